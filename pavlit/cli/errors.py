"""What ``pavlit`` reports as a user's error: :data:`USER_ERRORS`, the one-line text of each
(:func:`_error_text`, unwrapping jsonargparse's Union reports), ``PAVLIT_TRACEBACK``, and the check of every
``--config`` file before a command's parser reads it (:func:`check_config_files`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from pavlit import registry

TRACEBACK_ENV = "PAVLIT_TRACEBACK"

#: Exceptions that report input a user can fix; pavlit's own readers and settings raise these with messages that
#: name the file, line or field and what was expected. ``FloatingPointError`` is :class:`pavlit.callbacks.FiniteGuard`
#: stopping a run on a NaN loss.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    OSError,
    ImportError,
    FloatingPointError,
    registry.PluginError,
)


def _show_traceback() -> bool:
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _config_paths(argv: Sequence[str]) -> list[str]:
    paths = []
    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            paths.append(argv[index + 1])
        elif arg.startswith("--config="):
            paths.append(arg.removeprefix("--config="))
    return paths


def check_config_files(argv: Sequence[str]) -> None:
    """Check every ``--config`` file on the command line before the command's parser reads it.

    jsonargparse reports a YAML syntax error without the file's name, an empty file as "Unexpected config" and a
    non-UTF-8 file as a bare ``UnicodeDecodeError``; this names the file (and the line) instead. A ``--config``
    value that is not an existing file is left to the parser (it may be an inline YAML string).

    Raises:
        ValueError: A config file that is not UTF-8, not valid YAML, empty, or not a mapping of options.
    """
    import yaml

    for value in _config_paths(argv):
        path = Path(value).expanduser()
        if not path.is_file():
            if Path(value).suffix.lower() in (".yaml", ".yml", ".json"):
                raise FileNotFoundError(2, "--config: no such config file", value)
            continue
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data[: err.start].count(b"\n") + 1
            raise ValueError(
                f"{value}:{line}: the config file is not UTF-8 text (byte 0x{data[err.start]:02x}); save it as UTF-8"
            ) from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{value}:{mark.line + 1}:{mark.column + 1}" if mark is not None else value
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            context = getattr(err, "context", None)
            detail = f"{problem} ({context})" if context else problem
            raise ValueError(f"{where}: YAML syntax error in the config file: {detail}") from None
        if loaded is None:
            raise ValueError(f"{value}: the config file is empty (or holds only comments); expected YAML options")
        if not isinstance(loaded, dict):
            raise ValueError(
                f"{value}: expected a mapping of options (key: value lines) at the top of the config file, got a "
                f"{type(loaded).__name__}"
            )


def _error_text(err: BaseException) -> str:
    text = _unwrap_union_error(str(err).strip())
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    # A bare message from a library (e.g. "math domain error") says little without its type.
    return text if text and isinstance(err, (OSError, registry.PluginError)) else f"{type(err).__name__}: {text}"


_UNION_ERROR = "Does not validate against any of the Union subtypes"


def _unwrap_union_error(text: str) -> str:
    """The error a class raised while jsonargparse built it, out of its report on every Union subtype it tried.

    A LightningModule's ``__init__`` that refuses a setting (``TinyPolicy.n_head must be a positive integer``)
    reaches the user wrapped in ``Does not validate against any of the Union subtypes`` plus the subtypes, the
    ``NoneType`` alternative and the whole namespace; the class's own message is the line that says what is wrong.
    """
    if not text.startswith(_UNION_ERROR):
        return text
    reasons = [
        line.strip()[2:]
        for line in text.splitlines()
        if line.startswith("  - ") and not line.strip().startswith("- Expected a <class 'NoneType'>")
    ]
    return "; ".join(reasons) if reasons else text
