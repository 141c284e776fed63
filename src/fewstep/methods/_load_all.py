"""Imports every method module so that each registers itself. Adding a method = one line here."""

from . import flow_matching  # noqa: F401
from . import dmd  # noqa: F401
from . import ddmd  # noqa: F401
from . import cdm  # noqa: F401
from . import reflow  # noqa: F401
from . import perflow  # noqa: F401
