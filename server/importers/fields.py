"""Reading the capture files' JSON fields, refusing anything malformed with one line.

Every refusal is a `CaptureError` whose message names the file and the field,
the way the sidecar names a bad wire field:

    clean.json: lily__0.final_ids: expected 256 integers, got 255   (under --canvas-length 256)

Field paths are `<record>.<field>[<index>]`: a record is its key in a JSON
object (clean.json, anim_curves.json) or `[i]` in a JSON list (gallery.json,
bench_order.json, films_order.json, poem_order.json). The checks are
vectorised (one NumPy conversion per field), so validating all of clean.json
costs milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np


class CaptureError(ValueError):
    """A capture file the importer refuses: the message is one line naming file and field."""

    def __init__(self, file: str, field: str, problem: str) -> None:
        super().__init__(f"{file}: {field}: {problem}")
        self.file = file
        self.field = field
        self.problem = problem


def load_json(path: Path) -> Any:
    """The file's JSON, or a CaptureError saying why it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise CaptureError(path.name, "(file)", f"cannot read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise CaptureError(path.name, "(file)", f"not UTF-8 text: {err.reason} at byte {err.start}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise CaptureError(path.name, "(file)", f"not JSON: {err.msg} at line {err.lineno} column {err.colno}") from None


def load_run_list(path: Path) -> list:
    """A capture that is a list of runs (gallery, bench_order, films, poem): its JSON, checked to be a list."""
    data = load_json(path)
    if not isinstance(data, list):
        hint = " (this one is an object: clean.json's format?)" if isinstance(data, dict) else ""
        raise CaptureError(path.name, "(top level)", f"expected a list of runs{hint}")
    return data


class Fields:
    """Typed reads of one record's fields, each refusal naming `file: record.field`."""

    def __init__(self, file: str, record: str, value: Any) -> None:
        self.file = file
        self.record = record
        if not isinstance(value, Mapping):
            raise CaptureError(file, record, f"expected an object, got {_kind(value)}")
        self.value = value

    def where(self, key: str) -> str:
        return f"{self.record}.{key}"

    def fail(self, key: str, problem: str) -> "CaptureError":
        return CaptureError(self.file, self.where(key), problem)

    def has(self, key: str) -> bool:
        return key in self.value

    def raw(self, key: str) -> Any:
        if key not in self.value:
            raise self.fail(key, "missing")
        return self.value[key]

    def string(self, key: str, *, optional: bool = False) -> str | None:
        if optional and self.value.get(key) is None:
            return None
        value = self.raw(key)
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {_kind(value)}")
        return value

    def integer(self, key: str, *, low: int | None = None, high: int | None = None,
                optional: bool = False) -> int | None:
        """An integer in [low, high] (inclusive where given)."""
        if optional and self.value.get(key) is None:
            return None
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {_kind(value)}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise self.fail(key, f"{value} is outside [{low if low is not None else '-inf'}, "
                                 f"{high if high is not None else 'inf'}]")
        return value

    def number(self, key: str, *, optional: bool = False) -> float | None:
        if optional and self.value.get(key) is None:
            return None
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise self.fail(key, f"expected a finite number, got {_kind(value)}")
        return float(value)

    def boolean(self, key: str, *, optional: bool = False) -> bool | None:
        if optional and self.value.get(key) is None:
            return None
        value = self.raw(key)
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {_kind(value)}")
        return value

    def strings(self, key: str) -> list[str]:
        value = self.raw(key)
        if not isinstance(value, list):
            raise self.fail(key, f"expected a list of strings, got {_kind(value)}")
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise CaptureError(self.file, f"{self.where(key)}[{index}]", f"expected a string, got {_kind(item)}")
        return list(value)

    def child(self, key: str) -> "Fields":
        return Fields(self.file, self.where(key), self.raw(key))

    def ints(self, key: str, *, length: int | None = None, low: int = 0, high: int | None = None,
             what: str = "integers") -> np.ndarray:
        """A flat list of integers in [low, high) as int64, with the exact length where given."""
        return int_array(self.raw(key), self.file, self.where(key), ndim=1,
                         shape=None if length is None else (length,), low=low, high=high, what=what)

    def floats(self, key: str, *, low: float | None = None) -> np.ndarray:
        value = self.raw(key)
        where = self.where(key)
        if not isinstance(value, list) or not value:
            raise CaptureError(self.file, where, f"expected a non-empty list of numbers, got {_kind(value)}")
        array = _as_array(value)
        if array is None or array.ndim != 1 or array.dtype.kind not in "iuf":
            bad = next((i for i, x in enumerate(value) if isinstance(x, bool) or not isinstance(x, (int, float))), 0)
            raise CaptureError(self.file, f"{where}[{bad}]", f"expected a number, got {_kind(value[bad])}")
        array = array.astype(np.float64)
        finite = np.isfinite(array)
        if not finite.all():
            bad = int(np.argmin(finite))
            raise CaptureError(self.file, f"{where}[{bad}]", f"expected a finite number, got {value[bad]!r}")
        if low is not None and (array < low).any():
            bad = int(np.argmax(array < low))
            raise CaptureError(self.file, f"{where}[{bad}]", f"{value[bad]!r} is below {low}")
        return array


def int_array(value: Any, file: str, where: str, *, ndim: int, shape: tuple[int, ...] | None = None,
              low: int = 0, high: int | None = None, what: str = "integers") -> np.ndarray:
    """`value` (nested JSON lists) as an int64 array of rank `ndim`, every element an integer in [low, high).

    The message names the first offending element (`field[3]`, `field[2][17]`).
    """
    if not isinstance(value, list):
        raise CaptureError(file, where, f"expected a list of {what}, got {_kind(value)}")
    if shape is not None and len(value) != shape[0]:
        raise CaptureError(file, where, f"expected {shape[0]} {_plural(what, ndim)}, got {len(value)}")
    if ndim == 1 and not value:
        return np.zeros(0, dtype=np.int64)
    array = _as_array(value)
    if array is None or array.ndim != ndim or array.dtype.kind not in "iu" or (array.size == 0 and ndim > 1):
        raise _first_bad_element(value, file, where, ndim, shape, what)
    if shape is not None and array.shape != shape:
        raise _first_bad_element(value, file, where, ndim, shape, what)
    if _holds_bool(value, ndim):  # NumPy reads [True, 2] as integers; JSON true is not an id
        raise _first_bad_element(value, file, where, ndim, shape, what)
    array = array.astype(np.int64, copy=False)
    outside = array < low
    if high is not None:
        outside |= array >= high
    if outside.any():
        index = np.unravel_index(int(np.argmax(outside.reshape(-1))), array.shape)
        bad = int(array[index])
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        raise CaptureError(file, where + "".join(f"[{i}]" for i in index), f"{bad} is outside {bound}")
    return array


def _holds_bool(value: list, ndim: int) -> bool:
    if ndim == 1:
        return bool in set(map(type, value))
    return any(_holds_bool(row, ndim - 1) for row in value)


def _as_array(value: list) -> np.ndarray | None:
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):  # ragged nesting
        return None
    if array.dtype == object:
        return None
    return array


def _first_bad_element(value: list, file: str, where: str, ndim: int, shape: tuple[int, ...] | None,
                       what: str) -> CaptureError:
    """Walk the nesting to say exactly which element is not an integer (only on failure)."""
    def walk(item: Any, path: str, depth: int) -> CaptureError | None:
        if depth == ndim:
            if isinstance(item, bool) or not isinstance(item, int):
                return CaptureError(file, path, f"expected an integer, got {_kind(item)}")
            return None
        if not isinstance(item, list):
            return CaptureError(file, path, f"expected a list, got {_kind(item)}")
        if shape is not None and len(item) != shape[depth]:
            return CaptureError(file, path, f"expected {shape[depth]} {_plural(what, ndim - depth)}, got {len(item)}")
        for index, sub in enumerate(item):
            found = walk(sub, f"{path}[{index}]", depth + 1)
            if found is not None:
                return found
        return None

    found = walk(value, where, 0)
    if found is not None:
        return found
    width = {len(row) for row in value if isinstance(row, list)}
    return CaptureError(file, where, f"rows of different lengths {sorted(width)[:4]}; expected a rectangular table")


def _plural(what: str, depth: int) -> str:
    return what if depth <= 1 else "rows"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value[:20]!r})"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
