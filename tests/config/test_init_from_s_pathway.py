"""``student.init_from`` of a flow-map (average_velocity) student from a velocity run: the shared tensors are
loaded, the new s-pathway starts at zero output, so F(x, t, s) = v(x, t) of the source at step 0; any other
mismatch is still the one-line shape error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fewstep.cli import main
from fewstep.config.build import build_method, load_run_student
from fewstep.config.init_from import init_state
from fewstep.config.schema import load_config
from fewstep.core.flowmap import FlowMap
from fewstep.networks.dit import DiT
from fewstep.networks.unet import UNet

torch.set_num_threads(1)
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = ["device=cpu", "student.hidden=8", "student.depth=1", "student.emb_dim=4", "train.batch_size=32",
        "train.tensorboard=false", "train.progress=false", "eval.nfe=[]", "method.cfg.n_pairs=64",
        "method.cfg.pair_steps=4"]
AV = ["student.parameterization=average_velocity"]


@pytest.fixture(scope="module")
def velocity_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step reflow run of ring8: a velocity MLP student (no s input)."""
    run = tmp_path_factory.mktemp("v") / "r"
    assert main(["distill", "--config", str(CONFIGS / "reflow.yaml"), "train.steps=3", "train.ema_decays=[0.5]",
                 *TINY, "--run-dir", str(run)]) == 0
    return run


def _same_velocity(student: FlowMap, teacher: FlowMap, x: torch.Tensor) -> None:
    """F(x, t, s) of ``student`` equals the velocity of ``teacher`` for random t and s <= t."""
    g = torch.Generator().manual_seed(1)
    t = torch.rand(x.shape[0], generator=g)
    s = t * torch.rand(x.shape[0], generator=g)
    with torch.no_grad():
        want = teacher.velocity(x, t)
        assert want.abs().max() > 1e-3  # not the trivial zero network
        torch.testing.assert_close(student.F(x, t, s), want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(student(x, t, s), x)  # the jump moves: f = x + (s - t) v


def test_mlp_average_velocity_student_starts_at_the_velocity(velocity_run: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(None, ["method.name=reflow", "data.name=ring8", *TINY, *AV,
                             f"student.init_from={velocity_run}"])
    method, _, _ = build_method(cfg)
    student, teacher = method.student, load_run_student(velocity_run)
    assert student.net.use_s and not teacher.net.use_s
    _same_velocity(student, teacher, torch.randn(64, 2, generator=torch.Generator().manual_seed(0)))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "new s-pathway, output zero at init: net.net.0.weight[:, h columns (zero)]" in err
    # the h columns are trainable: they get a gradient at step 0
    x = torch.randn(16, 2)
    t = torch.rand(16)
    student.F(x, t, 0.5 * t).square().sum().backward()
    cols = student.net.h_columns()
    assert student.net.net[0].weight.grad[:, cols].abs().sum() > 0


@pytest.mark.parametrize("cls,kw", [
    (UNet, dict(event_shape=(1, 8, 8), channels=8, channel_mult=(1, 2), emb_dim=8, heads=2)),
    (DiT, dict(event_shape=(1, 8, 8), patch_size=4, hidden=16, depth=1, heads=2, emb_dim=8)),
])
def test_image_backbones_start_at_the_velocity(cls: type, kw: dict, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    teacher = FlowMap(cls(**kw, use_s=False), "velocity")
    with torch.no_grad():  # a trained-looking teacher: the zero-initialised output layers would hide everything
        for p in teacher.parameters():
            p.normal_(0, 0.3)
    student = FlowMap(cls(**kw, use_s=True), "average_velocity")
    state, fresh = init_state(student, teacher.state_dict(), "student.init_from='t'")
    assert fresh and all("h_mlp" in k for k in fresh) and sum("(zero)" in k for k in fresh) == 2
    student.load_state_dict(state)
    _same_velocity(student, teacher, torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("extra,needle", [
    (["student.hidden=16"], "its student does not match this one: 'net.net.0.bias' is (8,) there, (16,) here"),
    (["student.raw_time=true"], "'net.net.0.weight' is (8, 6) there, (8, 12) here"),
    # the frequencies are not saved: without the check the weights would load and run on other time features
    (["student.max_freq=2.0"], "fixed buffer 'net.t_emb.freqs' differs from the run's"),
    (["student.min_freq=0.25"], "fixed buffer 'net.t_emb.freqs' differs from the run's"),
])
def test_other_mismatches_are_one_line(velocity_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       extra: list[str], needle: str) -> None:
    assert main(["distill", "--method", "reflow", *TINY, *AV, "train.steps=1", *extra,
                 f"student.init_from={velocity_run}", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fewstep: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, err


def test_unet_raw_time_is_not_the_s_pathway() -> None:
    kw = dict(event_shape=(1, 8, 8), channels=8, channel_mult=(1, 2), emb_dim=8, heads=2)
    src = FlowMap(UNet(**kw, use_s=False), "velocity").state_dict()
    student = FlowMap(UNet(**kw, use_s=True, raw_time=True), "average_velocity")
    with pytest.raises(ValueError, match=r"^student.init_from='t': its student does not match this one: "
                                         r"'net.cond.t_mlp.0.weight' is \(32, 8\) there, \(32, 9\) here"):
        init_state(student, src, "student.init_from='t'")
