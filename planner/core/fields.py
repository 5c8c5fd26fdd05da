"""Typed reads of the values a loaded file holds (house rule 3).

Each reader returns the value of `key` in a mapping read from a file, or raises one DistplanError naming
where it is, the key, what is valid and what was found, e.g.
    profile.yaml: compute[0].fwd: 'intercept_s' must be a number >= 0, got -0.2
so the from_dict functions never call float() or int() on what a file holds: a string where a number
belongs, a list where a mapping belongs, null, true/false, NaN or infinity are each refused by name.
A `default` makes the key optional: absent or null, the default is returned.
"""

from __future__ import annotations

import math
import re

from planner.core.errors import DistplanError

REQUIRED = object()  # default of the readers below: the key must be present
# a name (model, cluster, GPU, time term): printed in titles and one-line messages, so one line, no brackets (the
# console reads [..] as markup) and no control characters
NAME = re.compile(r"[^\[\]\x00-\x1f\x7f]{1,200}")
NAME_RULE = "a name: 1-200 characters on one line, without brackets"  # what NAME accepts, in words, for error messages


def short(value: object, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters (error messages stay one readable line)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _fail(where: str, key: str, valid: str, value: object) -> DistplanError:
    """"<source>: <section>.<key> must be ..." inside a section, "<source>: '<key>' must be ..." at the top."""
    label = f"{where}.{key}" if ": " in where else f"{where}: '{key}'"
    return DistplanError(f"{label} must be {valid}, got {short(value)}")


def _get(d: dict, key: str, where: str, default: object) -> tuple[bool, object]:
    """(True, value) to check, or (False, default) for an absent or null optional key."""
    if not isinstance(d, dict):
        raise DistplanError(f"{where}: expected a mapping with '{key}', got {short(d)}")
    if key not in d or (d[key] is None and default is not REQUIRED):
        if default is REQUIRED:
            raise DistplanError(f"{where}: missing key '{key}'")
        return False, default
    return True, d[key]


def _range(minimum: float | None, above: bool, maximum: float | None) -> str:
    shown = lambda x: f"{x:g}" if isinstance(x, float) else str(x)  # noqa: E731
    if minimum is not None and maximum is not None and not above:
        return f"from {shown(minimum)} to {shown(maximum)}"
    parts = []
    if minimum is not None:
        parts.append(f"{'>' if above else '>='} {shown(minimum)}")
    if maximum is not None:
        parts.append(f"<= {shown(maximum)}")
    return " and ".join(parts)


def is_number(value: object) -> bool:
    """An int or a finite float (true/false are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float
        return False


def check_number(value: object, key: str, where: str, minimum: float | None = None, *, above: bool = False,
                 maximum: float | None = None) -> float:
    bounds = _range(minimum, above, maximum)
    valid = f"a number {bounds}".rstrip()
    if not is_number(value):
        raise _fail(where, key, valid, value)
    if (minimum is not None and (value <= minimum if above else value < minimum)) or \
            (maximum is not None and value > maximum):
        raise _fail(where, key, valid, value)
    return float(value)


def check_integer(value: object, key: str, where: str, minimum: int | None = None, maximum: int | None = None) -> int:
    valid = f"an integer {_range(minimum, False, maximum)}".rstrip()
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(where, key, valid, value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise _fail(where, key, valid, value)
    return value


def number(d: dict, key: str, where: str, minimum: float | None = None, *, above: bool = False,
           maximum: float | None = None, default: object = REQUIRED) -> float:
    """d[key] as a finite float within the bounds (`above`: strictly above `minimum`)."""
    present, value = _get(d, key, where, default)
    return check_number(value, key, where, minimum, above=above, maximum=maximum) if present else value


def integer(d: dict, key: str, where: str, minimum: int | None = None, maximum: int | None = None,
            default: object = REQUIRED) -> int:
    present, value = _get(d, key, where, default)
    return check_integer(value, key, where, minimum, maximum) if present else value


def text(d: dict, key: str, where: str, choices: tuple[str, ...] = (), default: object = REQUIRED) -> str:
    present, value = _get(d, key, where, default)
    if not present:
        return value
    if not isinstance(value, str) or (choices and value not in choices):
        raise _fail(where, key, f"one of {', '.join(choices)}" if choices else "text", value)
    return value


def name(d: dict, key: str, where: str, default: object = REQUIRED) -> str:
    present, value = _get(d, key, where, default)
    if present and not (isinstance(value, str) and NAME.fullmatch(value)):
        raise _fail(where, key, NAME_RULE, value)
    return value


def flag(d: dict, key: str, where: str, default: object = REQUIRED) -> bool:
    present, value = _get(d, key, where, default)
    if present and not isinstance(value, bool):
        raise _fail(where, key, "true or false", value)
    return value


def mapping(d: dict, key: str, where: str, default: object = REQUIRED) -> dict:
    present, value = _get(d, key, where, default)
    if present and not isinstance(value, dict):
        raise _fail(where, key, "a mapping", value)
    return value


def listing(d: dict, key: str, where: str, default: object = REQUIRED) -> list:
    present, value = _get(d, key, where, default)
    if present and not isinstance(value, list):
        raise _fail(where, key, "a list", value)
    return value
