"""Imports every method module so that each registers itself. Adding a method = one line here."""

from . import flow_matching  # noqa: F401
from . import consistency  # noqa: F401
from . import dmd  # noqa: F401
from . import ddmd  # noqa: F401
from . import cdm  # noqa: F401
from . import reflow  # noqa: F401
from . import meanflow  # noqa: F401
from . import splitmeanflow  # noqa: F401
from . import scm  # noqa: F401
from . import facm  # noqa: F401
from . import ayf  # noqa: F401
from . import perflow  # noqa: F401
from . import shortcut  # noqa: F401
from . import imm  # noqa: F401
