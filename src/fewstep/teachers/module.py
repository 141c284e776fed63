r"""Wrap any trained network as a teacher: prediction (velocity / x0 / noise / score) -> velocity.

The network is called as ``net(x, t, cond)`` or, with ``takes_s``, ``net(x, t, s, cond)`` with s = t (a
velocity network evaluated on the diagonal). Its output p of type ``prediction`` on the path
:math:`x_t = \alpha x_0 + \sigma x_1` is turned into a velocity by the exact affine conversions of
:mod:`fewstep.core.paths` (:math:`\Delta = \alpha\dot\sigma - \dot\alpha\sigma`):

.. math::
    v = \dot\alpha\hat x_0 + \dot\sigma\frac{x - \alpha\hat x_0}{\sigma},\qquad
    v = \dot\alpha\frac{x - \sigma\hat x_1}{\alpha} + \dot\sigma\hat x_1,\qquad
    \hat x_1 = -\sigma\,\nabla\log p_t .

x0-predictions are singular at t=0 (division by sigma) and noise/score predictions at t=1 (division by
alpha), so for those three the time is clamped to :math:`[t_\epsilon, 1 - t_\epsilon]` (default
:math:`t_\epsilon = 10^{-4}`) before the network is called and the conversion is applied. Velocity
predictions are used at the exact t. Guidance is :meth:`Teacher.velocity`'s :math:`v_u + w(v_c - v_u)`,
where the unconditional branch calls the network with the null label -1.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fewstep.core.paths import PREDICTION_TYPES, AffinePath, get_path
from fewstep.teachers.base import Teacher

__all__ = ["ModuleTeacher"]


def _has_s_argument(net: nn.Module) -> bool:
    """True when ``net.forward`` has a parameter named ``s`` (the flow-map backbone signature)."""
    try:
        return "s" in inspect.signature(net.forward).parameters
    except (TypeError, ValueError):
        return False


class ModuleTeacher(Teacher):
    """A teacher defined by a network's prediction on an affine path.

    Args:
        net: The network, ``net(x, t, cond)`` or ``net(x, t, s, cond)`` with t, s of shape (batch,).
        prediction: What the network predicts: ``velocity``, ``x0``, ``noise`` or ``score``.
        path: The path the network was trained on (name or :class:`AffinePath`).
        event_shape: Shape of one sample (default: ``net.event_shape`` if the network has one).
        num_classes: Number of classes of a conditional network (default: ``net.num_classes`` or None).
        takes_s: Whether the network takes a second time s (called with s = t). Default: detected from a
            parameter named ``s`` in ``net.forward`` (True for :class:`fewstep.networks.mlp.MLP`).
        t_eps: Clamp margin for the singular x0 / noise / score conversions, in (0, 0.5).

    Raises:
        ValueError: for an unknown prediction type, a missing event shape or a bad ``t_eps``.
    """

    def __init__(self, net: nn.Module, prediction: str = "velocity", path: str | AffinePath = "linear",
                 event_shape: Sequence[int] | None = None, num_classes: int | None = None,
                 takes_s: bool | None = None, t_eps: float = 1e-4) -> None:
        super().__init__()
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTION_TYPES}")
        if not 0.0 < t_eps < 0.5:
            raise ValueError(f"t_eps must lie in (0, 0.5), got {t_eps}")
        if event_shape is None:
            event_shape = getattr(net, "event_shape", None)
            if event_shape is None:
                raise ValueError("event_shape is required: the network has no 'event_shape' attribute")
        if num_classes is None:
            num_classes = getattr(net, "num_classes", None) or None
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes}")
        self.net = net
        self.prediction = prediction
        self.path = get_path(path)
        self.event_shape = tuple(int(s) for s in event_shape)
        self.num_classes = num_classes
        self.takes_s = _has_s_argument(net) if takes_s is None else bool(takes_s)
        self.t_eps = t_eps

    @classmethod
    def from_flowmap(cls, flowmap: nn.Module, event_shape: Sequence[int] | None = None,
                     num_classes: int | None = None) -> ModuleTeacher:
        r"""Teacher whose velocity is a flow map's instantaneous velocity :math:`F_\theta(x, t, t')`.

        Meant for a velocity-parameterized FlowMap trained by flow matching (any object with
        ``velocity(x, t, cond)`` works; its network supplies event_shape / num_classes when not given).
        """
        if not callable(getattr(flowmap, "velocity", None)):
            raise ValueError(f"from_flowmap needs an object with a velocity(x, t, cond) method, got "
                             f"{type(flowmap).__name__}")
        inner = getattr(flowmap, "net", flowmap)
        event_shape = event_shape if event_shape is not None else getattr(inner, "event_shape", None)
        num_classes = num_classes if num_classes is not None else getattr(inner, "num_classes", None)
        return cls(_FlowMapVelocity(flowmap), "velocity", "linear", event_shape, num_classes, takes_s=False)

    def _labels(self, x: Tensor, cond: Tensor | None) -> Tensor | None:
        """Labels passed to the network: None for an unconditional net, else cond with None -> all -1."""
        if self.num_classes is None:
            return None
        if cond is None:
            return torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        return cond

    def raw(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """The network's raw prediction at (x, t) (no conversion, no clamping)."""
        c = self._labels(x, cond)
        out = self.net(x, t, t, c) if self.takes_s else self.net(x, t, c)
        if out.shape != x.shape:
            raise ValueError(f"the network returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
        return out

    def _velocity(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """v(x, t | c) = convert(net(x, t_c, c), prediction -> velocity) with t_c the clamped time."""
        if self.prediction == "velocity":
            return self.raw(x, t, cond)
        tc = t.clamp(self.t_eps, 1.0 - self.t_eps)
        return self.path.convert(self.raw(x, tc, cond), x, tc, self.prediction, "velocity")

    def extra_repr(self) -> str:
        return (f"prediction={self.prediction}, path={self.path.name}, event_shape={self.event_shape}, "
                f"num_classes={self.num_classes}, takes_s={self.takes_s}")


class _FlowMapVelocity(nn.Module):
    """Adapter: ``forward(x, t, cond) = flowmap.velocity(x, t, cond)``."""

    def __init__(self, flowmap: nn.Module) -> None:
        super().__init__()
        self.flowmap = flowmap

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.flowmap.velocity(x, t, cond)
