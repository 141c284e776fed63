r"""Thin adapters that let the peers (rectified-flow-pytorch, torchcfm) train fewstep's MLP on fewstep's teachers.

fewstep's time runs from data (t = 0) to noise (t = 1). rectified-flow-pytorch's RectifiedFlow / Reflow and
torchcfm use :math:`\tau = 1 - t` (noise to data) with velocity :math:`dx/d\tau = -v(x, t)`, so a fewstep velocity
net F is seen as :math:`v_{peer}(x, \tau) = -F(x, 1-\tau)`. rectified-flow-pytorch's MeanFlow shares fewstep's
convention and calls ``model(x, t, delta)`` with :math:`\delta = t - r`: :math:`u_{peer} = F(x, t, t-\delta)`.
Used by :mod:`fewstep.benchmarks.peers`; needs the ``peers`` extra.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.teachers.gmm import GaussianMixtureTeacher

__all__ = ["load_rectified_flow_pytorch", "VelocityAdapter", "TeacherAdapter", "MeanFlowAdapter", "peer_loss"]


def load_rectified_flow_pytorch() -> types.ModuleType:
    """Import rectified_flow_pytorch; where torchvision is missing or broken (CPU torch), stub the three names it
    imports at module level (``utils.save_image``, ``models.VGG16_Weights``, ``transforms``), unused here.

    Returns:
        The imported ``rectified_flow_pytorch`` package.

    Raises:
        ImportError: if rectified_flow_pytorch itself is not installed.
    """
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError):
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
        tv = types.ModuleType("torchvision")
        for sub in ("utils", "models", "transforms"):
            setattr(tv, sub, types.ModuleType(f"torchvision.{sub}"))
            sys.modules[f"torchvision.{sub}"] = getattr(tv, sub)

        def save_image(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("torchvision is not importable; rectified_flow_pytorch's image saving is unavailable")

        tv.utils.save_image = save_image  # type: ignore[attr-defined]
        tv.models.VGG16_Weights = types.SimpleNamespace(DEFAULT=None)  # type: ignore[attr-defined]
        sys.modules["torchvision"] = tv
    import rectified_flow_pytorch

    return rectified_flow_pytorch


class VelocityAdapter(nn.Module):
    r"""A fewstep velocity net seen in the peers' noise-to-data time: :math:`v_{peer}(x,\tau) = -F(x, 1-\tau)`."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, times: Tensor) -> Tensor:
        """Peer velocity at peer time ``times`` (shape (batch,) or scalar)."""
        t = 1.0 - times.reshape(-1).expand(x.shape[0]).to(x.dtype)
        return -self.net(x, t, t)


class TeacherAdapter(nn.Module):
    r"""The exact teacher in the peers' time: :math:`v_{peer}(x,\tau) = -v_{teacher}(x, 1-\tau)` (a frozen model)."""

    def __init__(self, teacher: GaussianMixtureTeacher) -> None:
        super().__init__()
        self.teacher = teacher
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # the peer reads .device from a parameter

    def forward(self, x: Tensor, times: Tensor) -> Tensor:
        """Teacher velocity at peer time ``times``."""
        return -self.teacher.velocity(x, 1.0 - times.reshape(-1).expand(x.shape[0]).to(x.dtype))


class MeanFlowAdapter(nn.Module):
    r"""A fewstep average-velocity net called as the peer's ``model(x, t, delta)``: :math:`u = F(x, t, t-\delta)`."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, times: Tensor, delta: Tensor) -> Tensor:
        """Average velocity over [t - delta, t]."""
        return self.net(x, times, times - delta)


def peer_loss(
    name: str, net: nn.Module, teacher: GaussianMixtureTeacher, batch: int, gen: torch.Generator
) -> Callable[[], Tensor]:
    """The peer's own training loss on a fresh batch (exact teacher samples / teacher pairs), as a closure."""
    dim = teacher.dim

    def data() -> Tensor:
        return teacher.sample(batch, generator=gen).float()

    if name == "cfm_otcfm":
        from torchcfm.conditional_flow_matching import ExactOptimalTransportConditionalFlowMatcher

        fm, model = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0), VelocityAdapter(net)

        def cfm() -> Tensor:  # x0: noise (tau = 0), x1: data (tau = 1)
            tau, xt, ut = fm.sample_location_and_conditional_flow(torch.randn(batch, dim), data())
            return ((model(xt, tau) - ut) ** 2).mean()

        return cfm
    rfp = load_rectified_flow_pytorch()
    if name == "rfp_meanflow":
        mf = rfp.MeanFlow(MeanFlowAdapter(net), data_shape=(dim,))
        return lambda: mf(data())
    if name == "rfp_reflow":
        kw = {"data_shape": (dim,), "data_normalize_fn": None, "data_unnormalize_fn": None}
        frozen = rfp.RectifiedFlow(TeacherAdapter(teacher), **kw)
        reflow = rfp.Reflow(rfp.RectifiedFlow(VelocityAdapter(net), **kw), frozen_model=frozen, batch_size=batch)
        reflow.device = torch.device("cpu")  # Reflow.forward reads self.device, defined as a method in 0.14.0
        return reflow
    raise ValueError(f"unknown peer {name!r}; expected cfm_otcfm, rfp_meanflow or rfp_reflow")
