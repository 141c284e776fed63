"""Training methods: one file per method holding its loss, registered by name (:mod:`fewstep.methods.registry`).

Adding a method = one file with a ``@register``-ed :class:`~fewstep.methods.base.Method` and one line below.
Shared machinery (flow-map training base, reflow pairs and the marginal-alignment term, the distribution-matching
base, EMA targets) lives in :mod:`fewstep.methods._shared`.
"""

from fewstep.methods.base import Batch, Method, MethodConfig
from fewstep.methods.registry import METHODS, get_method, list_methods, register

# one import per method module; importing registers it
from fewstep.methods import flow_matching  # noqa: E402,F401
from fewstep.methods import consistency  # noqa: E402,F401
from fewstep.methods import dmd  # noqa: E402,F401
from fewstep.methods import dmd2  # noqa: E402,F401
from fewstep.methods import ddmd  # noqa: E402,F401
from fewstep.methods import cdm  # noqa: E402,F401
from fewstep.methods import reflow  # noqa: E402,F401
from fewstep.methods import meanflow  # noqa: E402,F401
from fewstep.methods import splitmeanflow  # noqa: E402,F401
from fewstep.methods import scm  # noqa: E402,F401
from fewstep.methods import facm  # noqa: E402,F401
from fewstep.methods import ayf  # noqa: E402,F401
from fewstep.methods import perflow  # noqa: E402,F401
from fewstep.methods import shortcut  # noqa: E402,F401
from fewstep.methods import imm  # noqa: E402,F401

__all__ = ["Batch", "Method", "MethodConfig", "METHODS", "get_method", "list_methods", "register"]
