"""Crash-safe, resumable storage for long jobs: one shard per unit of work, committed atomically.

A job (labeling, search) is cut into numbered chunks that do not depend on the number of ranks. Each finished
chunk is written to a temporary file, flushed to disk and renamed into place, so a shard either exists whole or
not at all: a run killed at any moment (``kill -9`` included) resumes by skipping the chunks whose shard exists,
and ends with exactly the records an uninterrupted run writes — none lost, none duplicated.

A fingerprint of the job's settings is stored beside the shards; resuming with different settings is refused
instead of silently mixing two datasets.

Integrity: every shard ``chunk-000007.jsonl`` has an integrity record ``chunk-000007.meta.json`` beside it, written
after the shard: the job's fingerprint, the chunk number, the record count, the byte size and the SHA-256 of the
shard. A shard counts as done only when its record matches: a 0-byte or truncated shard, one whose record is
missing (a writer killed between the two files, a shard written by an older pavlit) or one copied from another
job's folder is **redone, not trusted** — set aside as ``chunk-000007.jsonl.rejected`` with a warning, so that no
reader of the folder sees it either.

The folder's lock (one writer at a time) is :mod:`pavlit.jobs.lock`; the atomic write is :mod:`pavlit.jobs.atomic`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pavlit.jobs.atomic import atomic_write_text
from pavlit.jobs.jsonl import json_objects
from pavlit.jobs.lock import check_unlocked
from pavlit.jobs.settings import fingerprint

log = logging.getLogger(__name__)

SHARD_GLOB = "chunk-*.jsonl"
FINGERPRINT_FILE = "job.json"
META_SUFFIX = ".meta.json"
REJECTED_SUFFIX = ".rejected"


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
        self._verified: set[int] = set()
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

    def meta_path(self, chunk: int) -> Path:
        """The shard's integrity record (fingerprint, record count, size, SHA-256)."""
        return self.root / f"chunk-{chunk:06d}{META_SUFFIX}"

    def is_done(self, chunk: int) -> bool:
        """Whether ``chunk`` has a committed shard that passes its integrity check.

        A shard that exists but fails it is set aside (``*.jsonl.rejected``, with a warning) so the chunk is redone.
        """
        if chunk in self._verified:
            return True
        if not self.shard_path(chunk).exists():
            return False
        problem = self.check(chunk)
        if problem is not None:
            self._reject(chunk, problem)
            return False
        self._verified.add(chunk)
        return True

    def check(self, chunk: int) -> str | None:
        """Why the shard of ``chunk`` cannot be trusted, or ``None`` when it passes (see the module docstring)."""
        return check_shard(self.shard_path(chunk), self.fingerprint, chunk)

    def _reject(self, chunk: int, problem: str) -> None:
        path = self.shard_path(chunk)
        aside = path.with_name(path.name + REJECTED_SUFFIX)
        log.warning("%s: not trusted, redoing the chunk: %s (set aside as %s)", path, problem, aside.name)
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            pass  # another rank set it aside first
        self.meta_path(chunk).unlink(missing_ok=True)

    def done_chunks(self) -> set[int]:
        """The chunks whose shard passes its integrity check (failing ones are set aside)."""
        return {chunk for chunk in self._committed() if self.is_done(chunk)}

    def _committed(self) -> list[int]:
        chunks = []
        for path in sorted(self.root.glob(SHARD_GLOB)):
            number = path.stem.split("-", 1)[1]
            if number.isdigit():
                chunks.append(int(number))
        return chunks

    def commit(self, chunk: int, records: Iterable[Mapping[str, Any]]) -> Path:
        """Write the records of ``chunk`` as one shard, atomically, then its integrity record."""
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
        text = "".join(lines)
        data = text.encode("utf-8")
        path = self.shard_path(chunk)
        self._verified.discard(chunk)
        atomic_write_text(path, text)
        meta = {
            "fingerprint": self.fingerprint,
            "chunk": chunk,
            "records": len(lines),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        atomic_write_text(self.meta_path(chunk), json.dumps(meta) + "\n")
        self._verified.add(chunk)
        return path

    def records(self) -> Iterator[dict[str, Any]]:
        """Every committed record, in chunk order (temporary files of a killed writer are never read)."""
        for shard in self.shards():
            yield from shard

    def shards(self) -> Iterator[Iterator[dict[str, Any]]]:
        """The committed shards that pass their integrity check, in chunk order, each as an iterator over its records.

        A shard that fails the check is set aside with a warning and left out.
        """
        for chunk in self._committed():
            if self.is_done(chunk):
                yield _read_shard(self.shard_path(chunk))


def check_shard(path: Path, fingerprint: str | None, chunk: int | None = None) -> str | None:
    """Why the shard at ``path`` cannot be trusted, or ``None`` when it matches its integrity record.

    Args:
        path: A ``chunk-*.jsonl`` shard.
        fingerprint: The job's fingerprint the record must carry (``None``: any).
        chunk: The chunk number the record must carry (``None``: the one in the file name).
    """
    meta_path = path.with_name(path.name.removesuffix(".jsonl") + META_SUFFIX)
    if chunk is None:
        number = path.stem.split("-", 1)[-1]
        chunk = int(number) if number.isdigit() else None
    try:
        data = path.read_bytes()
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"it has no integrity record {meta_path.name} (an interrupted commit, or an older pavlit wrote it)"
    except (OSError, ValueError) as err:
        return f"its integrity record {meta_path.name} is unreadable ({err})"
    if not isinstance(meta, dict):
        return f"its integrity record {meta_path.name} is not a JSON object"
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        return f"it was written by a job with other settings (fingerprint {meta.get('fingerprint')!r})"
    if meta.get("chunk") != chunk:
        return f"its integrity record is for chunk {meta.get('chunk')!r}"
    if meta.get("bytes") != len(data) or meta.get("sha256") != hashlib.sha256(data).hexdigest():
        return f"its content does not match its integrity record ({len(data)} bytes, {meta.get('bytes')} recorded)"
    n_records = sum(1 for line in data.splitlines() if line.strip())
    if meta.get("records") != n_records:
        return f"it holds {n_records} records, {meta.get('records')} recorded"
    return None


def check_job_folder(folder: str | Path) -> None:
    """For a reader of a finished job's folder (``pavlit fit`` on ``pavlit label`` output): refuse what it can't trust.

    A folder another live job is still writing (its lock) and a shard that fails its integrity record are refused,
    naming them. A folder without any integrity record (written by a pavlit before they existed) is read as is.

    Raises:
        ValueError: Naming the folder or shard, and what to do.
    """
    root = Path(folder)
    shards = sorted(root.glob(SHARD_GLOB))
    if not shards:
        return
    check_unlocked(root)
    if not any(root.glob(f"chunk-*{META_SUFFIX}")):
        return  # written before integrity records existed
    fingerprint = None
    try:
        fingerprint = json.loads((root / FINGERPRINT_FILE).read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        pass
    for path in shards:
        problem = check_shard(path, fingerprint)
        if problem is not None:
            raise ValueError(
                f"{path}: not trusted: {problem}; rerun the job that wrote {root} (it redoes such shards), or delete "
                "the shard and its .meta.json to leave its chunk out"
            )


def _read_shard(path: Path) -> Iterator[dict[str, Any]]:
    for _where, record in json_objects(path, invalid="corrupt shard ({msg})", not_object=None):
        yield record


def chunks_for_rank(n_chunks: int, rank: int, world_size: int) -> list[int]:
    """The chunks one rank owns: round-robin, so ranks finish at about the same time."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    return list(range(rank, n_chunks, world_size))
