"""Config loading: strict keys and types named by dotted path, overrides, round trip, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from fewstep.config.build import build_method
from fewstep.config.schema import RunConfig, TrainConfig, from_dict, load_config, save_config, to_dict

torch.set_num_threads(1)
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_and_overrides_parse_yaml_values() -> None:
    cfg = load_config(None, ["train.lr=1e-3", "train.steps=20", "train.ema_decays=[0.99,0.999]",
                             "method.cfg.norm_p=0.75", "teacher.conditional=true", "train.betas=[0.8, 0.9]"])
    assert isinstance(cfg, RunConfig)
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)  # "1e-3" is a str in YAML 1.1
    assert cfg.train.steps == 20 and cfg.train.ema_decays == [0.99, 0.999] and cfg.train.betas == [0.8, 0.9]
    assert cfg.method.cfg == {"norm_p": 0.75} and cfg.teacher.conditional is True
    assert load_config().train.ema_decays == [0.999]
    assert load_config(None, ["train.amp=off"]).train.amp == "off"  # YAML 1.1 reads off as False


@pytest.mark.parametrize("overrides,needle", [
    (["train.lrr=1"], "unknown config key 'train.lrr'"),
    (["trainn.lr=1"], "unknown config key 'trainn'"),
    (["train.steps=ten"], "config key 'train.steps' must be an int, got 'ten'"),
    (["train.steps=1.5"], "config key 'train.steps' must be an int"),
    (["train.ema_decays=0.9"], "config key 'train.ema_decays' must be a list"),
    (["train.ema_decays=[0.9, x]"], r"config key 'train.ema_decays\[1\]' must be a float"),
    (["teacher.conditional=3"], "config key 'teacher.conditional' must be a bool"),
    (["train.optimizer=sgd"], "invalid value for config key 'train.optimizer': 'sgd'"),
    (["train.lr_schedule=step"], "invalid value for config key 'train.lr_schedule'"),
    (["teacher.kind=zoo"], "invalid value for config key 'teacher.kind'"),
    (["train.batch_size=10", "train.grad_accum=3"], "must be divisible by train.grad_accum=3"),
    (["train"], "must look like section.key=value"),
])
def test_errors_name_the_key(overrides: list[str], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        load_config(None, overrides)


def test_yaml_file_unknown_section_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("train: {steps: 3}\nmodel: {hidden: 4}\n")
    with pytest.raises(ValueError, match="unknown config key 'model'"):
        load_config(p)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.steps=7", "method.name=meanflow", "method.cfg.norm_p=0.5",
                             "data.kwargs={conditional: true}"])
    save_config(cfg, tmp_path / "config.yaml")
    back = from_dict(RunConfig, yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert to_dict(back) == to_dict(cfg) and back.train.steps == 7 and back.data.kwargs == {"conditional": True}


def test_method_hyperparameters_directly_under_method_section(tmp_path: Path) -> None:
    p = tmp_path / "m.yaml"
    p.write_text("method: {name: flow_matching, cond_drop: 0.25}\n")
    cfg = load_config(p, ["method.time_sampler=logit_normal"])
    assert cfg.method.cfg == {"cond_drop": 0.25, "time_sampler": "logit_normal"}


def test_method_cfg_checked_against_method_dataclass() -> None:
    cfg = load_config(None, ["method.name=flow_matching", "data.name=ring8", "method.cfg.norm_pp=1",
                             "device=cpu"])
    with pytest.raises(ValueError, match="unknown config key 'method.cfg.norm_pp'"):
        build_method(cfg)
    cfg = load_config(None, ["method.name=flow_matching", "data.name=ring8", "method.cfg.cond_drop=high",
                             "device=cpu"])
    with pytest.raises(ValueError, match="config key 'method.cfg.cond_drop' must be a float"):
        build_method(cfg)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        build_method(load_config(None, ["method.name=nope", "device=cpu"]))


def test_build_method_from_config() -> None:
    cfg = load_config(None, ["method.name=flow_matching", "data.name=ring8", "student.hidden=8",
                             "student.depth=1", "device=cpu", "method.cfg.cond_drop=0.0"])
    method, dataset, teacher = build_method(cfg)
    assert teacher is None and method.student.parameterization == "velocity"
    assert method.config.cond_drop == 0.0 and tuple(dataset.event_shape) == (2,)
    assert method.student.net.net[0].out_features == 8


def test_train_config_direct_validation() -> None:
    assert TrainConfig(steps=5).steps == 5
    with pytest.raises(ValueError, match="train.betas"):
        TrainConfig(betas=[0.9])
    with pytest.raises(ValueError, match="train.ema_decays"):
        TrainConfig(ema_decays=[1.5])


def test_shipped_configs_load_and_build() -> None:
    files = sorted(CONFIGS.glob("*.yaml"))
    assert any(f.name == "teacher_ring8.yaml" for f in files) and any(f.name == "teacher_digits.yaml" for f in files)
    for f in files:
        cfg = load_config(f, ["device=cpu"])
        if cfg.teacher.kind == "run":
            continue  # needs a trained teacher folder
        method, dataset, _ = build_method(cfg)
        assert method.name == cfg.method.name, f.name
        assert cfg.train.steps >= 1, f.name


def test_teacher_guidance_goes_to_method_or_wrapper() -> None:
    from fewstep.teachers.guided import GuidedTeacher
    from fewstep.teachers.presets import load_preset

    cfg = load_config(None, ["method.name=reflow", "teacher.conditional=true", "teacher.guidance=2.5",
                             "device=cpu", "student.hidden=8", "student.depth=1"])
    method, _, teacher = build_method(cfg)
    assert method.config.guidance == 2.5 and not isinstance(teacher, GuidedTeacher)
    with pytest.raises(ValueError, match="conflicts with method.cfg.guidance"):
        build_method(load_config(None, ["method.name=reflow", "teacher.conditional=true", "teacher.guidance=2.5",
                                        "method.cfg.guidance=1.5", "device=cpu"]))
    # w = 1 reaches the method too: CDM / decoupled DMD default to 3 and must not keep it under an unguided teacher
    small = ["teacher.conditional=true", "device=cpu", "student.hidden=8", "student.depth=1"]
    for name in ("cdm", "ddmd"):
        assert build_method(load_config(None, [f"method.name={name}", *small]))[0].config.guidance == 1.0
        assert build_method(load_config(None, [f"method.name={name}", "teacher.guidance=3.0", *small]))[
            0].config.guidance == 3.0
        assert build_method(load_config(None, [f"method.name={name}", "method.cfg.guidance=2.0", *small]))[
            0].config.guidance == 2.0
    base = load_preset("ring8", conditional=True)
    g = GuidedTeacher(base, 2.5)
    x, t, c = torch.randn(6, 2), torch.full((6,), 0.4), torch.tensor([0, 1, 2, 3, -1, 0])
    assert torch.allclose(g.velocity(x, t, c), base.velocity(x, t, c, guidance=2.5), atol=1e-6)
    assert not torch.allclose(g.velocity(x, t, c), base.velocity(x, t, c), atol=1e-3)
    assert g.num_classes == 4 and g.event_shape == (2,)


@pytest.mark.parametrize("conditional", [False, True])
def test_teacher_data_follow_the_teacher_section(conditional: bool) -> None:
    """data.name=teacher has labels iff teacher.conditional, also for the digits preset (whose mixture always
    carries its 10 classes): an unconditional run must not build a class-conditional student."""
    flag = str(conditional).lower()
    cfg = load_config(None, ["teacher.name=digits", f"teacher.conditional={flag}", "method.name=ct",
                             "student.hidden=16", "student.depth=1"])
    method, dataset, _ = build_method(cfg, "cpu")
    want = 10 if conditional else None
    assert dataset.num_classes == want
    assert getattr(method.student.net, "num_classes", None) == want
    # an explicit data.kwargs.conditional still wins
    cfg = load_config(None, ["teacher.name=digits", f"teacher.conditional={flag}", "method.name=ct",
                             f"data.kwargs={{conditional: {str(not conditional).lower()}}}"])
    assert build_method(cfg, "cpu")[1].num_classes == (None if conditional else 10)
