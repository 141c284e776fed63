"""The one atomic writer: complete new content or untouched old content, never a stray temporary file."""

from __future__ import annotations

from pathlib import Path

import pytest

from fewstep.core.io import atomic_write, atomic_write_bytes, atomic_write_text


def test_writes_and_replaces_without_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write_text(target, '{"a": 1}')
    assert target.read_text() == '{"a": 1}'
    atomic_write_bytes(target, b"\x00\x01new")
    assert target.read_bytes() == b"\x00\x01new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_failure_keeps_old_content_and_removes_temp(tmp_path: Path) -> None:
    target = tmp_path / "tensors.safetensors"
    atomic_write_bytes(target, b"old")

    def half_write(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_write)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["tensors.safetensors"]


def test_writer_gets_a_hidden_temp_in_the_same_folder(tmp_path: Path) -> None:
    seen: list[Path] = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        assert not (tmp_path / "out.txt").exists()  # the target appears only at the rename
        tmp.write_text("done")

    atomic_write(tmp_path / "out.txt", write)
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".out.txt.tmp")
    assert (tmp_path / "out.txt").read_text() == "done" and not seen[0].exists()
