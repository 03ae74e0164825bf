"""The one JSON Lines reader: every ``*.jsonl`` pavlit reads (shards, step labels, rollouts, task files) goes here.

Errors name the file and line (``path:line``); what a malformed line means is the caller's to say, so each reader
keeps its own message (a shard is "corrupt", a task file wants "one JSON object per line").
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 text file; a line that is not UTF-8 raises naming the file and line.

    Raises:
        ValueError: ``<path>:<line>: not UTF-8 text (...)``.
    """
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                yield line_no, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}:{line_no}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                    "expected a UTF-8 encoded file"
                ) from None


def json_lines(path: str | Path) -> Iterator[tuple[str, Any]]:
    """``(where, value)`` for every non-blank line: ``where`` is ``path:line``, ``value`` the parsed JSON, or the
    :class:`json.JSONDecodeError` of a line that is not JSON (for a caller that counts bad lines instead of raising).
    """
    for line_no, line in text_lines(path):
        if not line.strip():
            continue
        try:
            yield f"{path}:{line_no}", json.loads(line)
        except json.JSONDecodeError as err:
            yield f"{path}:{line_no}", err


def json_objects(
    path: str | Path,
    invalid: str = "not valid JSON ({msg})",
    not_object: str | None = "expected a JSON object, got {type}",
) -> Iterator[tuple[str, Any]]:
    """``(where, object)`` for every non-blank line; a line that is not JSON raises ``ValueError`` naming it.

    Args:
        path: The file.
        invalid: The message after ``path:line: `` for a line that is not JSON (``{msg}``: the parser's reason).
        not_object: The message for a JSON value that is not an object (``{type}``: its type); ``None`` passes any
            value through.

    Raises:
        ValueError: ``<path>:<line>: <invalid or not_object>``, or the :func:`text_lines` error for non-UTF-8 text.
    """
    for where, value in json_lines(path):
        if isinstance(value, json.JSONDecodeError):
            raise ValueError(f"{where}: {invalid.format(msg=value.msg)}") from None
        if not_object is not None and not isinstance(value, dict):
            raise ValueError(f"{where}: {not_object.format(type=type(value).__name__)}")
        yield where, value
