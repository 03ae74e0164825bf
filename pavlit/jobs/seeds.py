"""The seed schedule of a chunked job: every sampling call is seeded from ``(seed, chunk, phase)`` alone.

So a chunk's records do not depend on which rank computes it, on the number of ranks, or on interruptions.
"""

from __future__ import annotations

import hashlib


def phase_seed(seed: int, chunk: int, phase: str) -> int:
    """A 63-bit seed for one sampling phase of one chunk, independent of ranks and restarts."""
    digest = hashlib.sha256(f"{seed}:{chunk}:{phase}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
