"""Atomic file writes: the one writer used by checkpoints and reflow pair caches.

A file is written to a hidden temporary file in the same folder (``.<name>.tmp-<pid>``), flushed and
``fsync``-ed, then moved over the target with ``os.replace`` (atomic on POSIX and Windows within one file
system), and the folder is ``fsync``-ed so the rename itself is durable. A reader therefore sees either the
old content or the complete new content, never a truncated file; if writing fails the temporary file is
removed and the old content is left untouched.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "fsync_dir", "git_commit"]


def fsync_dir(path: str | Path) -> None:
    """``fsync`` a folder so that renames inside it are durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Create or replace ``path`` atomically with whatever ``write(tmp_path)`` writes to a temporary path.

    Args:
        path: The target file.
        write: Writes the complete new content to the path it is given (e.g. a safetensors ``save_file``).

    Raises:
        Exception: whatever ``write`` raises; the temporary file is removed first and ``path`` keeps its old
            content.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write_bytes(path, text.encode(encoding))


def git_commit(path: str | Path | None = None, short: bool = False) -> str:
    """The git commit of fewstep's source tree (HEAD), or the last commit that changed ``path``; "" outside git.

    Args:
        path: A file whose last changing commit is wanted (None: HEAD).
        short: Abbreviated hash instead of the full 40 hex digits.

    Returns:
        The hash, or "" when git or the checkout is missing.
    """
    import subprocess

    cmd = ["git", "log", "-1", f"--format={'%h' if short else '%H'}"]
    if path is not None:
        cmd += ["--", str(Path(path).resolve())]
    try:
        out = subprocess.run(cmd, cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""
