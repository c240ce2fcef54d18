"""JSON from an adapter's files, parsed strictly: nesting capped before the parser recurses, no NaN or Infinity (nor
numbers too large for a float), no integer literals longer than any real setting, no key given twice. Every refusal
names the file and the key."""

from __future__ import annotations

import itertools
import json
import math
import re

from .errors import AdapterFormatError, where

MAX_INTEGER_DIGITS = 30  # longer literals are no setting any producer writes (and cost quadratic time to convert)
# a string, or an unterminated one to the end of the text: every quote that starts a match ends it, so removing
# them is linear even on hostile text
_STRING = re.compile(r'"(?:[^"\\]|\\.)*(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


class _NonFinite:
    """What a NaN, Infinity or too-large number parses to, found afterwards with the key that holds it."""

    def __init__(self, text: str):
        self.text = text


def nesting_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in `text`, counted without parsing (brackets in strings skipped)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0)


def loads(text: str, path, max_depth: int):
    """`text` parsed, or AdapterFormatError naming `path` and the key at fault."""
    depth = nesting_depth(text)
    if depth > max_depth:
        raise AdapterFormatError(f"{path}: expected JSON nested at most {max_depth} levels deep, found {depth}")

    def pairs(items):
        seen = {}
        for key, value in items:
            if key in seen:
                raise AdapterFormatError(f"{where(path, key)}: expected each key once in an object, found it twice")
            seen[key] = value
        return seen

    refused = []

    def refuse(text: str) -> _NonFinite:
        refused.append(text)
        return _NonFinite(text)

    def integer(literal: str):
        return refuse(literal[:12] + "...") if len(literal.lstrip("-")) > MAX_INTEGER_DIGITS else int(literal)

    def number(literal: str):
        value = float(literal)
        return value if math.isfinite(value) else refuse(literal)

    try:
        data = json.loads(text, object_pairs_hook=pairs, parse_constant=refuse, parse_int=integer,
                          parse_float=number)
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"{path}: not valid JSON ({e})") from None
    if refused:
        _refuse_non_finite(data, path)
    return data


def _refuse_non_finite(data, path) -> None:
    stack = [(data, None)]
    while stack:  # iterative: the depth is capped, but nothing here should recurse on input anyway
        value, key = stack.pop()
        if isinstance(value, _NonFinite):
            raise AdapterFormatError(f"{where(path, key) if key is not None else path}: expected a finite number of "
                                     f"ordinary size, found {value.text} (NaN, Infinity and out-of-range numbers "
                                     f"are not accepted)")
        if isinstance(value, dict):
            stack.extend((v, k if key is None else f"{key}.{k}") for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, f"{key}[{i}]" if key is not None else f"[{i}]") for i, v in enumerate(value))
