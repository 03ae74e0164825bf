"""Moved to :mod:`pavlit.jobs` (shards, atomic writes, the output lock, settings fingerprints); this module keeps the
old import path working for code written against it."""

from pavlit.jobs.atomic import atomic_write_lines, atomic_write_text
from pavlit.jobs.lock import LOCK_FILE, check_unlocked, output_lock
from pavlit.jobs.settings import describe, fingerprint
from pavlit.jobs.shards import (
    FINGERPRINT_FILE,
    META_SUFFIX,
    REJECTED_SUFFIX,
    SHARD_GLOB,
    ShardStore,
    check_job_folder,
    check_shard,
    chunks_for_rank,
)

__all__ = [
    "FINGERPRINT_FILE",
    "LOCK_FILE",
    "META_SUFFIX",
    "REJECTED_SUFFIX",
    "SHARD_GLOB",
    "ShardStore",
    "atomic_write_lines",
    "atomic_write_text",
    "check_job_folder",
    "check_shard",
    "check_unlocked",
    "chunks_for_rank",
    "describe",
    "fingerprint",
    "output_lock",
]
