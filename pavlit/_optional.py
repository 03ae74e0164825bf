"""The one gate for heavy optional imports (bitsandbytes, gguf, vllm, ...).

Import them inside the function that needs them, through :func:`require`, so that ``import pavlit`` and
``pavlit --help`` stay fast and a missing extra says how to install it::

    bnb = require("bitsandbytes", extra="quant")
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str) -> ModuleType:
    """Import ``module``, or explain which pavlit extra provides it.

    Args:
        module: The module to import, e.g. ``bitsandbytes`` or ``gguf``.
        extra: The ``pavlit[...]`` extra that installs it, e.g. ``quant``.

    Returns:
        The imported module.

    Raises:
        ImportError: ``module`` is not installed (the message says ``pip install 'pavlit[extra]'``), or it is
            installed but its own import fails, whatever it raises (``RuntimeError`` from a broken CUDA setup,
            ``sys.exit()``): the message says so, with the cause chained.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing = err.name or ""
        # Only a missing `module` itself (or its parent package) is a missing extra; anything else is a broken
        # install of that package, and telling the user to install it again would send them in a circle.
        if missing and (module == missing or module.startswith(missing + ".")):
            raise ImportError(
                f"{module!r} is not installed; it comes with an optional extra: pip install 'pavlit[{extra}]'",
                name=module,
            ) from err
        raise ImportError(
            f"{module!r} (from the pavlit[{extra}] extra) is installed but failed to import: {err}", name=module
        ) from err
    except (Exception, SystemExit) as err:  # a package's import can raise anything; report it like a broken install
        raise ImportError(
            f"{module!r} (from the pavlit[{extra}] extra) is installed but failed to import: "
            f"{type(err).__name__}: {err}",
            name=module,
        ) from err
