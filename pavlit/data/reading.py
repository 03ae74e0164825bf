"""Reading step-label and outcome datasets: every file kind ``pavlit fit`` accepts, and the bad-record policy.

:func:`iter_records` yields ``(where, record)`` from a `pavlit label` folder, JSONL / Parquet files, a
``save_to_disk`` folder or a dataset ``datasets`` loads offline; :class:`BadRecords` raises on the first bad record
(naming ``file:line``) or counts and logs them; :func:`valid_step_records` keeps the records that meet the
step-label contract (:func:`pavlit.labeling.records.validate_record`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pavlit.jobs.jsonl import json_lines
from pavlit.jobs.shards import SHARD_GLOB, check_job_folder
from pavlit.labeling.records import validate_record

__all__ = ["BadRecords", "OnBadRecord", "iter_records", "valid_step_records"]

log = logging.getLogger(__name__)

OnBadRecord = Literal["error", "skip"]


def _data_files(folder: Path) -> list[Path]:
    check_job_folder(folder)  # a label folder still being written, or a shard failing its integrity record
    shards = sorted(folder.glob(SHARD_GLOB))
    return shards or sorted(folder.glob("*.jsonl")) + sorted(folder.glob("*.parquet"))


def iter_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, record)`` from a step-label (or outcome) dataset; ``where`` is ``file:line`` or ``file:row n``.

    ``path`` may be a folder of ``chunk-*.jsonl`` shards (a labelling run's output), a folder of ``*.jsonl`` /
    ``*.parquet`` files, one such file, a folder written by ``datasets.Dataset.save_to_disk``, or anything
    ``datasets.load_dataset`` loads offline (a local folder of data files, or a cached dataset name). A line that
    is not JSON yields its error message (a ``str``) in place of the record, for the caller's bad-record policy.
    """
    source = Path(path).expanduser()
    files = [source] if source.is_file() else _data_files(source) if source.is_dir() else []
    if files:
        for file in files:
            if file.suffix == ".parquet":
                yield from _parquet_records(file)
            else:
                yield from _jsonl_records(file)
        return
    if source.is_dir():
        if not any(source.iterdir()):
            raise FileNotFoundError(
                f"cannot read a step-label dataset from {str(path)!r}: the folder is empty (expected chunk-*.jsonl, "
                "*.jsonl or *.parquet files)"
            )
    elif _looks_like_a_path(str(path)):
        raise FileNotFoundError(
            f"cannot read a step-label dataset from {str(path)!r}: no such file or folder (expected a `pavlit label` "
            "output folder, or *.jsonl / *.parquet files)"
        )
    yield from _hf_records(str(path), source)


def _looks_like_a_path(name: str) -> bool:
    # A dataset name for `datasets` is "name" or "owner/name"; anything else that does not exist is a missing path,
    # reported as such without asking `datasets` (which would look for it on the Hub).
    has_data_suffix = Path(name).suffix in (".jsonl", ".json", ".parquet")
    return name.startswith(("/", ".", "~")) or has_data_suffix or name.count("/") > 1


def _jsonl_records(file: Path) -> Iterator[tuple[str, Any]]:
    for where, record in json_lines(file):
        if isinstance(record, json.JSONDecodeError):
            record = f"not valid JSON ({record.msg}); is the file truncated?"
        yield where, record


def _parquet_records(file: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    row = 0
    try:
        parquet = pq.ParquetFile(file)
        batches = parquet.iter_batches()
        for batch in batches:
            for record in batch.to_pylist():
                yield f"{file}:row {row}", record
                row += 1
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid / ArrowIOError derive from these
        raise ValueError(
            f"{file}: cannot read it as Parquet after {row} rows ({err}); is the file truncated or not Parquet?"
        ) from None


def _hf_records(name: str, folder: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        if folder.is_dir() and ((folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file()):
            loaded = datasets.load_from_disk(str(folder))
        else:
            loaded = datasets.load_dataset(name)
    except Exception as err:  # datasets raises many types; all mean "cannot read this"
        raise FileNotFoundError(
            f"cannot read a step-label dataset from {name!r}: it is not a file or a folder of chunk-*.jsonl / *.jsonl "
            f"/ *.parquet files, and datasets could not load it offline ({type(err).__name__}: {err})"
        ) from err
    splits = loaded.items() if isinstance(loaded, Mapping) else [("train", loaded)]
    for split, dataset in splits:
        for row, record in enumerate(dataset):
            yield f"{name}[{split}]:row {row}", dict(record)


class BadRecords:
    """The bad-record policy: raise on the first one, or count and log them.

    Args:
        mode: ``"error"`` raises ``ValueError(f"{where}: {reason}")``; ``"skip"`` counts and logs.
        what: What a record is, for the log line.
    """

    def __init__(self, mode: OnBadRecord, what: str = "record") -> None:
        if mode not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip', got {mode!r}")
        self.mode = mode
        self.what = what
        self.count = 0
        self.first: list[str] = []

    def __call__(self, where: str, reason: str) -> None:
        message = f"{where}: {reason}"
        if self.mode == "error":
            raise ValueError(f"{message} (set on_bad_record='skip' to count and skip such {self.what}s)")
        self.count += 1
        if len(self.first) < 5:
            self.first.append(message)
            log.warning("skipping bad %s: %s", self.what, message)

    def summarise(self) -> None:
        if self.count:
            log.warning("skipped %d bad %ss; first: %s", self.count, self.what, "; ".join(self.first))


def valid_step_records(
    path: str | Path, bad: BadRecords, step_delimiter: str | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """The records of ``path`` that meet the step-label contract (others go to ``bad``).

    With ``step_delimiter``, every step but a record's last must end with it: a step that does not was not cut
    where inference cuts, so its label would sit on a token that search and RL never score.
    """
    records = []
    for where, record in iter_records(path):
        if isinstance(record, str):
            bad(where, record)
            continue
        if not isinstance(record, dict):
            bad(where, f"expected a JSON object, got {type(record).__name__}")
            continue
        try:
            validate_record(record, where)
        except ValueError as err:
            bad(where, str(err).removeprefix(f"{where}: "))
            continue
        if not 0.0 <= float(record["seed_outcome"]) <= 1.0:
            bad(where, f"seed_outcome must be in [0, 1], got {record['seed_outcome']}")
            continue
        if step_delimiter:
            cut = next((h for h, step in enumerate(record["steps"][:-1]) if not step.endswith(step_delimiter)), None)
            if cut is not None:
                bad(
                    where,
                    f"field 'steps': step {cut} ({record['steps'][cut]!r}) does not end with the step delimiter "
                    f"{step_delimiter!r}; every step but the last must (set data.init_args.step_delimiter to the "
                    "task's delimiter)",
                )
                continue
        records.append((where, record))
    return records
