"""Training methods: one file per method holding its loss, registered by name (:mod:`fewstep.methods.registry`).

Adding a method = one file with a ``@register``-ed :class:`~fewstep.methods.base.Method` and one line below.
Shared machinery (flow-map training base, reflow pairs and the marginal-alignment term, the distribution-matching
base, EMA targets) lives in :mod:`fewstep.methods._shared`.
"""

# one import per method module; importing registers it
from fewstep.methods import (
    ayf,  # noqa: E402,F401
    cdm,  # noqa: E402,F401
    consistency,  # noqa: E402,F401
    ddmd,  # noqa: E402,F401
    dmd,  # noqa: E402,F401
    dmd2,  # noqa: E402,F401
    facm,  # noqa: E402,F401
    flow_matching,  # noqa: E402,F401
    imm,  # noqa: E402,F401
    meanflow,  # noqa: E402,F401
    perflow,  # noqa: E402,F401
    reflow,  # noqa: E402,F401
    scm,  # noqa: E402,F401
    shortcut,  # noqa: E402,F401
    splitmeanflow,  # noqa: E402,F401
)
from fewstep.methods.base import Batch, Method, MethodConfig
from fewstep.methods.registry import METHODS, get_method, list_methods, register

__all__ = ["Batch", "Method", "MethodConfig", "METHODS", "get_method", "list_methods", "register"]
