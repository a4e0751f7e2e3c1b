"""One schema for every setting: each key's type, default, range and choices, declared as data.

stages/config.py declares the keys of sources.toml and adapter.toml with `Key`; each source
file declares its own params the same way (`Source.PARAMS`, stages/sources/__init__.py).
`check()` validates one TOML table against such a schema: an unknown key (with the nearest
known one), a missing required key, a wrong type, a value out of range, not among the
choices or not of the expected form each become one line naming the file, the full dotted
key, what was expected and the fix. Defaults fill what the table leaves out, and a wrong
value is replaced by its default, so later checks never see a wrong type.
Stdlib only and cheap to import: dodo.py validates on every `doit`.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

REQUIRED = object()  # a Key's default when the key must be given

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "a table"}
_PLURAL = {str: "strings", int: "integers", float: "numbers", bool: "true/false values", dict: "tables"}


def type_name(types: type | tuple[type, ...]) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _show(value: Any) -> str:
    return '""' if value == "" else str(value)


@dataclass(frozen=True)
class Key:
    """One setting: its type, default and the values it may take."""
    type: type | tuple[type, ...]
    default: Any = None            # a value, a callable that makes one (lists, tables), or REQUIRED
    min: float | None = None       # inclusive bounds ...
    max: float | None = None
    above: float | None = None     # ... and exclusive ones
    below: float | None = None
    choices: tuple | None = None   # the values it (or, for a list, each item) may take
    items: type | None = None      # a list: the type of each item
    pattern: str | None = None     # a string (or each item): must match this regular expression in full
    expect: str = ""               # how a message says the range or form ("0 (all) or more"); built when empty
    unique: bool = False           # a list: no item twice
    nonblank: bool = False         # a string (or each item): not empty or only spaces

    def __getitem__(self, i: int) -> Any:  # the older (types, default) tuple form some callers index
        return (self.type, self.default)[i]

    def make_default(self) -> Any:
        return self.default() if callable(self.default) else self.default

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def expected(self) -> str:
        """What the key must be, in words, beyond its type."""
        if self.expect:
            return self.expect
        low = (f"at least {_num(self.min)}" if self.min not in (None, 0) else "0 or more" if self.min == 0
               else f"greater than {_num(self.above)}" if self.above is not None else "")
        high = (f"at most {_num(self.max)}" if self.max is not None
                else f"less than {_num(self.below)}" if self.below is not None else "")
        if self.min is not None and self.max is not None:
            return f"between {_num(self.min)} and {_num(self.max)}"
        return " and ".join(p for p in (low, high) if p)


def _coerce(value: Any, key: Key) -> tuple[Any, bool]:
    """TOML has distinct integers and floats: an integer is fine where a number is wanted, a bool never is."""
    types = key.type if isinstance(key.type, tuple) else (key.type,)
    if isinstance(value, bool):
        return value, bool in types
    if float in types and isinstance(value, int):
        return float(value), True
    return value, isinstance(value, types)


def _closest(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'? " if close else ""


def _default_hint(key: Key) -> str:
    if key.required:
        return "fix its value"
    default = key.make_default()
    shown = '""' if default == "" else repr(default) if isinstance(default, (str, list)) else str(default).lower() \
        if isinstance(default, bool) else str(default)
    return f"fix its value, or remove the key for the default ({shown})"


def check_value(where: str, dotted: str, value: Any, key: Key) -> tuple[Any, str | None]:
    """(the value, converted, or None) and the one-line problem with it, if any."""
    value, ok = _coerce(value, key)
    if not ok:
        shown = str(value).lower() if isinstance(value, bool) else repr(value)  # as TOML writes it
        return None, f"{where}: key '{dotted}' must be {type_name(key.type)} (got {shown}); {_default_hint(key)}"
    if isinstance(value, list) and key.items is not None:
        for item in value:
            if not isinstance(item, key.items) or (isinstance(item, bool) and key.items is not bool):
                return None, (f"{where}: key '{dotted}' must be a list of {_PLURAL.get(key.items, key.items.__name__)} "
                              f"(got {item!r} in it); fix that item")
    values = value if isinstance(value, list) else [value]
    for item in values:
        if key.choices is not None and item not in key.choices:
            options = ", ".join(_show(c) for c in key.choices)
            if isinstance(value, list):
                return None, (f"{where}: key '{dotted}' lists {item!r}, not one of {options}; "
                              f"{_closest(item, key.choices)}fix that item")
            return None, (f"{where}: key '{dotted}' must be one of {options} (got {item!r}); "
                          f"{_closest(item, key.choices)}{_default_hint(key)}")
        if key.nonblank and isinstance(item, str) and not item.strip():
            if isinstance(value, list):
                return None, f"{where}: key '{dotted}' holds an empty string; remove it"
            return None, f"{where}: key '{dotted}' is empty; give a value, or remove the key"
        if key.pattern is not None and isinstance(item, str) and item and not re.fullmatch(key.pattern, item):
            form = key.expect or f"of the form {key.pattern}"
            return None, f"{where}: key '{dotted}' must {'look' if form.startswith('like ') else 'be'} {form} (got {item!r}); fix it"
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            low_bad = (key.min is not None and item < key.min) or (key.above is not None and item <= key.above)
            high_bad = (key.max is not None and item > key.max) or (key.below is not None and item >= key.below)
            if low_bad or high_bad:
                return None, f"{where}: key '{dotted}' must be {key.expected()} (got {item!r}); {_default_hint(key)}"
    if key.unique and isinstance(value, list):
        seen = set()
        for item in value:
            if item in seen:
                return None, f"{where}: key '{dotted}' lists {item!r} twice; remove the repeat"
            seen.add(item)
    return value, None


def check(where: str, table: dict, schema: dict[str, Key], problems: list[str], prefix: str = "",
          required: bool = True) -> dict[str, Any]:
    """Validate `table` against `schema`: every key known and well-formed; defaults fill the rest.

    `where` is the file as the user knows it, `prefix` the dotted path of the table in it.
    A missing REQUIRED key is a problem only when `required` (a disabled source may leave it out).
    """
    out: dict[str, Any] = {}
    for name in table:
        if name not in schema:
            known = ", ".join(sorted(schema)) or "none"
            problems.append(f"{where}: unknown key '{prefix}{name}' ({_closest(name, schema)}known keys: {known}); "
                            f"rename or remove it")
    for name, key in schema.items():
        if name not in table:
            if key.required:
                if required:
                    problems.append(f"{where}: missing key '{prefix}{name}' ({type_name(key.type)}"
                                    f"{', ' + key.expected() if key.expected() else ''}); add it")
            else:
                out[name] = key.make_default()
            continue
        value, problem = check_value(where, f"{prefix}{name}", table[name], key)
        if problem:
            problems.append(problem)
            if not key.required:
                out[name] = key.make_default()
            continue
        out[name] = value
    return out
