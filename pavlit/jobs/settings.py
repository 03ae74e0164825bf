"""A job's settings fingerprint: what determines its records, hashed, so a resume with other settings is refused."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any


def fingerprint(settings: Mapping[str, Any]) -> str:
    """A stable hash of JSON-serialisable job settings."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def describe(obj: Any) -> Any:
    """A JSON description of a configured object: its class and public settings (job fingerprints, reports).

    Plain values stay as they are; an object becomes ``{"class": "module.Qualname", <public attribute>: ...}``,
    its nested plain values described recursively, other nested objects by their ``repr`` (when they define one)
    or their class. Attributes starting with ``_`` (caches, loaded models) are left out.
    """
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    if isinstance(obj, list | tuple):
        return [describe(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): describe(v) for k, v in obj.items()}
    if not hasattr(obj, "__dict__"):
        return repr(obj)
    out: dict[str, Any] = {"class": f"{type(obj).__module__}.{type(obj).__qualname__}"}
    for key, value in vars(obj).items():
        if key.startswith("_"):
            continue
        if value is None or isinstance(value, str | int | float | bool | list | tuple | dict):
            out[key] = describe(value)
        elif type(value).__repr__ is not object.__repr__:
            out[key] = repr(value)
        else:
            out[key] = f"{type(value).__module__}.{type(value).__qualname__}"
    return out
