"""Check a monitor against the contract of canvaswatch.monitors.base, in the monitor's own tests.

    from canvaswatch.monitors.testing import check_monitor

    def test_my_monitor_keeps_the_contract():
        check_monitor(MyMonitor)

check_monitor builds the monitor once (from `Params()`, or the params given), drives it
through synthetic requests, closes it, and raises MonitorCheckError naming every rule of
the contract it saw broken and where. The requests, on a synthetic vocabulary whose every
piece holds a '§' (so canvas text in a reason or an attribute cannot hide):

  - the server's warm-up request (L = 16, k = 4, two steps; rule 6);
  - a request that ends before any step reaches the monitor (rule 5);
  - ordinary requests (L = 32, k = 4): positions settle from noise left to right, padding
    early, a few settle on one token and flip to another, a token splits over two
    positions, a phrase stands twice; with several blocks, with dropped steps, without
    the residual, with the sampler's signals (rules 5, 7, 8 and 9 on every call);
  - a block after a different first block, against the same block alone (rule 3);
  - two requests interleaved on the one instance, against each alone (rule 1);
  - 400-step requests, in one block and in 16, against a 40-step one (rule 2);
  - a wide canvas (L = 256, k = 8), every call timed against the budget (rule 4).

The helpers `canvas_step`, `run_request` and `SyntheticVocabulary` build steps by hand for
tests of what a monitor should and should not flag.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import sys
import time
import traceback
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from canvaswatch.monitors.base import DecodedStep, Evidence, FinalCanvas, Flag, RequestMeta, Severity
from canvaswatch.monitors.registry import contract_problem, instantiate, parse_params

MARK = "§"

RULES = {
    1: "one instance serves every request: per-request state lives in what start() returns",
    2: "state is bounded by the canvas length L",
    3: "positional state starts over at a new block",
    4: "each call fits the per-call budget",
    5: "the first exception switches the monitor off for the rest of the request",
    6: "the warm-up request",
    7: "no decoded text in a flag's reason or attributes",
    8: "a flag names its monitor, has a reason, a score in [0, 1] and evidence on the canvas",
    9: "a step's arrays are read, never written",
}


class MonitorCheckError(AssertionError):
    """A monitor broke rules of the contract; the message lists each one with what was seen."""


@dataclass(frozen=True)
class MonitorReport:
    """What check_monitor saw of a monitor that kept the contract."""

    flags: tuple[Flag, ...]  # every flag raised on the ordinary requests
    slowest_call_ms: float  # the slowest start / on_step / on_finish outside the warm-up


class SyntheticVocabulary:
    """`size` tokens, each piece '§' and two characters: decoded text holds a '§' in every 3 characters.

    encode() reads back text made of these pieces and returns [] for any other text.
    """

    _CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"

    def __init__(self, size: int = 1024) -> None:
        if not 2 <= size <= len(self._CHARS) ** 2:
            raise ValueError(f"size: must be in [2, {len(self._CHARS) ** 2}], got {size}")
        self.size = size
        self._pieces = [MARK + self._CHARS[i // len(self._CHARS)] + self._CHARS[i % len(self._CHARS)]
                        for i in range(size)]
        self._ids = {piece: i for i, piece in enumerate(self._pieces)}

    def piece(self, token_id: int) -> str:
        return self._pieces[int(token_id)]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self._pieces[int(i)] for i in ids)

    def encode(self, text: str) -> list[int]:
        if len(text) % 3:
            return []
        ids = [self._ids.get(text[i : i + 3]) for i in range(0, len(text), 3)]
        return [] if None in ids else ids

    def char_offsets(self, ids: Sequence[int]) -> list[int]:
        return [3 * i for i in range(len(ids) + 1)]


_VOCAB = SyntheticVocabulary()


def canvas_step(top1: Sequence[int], prob: float | Sequence[float] = 0.9, *, block: int = 0, step: int = 0,
                vocab: Any = None, alternatives: Mapping[int, Sequence[tuple[int, float]]] | None = None,
                k: int = 4, new_block: bool = False, **signals: Any) -> DecodedStep:
    """A step whose top-1 canvas is `top1` at probability `prob` (one for all positions, or one each).

    alternatives[position] lists (id, prob) runners-up for slots 1.. of that position; other
    slots are empty (probability 0). The residual is what the kept probabilities leave of 1.
    `signals` are the sampler's (accepted, entropy, argmax_ids, canvas_ids, temperature).
    """
    length = len(top1)
    ids = np.zeros((length, k), dtype=np.int64)
    probs = np.zeros((length, k), dtype=np.float32)
    ids[:, 0] = top1
    probs[:, 0] = prob
    for position, extra in (alternatives or {}).items():
        for slot, (token, p) in enumerate(extra, start=1):
            ids[position, slot], probs[position, slot] = token, p
    residual = np.maximum(1.0 - probs.sum(axis=1, dtype=np.float64), 0.0).astype(np.float32)
    arrays = {name: np.asarray(value) for name, value in signals.items() if name != "temperature" and value is not None}
    return DecodedStep(block=block, step=step, ids=ids, probs=probs, vocab=vocab if vocab is not None else _VOCAB,
                       residual=residual, new_block=new_block, temperature=signals.get("temperature"), **arrays)


def run_request(monitor: Any, steps: Iterable[DecodedStep], *, output_ids: Sequence[int] | None = None,
                request_id: str = "test", total_steps: int = 0) -> list[Flag]:
    """Every flag a monitor raises on one request: start, each step, finish.

    new_block is set on the first step of each block, as the server sets it. The output is
    `output_ids`, or else the last step's top-1 canvas.
    """
    steps = list(steps)
    length = steps[0].canvas_length if steps else 1
    state = monitor.start(RequestMeta(request_id, "test-model", "", (), length, total_steps))
    flags: list[Flag] = []
    previous_block = None
    for step in steps:
        if step.block != previous_block and not step.new_block:
            step = dataclasses.replace(step, new_block=True)
        previous_block = step.block
        flags += monitor.on_step(state, step) or []
    if output_ids is None:
        output_ids = steps[-1].ids_np[:, 0].tolist() if steps else []
    vocab = steps[-1].vocab if steps else _VOCAB
    final = FinalCanvas(tuple(int(i) for i in output_ids), vocab.decode(output_ids), len(steps), 0)
    return flags + list(monitor.on_finish(state, final) or [])


def check_monitor(cls: type, params: Any = None, *, budget_ms: float = 50.0,
                  hidden_size: int | None = None) -> MonitorReport:
    """Build `cls` once, drive it through synthetic requests, close it; raise MonitorCheckError on broken rules.

    params: the Params to build with (default `cls.Params()`); budget_ms: the per-call budget
    (the server's monitor_budget_ms); hidden_size: also send steps in the `embeddings` form,
    with self-conditioning vectors of this size (for monitors that read `step.hidden`).
    """
    return _Checker(cls, params, budget_ms, hidden_size).run()


# ---------------------------------------------------------------------------------------------
# Synthetic requests


@dataclass
class _StepSpec:
    block: int
    step: int
    ids: np.ndarray
    probs: np.ndarray
    residual: np.ndarray | None
    signals: dict[str, Any] = field(default_factory=dict)
    hidden: np.ndarray | None = None

    def build(self, new_block: bool) -> DecodedStep:
        """A fresh step on fresh copies: what one call does to its arrays cannot reach another run."""
        signals = {name: value.copy() if isinstance(value, np.ndarray) else value for name, value in self.signals.items()}
        residual = None if self.residual is None else self.residual.copy()
        return DecodedStep(
            block=self.block, step=self.step, ids=self.ids.copy(), probs=self.probs.copy(), vocab=_VOCAB,
            residual=residual, residual_sum=None if residual is None else float(np.add.reduce(residual, dtype=np.float64)),
            hidden=None if self.hidden is None else torch.from_numpy(self.hidden.copy()), new_block=new_block, **signals,
        )


@dataclass
class _Request:
    name: str
    length: int
    steps: list[_StepSpec]
    total_steps: int = 0
    request_id: str = ""

    def meta(self) -> RequestMeta:
        return RequestMeta(self.request_id or self.name, "synthetic", "", (), self.length, self.total_steps)

    def final(self) -> FinalCanvas:
        output = self.steps[-1].ids[:, 0].tolist() if self.steps else []
        return FinalCanvas(tuple(output), _VOCAB.decode(output), len(self.steps), 0)


def _warm_up_request() -> _Request:
    """The request the server runs every monitor on before serving (Engine.warm_up)."""
    length, k = 16, 4
    ids = (np.arange(length * k, dtype=np.int64).reshape(length, k) * 7919) % _VOCAB.size
    probs = np.tile(np.array([0.85, 0.1, 0.03, 0.0], dtype=np.float32), (length, 1))
    ids[:, 3] = 0  # an empty slot's id is cleared, as the decoder does
    residual = np.full(length, 1.0 - float(probs[0].sum(dtype=np.float64)), dtype=np.float32)
    steps = [_StepSpec(0, number, ids, probs, residual) for number in range(2)]
    return _Request("warm-up", length, steps, request_id="warm-up")


def _block(rng: np.random.Generator, length: int, k: int, steps: int, *, block: int, keep: float = 1.0,
           gap: int = 0, residual: bool = True, signals: bool = False, settled_at_start: float = 0.0,
           hidden_size: int | None = None) -> list[_StepSpec]:
    """One block denoising from noise: positions settle roughly left to right (padding first,
    the end of the text early), two settle on a wrong token and flip, one token splits over
    two positions, a phrase stands twice for a while. `keep` < 1 drops steps at random and
    `gap` drops that many in a row from a third of the way (never the first step)."""
    size = _VOCAB.size
    target = rng.integers(2, size, length)
    pad = max(1, length // 8)
    target[-pad:] = 0
    settle = np.minimum((np.arange(length) / length * 0.7 * steps).astype(int) + rng.integers(0, 3, length), steps - 1)
    settle[-pad:] = min(1, steps - 1)
    text = length - pad
    answer = text - max(1, text // 5)
    settle[answer:text] = np.minimum(settle[answer:text], 2)  # the end of the text (an answer) written first
    phrase = int(rng.integers(0, max(1, answer - 8)))
    if phrase + 8 <= answer:  # the copy of a phrase stays undecided a while after the phrase settles
        settle[phrase + 4 : phrase + 8] = np.maximum(settle[phrase + 4 : phrase + 8],
                                                     min(int(settle[phrase : phrase + 4].max()) + 4, steps - 1))
    settle[rng.random(length) < settled_at_start] = 0
    wrong = np.full(length, -1)
    flip_at = np.full(length, steps)
    for position in rng.choice(length - pad, size=min(2, length - pad), replace=False):
        if settle[position] + 5 < steps:
            wrong[position] = rng.integers(2, size)
            flip_at[position] = settle[position] + 4
    smear = int(rng.integers(0, max(1, length - pad - 1)))
    specs = []
    for t in range(steps):
        if t > 0 and ((keep < 1.0 and rng.random() > keep) or steps // 3 <= t < steps // 3 + gap):
            continue
        ids = rng.integers(2, size, (length, k))
        probs = np.sort(rng.uniform(0.0, 0.12, (length, k)), axis=1)[:, ::-1].astype(np.float32)
        settled = t >= settle
        shown = np.where((wrong >= 0) & (t < flip_at), wrong, target)
        ids[settled, 0] = shown[settled]
        probs[settled, 0] = np.minimum(0.97, 0.8 + 0.03 * (t - settle[settled]))
        probs[settled, 1:] = np.minimum(probs[settled, 1:], (1 - probs[settled, :1]) / k)
        soon = ~settled & (t >= settle - 3)
        ids[soon, 1] = target[soon]
        probs[soon, 1] = 0.2
        probs[soon, 0] = np.maximum(probs[soon, 0], 0.25)
        if not settled[smear] and not settled[smear + 1] and length > smear + 1:
            ids[smear, 0] = ids[smear + 1, 0] = target[smear]
            probs[smear, 0] = probs[smear + 1, 0] = 0.4
        if phrase + 8 <= answer and settled[phrase : phrase + 4].all() and not settled[phrase + 4 : phrase + 8].any():
            ids[phrase + 4 : phrase + 8, 0] = target[phrase : phrase + 4]
            probs[phrase + 4 : phrase + 8, 0] = 0.5
        order = np.argsort(-probs, axis=1, kind="stable")
        probs = np.take_along_axis(probs, order, axis=1)
        ids = np.take_along_axis(ids, order, axis=1).astype(np.int64)
        kept = np.maximum(1.0 - probs.sum(axis=1, dtype=np.float64), 0.0).astype(np.float32)
        extra: dict[str, Any] = {}
        if signals:
            accepted = probs[:, 0] >= 0.8
            extra = {
                "accepted": accepted,
                "entropy": rng.uniform(0.0, 3.0, length).astype(np.float32) * ~accepted,
                "argmax_ids": ids[:, 0].copy(),
                "canvas_ids": np.where(accepted, ids[:, 0], rng.integers(0, size, length)).astype(np.int64),
                "temperature": 0.8 - 0.4 * t / max(steps - 1, 1),
            }
        hidden = None
        if hidden_size is not None:
            hidden = rng.standard_normal((length, hidden_size)).astype(np.float32)
        specs.append(_StepSpec(block, t, np.ascontiguousarray(ids), np.ascontiguousarray(probs),
                               kept if residual else None, extra, hidden))
    return specs


def _request(name: str, seed: int, *, length: int = 32, k: int = 4, blocks: int = 1, steps: int = 24,
             **options: Any) -> _Request:
    rng = np.random.default_rng(seed)
    specs = [spec for block in range(blocks) for spec in _block(rng, length, k, steps, block=block, **options)]
    return _Request(name, length, specs, total_steps=steps)


# ---------------------------------------------------------------------------------------------
# The checker


class _Stop(Exception):
    """The monitor raised: the server would switch it off for the rest of the request."""


@dataclass
class _Run:
    step_flags: list[tuple[int, Flag]] = field(default_factory=list)  # (block of the step, flag)
    finish_flags: list[Flag] = field(default_factory=list)
    state_bytes: int = 0
    completed: bool = False


class _Checker:
    def __init__(self, cls: type, params: Any, budget_ms: float, hidden_size: int | None) -> None:
        self.cls = cls
        self.params = params
        self.budget_s = budget_ms / 1000.0
        self.hidden_size = hidden_size
        self.name = getattr(cls, "name", None) or getattr(cls, "__name__", "monitor")
        self.problems: dict[str, str] = {}  # first sighting per kind of problem
        self.slowest = 0.0
        self.timings: list[tuple[str, float]] | None = None
        self.flags: list[Flag] = []
        self.monitor: Any = None
        self.shared: set[int] = set()

    def problem(self, rule: int, kind: str, message: str) -> None:
        self.problems.setdefault(f"{rule}:{kind}", f"rule {rule} ({RULES[rule]}): {message}")

    def run(self) -> MonitorReport:
        try:
            if self._build():
                self._drive_all()
        finally:
            self._close()
        if self.problems:
            listed = "\n".join(f"  - {text}" for _, text in sorted(self.problems.items()))
            raise MonitorCheckError(
                f"{self.name} breaks {len(self.problems)} rule(s) of the monitor contract "
                f"(canvaswatch.monitors.base; docs/writing-a-monitor.md):\n{listed}")
        return MonitorReport(tuple(self.flags), self.slowest * 1000.0)

    # -- building ------------------------------------------------------------------------------

    def _build(self) -> bool:
        problem = contract_problem(self.cls)
        if problem is not None:
            self.problems["0:contract"] = f"the class {problem}"
            return False
        description = getattr(self.cls, "description", "")
        if not isinstance(description, str) or not description.strip():
            self.problems["0:description"] = "the class has no description (give it a docstring or set `description`)"
        params = self.params
        if params is None:
            try:
                params = self.cls.Params()
            except Exception as err:  # noqa: BLE001 - reported, with what to do
                self.problems["0:params"] = (f"{self.cls.Params.__name__}() fails ({type(err).__name__}: {err}); "
                                             "give every field a default, or pass params= to check_monitor")
                return False
        self._check_params(params)
        key = f"monitors.{self.name}"
        try:
            self.monitor = instantiate(self.cls, params, key)
        except Exception as err:  # noqa: BLE001
            self.problems["0:build"] = f"building it from {params!r} fails: {type(err).__name__}: {err}"
            return False
        return True

    def _check_params(self, params: Any) -> None:
        """Every parameter can be written in TOML and reads back as itself through the registry."""
        params_cls = type(params)
        try:
            hints = typing.get_type_hints(params_cls)
        except Exception as err:  # noqa: BLE001
            self.problems["0:hints"] = f"the type hints of {params_cls.__name__} cannot be resolved: {err}"
            return
        table = {}
        for item in dataclasses.fields(params_cls):
            if not _toml_type(hints[item.name]):
                self.problems[f"0:type:{item.name}"] = (
                    f"{params_cls.__name__}.{item.name} is typed {hints[item.name]!r}, which a TOML table "
                    "cannot hold (use int, float, str, bool, lists of them, or None-able ones)")
                return
            value = getattr(params, item.name)
            if value is not None:
                table[item.name] = list(value) if isinstance(value, tuple) else value
        try:
            again = parse_params(params_cls, table, f"monitors.{self.name}")
        except Exception as err:  # noqa: BLE001
            self.problems["0:toml"] = f"its parameters written as a TOML table do not read back: {err}"
            return
        if _listed(dataclasses.asdict(again)) != _listed(dataclasses.asdict(params)):
            self.problems["0:toml"] = f"its parameters read back from TOML as {again!r}, not {params!r}"

    def _close(self) -> None:
        close = getattr(self.monitor, "close", None)
        if callable(close):
            try:
                close()
            except Exception as err:  # noqa: BLE001
                self.problems["0:close"] = f"close() raised {type(err).__name__}: {err}"

    # -- driving -------------------------------------------------------------------------------

    def _drive_all(self) -> None:
        hidden = {"hidden_size": self.hidden_size}
        self._drive(_warm_up_request(), warm_up=True)
        self.shared = _reachable(self.monitor)
        self.shared.add(id(_VOCAB))
        ordinary = [
            _request("one block", 1, **hidden),
            _request("three blocks, dropped steps", 2, blocks=3, steps=16, keep=0.8, gap=5, **hidden),
            _request("no residual", 3, residual=False, **hidden),
            _request("sampler signals", 4, signals=True, **hidden),
        ]
        empty = _Request("no steps", 32, [], total_steps=24)
        self._drive(empty)
        for request in ordinary:
            run = self._drive(request)
            self.flags += [flag for _, flag in run.step_flags] + run.finish_flags
        baseline = _deep_size(self.monitor, set())
        self._check_new_block(hidden)
        self._check_interleaved(hidden)
        self._check_bounded(hidden)
        self._check_budget(hidden)
        grown = _deep_size(self.monitor, set()) - baseline
        if grown > 0.1 * baseline + 8192:
            self.problem(1, "instance", f"the monitor instance grew by {grown:,} bytes while requests ran; what "
                                         "belongs to a request goes in the state start() returns")

    def _drive(self, request: _Request, *, warm_up: bool = False, measure: bool = False,
               timings: list[tuple[str, float]] | None = None) -> _Run:
        run = _Run()
        self.timings = timings
        try:
            state = self._call(request, "start", None, lambda: self.monitor.start(request.meta()), warm_up)
            previous_block = None
            for spec in request.steps:
                step = spec.build(new_block=spec.block != previous_block)
                previous_block = spec.block
                flags = self._call(request, "on_step", step, lambda: self.monitor.on_step(state, step), warm_up)
                run.step_flags += [(spec.block, flag) for flag in self._flags(flags, request, "on_step", spec)]
            if measure:
                run.state_bytes = _deep_size(state, self.shared)
            flags = self._call(request, "on_finish", None, lambda: self.monitor.on_finish(state, request.final()), warm_up)
            run.finish_flags = self._flags(flags, request, "on_finish", None)
            run.completed = True
        except _Stop:
            pass
        finally:
            self.timings = None
        return run

    def _call(self, request: _Request, phase: str, step: DecodedStep | None, call: Callable[[], Any],
              warm_up: bool) -> Any:
        arrays = _arrays(step) if step is not None else {}
        before = {name: value.copy() for name, value in arrays.items()}
        started = time.perf_counter()
        try:
            result = call()
        except Exception as err:  # noqa: BLE001 - what the server's isolation would catch
            where = f" at block {step.block} step {step.step}" if step is not None else ""
            frame = traceback.extract_tb(err.__traceback__)[-1]
            rule = 6 if warm_up else 5
            self.problem(rule, f"raise:{phase}", (
                f"{phase} raised {type(err).__name__}: {err} ({frame.filename}:{frame.lineno}){where} of the "
                f"{request.name!r} request; the server would switch the monitor off for the rest of that request"))
            raise _Stop from None
        elapsed = time.perf_counter() - started
        if not warm_up:
            self.slowest = max(self.slowest, elapsed)
        if self.timings is not None:
            self.timings.append((phase, elapsed))
        for name, value in arrays.items():
            if not np.array_equal(value, before[name], equal_nan=True):
                self.problem(9, name, f"{phase} changed step.{name} in place (block {step.block} step {step.step} "
                                      f"of the {request.name!r} request); copy an array before changing it")
        return result

    def _flags(self, result: Any, request: _Request, phase: str, spec: _StepSpec | None) -> list[Flag]:
        where = f"{phase} of the {request.name!r} request" + (f" at block {spec.block} step {spec.step}" if spec else "")
        if not isinstance(result, (list, tuple)):
            self.problem(8, "list", f"{where} returned {type(result).__name__}, not a list of Flag (return [] for none)")
            return []
        flags = []
        for flag in result:
            if not isinstance(flag, Flag):
                self.problem(8, "type", f"{where} returned a {type(flag).__name__} among its flags, not a Flag")
                continue
            self._check_flag(flag, request, where)
            flags.append(flag)
        return flags

    def _check_flag(self, flag: Flag, request: _Request, where: str) -> None:
        if flag.monitor != self.name:
            self.problem(8, "monitor", f"a flag from {where} names monitor {flag.monitor!r}, not {self.name!r}")
        if not isinstance(flag.severity, Severity):
            self.problem(8, "severity", f"a flag from {where} has severity {flag.severity!r}, not a Severity")
        if not isinstance(flag.reason, str) or not flag.reason.strip():
            self.problem(8, "reason", f"a flag from {where} has no reason")
        elif MARK in flag.reason:
            self.problem(7, "reason", f"the reason {flag.reason!r} of a flag from {where} holds canvas text "
                                      "(the test vocabulary's pieces start with '§'); put text in Evidence.snippet")
        if not isinstance(flag.score, (int, float)) or isinstance(flag.score, bool) \
                or not math.isfinite(flag.score) or not 0.0 <= flag.score <= 1.0:
            self.problem(8, "score", f"a flag from {where} has score {flag.score!r}, not a number in [0, 1]")
        attributes = flag.attributes
        if not isinstance(attributes, Mapping) or not all(isinstance(key, str) and isinstance(value, str)
                                                          for key, value in attributes.items()):
            self.problem(8, "attributes", f"a flag from {where} has attributes {attributes!r}, not strings by name")
        else:
            for key, value in attributes.items():
                if MARK in key or MARK in value:
                    self.problem(7, "attributes", f"attribute {key!r} = {value!r} of a flag from {where} holds canvas "
                                                  "text; put text in Evidence.snippet")
        if not isinstance(flag.evidence, tuple) or not all(isinstance(e, Evidence) for e in flag.evidence):
            self.problem(8, "evidence", f"a flag from {where} has evidence {flag.evidence!r}, not a tuple of Evidence")
            return
        for evidence in flag.evidence:
            outside = [p for p in evidence.positions if not (isinstance(p, (int, np.integer)) and 0 <= p < request.length)]
            if outside:
                self.problem(8, "positions", f"evidence of a flag from {where} names positions {outside[:5]}, "
                                             f"outside the canvas [0, {request.length})")

    # -- the rules that need several runs ------------------------------------------------------

    def _check_new_block(self, hidden: dict) -> None:
        """Flags about a block must not depend on the block before it."""
        first = _request("a first block", 11, steps=20, **hidden).steps
        second = [dataclasses.replace(spec, block=1)
                  for spec in _request("a block", 12, steps=20, settled_at_start=0.5, **hidden).steps]
        after = self._drive(_Request("a block after another", 32, first + second, total_steps=20))
        alone = self._drive(_Request("the same block alone", 32, second, total_steps=20))
        if not (after.completed and alone.completed):
            return
        extra = _keys(_about_block(after, 1)) - _keys(_about_block(alone, 1))
        if extra:
            reason = next(iter(extra))[2]
            self.problem(3, "reset", f"block 1 after block 0 raised {sum(extra.values())} flag(s) that block 1 alone "
                                     f"does not, e.g. {reason!r}; reset what is kept per position when "
                                     "step.new_block is true")

    def _check_interleaved(self, hidden: dict) -> None:
        """Two requests on one instance, step by step in turn, flag as each does alone."""
        first, second = (_request(f"interleaved {n}", 20 + n, **hidden) for n in (1, 2))
        alone = [self._drive(first), self._drive(second)]
        if not all(run.completed for run in alone):
            return
        together = self._drive_interleaved(first, second)
        if together is None:
            return
        for request, single, mixed in zip((first, second), alone, together):
            if _keys(_all_flags(single)) != _keys(_all_flags(mixed)):
                self.problem(1, "interleave", f"the {request.name!r} request raised other flags while another "
                                              "request ran on the same instance than it raises alone")

    def _drive_interleaved(self, first: _Request, second: _Request) -> list[_Run] | None:
        runs = [_Run(), _Run()]
        requests = (first, second)
        try:
            states = [self._call(r, "start", None, lambda r=r: self.monitor.start(r.meta()), False) for r in requests]
            previous: list[int | None] = [None, None]
            for number in range(max(len(first.steps), len(second.steps))):
                for index, request in enumerate(requests):
                    if number >= len(request.steps):
                        continue
                    spec = request.steps[number]
                    step = spec.build(new_block=spec.block != previous[index])
                    previous[index] = spec.block
                    flags = self._call(request, "on_step", step,
                                       lambda i=index, s=step: self.monitor.on_step(states[i], s), False)
                    runs[index].step_flags += [(spec.block, f) for f in self._flags(flags, request, "on_step", spec)]
            for index, request in enumerate(requests):
                flags = self._call(request, "on_finish", None,
                                   lambda i=index, r=request: self.monitor.on_finish(states[i], r.final()), False)
                runs[index].finish_flags = self._flags(flags, request, "on_finish", None)
        except _Stop:
            return None
        return runs

    def _check_budget(self, hidden: dict) -> None:
        """Every call on a wide canvas, timed on two runs of the request (the faster of each pair
        counts, so that a pause of the machine is not taken for the monitor's cost)."""
        request = _request("wide canvas", 5, length=256, k=8, steps=16, **hidden)
        runs: list[list[tuple[str, float]]] = [[], []]
        for timings in runs:
            if not self._drive(request, timings=timings).completed:
                return
        for (phase, first), (_, second) in zip(*runs):
            elapsed = min(first, second)
            if elapsed > self.budget_s:
                self.problem(4, phase, f"{phase} took {elapsed * 1000:.1f} ms on a canvas of L = {request.length}, "
                                       f"k = 8, over the {self.budget_s * 1000:.0f} ms budget")

    def _check_bounded(self, hidden: dict) -> None:
        """State after 400 steps, in one block or in 16, against state after 40."""
        short = self._drive(_request("40 steps", 30, steps=40, **hidden), measure=True)
        long = self._drive(_request("400 steps in one block", 31, steps=400, **hidden), measure=True)
        blocks = self._drive(_request("400 steps in 16 blocks", 32, blocks=16, steps=25, **hidden), measure=True)
        if not short.completed:
            return
        limit = 1.5 * short.state_bytes + 8192
        for run, what in ((long, "400 steps in one block"), (blocks, "400 steps in 16 blocks")):
            if run.completed and run.state_bytes > limit:
                self.problem(2, what, f"the state held {run.state_bytes:,} bytes after {what} against "
                                      f"{short.state_bytes:,} after 40 steps (L = 32 in both)")


def _arrays(step: DecodedStep) -> dict[str, np.ndarray]:
    found = {"ids_np": step.ids_np, "probs_np": step.probs_np}
    for name in ("residual", "canvas_ids", "accepted", "entropy", "argmax_ids"):
        value = getattr(step, name)
        if value is not None:
            found[name] = value
    if step.hidden is not None:
        found["hidden"] = step.hidden.numpy()
    return found


def _all_flags(run: _Run) -> list[Flag]:
    return [flag for _, flag in run.step_flags] + run.finish_flags


def _about_block(run: _Run, block: int) -> list[Flag]:
    """Flags raised from `block` on whose evidence is all in `block` (a block judged at the next one's start is not)."""
    later = [flag for seen_in, flag in run.step_flags if seen_in >= block] + run.finish_flags
    return [flag for flag in later if flag.evidence and all(e.block == block for e in flag.evidence)]


def _keys(flags: Iterable[Flag]) -> collections.Counter:
    return collections.Counter(
        (flag.monitor, int(flag.severity), flag.reason, round(float(flag.score), 9), flag.evidence,
         tuple(sorted(flag.attributes.items())))
        for flag in flags
    )


def _listed(value: Any) -> Any:
    """Tuples as lists, all the way down: a TOML array reads back as a list."""
    if isinstance(value, (list, tuple)):
        return [_listed(v) for v in value]
    if isinstance(value, dict):
        return {k: _listed(v) for k, v in value.items()}
    return value


def _toml_type(hint: Any) -> bool:
    if hint in (int, float, str, bool, Any):
        return True
    origin = typing.get_origin(hint)
    arguments = [a for a in typing.get_args(hint) if a is not type(None) and a is not Ellipsis]
    if origin in (list, tuple):
        return all(_toml_type(a) for a in arguments)
    if origin in (typing.Union, types.UnionType):
        return len(arguments) == 1 and _toml_type(arguments[0])
    return False


_LEAVES = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
           types.CodeType, str, bytes, int, float, complex, bool, type(None))


def _reachable(root: Any, limit: int = 200_000) -> set[int]:
    """Ids of the objects `root` holds, directly or not (what requests share: not state)."""
    seen: set[int] = set()
    for _ in _walk(root, seen, limit):
        pass
    return seen


def _deep_size(root: Any, exclude: set[int], limit: int = 200_000) -> int:
    """Bytes held by `root` and what it holds, leaving out the objects in `exclude`."""
    seen = set(exclude)
    return sum(_own_size(item) for item in _walk(root, seen, limit))


def _walk(root: Any, seen: set[int], limit: int) -> Iterable[Any]:
    stack = [root]
    while stack and len(seen) < limit:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        if isinstance(item, (np.ndarray, torch.Tensor)) or isinstance(item, _LEAVES):
            continue
        if isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset, collections.deque)):
            stack.extend(item)
        attributes = getattr(item, "__dict__", None)
        if isinstance(attributes, dict):
            stack.append(attributes)
        for slot in getattr(type(item), "__slots__", ()):
            if isinstance(slot, str) and hasattr(item, slot):
                stack.append(getattr(item, slot))


def _own_size(item: Any) -> int:
    if isinstance(item, np.ndarray):
        return item.nbytes
    if isinstance(item, torch.Tensor):
        return item.numel() * item.element_size()
    try:
        return sys.getsizeof(item)
    except TypeError:
        return 0
