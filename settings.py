"""Settings declared once: a config field's default, the help text of its flag, what it allows.

    hidden: int = setting(64, "H: channels of the encoder and decoder", low=2)

Every config of the project (vqvae.Config, prior.PriorConfig, config.TrainConfig,
evaluation.JudgeConfig) is a dataclass of such fields. check() holds each field to its
declaration, add_flags() makes a command-line flag of each field with help text (train.py's
command line), and from_dict() reads a config back from a run's config.json.
"""
import argparse
import math
import numbers
from dataclasses import field, fields

import numpy as np


class SettingError(ValueError):
    """A setting outside what its field allows; .name is the field, so that the command line can
    name the flag instead."""

    def __init__(self, name, message):
        super().__init__(message)
        self.name = name


def setting(default, help=None, *, low=None, above=None, below=None, high=None, choices=None, **flag):
    """A dataclass field with its allowed values: low <= v, above < v, v < below, v <= high, v in
    choices. help: the text of its command-line flag (None: not a flag, set by the program).
    flag: more for the command line (short='-K'; resumable=True: may be given again on resume;
    only=(field, values): applies only where another setting is one of those values) or for
    from_dict (absent=v: a saved config from before the setting existed had v)."""
    return field(default=default, metadata=dict(help=help, low=low, above=above, below=below, high=high,
                                                choices=choices, **flag))


KINDS = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


def is_real(v):
    """A finite real number, and not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v)


def check(cfg):
    """Each field of a config dataclass holds a value of its declared type, within what it allows
    (check_value), stored as a plain Python value. A field of another type (a tuple) is the
    config's own to check, and so is a None where None is the default (a setting decided later,
    as its help says)."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if f.type in KINDS and not (v is None and f.default is None):
            setattr(cfg, f.name, check_value(f, v))


def check_value(f, v):
    """v as a value of field f -> v as a plain Python value, or a SettingError that names the field,
    the value and what is allowed. A bool is not taken for a number (True would pass for K = 1) nor
    a number for a bool, and a real must be finite: inf and nan are never a setting. NumPy scalars
    are accepted. Then f's low, above, below, high and choices."""
    is_bool = isinstance(v, (bool, np.bool_))
    ok = {bool: is_bool, int: isinstance(v, numbers.Integral) and not is_bool, float: is_real(v),
          str: isinstance(v, str)}[f.type]
    if not ok:
        raise SettingError(f.name, f"{f.name} must be {KINDS[f.type]}, got {v!r}")
    v, m = f.type(v), f.metadata
    if m.get("choices") is not None and v not in m["choices"]:
        raise SettingError(f.name, f"{f.name} must be one of {', '.join(map(str, m['choices']))}, got {v!r}")
    lower = (f"[{m['low']}" if m.get("low") is not None else f"({m['above']}" if m.get("above") is not None else None)
    upper = (f"{m['below']})" if m.get("below") is not None else f"{m['high']}]" if m.get("high") is not None else None)
    ok = ((m.get("low") is None or v >= m["low"]) and (m.get("above") is None or v > m["above"])
          and (m.get("below") is None or v < m["below"]) and (m.get("high") is None or v <= m["high"]))
    if not ok:
        if lower and upper:
            allowed = f"in {lower}, {upper}"
        elif lower:
            allowed = f"{'>=' if lower[0] == '[' else '>'} {lower[1:]}"
        else:
            allowed = f"{'<' if upper[-1] == ')' else '<='} {upper[:-1]}"
        raise SettingError(f.name, f"{f.name} must be {allowed}, got {v!r}")
    return v


def from_dict(cls, d):
    """A config dataclass from a dict (a config.json section), refusing keys it does not know; a
    setting the dict lacks takes its `absent` value (what configs saved before it existed meant)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; expected some of {sorted(known)}")
    absent = {f.name: f.metadata["absent"] for f in fields(cls) if "absent" in f.metadata and f.name not in d}
    return cls(**d, **absent)


# -----------------------------------------------------------------------------
# the command line


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line (its usage of some sixty flags is a wall of text)
    and without abbreviated flags: '--batch 4' is an error, not a silent '--batch-size 4'
    that a resumed run's check for changed flags would not see."""

    def __init__(self, **kw):
        super().__init__(allow_abbrev=False, **kw)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_list(text):
    """'8,6,5' -> (8, 6, 5), for argparse."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}")


def flag(dest):
    """A field's flag: 'prior_steps' -> '--prior-steps'."""
    return "--" + dest.replace("_", "-")


def add_flags(parser, cls, prefix="", names=None):
    """A flag for each field of cls with help text (or those named), its default None: a flag not
    given keeps the dataclass's default, and `given` is what is not None."""
    for f in fields(cls):
        m = f.metadata
        if not m.get("help") or (names and f.name not in names):
            continue
        default = "" if f.default is None else f" (default: {','.join(map(str, f.default)) if f.type is tuple else f.default})"
        kw = dict(dest=prefix + f.name, default=None, help=m["help"] + default)
        if f.type is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"], kw["metavar"] = (int_list, "L1,L2,...") if f.type is tuple else (f.type, None)
            kw["choices"] = m.get("choices")
        parser.add_argument(flag(prefix + f.name), *([m["short"]] if m.get("short") else []), **kw)


def flag_message(e, prefix=""):
    """A SettingError's message, with the field that starts it named as the flag the user types."""
    message = str(e)
    return flag(prefix + e.name) + message[len(e.name):] if message.startswith(e.name) else message
