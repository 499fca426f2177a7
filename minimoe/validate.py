"""One check for every field of a config: the right type, a finite number, inside its declared range.

Each config dataclass (GPTConfig, TrainConfig, SampleConfig, the scripts' own) declares the allowed
interval of each numeric field with @ranges and calls check_fields first in __post_init__:

    @ranges(max_iters="[1, 1e12]", learning_rate="(0, 1]", ...)
    @dataclass
    class TrainConfig:
        ...
        def __post_init__(self):
            check_fields(self)
            ... relations between fields (min_lr <= learning_rate, top_k <= n_experts, ...)

(@ranges stores the table as cls.RANGES, outside the dataclass's fields, and --help shows it.)

Why one walker instead of an `if` per field: every comparison with NaN is False, so `if x < 0` lets
nan through, and int(inf) raises OverflowError; hand-written checks miss whole classes of bad values.
The walker goes by each field's type hint:
    bool       True or False (1 and "yes" are refused: from Python they usually hide a mistake)
    int        a Python int (not a bool, not 2.0), inside its interval
    float      an int or float (not a bool), finite, inside its interval
    str        a str, non-empty unless RANGES says "may be empty"
    X | None   None, or the check of X
A numeric field missing from RANGES is still held to its type, to finiteness and to the int64 range,
and tests/test_inputs.py names it, so a new field cannot ship without a declared range.
"""

from dataclasses import dataclass, fields
from functools import lru_cache
import math
import os
import re
import typing

INT64 = "[-9.2e18, 9.2e18]"      # the fallback interval of an int field without a declared range
FLOAT_ANY = "(-inf, inf)"         # ... and of a float field (still finite: the ends are open)
MAY_BE_EMPTY = "may be empty"     # RANGES value for a str field whose empty value means something


def ranges(prefix: str | None = None, **table):
    """Class decorator: the allowed interval of each numeric field ("[1, 1e12]", "(0, 1]", ...) or
    MAY_BE_EMPTY for a str field. prefix="--" makes errors name fields as the command line does."""
    def wrap(cls):
        unknown = sorted(set(table) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"@ranges on {cls.__name__}: no such field(s) {unknown}")
        for name, spec in table.items():
            if spec != MAY_BE_EMPTY:
                interval(spec)                              # a typo in a range fails at import
        cls.RANGES = dict(table)
        if prefix is not None:
            cls.PREFIX = prefix
        return cls
    return wrap


@dataclass(frozen=True)
class Interval:
    """A closed, open or half-open interval written as in maths: "[1, 1e12]", "(0, 1]", "[0, inf)"."""
    lo: float
    hi: float
    lo_open: bool
    hi_open: bool
    text: str

    def __contains__(self, v) -> bool:
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return above and below


@lru_cache(maxsize=None)
def interval(text: str) -> Interval:
    m = re.fullmatch(r"\s*([\[(])\s*([^,\s]+)\s*,\s*([^\]\s)]+)\s*([\])])\s*", text)
    if not m:
        raise ValueError(f"bad interval {text!r}: write it like '[1, 1e12]' or '(0, inf)'")
    return Interval(float(m[2]), float(m[3]), m[1] == "(", m[4] == ")", text.strip())


@lru_cache(maxsize=None)
def _hints(cls) -> dict:
    """field name -> (base type, optional) for every dataclass field of cls."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        args = typing.get_args(hints[f.name])
        optional = type(None) in args
        base = next(a for a in args if a is not type(None)) if optional else hints[f.name]
        out[f.name] = (base, optional)
    return out


def show(value) -> str:
    """repr(value), shortened to one readable piece (a 5000-digit int has no repr at all)."""
    try:
        text = repr(value)
    except ValueError:                                  # int too long to print (sys.int_info)
        return f"<a {value.bit_length()}-bit integer>"
    return text if len(text) <= 40 else text[:30] + "..." + text[-6:]


def allowed(cls, name: str) -> str:
    """What field `name` of config class `cls` accepts, in words (also shown by --help)."""
    base, optional = _hints(cls)[name]
    spec = getattr(cls, "RANGES", {}).get(name)
    none = ", or None" if optional else ""
    if base is bool:
        return "true or false" + none
    if base is int:
        return f"an integer in {spec or INT64}" + none
    if base is float:
        return f"a finite number in {spec or FLOAT_ANY}" + none
    if base is str:
        return ("a string" if spec == MAY_BE_EMPTY else "a non-empty string") + none
    return f"a {base.__name__}" + none


def bad_field(cfg, name: str) -> ValueError:
    """'TrainConfig.max_iters=0 is invalid: must be ...' (or '--max_iters=0 ...' with @ranges(prefix="--"))."""
    cls = type(cfg)
    prefix = getattr(cls, "PREFIX", cls.__name__ + ".")
    return ValueError(f"{prefix}{name}={show(getattr(cfg, name))} is invalid: must be {allowed(cls, name)}")


def check_fields(cfg) -> None:
    """Raise a one-line ValueError naming the first field of `cfg` whose value is not allowed."""
    table = getattr(type(cfg), "RANGES", {})
    for name, (base, optional) in _hints(type(cfg)).items():
        v = getattr(cfg, name)
        if v is None and optional:
            continue
        if base is bool:
            ok = isinstance(v, bool)
        elif base is int:
            ok = isinstance(v, int) and not isinstance(v, bool) and v in interval(table.get(name, INT64))
        elif base is float:
            ok = (isinstance(v, (int, float)) and not isinstance(v, bool)
                  and (isinstance(v, int) or math.isfinite(v))       # (math.isfinite(10**400) overflows)
                  and v in interval(table.get(name, FLOAT_ANY)))
        elif base is str:              # (a pathlib.Path is fine where a path is meant)
            ok = isinstance(v, (str, os.PathLike)) and (str(v) != "" or table.get(name) == MAY_BE_EMPTY)
        else:
            ok = isinstance(v, base)
        if not ok:
            raise bad_field(cfg, name)


def unranged_fields(cls) -> list[str]:
    """The int/float fields of cls without a declared interval (tests keep this list empty)."""
    table = getattr(cls, "RANGES", {})
    return [n for n, (base, _) in _hints(cls).items() if base in (int, float) and n not in table]
