"""The command line of every script: `--field=value` for the fields of any dataclass.

    model_config, cfg = parse_overrides(sys.argv[1:], GPTConfig(), TrainConfig())

No argparse table to keep in sync: the options are the dataclass fields, --help shows each with its
default, the `# comment` after it in the source and its range (@ranges, validate.py), and a typo or
a badly typed value is a one-line ValueError that says what to write instead.
"""

from dataclasses import fields, replace
import difflib
import inspect
import math
import re
import typing

from .validate import MAY_BE_EMPTY, allowed, show


def field_comments(cls) -> dict:
    """The `# comment` after each field in the class source: the help text of --help."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return dict(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", source, flags=re.M))


def help_text(*configs) -> str:
    """--help: every field of each config with its default, its comment and its allowed range."""
    lines = ["options (--field=value; bools take true/false, Optional fields take None):"]
    for c in configs:
        comments = field_comments(type(c))
        table = getattr(type(c), "RANGES", {})
        lines.append(f"\n  {type(c).__name__}:")
        for f in fields(c):
            option = f"--{f.name}={getattr(c, f.name)!r}"
            span = f"(range {table[f.name]})" if table.get(f.name, MAY_BE_EMPTY) != MAY_BE_EMPTY else ""
            lines.append(f"    {option:<34} {' '.join(filter(None, (comments.get(f.name), span)))}".rstrip())
    return "\n".join(lines)


def parse_value(name: str, text: str, hint, cls=None):
    """Parse the text of --name=text into the field's type (int, float, bool, str, X | None).
    Only the syntax is checked here; the value's range is the dataclass's __post_init__'s job."""
    args = typing.get_args(hint)
    if type(None) in args:
        if text.lower() == "none":
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"--{name}={show(text)} is not a boolean: use true/false (or 1/0)")
    try:
        if hint is int:
            if re.fullmatch(r"[+-]?[\d_.]+[eE][+-]?\d+", text):       # 5e5 is fine; 1e999 is inf
                value = float(text)
                if not math.isfinite(value) or value != int(value):
                    raise ValueError
                return int(value)
            return int(text)                     # (a 5000-digit int raises ValueError too)
        if hint is float:
            return float(text)                   # nan/inf parse; __post_init__ says they are not allowed
    except ValueError:
        kind = "an integer" if hint is int else "a number"
        none = " or None" if type(None) in args else ""
        what = f"; allowed: {allowed(cls, name)}" if cls is not None else ""
        raise ValueError(f"--{name}={show(text)} is not {kind}{none}{what}") from None
    return text


def parse_overrides(argv, *configs):
    """Apply `--field=value` arguments to the given dataclass instances (in place) and return them
    as a tuple. Each field name may belong to one instance only. `--help` prints every field with
    its default and comment and exits; an unknown or badly typed option raises a ValueError that
    says what to write instead. The instances are re-validated afterwards (their __post_init__)."""
    owner = {}
    for c in configs:
        for f in fields(c):
            if f.name in owner:
                raise ValueError(f"field {f.name!r} is in both {type(owner[f.name]).__name__} and "
                                 f"{type(c).__name__}; the command line could not tell them apart")
            owner[f.name] = c
    if "--help" in argv or "-h" in argv:
        print(help_text(*configs))
        raise SystemExit(0)
    for arg in argv:
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: options look like --field=value (see --help)")
        name, has_value, text = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name not in owner:
            close = difflib.get_close_matches(name, list(owner), n=3)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
            raise ValueError(f"unknown option --{name}{hint} (--help lists all options)")
        c = owner[name]
        hint = typing.get_type_hints(type(c))[name]
        if not has_value:
            if hint is not bool:
                raise ValueError(f"--{name} needs a value: --{name}=VALUE")
            text = "true"                                      # a bare --compile means --compile=true
        setattr(c, name, parse_value(name, text, hint, type(c)))
    for c in configs:
        replace(c)                     # builds a copy, which runs __post_init__: invalid values raise
    return configs
