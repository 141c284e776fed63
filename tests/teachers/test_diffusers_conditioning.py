"""Condition tables (precomputed embeddings as safetensors shards), label datasets, bf16 teachers, VAE decoding."""

from __future__ import annotations

import copy

import pytest
import torch

from _diffusers_fixtures import save_sd3_folder, save_unet_folder
from fewstep.integrations.diffusers import ConditionTable, DiffusersTeacher, save_condition_table
from fewstep.integrations.diffusers.conditioning import ConditionDataset, Conditioner
from fewstep.integrations.diffusers.student import student_from_teacher


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def test_table_round_trip_shards_null_rows_and_nested_names(tmp_path):
    g = torch.Generator().manual_seed(0)
    rows = {"encoder_hidden_states": torch.randn(5, 3, 4, generator=g), "added_cond_kwargs.text_embeds":
            torch.randn(5, 2, generator=g), "encoder_attention_mask": torch.ones(5, 3, dtype=torch.long)}
    null = {"encoder_hidden_states": torch.zeros(1, 3, 4), "added_cond_kwargs.text_embeds": torch.full((1, 2), 7.0),
            "encoder_attention_mask": torch.zeros(1, 3, dtype=torch.long)}
    folder = save_condition_table(tmp_path / "c", rows, null, latents=torch.randn(5, 2, 2, 2), shard_size=2)
    assert len(list(folder.glob("cond-*.safetensors"))) == 3
    table, latents = ConditionTable.load(folder)
    assert len(table) == 5 and latents.shape == (5, 2, 2, 2)
    kw = table.rows(torch.tensor([4, -1, 0]), torch.device("cpu"), torch.float64)
    assert kw["encoder_hidden_states"].dtype == torch.float64
    torch.testing.assert_close(kw["encoder_hidden_states"][0], rows["encoder_hidden_states"][4].double())
    assert bool((kw["encoder_hidden_states"][1] == 0).all())
    assert kw["added_cond_kwargs"]["text_embeds"][1].tolist() == [7.0, 7.0]
    assert kw["encoder_attention_mask"].dtype == torch.long and kw["encoder_attention_mask"][1].sum() == 0
    assert copy.deepcopy(table) is table  # EMA / fake-score copies share it
    ds = ConditionDataset(table, latents, (2, 2, 2))
    x0, ids = ds.sample(7, torch.Generator().manual_seed(1))
    assert ds.num_classes == 5 and ids.shape == (7,) and torch.equal(x0, latents[ids])


def test_table_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="share their leading size"):
        ConditionTable({"a": torch.zeros(2, 1), "b": torch.zeros(3, 1)})
    with pytest.raises(ValueError, match="null tensor 'a' has shape"):
        ConditionTable({"a": torch.zeros(2, 4)}, {"a": torch.zeros(1, 3)})
    t = ConditionTable({"a": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match="need a null embedding"):
        t.rows(torch.tensor([0, -1]), torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
        t.rows(torch.tensor([2]), torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="not a condition folder"):
        ConditionTable.load(tmp_path)
    with pytest.raises(ValueError, match="null class"):
        Conditioner("class", 3, None).kwargs(torch.tensor([0, -1]), 2, torch.device("cpu"), torch.float32)


def test_bf16_teacher_matches_float32_and_student_is_float32(tmp_path):
    folder, cond = save_sd3_folder(tmp_path)
    table = ConditionTable.load(cond)[0]
    t32, t16 = DiffusersTeacher.from_pretrained(folder), DiffusersTeacher.from_pretrained(folder, dtype="bfloat16")
    for t in (t32, t16):
        t.attach_conditioning(table)
    assert next(t16.model.parameters()).dtype == torch.bfloat16
    x, tt, c = torch.randn(2, 4, 8, 8), torch.tensor([0.7, 0.3]), torch.tensor([1, -1])
    with torch.no_grad():
        v32, v16 = t32.velocity(x, tt, c), t16.velocity(x, tt, c)
    assert v16.dtype == torch.float32
    assert float((v16 - v32).norm() / v32.norm()) < 0.05
    f = student_from_teacher(t16, "average_velocity")
    assert all(p.dtype == torch.float32 for p in f.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    teacher = DiffusersTeacher.from_pretrained(save_unet_folder(tmp_path))
    x, t, s = torch.randn(2, 3, 8, 8), torch.tensor([0.8, 0.4]), torch.tensor([0.2, 0.0])
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        f = student_from_teacher(teacher, "average_velocity", gradient_checkpointing=ckpt)
        f.F(x, t, s).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in f.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_vae_decode(tmp_path):
    folder, _ = save_sd3_folder(tmp_path, with_vae=True)
    teacher = DiffusersTeacher.from_pretrained(folder)
    img = teacher.decode(torch.randn(2, 4, 8, 8))
    assert img.shape == (2, 3, 8, 8) and bool(torch.isfinite(img).all())
    with pytest.raises(ValueError, match="has no VAE"):
        DiffusersTeacher.from_pretrained(folder, load_vae=False).decode(torch.randn(1, 4, 8, 8))


def test_teacher_latents_become_the_rows_data(tmp_path):
    from fewstep.integrations.diffusers.conditioning import add_teacher_latents
    from fewstep.sampling.samplers import solve

    folder, cond = save_sd3_folder(tmp_path)
    teacher = DiffusersTeacher.from_pretrained(folder)
    table = ConditionTable.load(cond)[0]
    teacher.attach_conditioning(table)
    add_teacher_latents(teacher, cond, steps=3, guidance=2.0, seed=1, batch_size=4)
    table2, latents = ConditionTable.load(cond)
    assert latents.shape == (6, 4, 8, 8) and (cond / "null.safetensors").is_file()
    torch.testing.assert_close(table2.tensors["encoder_hidden_states"], table.tensors["encoder_hidden_states"])
    x1 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = solve(teacher.velocity, x1[4:5], teacher.sampling_grid(3), cond=torch.tensor([4]), guidance=2.0).x
    torch.testing.assert_close(latents[4:5], ref, rtol=1e-5, atol=1e-5)
