"""sampling.image_grid: class-row grid samples; re-noising draws are independent of the starting noise."""

from __future__ import annotations

import torch

from fewstep.core.flowmap import FlowMap
from fewstep.networks.factory import build_network
from fewstep.sampling.image_grid import class_grid_samples
from fewstep.sampling.spec import SamplerSpec

torch.set_num_threads(1)


def _consistency_student() -> FlowMap:
    torch.manual_seed(0)
    net = build_network("unet", (1, 8, 8), num_classes=10, use_s=False, hidden=8, depth=1, emb_dim=8,
                        options={"channel_mult": [1, 2], "heads": 2})
    with torch.no_grad():
        for p in net.parameters():  # the zero-initialised output layer would make F = 0
            p.normal_(0.0, 0.2)
    return FlowMap(net, "consistency").eval()


def test_renoise_is_fresh_noise() -> None:
    r"""For a consistency student at 2 NFE, gamma = 0 gives 0.5 x0_hat + 0.5 x_1 and gamma = 1 gives
    0.5 x0_hat + 0.5 z: equal only if the re-noising z were the starting noise x_1 (same generator seed)."""
    student = _consistency_student()
    with torch.no_grad():
        det = class_grid_samples(student, SamplerSpec(gamma=0.0), [1, 2], num_classes=10, per_cell=1)
        sto = class_grid_samples(student, SamplerSpec(gamma=1.0), [1, 2], num_classes=10, per_cell=1)
    assert torch.equal(det["1 NFE"], sto["1 NFE"])  # one jump to data: no re-noising
    gap = (det["2 NFE"] - sto["2 NFE"]).abs().amax(dim=(1, 2, 3))
    assert bool((gap > 1e-3).all())
