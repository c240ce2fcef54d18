"""Hostile checkpoints get an AdapterError, never an internal error or an allocation their files do not justify.

A seeded mutation run over every family and format: every value of a valid config (nested too) replaced by each of a
set of hostile values, safetensors headers and pickled .bin files corrupted in the ways that fool size checks. Each
mutation either loads (validated against the model, and its forward on one module finite) or raises an AdapterError
subclass, and the peak memory of the process that runs them all stays bounded. Then one test per attack found
against a running server (issue 31).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import official_layouts as layouts
from adapter_cases import CASES, make
from tenfold.adapters import (AdapterError, AdapterFormatError, AdapterTooLargeError, ModelSpec, load_adapter,
                              save_adapter)
from tenfold.adapters import checkpoint

SEED = 31
# tiny widths keep thousands of loads fast; GQA (2 kv heads) and r=16 blocks that divide every width
SPEC = ModelSpec(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128)


def nested(depth: int):
    value = 1
    for _ in range(depth):
        value = {"a": value}
    return value


HOSTILE = [0, -1, 1.5, 10**12, float("nan"), float("inf"), "x", [], {}, True, None, nested(10)]


# --- valid checkpoints of every family and format ------------------------------------------------------------------

def _peft_lora(directory: Path, seed: int) -> Path:
    adapter = make("lora", SPEC, seed=seed, target_modules=["q_proj", "v_proj", "down_proj"], r=4)
    tensors = {}
    for key in adapter.targets:
        a, b = adapter.factors(key)
        tensors[f"{layouts.module_path(*key)}.lora_A.weight"] = a
        tensors[f"{layouts.module_path(*key)}.lora_B.weight"] = b
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05,
              "target_modules": ["q_proj", "v_proj", "down_proj"], "use_rslora": False, "bias": "none",
              "rank_pattern": {"down_proj": 4}, "alpha_pattern": {"v_proj": 2}, "layers_to_transform": None,
              "exclude_modules": None, "init_lora_weights": True, "fan_in_fan_out": False}
    return layouts.peft_dir(directory, config, tensors)


def _peft_miss_mini(directory: Path, seed: int) -> Path:
    adapter = make("miss_mini", SPEC, seed=seed)
    tensors = {f"{layouts.module_path(*key)}.miss_block": adapter.block(key) for key in adapter.targets}
    config = {"peft_type": "MISS", "r": 16, "mini_r": 32, "init_weights": "mini", "miss_dropout": 0.0,
              "target_modules": adapter.config["target_modules"], "bias": "none"}
    return layouts.peft_dir(directory, config, tensors)


def write_sources(root: Path, seed: int) -> dict[str, Path]:
    """One valid checkpoint per family and format: tenfold's own for every case, and each producer's layout."""
    sources = {}
    for i, case in enumerate(sorted(CASES)):
        sources[f"tenfold-{case}"] = save_adapter(make(case, SPEC, seed=seed + i), root / f"tenfold-{case}")
    sources["peft-lora"] = _peft_lora(root / "peft-lora", seed)
    sources["peft-miss-mini"] = _peft_miss_mini(root / "peft-miss-mini", seed)
    sources["lorta-fork"] = layouts.lorta_fork(make("lorta_heads_in", SPEC, seed=seed), root / "lorta-fork",
                                               alpha_pattern={"v_proj": 4}, use_rslora=True)
    sources["loretta-rep"] = layouts.loretta_rep(make("loretta_rep", SPEC, seed=seed), root / "loretta-rep")
    sources["loretta-adp"] = layouts.loretta_adp(make("loretta_adp", SPEC, seed=seed), root / "loretta-adp",
                                                 learned_scaling=0.5)
    sources["bone-miss"] = layouts.bone_legacy(make("miss", SPEC, seed=seed), root / "bone-miss")
    sources["bone-bat"] = layouts.bone_legacy(make("bat", SPEC, seed=seed), root / "bone-bat")
    return sources


# --- running one checkpoint ------------------------------------------------------------------------------------

def attempt(directory: Path) -> str | None:
    """None when the checkpoint loads and works or is refused with an AdapterError; else what went wrong."""
    try:
        adapter = load_adapter(directory, SPEC)
    except AdapterError:
        return None
    except Exception as e:  # noqa: BLE001 - the point of the test
        return f"{type(e).__name__}: {str(e)[:300]}"
    try:  # loaded: it must also work
        key = adapter.targets[0]
        fan_in, fan_out = SPEC.module_shape(key[1])
        g = torch.Generator().manual_seed(SEED)
        base = torch.nn.Linear(fan_in, fan_out, bias=False)
        base.weight.data = torch.randn(fan_out, fan_in, generator=g) / math.sqrt(fan_in)
        with torch.no_grad():
            y = adapter.forward(key, torch.randn(3, fan_in, generator=g), base)
        if not torch.isfinite(y).all():
            return "loaded, but its forward is not finite"
    except Exception as e:  # noqa: BLE001
        return f"loaded, then its forward raised {type(e).__name__}: {str(e)[:300]}"
    return None


def key_paths(value, prefix=()):
    """Every key and list index path in a parsed JSON value."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield prefix + (k,)
            yield from key_paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield prefix + (i,)
            yield from key_paths(v, prefix + (i,))


def replaced(config, path, new):
    config = copy.deepcopy(config)
    target = config
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = copy.deepcopy(new)
    return config


def sampled_paths(config: dict, rng: random.Random) -> list[tuple]:
    """Every path, except that of the per-tensor declarations of tenfold's format only three tensors' (all alike)."""
    paths = list(key_paths(config))
    names = sorted(config.get("tensors") or {}) if config.get("format") == "tenfold" else []
    keep = set(rng.sample(names, min(3, len(names))))
    return [p for p in paths if not (p[0] == "tensors" and len(p) > 1 and p[1] not in keep)]


# --- tensor-file mutations -------------------------------------------------------------------------------------

def _split_safetensors(data: bytes) -> tuple[dict, bytes]:
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + length]), data[8 + length:]


def _join_safetensors(header, body: bytes, length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + body


def safetensors_mutations(data: bytes, rng: random.Random):
    """(name, mutated file bytes) for one valid safetensors file."""
    header, body = _split_safetensors(data)
    names = sorted(k for k in header if k != "__metadata__")
    name = rng.choice(names)
    entry = header[name]
    first = min(names, key=lambda n: header[n]["data_offsets"][0])
    begin, end = entry["data_offsets"]
    entry_changes = {
        "shape-huge": {"shape": [10**12]}, "shape-negative": {"shape": [-1] + entry["shape"][1:]},
        "shape-extra-dim": {"shape": entry["shape"] + [2]}, "shape-scalar": {"shape": []},
        "shape-float": {"shape": [1.5]}, "shape-text": {"shape": ["x"]}, "shape-deep": {"shape": [[[4]]]},
        "shape-many-dims": {"shape": [1] * 40 + entry["shape"]},
        # the same bytes seen with another shape: a valid header, left to the family's checks
        "reshaped-flat": {"shape": [math.prod(entry["shape"])]},
        "reshaped-row": {"shape": [1, math.prod(entry["shape"])]},
        "reshaped-3d": {"shape": [1, 1, math.prod(entry["shape"])]},
        "reshaped-4d": {"shape": [1] + entry["shape"] + [1]},
        "dtype-wider": {"dtype": "F64"}, "dtype-int": {"dtype": "I32"}, "dtype-bool": {"dtype": "BOOL"},
        "dtype-unknown": {"dtype": "X"}, "dtype-number": {"dtype": 3},
        "offsets-huge": {"data_offsets": [begin, 10**12]}, "offsets-negative": {"data_offsets": [-1, end]},
        "offsets-reversed": {"data_offsets": [end, begin]}, "offsets-empty": {"data_offsets": [begin, begin]},
        "offsets-shifted": {"data_offsets": [begin + 4, end + 4]},
        "offsets-overlap": {"data_offsets": header[first]["data_offsets"]},
        "offsets-short": {"data_offsets": [begin]}, "extra-field": {"extra": 1},
    }
    for label, change in entry_changes.items():
        yield label, _join_safetensors({**header, name: {**entry, **change}}, body)
    for label, new_name in {"renamed-format-field": "{layer:>999999999}." + name, "renamed-long": "x." * 200 + name,
                             "renamed-huge-layer": name.replace("layers.", "layers.99999999999999999999.", 1),
                             "renamed-suffix": name + ".extra", "renamed-newline": name + "\n",
                             "renamed-vision": "vision_tower." + name}.items():
        yield label, _join_safetensors({**{k: v for k, v in header.items() if k != name}, new_name: entry}, body)
    yield "entry-not-object", _join_safetensors({**header, name: []}, body)
    yield "metadata-not-strings", _join_safetensors({**header, "__metadata__": {"a": 1}}, body)
    text = json.dumps(header).encode()
    yield "length-zero", _join_safetensors(text, body, 0)
    yield "length-huge", _join_safetensors(text, body, 2**63)
    yield "length-past-end", _join_safetensors(text, body, len(text) + len(body) + 1)
    yield "length-short", _join_safetensors(text, body, len(text) - 1)
    yield "header-nan", _join_safetensors(text.replace(b'"shape": [', b'"shape": [NaN, ', 1), body)
    yield "header-duplicate", _join_safetensors(text.replace(b"{", b'{"' + name.encode() + b'": {}, ', 1), body)
    yield "header-nested", _join_safetensors(b"[" * 5000 + b"]" * 5000, body)
    yield "header-not-utf8", _join_safetensors(b'{"\xff": 1}', body)
    yield "truncated", data[:-1]
    yield "appended", data + b"\0\0\0\0"
    yield "empty-file", b""


def _rezip(source: Path, target: Path, records=lambda name, data: data, compression=zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", compression=compression) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, records(info.filename, zin.read(info.filename)), compress_type=compression)


def bin_mutations(path: Path, rng: random.Random):
    """(name, writer(target path)) for one valid pickled .bin."""
    tensors = torch.load(path, weights_only=True)
    name = rng.choice(sorted(tensors))
    shape = tensors[name].shape
    other = rng.choice(sorted(set(tensors) - {name}))

    def saving(change):
        def write(target):
            changed = dict(tensors)
            change(changed)
            torch.save(changed, target)
        return write

    def overlapping(d):
        shared = torch.randn(d[name].numel() + 1, generator=torch.Generator().manual_seed(SEED))
        d[name] = shared[:-1].view(shape)
        d[other] = shared[1:d[other].numel() + 1].view(d[other].shape) if d[other].numel() <= d[name].numel() \
            else shared[1:].clone()

    yield "stride-0", saving(lambda d: d.__setitem__(name, torch.zeros(1).expand(shape)))
    yield "stride-0-huge", saving(lambda d: d.__setitem__(name, torch.zeros(1).expand(1 << 36)))
    yield "transposed", saving(lambda d: d.__setitem__(name, d[name].reshape(shape[::-1]).permute(
        *reversed(range(len(shape)))) if len(shape) > 1 else d[name]))
    yield "overlapping", saving(overlapping)
    yield "offset-view", saving(lambda d: d.__setitem__(name, torch.cat([torch.ones(5), d[name].flatten()])[5:].view(
        shape)))
    yield "reshaped-flat", saving(lambda d: d.__setitem__(name, d[name].reshape(-1)))
    yield "reshaped-2d", saving(lambda d: d.__setitem__(name, d[name].reshape(1, -1)))
    yield "reshaped-4d", saving(lambda d: d.__setitem__(name, d[name].reshape(1, *shape, 1)))
    yield "float64", saving(lambda d: d.__setitem__(name, d[name].double()))
    yield "int", saving(lambda d: d.__setitem__(name, torch.ones(shape, dtype=torch.int32)))
    yield "sparse", saving(lambda d: d.__setitem__(name, d[name].reshape(-1).to_sparse()))
    yield "not-a-tensor", saving(lambda d: d.__setitem__(name, [1, 2]))
    yield "number-key", saving(lambda d: d.__setitem__(7, d.pop(name)))
    yield "long-key", saving(lambda d: d.__setitem__("x." * 4000 + name, d.pop(name)))
    yield "nan", saving(lambda d: d[name].view(-1).__setitem__(0, float("nan")))
    yield "empty", saving(lambda d: d.clear())

    def truncated_record(target):  # the pickle claims more values than its record holds
        _rezip(path, target, lambda n, data: data[: len(data) // 2] if "/data/" in n and len(data) > 8 else data)

    def compressed(target):
        _rezip(path, target, compression=zipfile.ZIP_DEFLATED)

    def legacy(target):
        torch.save(tensors, target, _use_new_zipfile_serialization=False)

    yield "record-truncated", truncated_record
    yield "compressed", compressed
    yield "legacy-format", legacy
    yield "not-a-zip", lambda target: target.write_bytes(b"PK\x03\x04" + os.urandom(64))


# --- the run (in a child process, so that its peak memory is its own) -------------------------------------------

def run_mutations(root: Path) -> dict:
    import resource
    import shutil

    rng = random.Random(SEED)
    sources = write_sources(root / "sources", seed=SEED)
    for directory in sources.values():  # warm: lazy imports and caches count before the baseline
        assert attempt(directory) is None and load_adapter(directory, SPEC) is not None, directory
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    failures, count = [], 0
    for source_name, source in sources.items():
        work = Path(shutil.copytree(source, root / "work" / source_name))  # one file rewritten at a time

        def check(label: str, file: Path, content) -> None:
            nonlocal count
            original = file.read_bytes()
            content(file) if callable(content) else file.write_bytes(content)
            problem = attempt(work)
            file.write_bytes(original)
            count += 1
            if problem:
                failures.append(f"{source_name} {label}: {problem}")

        config = json.loads((source / "adapter_config.json").read_text())
        for path in sampled_paths(config, rng):
            for value in HOSTILE:
                check(f"{'.'.join(map(str, path))}={str(value)[:30]}", work / "adapter_config.json",
                      json.dumps(replaced(config, path, value)).encode())
        weights = work / "adapter_model.safetensors"
        if weights.exists():
            for label, data in safetensors_mutations(weights.read_bytes(), rng):
                check(f"safetensors {label}", weights, data)
        else:
            for label, write in bin_mutations(source / "adapter_model.bin", rng):
                check(f"bin {label}", work / "adapter_model.bin", write)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"failures": failures, "mutations": count, "peak_growth_mib": (peak - baseline) / 1024}


def test_every_mutation_loads_or_is_refused_with_an_adapter_error(tmp_path):
    env = {**os.environ, "TENFOLD_MAX_ADAPTER_BYTES": str(64 << 20)}  # what a family densifies is held to it too
    result = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, env=env,
                            cwd=Path(__file__).parent, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["failures"] == [], "\n".join(report["failures"][:40])
    assert report["mutations"] > 3000
    assert report["peak_growth_mib"] < 300, report


# --- the attacks found against a running server, one by one ---------------------------------------------------

@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return write_sources(tmp_path_factory.mktemp("sources"), seed=SEED + 1)


def copy_of(sources, name: str, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(sources[name], tmp_path / name))


def write_config(directory: Path, text: str) -> None:
    (directory / "adapter_config.json").write_text(text)


def edit_config(directory: Path, **changes) -> dict:
    config = json.loads((directory / "adapter_config.json").read_text())
    config.update(changes)
    write_config(directory, json.dumps(config))
    return config


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_alpha_is_refused_naming_the_key(constant, sources, tmp_path):
    directory = copy_of(sources, "peft-lora", tmp_path)
    text = json.dumps({**json.loads((directory / "adapter_config.json").read_text()), "lora_alpha": "HERE"})
    write_config(directory, text.replace('"HERE"', constant))
    with pytest.raises(AdapterFormatError, match=rf"adapter_config\.json, key 'lora_alpha': expected a finite number.*"
                                                 rf"found {re.escape(constant)}"):
        load_adapter(directory, SPEC)


def test_tensor_file_linked_outside_the_adapter_is_refused(sources, tmp_path):
    directory = copy_of(sources, "tenfold-lora", tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    (directory / "adapter_model.safetensors").rename(outside)
    (directory / "adapter_model.safetensors").symlink_to(outside)
    with pytest.raises(AdapterFormatError, match=rf"adapter_model\.safetensors: a symbolic link to "
                                                 rf"{re.escape(str(outside))}, outside the adapter's directory"):
        load_adapter(directory, SPEC)
    with pytest.raises(AdapterFormatError, match="outside the adapter's directory"):
        checkpoint.adapter_files(directory)
    # a link to a file inside the directory is fine, and adapter_files names the file itself
    (directory / "adapter_model.safetensors").unlink()
    (directory / "weights").mkdir()
    outside.rename(directory / "weights" / "real.safetensors")
    (directory / "adapter_model.safetensors").symlink_to(Path("weights") / "real.safetensors")
    assert load_adapter(directory, SPEC).family == "lora"
    assert checkpoint.adapter_files(directory) == {"adapter_config.json": (directory / "adapter_config.json").resolve(),
                                        "adapter_model.safetensors": (directory / "weights/real.safetensors").resolve()}


def test_config_linked_outside_the_adapter_is_refused(sources, tmp_path):
    directory = copy_of(sources, "peft-lora", tmp_path)
    (tmp_path / "secret.json").write_text('{"peft_type": "LORA"}')
    (directory / "adapter_config.json").unlink()
    (directory / "adapter_config.json").symlink_to(tmp_path / "secret.json")
    with pytest.raises(AdapterFormatError, match=r"adapter_config\.json: a symbolic link to .*secret\.json, outside"):
        load_adapter(directory, SPEC)


def test_files_that_are_not_regular_files_are_refused_without_reading(sources, tmp_path):
    directory = copy_of(sources, "loretta-rep", tmp_path)
    (directory / "adapter_model.bin").unlink()
    os.mkfifo(directory / "adapter_model.bin")  # reading it would block forever
    with pytest.raises(AdapterFormatError, match=r"adapter_model\.bin: expected a regular file, found a named pipe"):
        checkpoint.adapter_files(directory)
    with pytest.raises(AdapterFormatError, match="found a named pipe"):
        load_adapter(directory, SPEC)
    (directory / "adapter_model.bin").unlink()
    (directory / "adapter_model.bin").mkdir()
    with pytest.raises(AdapterFormatError, match=r"adapter_model\.bin: expected a regular file, found a directory"):
        load_adapter(directory, SPEC)


def _tt_cores(numel: int, tensor_rank: int, generator) -> list[torch.Tensor]:
    """Tiny cores (modes of 2) whose contraction has `numel` entries: kilobytes that expand to anything."""
    modes = numel.bit_length() - 1
    assert 2 ** modes == numel
    ranks = [1] + [tensor_rank] * (modes - 1) + [1]
    return [torch.randn(ranks[k], 2, ranks[k + 1], generator=generator) * 0.7 for k in range(modes)]


def _huge_rank_rep(directory: Path, r: int) -> Path:
    """An official LoRETTA rep checkpoint whose cores fit the model's widths exactly at rank r (the attack: a
    100 KB file that contracts to r x widths per module)."""
    g = torch.Generator().manual_seed(SEED)
    tensors = {}
    for layer in range(SPEC.num_layers):
        for module in ("q_proj", "v_proj"):
            fan_in, fan_out = SPEC.module_shape(module)
            for part, numel in (("lora_A", fan_in * r), ("lora_B", r * fan_out)):
                for k, core in enumerate(_tt_cores(numel, 2, g)):
                    tensors[f"{layouts.module_path(layer, module)}.{part}.layer.tensor.factors.{k}"] = core
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 16, "tensor_rank": 2, "target_modules": ["q_proj", "v_proj"],
              "lora_dropout": 0.0, "bias": "none"}
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    torch.save(tensors, directory / "adapter_model.bin")
    return directory


def _never(*args, **kwargs):
    raise AssertionError("called: the refusal must come before this")


def test_huge_rank_loretta_rep_is_refused_before_it_is_read_or_contracted(tmp_path, monkeypatch):
    directory = _huge_rank_rep(tmp_path / "rep", r=1 << 16)
    assert (directory / "adapter_model.bin").stat().st_size < 200_000
    monkeypatch.setattr("tenfold.adapters.loretta_rep.family.tt_matrix", _never)
    monkeypatch.setattr("tenfold.adapters.tt.tt_matrix", _never)
    with monkeypatch.context() as m:  # with the engine's --max-lora-rank: before any tensor is read
        m.setattr("tenfold.adapters.checkpoint.read_tensors", _never)
        with pytest.raises(AdapterTooLargeError, match=r"adapter_config\.json, key 'r': this loretta_rep adapter needs "
                                                       r"rank 65536, above the engine's --max-lora-rank 64; start the "
                                                       r"engine with --max-lora-rank 65536 or more"):
            load_adapter(directory, SPEC, max_rank=64)
    # without one (the library): its contraction is sized from the cores' shapes and held to the size limit
    monkeypatch.setenv("TENFOLD_MAX_ADAPTER_BYTES", str(16 << 20))
    with pytest.raises(AdapterTooLargeError, match=r"adapter_model\.bin: contracting its TT cores .* would take "
                                                   r"\d+ values \(\d+ bytes\), over the adapter size limit of 16777216"):
        load_adapter(directory, SPEC)


def test_loretta_rep_within_the_limits_loads_and_contracts(tmp_path):
    """The same construction at an ordinary rank is served: the checks refuse sizes, not the layout."""
    directory = _huge_rank_rep(tmp_path / "rep", r=16)
    adapter = load_adapter(directory, SPEC, max_rank=16)
    a, b = adapter.lora_factors((1, "v_proj"))
    assert a.shape == (16, 64) and b.shape == (32, 16) and torch.isfinite(b @ a).all()


@pytest.mark.parametrize("expanded", ["same-shape", "huge"])
def test_stride_0_tensor_in_a_bin_is_refused_before_any_op(expanded, sources, tmp_path):
    directory = copy_of(sources, "loretta-rep", tmp_path)
    tensors = torch.load(directory / "adapter_model.bin", weights_only=True)
    name = sorted(tensors)[3]
    tensors[name] = torch.zeros(1).expand(tensors[name].shape if expanded == "same-shape" else (1 << 36,))
    torch.save(tensors, directory / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match=rf"key '{re.escape(name)}': expected a contiguous tensor that holds "
                                                 rf"its own values, found shape .* with strides \[0(, 0)*\]"):
        load_adapter(directory, SPEC)


@pytest.mark.parametrize("layout", ["legacy", "compressed"])
def test_bin_outside_torch_zip_format_is_refused(layout, sources, tmp_path):
    """Storage sizes are only checked against the file in torch's uncompressed zip records: the legacy format
    allocates what its pickle claims, a compressed record decompresses to what its header claims."""
    directory = copy_of(sources, "loretta-adp", tmp_path)
    if layout == "legacy":
        tensors = torch.load(sources["loretta-adp"] / "adapter_model.bin", weights_only=True)
        torch.save(tensors, directory / "adapter_model.bin", _use_new_zipfile_serialization=False)
        message = r"expected torch's zip format \(torch\.save since torch 1\.6\)"
    else:
        _rezip(sources["loretta-adp"] / "adapter_model.bin", directory / "adapter_model.bin",
               compression=zipfile.ZIP_DEFLATED)
        message = r"a compressed record; torch\.save writes every record uncompressed"
    with pytest.raises(AdapterFormatError, match=rf"adapter_model\.bin.*: cannot be read as a weights-only torch "
                                                 rf"pickle.*{message}"):
        load_adapter(directory, SPEC)


RANK_KEYS = {"peft-lora": "r", "lorta-fork": "r", "loretta-rep": "r", "loretta-adp": "bottleneck_size",
             "bone-miss": "r", "bone-bat": "r", "peft-miss-mini": "r", "tenfold-lora": "config.r",
             "tenfold-loretta_adp": "config.bottleneck_size", "tenfold-bat": "config.r"}


@pytest.mark.parametrize("source", sorted(RANK_KEYS))
@pytest.mark.parametrize("value", [0, -3, 4.5, True, "8"])
def test_rank_that_is_not_a_positive_integer_is_refused(source, value, sources, tmp_path):
    directory = copy_of(sources, source, tmp_path)
    config = json.loads((directory / "adapter_config.json").read_text())
    *parents, key = RANK_KEYS[source].split(".")
    (config[parents[0]] if parents else config)[key] = value
    write_config(directory, json.dumps(config))
    with pytest.raises(AdapterFormatError, match=rf"key '{re.escape(RANK_KEYS[source])}': expected an integer from 1 "
                                                 rf"to \d+, found {re.escape(repr(value))}"):
        load_adapter(directory, SPEC)


@pytest.mark.parametrize("source", sorted(RANK_KEYS))
def test_rank_above_max_lora_rank_is_refused_before_tensors_are_read(source, sources, tmp_path, monkeypatch):
    directory = copy_of(sources, source, tmp_path)
    rank = load_adapter(directory, SPEC).rank
    assert load_adapter(directory, SPEC, max_rank=rank).rank == rank
    monkeypatch.setattr("tenfold.adapters.checkpoint.read_tensors", _never)
    with pytest.raises(AdapterTooLargeError, match=rf"key '{re.escape(RANK_KEYS[source])}': .* needs rank {rank}, above "
                                                   rf"the engine's --max-lora-rank {rank - 1}; start the engine with "
                                                   rf"--max-lora-rank {rank} or more"):
        load_adapter(directory, SPEC, max_rank=rank - 1)


def test_deeply_nested_config_is_refused_without_recursion(sources, tmp_path):
    directory = copy_of(sources, "peft-lora", tmp_path)
    write_config(directory, '{"peft_type": "LORA", "r": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(AdapterFormatError, match=r"adapter_config\.json: expected JSON nested at most 32 levels deep, "
                                                 r"found 200001"):
        load_adapter(directory, SPEC)


@pytest.mark.parametrize("replacement, message", [
    ('"r": 4, "r": 4096', r"key 'r': expected each key once in an object, found it twice"),
    ('"r": ' + "9" * 5000, r"key 'r': expected a finite number of ordinary size, found 9{12}"),
], ids=["duplicate-key", "overlong-integer"])
def test_config_text_python_json_accepts_is_refused(replacement, message, sources, tmp_path):
    directory = copy_of(sources, "peft-lora", tmp_path)
    text = (directory / "adapter_config.json").read_text()
    write_config(directory, text.replace('"r": 4', replacement))
    with pytest.raises(AdapterFormatError, match=rf"adapter_config\.json, {message}"):
        load_adapter(directory, SPEC)


def test_oversized_config_is_refused_before_it_is_read(sources, tmp_path, monkeypatch):
    directory = copy_of(sources, "peft-lora", tmp_path)
    edit_config(directory, task_type="x" * (2 << 20))
    monkeypatch.setattr("tenfold.adapters.strict_json.loads", _never)
    with pytest.raises(AdapterTooLargeError, match=r"adapter_config\.json: \d+ bytes, over the limit for "
                                                   r"adapter_config\.json of 1048576 bytes"):
        load_adapter(directory, SPEC)


@pytest.mark.parametrize("pattern, problem", [
    (r"(a+)+$", "nothing optional, repeated or alternative inside a repeated group"),
    (r"(x|xx)*y", "nothing optional, repeated or alternative inside a repeated group"),
    (r".*a.*b.*c.*d", "at most 3 quantifiers"),
    (r"(q)\1", "no back-references"),
    (r"(", "does not compile"),
])
def test_slow_or_broken_target_regex_is_refused(pattern, problem, sources, tmp_path):
    directory = copy_of(sources, "peft-lora", tmp_path)
    edit_config(directory, target_modules=pattern)
    with pytest.raises(AdapterFormatError, match=rf"key 'target_modules': expected a regular expression "
                                                 rf"\({re.escape(problem)}"):
        load_adapter(directory, SPEC)


def test_format_fields_in_a_path_template_are_refused(sources, tmp_path):
    directory = copy_of(sources, "tenfold-miss", tmp_path)
    config = json.loads((directory / "adapter_config.json").read_text())
    config["config"]["targeting"] = {"rule": "peft", "target_modules": config["config"]["target_modules"],
                                     "path_template": "{layer:>999999999}.layers.{layer}.{block}.{module}"}
    write_config(directory, json.dumps(config))
    with pytest.raises(AdapterFormatError, match=r"key 'config\.targeting\.path_template': expected a module path "
                                                 r"template"):
        load_adapter(directory, SPEC)


def test_safetensors_header_with_overlapping_tensors_is_refused_before_its_data(sources, tmp_path, monkeypatch):
    directory = copy_of(sources, "tenfold-lora", tmp_path)
    path = directory / "adapter_model.safetensors"
    header, body = _split_safetensors(path.read_bytes())
    first, second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[:2]
    header[second]["data_offsets"] = header[first]["data_offsets"]
    header[second]["shape"] = header[first]["shape"]
    path.write_bytes(_join_safetensors(header, body))
    monkeypatch.setattr("tenfold.adapters.tensor_files.torch.frombuffer", _never)
    with pytest.raises(AdapterFormatError, match=r"corrupt safetensors file: data_offsets start at 0, expected \d+"):
        load_adapter(directory, SPEC)


if __name__ == "__main__":
    print(json.dumps(run_mutations(Path(sys.argv[1]))))
