"""Crash-safe, resumable storage for long jobs: one shard per unit of work, committed atomically.

A job (labeling, search) is cut into numbered chunks that do not depend on the number of ranks. Each finished
chunk is written to a temporary file, flushed to disk and renamed into place, so a shard either exists whole or
not at all: a run killed at any moment (``kill -9`` included) resumes by skipping the chunks whose shard exists,
and ends with exactly the records an uninterrupted run writes — none lost, none duplicated.

A fingerprint of the job's settings is stored beside the shards; resuming with different settings is refused
instead of silently mixing two datasets.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

SHARD_GLOB = "chunk-*.jsonl"
FINGERPRINT_FILE = "job.json"


def fingerprint(settings: Mapping[str, Any]) -> str:
    """A stable hash of JSON-serialisable job settings."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class ShardStore:
    """A folder of atomically committed JSONL shards, one per chunk of work.

    Args:
        root: The folder (created if missing).
        settings: The job's settings; their fingerprint must match the one already stored in ``root``.
    """

    def __init__(self, root: str | Path, settings: Mapping[str, Any]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.settings = dict(settings)
        self.fingerprint = fingerprint(self.settings)
        self._check_fingerprint()

    def _check_fingerprint(self) -> None:
        path = self.root / FINGERPRINT_FILE
        if path.exists():
            try:
                stored = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}: not valid JSON ({err.msg}); this file records which settings made the shards beside it "
                    "— delete the folder to start over, or restore the file"
                ) from None
            if not isinstance(stored, dict):
                raise ValueError(f"{path}: expected a JSON object with 'fingerprint' and 'settings'")
            if stored.get("fingerprint") != self.fingerprint:
                changed = sorted(
                    k
                    for k in set(stored.get("settings", {})) | set(self.settings)
                    if json.dumps(stored.get("settings", {}).get(k), default=str, sort_keys=True)
                    != json.dumps(self.settings.get(k), default=str, sort_keys=True)
                )
                raise ValueError(
                    f"{self.root} holds shards of a job with other settings (changed: {', '.join(changed) or '?'}); "
                    "use a new output folder, or delete this one to start over"
                )
        else:
            # Several ranks may race here; they write identical content, and the write is atomic.
            atomic_write_text(path, json.dumps({"fingerprint": self.fingerprint, "settings": self.settings}, indent=2))

    def shard_path(self, chunk: int) -> Path:
        return self.root / f"chunk-{chunk:06d}.jsonl"

    def is_done(self, chunk: int) -> bool:
        return self.shard_path(chunk).exists()

    def done_chunks(self) -> set[int]:
        return {int(p.stem.split("-")[1]) for p in self.root.glob(SHARD_GLOB)}

    def commit(self, chunk: int, records: Iterable[Mapping[str, Any]]) -> Path:
        """Write the records of ``chunk`` as one shard, atomically."""
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        path = self.shard_path(chunk)
        atomic_write_text(path, text)
        return path

    def records(self) -> Iterator[dict[str, Any]]:
        """Every committed record, in chunk order (temporary files of a killed writer are never read)."""
        for shard in self.shards():
            yield from shard

    def shards(self) -> Iterator[Iterator[dict[str, Any]]]:
        """The committed shards in chunk order, each as an iterator over its records (one chunk's work)."""
        for path in sorted(self.root.glob(SHARD_GLOB)):
            yield _read_shard(path)


def _read_shard(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: corrupt shard ({err.msg})") from None


def chunks_for_rank(n_chunks: int, rank: int, world_size: int) -> list[int]:
    """The chunks one rank owns: round-robin, so ranks finish at about the same time."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    return list(range(rank, n_chunks, world_size))
