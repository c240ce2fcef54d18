"""Checkpoint settings: every key of a producer's adapter_config.json is honoured with the producer's meaning, or
the checkpoint is refused naming the file, the key, what tenfold serves and what it found.

Each format reader declares its keys in three groups:
- honoured: tenfold implements the producer's meaning exactly (or the key has no effect on the served forward pass:
  dropout, init-only options, bookkeeping);
- refused when set: the producer gives the key a meaning tenfold does not serve (the value that is accepted is given);
- any other key (one tenfold has never seen) is refused unless it is unset (null, false, empty), because its meaning
  is unknown: a checkpoint is served with exactly its producer's meaning or not at all.

Targeting (which modules of the base model an adapter changes) follows the producer's rule, written out from its
documentation and code: `peft_targeted` is PEFT's rule (target_modules, exclude_modules, layers_to_transform,
layers_pattern, modules_to_save), `loretta_targeted` is the official LoRETTA code's rule (a plain suffix test).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from .errors import AdapterFormatError, AdapterKeyError, where
from .values import Values, shown

# Keys every PEFT-style config carries; none changes the forward pass.
BOOKKEEPING = ("peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
               "peft_version")


def _unset(value) -> bool:
    return value is None or value is False or (isinstance(value, (list, dict, str, tuple)) and len(value) == 0)


def not_set(value) -> bool:
    """null, false or empty: the setting is off."""
    return _unset(value)


@dataclass(frozen=True)
class Refusal:
    key: str
    accepted: str                       # what tenfold serves, in words, for the message
    ok: object                          # predicate on the value: True when it is served
    why: str                            # the producer's meaning and what to do instead


def audit(config: dict, cfg_path, honoured: tuple[str, ...], refusals: tuple[Refusal, ...], producer: str) -> None:
    """Raise AdapterFormatError for the first key whose setting tenfold does not serve."""
    by_key = {r.key: r for r in refusals}
    for key, value in config.items():
        if key in by_key:
            rule = by_key[key]
            if not rule.ok(value):
                raise AdapterFormatError(f"{where(cfg_path, key)}: expected {rule.accepted}, found {value!r}; "
                                         f"{rule.why}")
        elif key not in honoured and key not in BOOKKEEPING and not _unset(value):
            raise AdapterFormatError(
                f"{where(cfg_path, key)}: expected the key to be absent or unset, found {value!r}; tenfold does not "
                f"know what this {producer} setting does, and serves a checkpoint only with its producer's exact "
                f"meaning (see README, 'Checkpoint settings')")


# --- targeting --------------------------------------------------------------------------------------------------

ALL_LINEAR = "all-linear"


def _layer_index(key: str, layers_pattern) -> int | None:
    """PEFT's layer index of a module path: the first numbered segment (after `layers_pattern` when given)."""
    if layers_pattern is None or len(layers_pattern) == 0:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        m = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def peft_targeted(config: dict, key: str, linear_names=None) -> bool:
    """Whether PEFT adapts the module at path `key` (``model.layers.3.self_attn.q_proj``) under this config:
    exclude_modules and modules_to_save win; a string target is a full-match regex (``all-linear`` means every
    linear layer but the output head); a list matches a path equal to or ending in ``.<target>``; layers_to_transform
    (with layers_pattern) then filters list targets by layer index."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    for m in config.get("modules_to_save") or ():
        if re.match(rf"(^|.*\.){m}($|\..*)", key):
            return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        if targets == ALL_LINEAR:
            targets = list(linear_names or ())
        else:
            return re.fullmatch(targets, key) is not None
    if key in targets:
        return True  # named in full: layers_to_transform does not apply (PEFT's rule)
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and len(layers) == 0):
        return True
    index = _layer_index(key, config.get("layers_pattern"))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def loretta_targeted(config: dict, key: str) -> bool:
    """The official LoRETTA code's rule: a string is a full-match regex, a list matches any path *ending with* an
    entry (no dot required)."""
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    return any(key.endswith(t) for t in targets or ())


# How each targeting setting is used as a regular expression ("{}" is the user's expression).
TARGET_REGEX = "{}"                                        # re.fullmatch(target_modules / exclude_modules, path)
LAYERS_REGEX = r"(?:^|.*?\.){}\.(?P<idx>\d+)\."          # `_layer_index`


def check_peft_targeting(values: Values) -> None:
    """target_modules, exclude_modules, layers_to_transform and layers_pattern as PEFT reads them."""
    values.targets("target_modules", TARGET_REGEX)
    values.targets("exclude_modules", TARGET_REGEX)
    values.layers("layers_to_transform")
    pattern = values.config.get("layers_pattern")
    for entry in [pattern] if isinstance(pattern, str) else values.names("layers_pattern") or ():
        values.regex("layers_pattern", entry, LAYERS_REGEX)


_TARGETING_KEYS = ("rule", "path_template", "blocks", "target_modules", "exclude_modules", "layers_to_transform",
                   "layers_pattern")


def check_targeting(values: Values, key: str = "targeting") -> None:
    """tenfold's record of the producer's targeting rule (`targeted_set` reads it), as a family config holds it."""
    if values.config.get(key) is None:
        return
    targeting = Values(values.config[key], values.path, f"{values.prefix}{key}.")
    unknown = sorted(k for k in targeting.config if k not in _TARGETING_KEYS)
    if unknown:
        targeting.fail(unknown[0], f"only the keys {', '.join(_TARGETING_KEYS)}")
    targeting.choice("rule", ("peft", "loretta"), "peft")
    template = targeting.text("path_template")
    if template is not None and template_problem(template):
        targeting.fail("path_template", template_problem(template))
    blocks = targeting.config.get("blocks") or {}
    if not isinstance(blocks, dict) or not all(isinstance(m, str) and isinstance(b, str) and
                                               (b == "" or _PATH_PART.fullmatch(b)) for m, b in blocks.items()):
        targeting.fail("blocks", "a mapping of module names to the path segment holding them")
    check_peft_targeting(targeting)


MAX_TEMPLATE = 128  # characters of a module path template: module paths stay short for the targeting regexes
_PATH_PART = re.compile(r"[\w.-]{1,%d}" % MAX_TEMPLATE)


def template_problem(template: str) -> str | None:
    """Why `template` is not a module path template (plain path text and the fields {layer}, {block}, {module}
    without format specs), or None."""
    if len(template) > MAX_TEMPLATE:
        return f"a module path template of at most {MAX_TEMPLATE} characters"
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError:
        parts = None
    fields = [field for _, field, _, _ in parts or ()]
    if parts is None or any(spec or conversion for _, _, spec, conversion in parts) or \
            not set(fields) - {None} <= {"layer", "block", "module"} or "layer" not in fields or \
            "module" not in fields or not all(_PATH_PART.fullmatch(text) for text, _, _, _ in parts if text):
        return "a module path template such as 'model.layers.{layer}.{block}.{module}'"
    return None


# The parts of a module path PEFT sees for a Llama-style decoder; `path_template` in an adapter's config records the
# real one from the checkpoint's keys.
DEFAULT_TEMPLATE = "model.layers.{layer}.{block}.{module}"
BLOCKS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def module_path(template: str, layer: int, module: str, blocks: dict | None = None) -> str:
    block = (blocks or {}).get(module) or BLOCKS.get(module, "self_attn")
    return template.format(layer=layer, block=block, module=module)


def template_from_paths(paths: dict, strip: str = "base_model.model.") -> tuple[str, dict]:
    """(path template, {module: block}) from a checkpoint's module paths {(layer, module): full path}: the paths
    PEFT matched its targets against (the wrapper's ``base_model.model.`` prefix removed)."""
    template, blocks = DEFAULT_TEMPLATE, {}
    for (layer, module), path in sorted(paths.items()):
        path = path.removeprefix(strip)
        m = re.match(rf"^(?P<prefix>(?:.*\.)?)layers\.{layer}\.(?:(?P<block>.+)\.)?{module}$", path)
        if m is None:
            continue
        if not all(_PATH_PART.fullmatch(part) for part in (m.group("prefix"), m.group("block")) if part):
            raise AdapterKeyError(f"module path {shown(path)}: expected a path of letters, digits, '_', '-' and '.' "
                                  f"of at most {MAX_TEMPLATE} characters before the layer index")
        template = m.group("prefix") + "layers.{layer}.{block}.{module}"
        blocks[module] = m.group("block") or ""
    if any(b == "" for b in blocks.values()):  # modules directly under the layer: no block segment
        template = template.replace("{block}.", "")
    return template, blocks


def targeted_set(targeting: dict, num_layers: int, modules) -> set[tuple[int, str]]:
    """{(layer, module)} of the served model that the producer's rule adapts."""
    rule = peft_targeted if targeting.get("rule", "peft") == "peft" else (lambda c, k, _=None: loretta_targeted(c, k))
    template = targeting.get("path_template") or DEFAULT_TEMPLATE
    blocks = targeting.get("blocks") or {}
    if isinstance(targeting.get("layers_to_transform"), list) and targeting["layers_to_transform"]:  # looked up per path
        targeting = {**targeting, "layers_to_transform": frozenset(targeting["layers_to_transform"])}
    return {(layer, m) for layer in range(num_layers) for m in modules
            if rule(targeting, module_path(template, layer, m, blocks), tuple(modules))}
