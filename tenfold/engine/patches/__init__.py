"""tenfold's replacements for vLLM symbols, one module per concern.

None of these modules changes vLLM: each one's `replacements()` returns what it would replace (reading vLLM's
current attributes as the originals it wraps), and `engine/vllm_compat.py`, the one module that patches vLLM,
checks the version and installs them in order (`install()`). A module whose replacements wrap another's (residency
wraps the worker cache's) comes after it there.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Replacement(NamedTuple):
    owner: Any  # a vLLM class or module
    name: str
    new: Any
    added: bool = False  # a method of tenfold's own on a vLLM class (vLLM calls none of them)


def replacing(owner, **new) -> list[Replacement]:
    """One Replacement per keyword: `replacing(Cls, method=fn, other=fn2)`."""
    return [Replacement(owner, name, value) for name, value in new.items()]
