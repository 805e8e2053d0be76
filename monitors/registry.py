"""Where monitors come from: the built-ins plus the `canvaswatch.monitors` entry points.

A third-party monitor is a package that declares, in its pyproject,
    [project.entry-points."canvaswatch.monitors"]
    my_monitor = "my_pkg.module:MyMonitor"
where MyMonitor subclasses canvaswatch.monitors.base.Monitor (or has the members of
MonitorProtocol); docs/writing-a-monitor.md walks through one. Parameters from the
TOML table [monitors.<name>] are checked against the monitor's `Params` dataclass
here, so a typo fails at start-up with the key named.

Checking a configuration (`validate`) parses parameters and builds nothing: a monitor's
constructor may load a model or start a thread, so the engine builds each monitor once
(`build`) and closes it once.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from importlib.metadata import entry_points
from typing import Any, Mapping

from canvaswatch.monitors.base import Monitor, MonitorProtocol
from canvaswatch.monitors.classifier import ClassifierMonitor
from canvaswatch.monitors.intermediate_context import IntermediateContextMonitor
from canvaswatch.monitors.lexicon import LexiconMonitor
from canvaswatch.monitors.non_chronological import NonChronologicalMonitor
from canvaswatch.monitors.probe import ProbeMonitor
from canvaswatch.monitors.self_correction import SelfCorrectionMonitor
from canvaswatch.monitors.sequence_smearing import SequenceSmearingMonitor
from canvaswatch.monitors.token_smearing import TokenSmearingMonitor
from canvaswatch.monitors.transparency import TransparencyMonitor

ENTRY_POINT_GROUP = "canvaswatch.monitors"
BUILTINS: dict[str, type] = {
    cls.name: cls
    for cls in (
        LexiconMonitor, SelfCorrectionMonitor, NonChronologicalMonitor, TokenSmearingMonitor,
        SequenceSmearingMonitor, IntermediateContextMonitor, TransparencyMonitor, ProbeMonitor, ClassifierMonitor,
    )
}


class MonitorConfigError(ValueError):
    """A monitor's configuration is wrong; the message starts with the TOML key."""


def available() -> dict[str, type]:
    """Every monitor class by name: built-ins first, then installed entry points."""
    found = dict(BUILTINS)
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name in found:
            continue  # a plugin cannot shadow a built-in or an earlier plugin
        found[point.name] = _LazyPlugin(point)
    return found


def resolve(name: str, key: str) -> type:
    classes = available()
    if name not in classes:
        raise MonitorConfigError(f"{key}: unknown monitor {name!r}; available: {', '.join(sorted(classes))}")
    cls = classes[name]
    if isinstance(cls, _LazyPlugin):
        cls = cls.load(key)
    return cls


def validate(name: str, table: Mapping[str, Any], key: str) -> Any:
    """The checked Params of monitor `name` from its TOML table, without building the monitor."""
    return parse_params(resolve(name, key).Params, table, key)


def build(name: str, table: Mapping[str, Any], key: str) -> MonitorProtocol:
    """Instantiate monitor `name` from its TOML table (key is e.g. 'monitors.lexicon')."""
    cls = resolve(name, key)
    params = parse_params(cls.Params, table, key)
    return instantiate(cls, params, key)


def parse_params(params_cls: type, table: Mapping[str, Any], key: str) -> Any:
    """Check a TOML table against a Params dataclass: unknown keys, types, then its own checks."""
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    hints = typing.get_type_hints(params_cls)
    values = {}
    for name, value in table.items():
        if name == "enabled":
            continue
        if name not in fields:
            raise MonitorConfigError(f"{key}.{name}: unknown parameter; expected one of {', '.join(sorted(fields))}")
        values[name] = _check_type(value, hints[name], f"{key}.{name}")
    try:
        return params_cls(**values)
    except ValueError as err:
        raise MonitorConfigError(f"{key}.{err}") from None


def instantiate(cls: type, params: Any, key: str) -> Any:
    """A monitor from checked params; a constructor's ValueError (e.g. a bad file) names the key."""
    try:
        return cls(params)
    except ValueError as err:
        raise MonitorConfigError(f"{key}.{err}") from None


def contract_problem(cls: Any) -> str | None:
    """What keeps `cls` from being built and run as a monitor, or None."""
    for attribute in ("name", "Params", "start", "on_step", "on_finish"):
        if not hasattr(cls, attribute):
            return f"lacks {attribute!r} of the Monitor contract"
    if not isinstance(cls.name, str) or not cls.name:
        return "sets no `name`"
    if not (isinstance(cls.Params, type) and dataclasses.is_dataclass(cls.Params)):
        return "has a `Params` that is not a dataclass"
    if isinstance(cls, type) and issubclass(cls, Monitor) and cls.on_step is Monitor.on_step:
        return "does not define on_step"
    return None


def describe_params(params: Any) -> dict[str, str]:
    return {f.name: str(getattr(params, f.name)) for f in dataclasses.fields(params)}


def _check_type(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1] or (Any,)
        if not isinstance(value, list):
            raise MonitorConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _check_type(value, options[0], key)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise MonitorConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


class _LazyPlugin:
    """An entry point not imported until a config enables it, so a broken plugin only breaks its users."""

    def __init__(self, point: Any) -> None:
        self.point = point

    def load(self, key: str) -> type:
        try:
            cls = self.point.load()
        except Exception as err:  # a plugin's import error must name the plugin, not crash opaquely
            raise MonitorConfigError(f"{key}: cannot load plugin {self.point.value!r}: {err}") from err
        problem = contract_problem(cls)
        if problem is not None:
            raise MonitorConfigError(f"{key}: plugin {self.point.value!r} {problem}")
        return cls

    @property
    def description(self) -> str:
        return f"plugin {self.point.value}"
