"""Plugins: discovered through entry points, listed without importing, loaded lazily.

Each kind of plugin has its own entry-point group and interface (:data:`pavlit.interfaces.INTERFACES`):
``pavlit.tasks``, ``pavlit.provers``, ``pavlit.rewards`` and ``pavlit.search``. pavlit declares its own
built-ins in its ``pyproject.toml`` exactly as a third-party package declares its plugins::

    [project.entry-points."pavlit.provers"]
    tempered = "my_pkg.provers:TemperedProver"

>>> from pavlit import registry
>>> [p.name for p in registry.list_plugins("pavlit.tasks")]  # doctest: +SKIP
['arithmetic', 'jsonl', 'planted', 'reasoning_gym']
>>> registry.load("pavlit.tasks", "arithmetic")  # doctest: +SKIP
<class 'pavlit.tasks.arithmetic.ArithmeticTask'>

Rules, after pytest and llm:

- :func:`list_plugins` reads package metadata only; it imports no plugin.
- :func:`load` imports one plugin and checks it is a concrete subclass of its group's interface.
- :func:`load_all` imports every plugin so that LightningCLI YAML can name them by short class name
  (``class_path: TemperedProver``); a plugin that fails (whatever it raises, ``sys.exit()`` included) is a
  :class:`PluginWarning` naming its distribution, never a crash.
- Two distributions registering the same name in one group is a :class:`PluginError`.
- ``PAVLIT_DISABLE_PLUGIN_AUTOLOAD=1`` keeps :func:`load_all` to pavlit's own built-ins (like pytest's
  ``PYTEST_DISABLE_PLUGIN_AUTOLOAD``); a plugin asked for by name with :func:`load` still loads.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pavlit.interfaces import INTERFACES

__all__ = [
    "AUTOLOAD_ENV",
    "BUILTIN_DISTRIBUTION",
    "PluginError",
    "PluginInfo",
    "PluginWarning",
    "autoload_enabled",
    "discover",
    "get",
    "info",
    "list_plugins",
    "load",
    "load_all",
]

AUTOLOAD_ENV = "PAVLIT_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN_DISTRIBUTION = "pavlit"
UNKNOWN_DISTRIBUTION = "<unknown distribution>"


class PluginError(Exception):
    """A plugin cannot be used: missing, failing to import, not matching its interface, or registered twice."""


class PluginWarning(UserWarning):
    """A plugin was skipped by :func:`load_all` because it failed to load."""


@dataclass(frozen=True)
class PluginInfo:
    """One registered plugin, as its package metadata declares it (nothing imported).

    Args:
        kind: The entry-point group, e.g. ``pavlit.provers``.
        name: The entry-point name, unique within its group.
        target: What the entry point points at, ``module:attr``.
        distribution: The name of the distribution (pip package) that registers it.
        version: That distribution's version.
    """

    kind: str
    name: str
    target: str
    distribution: str = UNKNOWN_DISTRIBUTION
    version: str = ""

    @property
    def builtin(self) -> bool:
        """Whether pavlit itself registers this plugin."""
        return _normalize_dist(self.distribution) == BUILTIN_DISTRIBUTION

    @property
    def origin(self) -> str:
        """``distribution version``, the way error messages name where a plugin comes from."""
        return f"{self.distribution} {self.version}".strip()

    def describe(self) -> str:
        """``'name' (kind = target) from distribution 'dist version'``, for messages."""
        return f"{self.name!r} ({self.kind} = {self.target}) from distribution {self.origin!r}"


EntryPointLike = importlib.metadata.EntryPoint | PluginInfo


def discover() -> list[PluginInfo]:
    """Every plugin that installed distributions declare in the pavlit entry-point groups (imports nothing).

    This is the one place that reads package metadata; tests replace it (or pass ``entry_points=``) to
    simulate installed plugins.
    """
    found = []
    for group in INTERFACES:
        found.extend(_from_entry_point(ep) for ep in importlib.metadata.entry_points(group=group))
    return found


def autoload_enabled() -> bool:
    """False when ``PAVLIT_DISABLE_PLUGIN_AUTOLOAD`` is set to anything but an empty string, ``0`` or ``false``."""
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() in ("", "0", "false", "no")


def list_plugins(kind: str | None = None, *, entry_points: Iterable[EntryPointLike] | None = None) -> list[PluginInfo]:
    """The registered plugins, sorted by kind then name, without importing any of them.

    Args:
        kind: Only this group (``pavlit.provers``, or the short ``provers``); ``None`` for all groups.
        entry_points: Use these instead of the installed package metadata (entry points or
            :class:`PluginInfo`); for tests and embedding.

    Raises:
        PluginError: Two distributions register the same name in one group.
    """
    return _unique(_collect(kind, entry_points))


def info(kind: str, name: str, *, entry_points: Iterable[EntryPointLike] | None = None) -> PluginInfo:
    """The metadata of one plugin, without importing it.

    Raises:
        PluginError: No plugin of that name, or two distributions register it.
    """
    group = _group(kind)
    plugins = _collect(group, entry_points)
    matches = _unique(p for p in plugins if p.name == name)
    if not matches:
        available = ", ".join(sorted({p.name for p in plugins})) or "none"
        raise PluginError(f"no {group} plugin named {name!r} is installed (available: {available})")
    return matches[0]


def load(kind: str, name: str, *, entry_points: Iterable[EntryPointLike] | None = None) -> type:
    """Import one plugin and check it against its group's interface.

    Works for third-party plugins even when autoloading is disabled: naming a plugin is asking for it.

    Args:
        kind: The group, ``pavlit.tasks`` or ``tasks``.
        name: The entry-point name, e.g. ``arithmetic``.
        entry_points: See :func:`list_plugins`.

    Returns:
        The plugin class, a concrete subclass of ``INTERFACES[kind]``.

    Raises:
        PluginError: The plugin is missing, fails to import, or is not a concrete subclass of the interface.
    """
    return _import(info(kind, name, entry_points=entry_points))


def get(kind: str, name: str, /, **init_args: Any) -> Any:
    """An instance of one plugin: ``load(kind, name)(**init_args)``.

    >>> registry.get("pavlit.provers", "best_of_k", k=4)  # doctest: +SKIP
    """
    return load(kind, name)(**init_args)


def load_all(
    kind: str | None = None, *, entry_points: Iterable[EntryPointLike] | None = None
) -> dict[str, dict[str, type]]:
    """Import every plugin (only pavlit's built-ins when autoloading is disabled).

    Importing makes each plugin class a known subclass of its interface, which is what lets jsonargparse
    resolve a short ``class_path: TemperedProver`` in a LightningCLI YAML.

    Args:
        kind: Only this group; ``None`` for all.
        entry_points: See :func:`list_plugins`.

    Returns:
        ``{group: {name: class}}`` for the plugins that loaded (every group present, possibly empty).

    Raises:
        PluginError: Two distributions register the same name in one group (a broken plugin only warns).
    """
    plugins = _collect(kind, entry_points)
    if not autoload_enabled():
        plugins = [p for p in plugins if p.builtin]
    groups = [_group(kind)] if kind is not None else list(INTERFACES)
    loaded: dict[str, dict[str, type]] = {group: {} for group in groups}
    for plugin in _unique(plugins):
        try:
            loaded[plugin.kind][plugin.name] = _import(plugin)
        except PluginError as err:
            warnings.warn(f"skipping plugin: {err}", PluginWarning, stacklevel=2)
    return loaded


def _collect(kind: str | None, entry_points: Iterable[EntryPointLike] | None) -> list[PluginInfo]:
    source = discover() if entry_points is None else [_as_info(ep) for ep in entry_points]
    group = _group(kind) if kind is not None else None
    return [p for p in source if p.kind in INTERFACES and (group is None or p.kind == group)]


def _unique(plugins: Iterable[PluginInfo]) -> list[PluginInfo]:
    # The same distribution can be seen twice (an editable install plus a stale egg-info on sys.path): identical
    # declarations are one plugin; two declarations of one name that differ are ambiguous.
    by_key: dict[tuple[str, str], list[PluginInfo]] = {}
    for plugin in plugins:
        same_name = by_key.setdefault((plugin.kind, plugin.name), [])
        if not any(_same_declaration(plugin, other) for other in same_name):
            same_name.append(plugin)
    clashes = [group for group in by_key.values() if len(group) > 1]
    if clashes:
        lines = [
            f"{group[0].kind} name {group[0].name!r} is registered more than once: "
            + "; ".join(f"{p.target} by {p.origin!r}" for p in group)
            for group in clashes
        ]
        raise PluginError(
            "\n".join(lines) + "\nuninstall one of the distributions, or rename the entry point in its pyproject.toml"
        )
    return sorted((group[0] for group in by_key.values()), key=lambda p: (p.kind, p.name))


def _same_declaration(a: PluginInfo, b: PluginInfo) -> bool:
    return a.target == b.target and _normalize_dist(a.distribution) == _normalize_dist(b.distribution)


def _import(plugin: PluginInfo) -> type:
    interface = INTERFACES[plugin.kind]
    expected = f"a subclass of {interface.__module__}.{interface.__qualname__}"
    try:
        obj = importlib.metadata.EntryPoint(plugin.name, plugin.target, plugin.kind).load()
    except (Exception, SystemExit) as err:  # a plugin's import can raise anything, even sys.exit(); it must not
        # take the CLI down with it (KeyboardInterrupt and pavlit.cli.Interrupted, a signal, still end the command)
        raise PluginError(f"{plugin.describe()} failed to import: {type(err).__name__}: {err}") from err
    if not isinstance(obj, type):
        raise PluginError(f"{plugin.describe()} is {obj!r}, not a class; expected {expected}")
    if not issubclass(obj, interface):
        raise PluginError(f"{plugin.describe()} is {obj.__module__}.{obj.__qualname__}, not {expected}")
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(obj.__abstractmethods__))
        raise PluginError(f"{plugin.describe()} does not implement the abstract method(s) {missing} of {expected}")
    return obj


def _group(kind: str) -> str:
    if kind in INTERFACES:
        return kind
    if f"pavlit.{kind}" in INTERFACES:
        return f"pavlit.{kind}"
    raise ValueError(f"unknown plugin kind {kind!r}; expected one of {', '.join(INTERFACES)}")


def _as_info(entry_point: EntryPointLike) -> PluginInfo:
    return entry_point if isinstance(entry_point, PluginInfo) else _from_entry_point(entry_point)


def _from_entry_point(entry_point: importlib.metadata.EntryPoint) -> PluginInfo:
    dist = getattr(entry_point, "dist", None)
    if dist is None:
        return PluginInfo(entry_point.group, entry_point.name, entry_point.value)
    return PluginInfo(
        entry_point.group,
        entry_point.name,
        entry_point.value,
        dist.metadata["Name"] or UNKNOWN_DISTRIBUTION,
        dist.version,
    )


def _normalize_dist(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
