"""One job per output folder: :func:`output_lock` keeps two jobs from writing into one folder at once.

``<folder>/.pavlit.lock`` holds the pid and host of the job writing there; a second job is refused with "another
pavlit job is writing here (pid N)", and a lock whose process is gone (a job killed with ``kill -9``) is taken over
with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_FILE = ".pavlit.lock"


@contextmanager
def output_lock(folder: str | Path, command: str = "pavlit") -> Iterator[Path]:
    """Hold ``<folder>/.pavlit.lock`` while a job writes into ``folder``; refuse when another live job holds it.

    The lock is taken only by the job's first process (``LOCAL_RANK`` and ``NODE_RANK`` unset or 0); the ranks it
    launches write under its lock. A lock whose process is gone (same host, pid not running) is stale: it is taken
    over with a warning. A lock from another host cannot be checked and is refused, naming the file to delete.

    Raises:
        ValueError: Another pavlit job is writing into ``folder`` (the message names its pid and the lock file).
    """
    root = Path(folder)
    lock = root / LOCK_FILE
    if _launched_rank():
        yield lock
        return
    root.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    mine = json.dumps({"pid": os.getpid(), "host": host, "command": command}) + "\n"
    for _attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder.get("pid") == os.getpid() and holder.get("host") == host:
                raise ValueError(f"{root}: this process already runs a job writing here ({lock})") from None
            if _is_stale(lock, holder):
                pid = holder.get("pid")
                log.warning("%s: taking over a stale lock of pid %s, which is no longer running", lock, pid)
                lock.unlink(missing_ok=True)
                continue
            raise _locked_error(root, lock, holder) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(mine)
        break
    else:
        raise ValueError(f"{root}: could not take the lock {lock} (another job took it first)")
    try:
        yield lock
    finally:
        if _lock_holder(lock).get("pid") == os.getpid():
            lock.unlink(missing_ok=True)


def check_unlocked(folder: str | Path) -> None:
    """Raise the :func:`output_lock` error when another live job holds ``folder``'s lock (a stale lock passes).

    For what a job writes before it takes the lock (its resolved ``config.yaml``).
    """
    root = Path(folder)
    lock = root / LOCK_FILE
    if _launched_rank() or not lock.exists():
        return
    holder = _lock_holder(lock)
    if not _is_stale(lock, holder) and holder.get("pid") != os.getpid():
        raise _locked_error(root, lock, holder)


def _launched_rank() -> bool:
    """A process launched by a job's first process (it writes under that process's lock)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0) != 0 or int(os.environ.get("NODE_RANK", "0") or 0) != 0


def _is_stale(lock: Path, holder: dict[str, Any]) -> bool:
    pid, host = holder.get("pid"), holder.get("host")
    if not holder:
        return _age(lock) > 10.0  # a writer killed between creating the lock and filling it
    return host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)


def _locked_error(root: Path, lock: Path, holder: dict[str, Any]) -> ValueError:
    pid, host = holder.get("pid"), holder.get("host")
    where = f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")
    return ValueError(
        f"{root}: another pavlit job is writing here ({where}, lock {lock}); wait for it to finish, or use another "
        "output folder (delete the lock only if no such job is running)"
    )


def _lock_holder(lock: Path) -> dict[str, Any]:
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True
