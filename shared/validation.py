"""Reading structured data that another party wrote: strict JSON and declared shapes.

Everything a site, a coordinator or a file from elsewhere hands over is parsed here before any
field is used: :func:`load_json` refuses what Python's ``json`` would accept but no honest writer
produces (``NaN``/``Infinity``, integers of more digits than any count, nesting deeper than any
manifest, lone surrogates, more bytes than allowed), and :func:`check` holds the parsed value
against a declared shape (:class:`Record`, :class:`ListOf`, :class:`MapOf`, :class:`Str`,
:class:`Int`, :class:`Num`), so that a value of the wrong type, an absent key or an unbounded
list is a :class:`ValidationError` naming where it is, never a ``KeyError`` or ``TypeError``
deep inside the code that uses it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedatlas.shared.errors import FedatlasError

MAX_DEPTH = 32  # no manifest, adaptor or statement nests deeper than a few levels
MAX_INT_DIGITS = 19  # int64 and every count fit; Python would parse 4,300 digits
_SURROGATE = re.compile("[\ud800-\udfff]")


class ValidationError(FedatlasError):
    """Data from elsewhere is not what it must be (which field, what was expected)."""


def load_json(text: str | bytes, *, source: str, max_bytes: int) -> Any:
    """Parse JSON strictly (see the module docstring); :class:`ValidationError` otherwise."""
    size = len(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    if size > max_bytes:
        raise ValidationError(f"{source}: {size:,} bytes of JSON, at most {max_bytes:,} allowed")
    try:
        data = text.decode("utf-8") if isinstance(text, bytes) else text
        _check_depth(data, source)
        value = json.loads(data, parse_constant=_refuse_constant, parse_int=_bounded_int)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise ValidationError(f"{source}: not strict JSON ({exc})") from None
    _refuse_surrogates(value, source)
    return value


def _check_depth(text: str, source: str) -> None:
    """Refuse nesting deeper than :data:`MAX_DEPTH` before the parser recurses into it."""
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise ValidationError(f"{source}: JSON nested deeper than {MAX_DEPTH} levels")
        elif char in "]}":
            depth -= 1


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(digits)} characters")
    return int(digits)


def _refuse_surrogates(value: Any, source: str) -> None:
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise ValidationError(f"{source}: a string holds a lone UTF-16 surrogate")
    elif isinstance(value, list):
        for item in value:
            _refuse_surrogates(item, source)
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_surrogates(key, source)
            _refuse_surrogates(item, source)


# ------------------------------------------------------------------------------------ shapes
class Shape:
    """A declared shape of a JSON value."""

    def check(self, value: Any, where: str) -> None:
        """Raise :class:`ValidationError` unless ``value`` has this shape."""
        raise NotImplementedError


@dataclass(frozen=True)
class Str(Shape):
    """A string of at most ``max_len`` characters."""

    max_len: int = 1024

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, str):
            raise ValidationError(f"{where}: {_kind(value)}, expected a string")
        if len(value) > self.max_len:
            raise ValidationError(f"{where}: {len(value):,} characters, at most {self.max_len:,}")


@dataclass(frozen=True)
class Int(Shape):
    """An integer (not a boolean) in ``[low, high]``."""

    low: int = -(2**63)
    high: int = 2**63 - 1

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValidationError(f"{where}: {_kind(value)}, expected an integer")
        if not self.low <= value <= self.high:
            raise ValidationError(f"{where}: {value} is outside [{self.low}, {self.high}]")


@dataclass(frozen=True)
class Num(Shape):
    """A finite number."""

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValidationError(f"{where}: {_kind(value)}, expected a number")
        if not math.isfinite(value):
            raise ValidationError(f"{where}: {value} is not finite")


@dataclass(frozen=True)
class Bool(Shape):
    """``true`` or ``false``."""

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, bool):
            raise ValidationError(f"{where}: {_kind(value)}, expected true or false")


@dataclass(frozen=True)
class Json(Shape):
    """Any JSON value (its size and depth are bounded by :func:`load_json`)."""

    def check(self, value: Any, where: str) -> None:
        return


@dataclass(frozen=True)
class OneOf(Shape):
    """A value of one of ``shapes``."""

    shapes: tuple[Shape, ...]

    def check(self, value: Any, where: str) -> None:
        problems = []
        for shape in self.shapes:
            try:
                shape.check(value, where)
            except ValidationError as exc:
                problems.append(str(exc))
            else:
                return
        raise ValidationError(" or ".join(problems))


@dataclass(frozen=True)
class Nullable(Shape):
    """``null`` or ``shape``."""

    shape: Shape

    def check(self, value: Any, where: str) -> None:
        if value is not None:
            self.shape.check(value, where)


@dataclass(frozen=True)
class ListOf(Shape):
    """A list of at most ``max_len`` items of ``item``."""

    item: Shape
    max_len: int = 100_000

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, list):
            raise ValidationError(f"{where}: {_kind(value)}, expected a list")
        if len(value) > self.max_len:
            raise ValidationError(f"{where}: {len(value):,} items, at most {self.max_len:,}")
        for i, item in enumerate(value):
            self.item.check(item, f"{where}[{i}]")


@dataclass(frozen=True)
class MapOf(Shape):
    """An object of at most ``max_len`` string keys (each a :class:`Str`) to ``value``s."""

    value: Shape
    max_len: int = 100_000
    key: Str = Str(1024)

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise ValidationError(f"{where}: {_kind(value)}, expected an object")
        if len(value) > self.max_len:
            raise ValidationError(f"{where}: {len(value):,} entries, at most {self.max_len:,}")
        for key, item in value.items():
            self.key.check(key, f"{where} key {str(key)[:40]!r}")
            self.value.check(item, f"{where}[{key!r}]")


@dataclass(frozen=True)
class Record(Shape):
    """An object with the ``required`` keys and any of the ``optional`` ones; other keys are
    refused unless ``open`` (a format that later versions may extend)."""

    required: Mapping[str, Shape]
    optional: Mapping[str, Shape] = field(default_factory=dict)
    open: bool = False

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise ValidationError(f"{where}: {_kind(value)}, expected an object")
        missing = sorted(set(self.required) - set(value))
        unknown = [] if self.open else sorted(set(value) - set(self.required) - set(self.optional))
        if missing or unknown:
            raise ValidationError(f"{where}: missing keys {missing}, unknown keys {unknown[:5]}")
        for key, item in value.items():
            shape = self.required.get(key) or self.optional.get(key)
            if shape is not None:
                shape.check(item, f"{where}.{key}")


def check(value: Any, shape: Shape, where: str) -> None:
    """Raise :class:`ValidationError` (naming the field) unless ``value`` has ``shape``."""
    shape.check(value, where)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__
