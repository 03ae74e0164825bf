"""Atomic file writes: a reader sees the old file or the whole new one, never a partial one (fsync, then rename)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a partial one."""
    atomic_write_lines(path, [text])


def atomic_write_lines(path: str | Path, pieces: Iterable[str]) -> None:
    """Like :func:`atomic_write_text`, for text produced piece by piece (memory stays one piece, not the file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its files are private (0600); a dataset on a shared cluster must keep the umask's mode.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            for piece in pieces:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.filename is None:  # a full disk, a quota: the write itself names no file
            raise OSError(err.errno, f"{err.strerror or err} while writing", str(path)) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
