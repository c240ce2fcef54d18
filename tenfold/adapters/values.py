"""Typed, ranged reads of an adapter config's values: each value a family reads is checked where it reads it, with a
message naming the file, the key, what was expected and what was found. Numbers are finite and of ordinary size,
ranks and sizes positive integers (never booleans or floats), regular expressions compiled and free of the
constructs that make matching slow (nested or many quantifiers, back-references)."""

from __future__ import annotations

import math
import re
from re import _parser as sre_parse  # the parser `re` compiles with (`sre_parse` is its deprecated alias)

from .errors import AdapterFormatError, where

REQUIRED = object()
MAX_MAGNITUDE = 1e6       # |alpha|, |scaling|: beyond it ordinary factors overflow half-precision products
MAX_SIZE = 1 << 20        # ranks, widths and block sizes: above any model's width
MAX_LAYERS = 1 << 12      # layer counts and indices: above any model's depth
MAX_PATTERN = 256         # characters of one regular expression
MAX_QUANTIFIERS = 3       # repeats in one regular expression (real ones use one or two)
MAX_NAMES = 1024          # entries of a list of module names or layer indices
MAX_TEXT = 256            # characters of a name or choice


def shown(value) -> str:
    """A value for a message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite int or float (not a bool)."""
    return is_int(value) or (isinstance(value, float) and math.isfinite(value))


class Values:
    """One config mapping's values, read with their checks (`prefix` names where the mapping sits in the file, as in
    "config." for tenfold's own format)."""

    def __init__(self, config, path, prefix: str = ""):
        self.path, self.prefix = path, prefix
        if not isinstance(config, dict):
            raise AdapterFormatError(f"{self.where()}: expected an object, found {shown(config)}")
        self.config = config

    def where(self, key: str | None = None) -> str:
        name = f"{self.prefix}{key}" if key is not None else self.prefix.rstrip(".") or None
        return where(self.path, name)

    def fail(self, key: str, expected: str, value=REQUIRED):
        value = self.config.get(key) if value is REQUIRED else value
        raise AdapterFormatError(f"{self.where(key)}: expected {expected}, found {shown(value)}")

    def _value(self, key, default):
        value = self.config.get(key)
        if value is None:
            if default is REQUIRED:
                self.fail(key, "a value (the key is required)")
            return default
        return value

    def int(self, key: str, default=REQUIRED, minimum: int = 1, maximum: int = MAX_SIZE) -> int:
        value = self._value(key, default)
        if value is not None and not (is_int(value) and minimum <= value <= maximum):
            self.fail(key, f"an integer from {minimum} to {maximum}", value)
        return value

    def number(self, key: str, default=REQUIRED, minimum: float = -MAX_MAGNITUDE, maximum: float = MAX_MAGNITUDE,
               nonzero: bool = False) -> float:
        value = self._value(key, default)
        if value is not None and not (is_number(value) and minimum <= value <= maximum and not (nonzero and value == 0)):
            self.fail(key, f"a{' nonzero' if nonzero else ''} finite number from {minimum:g} to {maximum:g}", value)
        return value

    def fraction(self, key: str) -> float:
        """A dropout probability: in [0, 1), 0 when unset."""
        value = self._value(key, 0.0)
        if not is_number(value) or not 0 <= value < 1:
            self.fail(key, "a probability from 0 up to (not including) 1", value)
        return float(value)

    def flag(self, key: str, default: bool = False) -> bool:
        value = self._value(key, default)
        if not isinstance(value, bool):
            self.fail(key, "true or false", value)
        return value

    def choice(self, key: str, options, default=REQUIRED):
        value = self._value(key, default)
        if not any(value is option or (type(value) is type(option) and value == option) for option in options):
            self.fail(key, f"one of {', '.join(shown(o) for o in options)}", value)
        return value

    def text(self, key: str, default=None) -> str | None:
        value = self._value(key, default)
        if value is not None and not (isinstance(value, str) and len(value) <= MAX_TEXT):
            self.fail(key, f"a string of at most {MAX_TEXT} characters", value)
        return value

    def names(self, key: str, default=None) -> list[str] | None:
        """A list of short strings (module names)."""
        value = self._value(key, default)
        if value is not None and not _names(value):
            self.fail(key, f"a list of at most {MAX_NAMES} module names (strings)", value)
        return value

    def targets(self, key: str, wrap: str = "{}") -> str | list[str] | None:
        """null, a regular expression (used as `wrap` with the expression in it) or a list of module names: PEFT's
        target_modules and exclude_modules."""
        value = self.config.get(key)
        if isinstance(value, str):
            return self.regex(key, value, wrap)
        if value is not None and not _names(value):
            self.fail(key, f"null, a regular expression or a list of at most {MAX_NAMES} module names", value)
        return value

    def layers(self, key: str) -> int | list[int] | None:
        """null, one layer index or a list of them."""
        value = self.config.get(key)
        single = is_int(value) and 0 <= value < MAX_LAYERS
        many = isinstance(value, list) and len(value) <= MAX_NAMES and all(
            is_int(i) and 0 <= i < MAX_LAYERS for i in value)
        if value is not None and not (single or many):
            self.fail(key, f"null, a layer index or a list of at most {MAX_NAMES} layer indices (integers from 0 to "
                           f"{MAX_LAYERS - 1})", value)
        return value

    def layer_list(self, key: str) -> list[int] | None:
        """null or a list of layer indices."""
        value = self.config.get(key)
        if value is not None and not isinstance(value, list):
            self.fail(key, "null or a list of layer indices")
        return self.layers(key)

    def patterns(self, key: str, wrap: str, check) -> dict:
        """A mapping of regular expressions (used as `wrap`) to values that `check(value)` accepts; {} when unset.
        `check` returns the accepted values' description when it refuses one."""
        value = self._value(key, {})
        if not isinstance(value, dict) or len(value) > MAX_NAMES:
            self.fail(key, f"a mapping of at most {MAX_NAMES} module patterns to values", value)
        for pattern, entry in value.items():
            self.regex(key, pattern, wrap)
            refused = check(entry)
            if refused:
                self.fail(key, f"{refused} for pattern {shown(pattern)}", entry)
        return value

    def regex(self, key: str, pattern, wrap: str = "{}") -> str:
        problem = regex_problem(pattern, wrap)
        if problem:
            self.fail(key, f"a regular expression ({problem})", pattern)
        return pattern


def _names(value) -> bool:
    return isinstance(value, list) and len(value) <= MAX_NAMES and all(
        isinstance(n, str) and 0 < len(n) <= MAX_TEXT for n in value)


def positive_int(value) -> str | None:
    """`Values.patterns` check: a rank."""
    return None if is_int(value) and 1 <= value <= MAX_SIZE else f"an integer from 1 to {MAX_SIZE}"


def positive_number(value) -> str | None:
    """`Values.patterns` check: a positive alpha."""
    ok = is_number(value) and 0 < value <= MAX_MAGNITUDE
    return None if ok else f"a positive finite number up to {MAX_MAGNITUDE:g}"


def finite_number(value) -> str | None:
    """`Values.patterns` check: an alpha."""
    ok = is_number(value) and abs(value) <= MAX_MAGNITUDE
    return None if ok else f"a finite number from {-MAX_MAGNITUDE:g} to {MAX_MAGNITUDE:g}"


def regex_problem(pattern, wrap: str = "{}") -> str | None:
    """Why `pattern` cannot be used as a module-path regular expression (inside `wrap`), or None. What is refused is
    what makes backtracking blow up even on short strings: inside a quantified group any other quantifier or an
    alternation (ambiguous repetition), more than a few quantifiers in all, back-references."""
    if not isinstance(pattern, str) or not 0 < len(pattern) <= MAX_PATTERN:
        return f"a string of 1 to {MAX_PATTERN} characters"
    try:
        parsed = sre_parse.parse(pattern)
        re.compile(wrap.replace("{}", pattern))
    except (re.error, OverflowError, RecursionError, ValueError) as e:
        return f"does not compile: {e}"
    quantifiers = 0
    stack = [(parsed, False)]
    while stack:
        items, repeated = stack.pop()
        for op, arg in items:
            name = str(op)
            if name in ("GROUPREF", "GROUPREF_EXISTS"):
                return "no back-references"
            if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT", "BRANCH") and repeated:
                return "nothing optional, repeated or alternative inside a repeated group"
            if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                quantifiers += 1
                stack.append((arg[2], arg[1] > 1))
            elif name == "SUBPATTERN":
                stack.append((arg[-1], repeated))
            elif name == "BRANCH":
                stack.extend((branch, repeated) for branch in arg[1])
            elif name in ("ASSERT", "ASSERT_NOT"):
                stack.append((arg[1], repeated))
            elif name == "ATOMIC_GROUP":
                stack.append((arg, repeated))
    if quantifiers > MAX_QUANTIFIERS:
        return f"at most {MAX_QUANTIFIERS} quantifiers"
    return None
