"""What `tenfold bench` serves: the model, synthetic adapters of each family, and the request stream.

Everything is seeded: the same arguments give the same model, adapters, prompts, lengths, adapter popularity and
arrival times, so every mode of one run (and a rerun) sees identical work.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

REPO_DATA = Path(__file__).resolve().parent.parent / "data"
CPU_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "HF_HUB_OFFLINE": "1"}
# the small random benchmark model: hidden 512, 8 layers (~30M parameters with its 512-token vocabulary)
BENCH_MODEL = dict(hidden_size=512, num_heads=8, num_kv_heads=8, num_layers=8, intermediate_size=1376,
                   vocab_size=512)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for max_lora_rank


def build_model(cache_dir: Path, config: dict | None = None) -> Path:
    """The benchmark model (random weights, a BPE tokenizer trained in-process), cached per configuration."""
    from ..tiny_llama import TinyLlamaConfig, build_tiny_llama

    config = config or BENCH_MODEL
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    name = "model" if config == BENCH_MODEL else f"model-{key}"  # "model": the cache of benchmarks/ scripts
    return build_tiny_llama(cache_dir / name, REPO_DATA / "demo_corpus.txt", TinyLlamaConfig(**config))


RANDOM_MODEL = "random"  # --model random: the random-weight benchmark model above (the earlier fp32 tables)
DEFAULT_MODEL = "smollm2"  # a real pretrained model, fetched once by `tenfold model fetch`


def resolve_model(name_or_dir: str, cache_dir: Path) -> Path:
    """--model: a HuggingFace model directory, a model tenfold fetches by name (`tenfold model list`), or `random`."""
    from ..model_zoo import KNOWN_MODELS, ModelFetchError, fetch

    path = Path(name_or_dir).expanduser()
    if (path / "config.json").is_file():
        return path
    if name_or_dir == RANDOM_MODEL:
        return build_model(cache_dir)
    if name_or_dir in KNOWN_MODELS:
        try:
            return fetch(name_or_dir)
        except ModelFetchError as e:
            raise SystemExit(f"tenfold bench: --model {name_or_dir}: {e}") from None
    raise SystemExit(f"tenfold bench: --model {name_or_dir}: not a model directory (no config.json) and not a known "
                     f"model name ({', '.join([*KNOWN_MODELS, RANDOM_MODEL])})")


def model_dtype(model_dir: Path) -> str:
    """The dtype a model is saved in (config.json), the one its users serve it in: what --dtype auto means."""
    config = json.loads((model_dir / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(dtype).removeprefix("torch.")


def synth_adapters(family: str, count: int, model_dir: Path, cache_dir: Path, dtype: str, lora_form: bool = False,
                   progress: bool = False) -> list[Path]:
    """`count` random adapters (non-zero factors, distinct seeds) of `family` in tenfold's format, or their exact
    LoRA form as PEFT directories (`tenfold convert`'s output) when `lora_form`; cached under a key of every
    setting, so a rerun, or a run with fewer adapters, reuses them."""
    import torch
    from tqdm import tqdm

    from ..adapters import FAMILIES, ModelSpec, save_adapter
    from ..adapters.convert import convert_to_lora
    from ..adapters.registry import DECLARATIONS

    settings = {"family": family, "create": DECLARATIONS[family].bench_settings, "dtype": dtype,
                "format": "peft" if lora_form else "tenfold",
                "model": json.loads(model_identity(model_dir).read_text())}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    root = cache_dir / "adapters" / f"{family}-{settings['format']}-{key}"
    paths = [root / f"{family}-{i}" for i in range(count)]
    missing = [p for p in paths if not (p / "adapter_config.json").is_file()]
    if not missing:
        return paths
    spec = ModelSpec.from_pretrained(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    for path in tqdm(missing, desc=f"{family} adapters ({settings['format']})", unit="adapter", disable=not progress):
        seed = int(path.name.rsplit("-", 1)[1])
        adapter = FAMILIES[family].create(spec, **DECLARATIONS[family].bench_settings, init="random", seed=1000 + seed,
                                          dtype=getattr(torch, dtype))
        # written aside and renamed when complete: a cut run never leaves half an adapter behind
        tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        if lora_form:
            convert_to_lora(adapter, tmp, str(model_dir))
        else:
            save_adapter(adapter, tmp)
        try:
            tmp.rename(path)
        except OSError:  # a concurrent run finished the same adapter first
            shutil.rmtree(tmp)
    return paths


def user_adapters(adapter_dir: Path, count: int, model_dir: Path, cache_dir: Path, lora_form: bool = False,
                  progress: bool = False) -> list[Path]:
    """The first `count` adapters (by name) of `adapter_dir`, one per sub-directory in any format tenfold reads, each
    validated against the model; with `lora_form`, their exact LoRA form written once into the cache (keyed by the
    adapter files' fingerprint, so an edited adapter is converted again). Nothing is written next to the user's files."""
    from tqdm import tqdm

    from ..adapters import ModelSpec, load_adapter
    from ..adapters.convert import convert_to_lora
    from ..adapters.checkpoint import fingerprint

    paths = adapter_dir_entries(adapter_dir)
    if count > len(paths):
        raise ValueError(f"--adapters {count}: {adapter_dir} holds only {len(paths)} adapter directories")
    paths = paths[:count]
    if not lora_form:
        return paths
    spec = ModelSpec.from_pretrained(model_dir)
    converted = []
    for path in tqdm(paths, desc=f"{adapter_dir.name} (LoRA form)", unit="adapter", disable=not progress):
        out = cache_dir / "converted" / f"{path.name}-{fingerprint(path)}"
        if not (out / "adapter_config.json").is_file():
            tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            convert_to_lora(load_adapter(path, spec), tmp, str(model_dir))
            try:
                tmp.rename(out)
            except OSError:  # a concurrent run finished the same conversion first
                shutil.rmtree(tmp)
        converted.append(out)
    return converted


def adapter_dir_entries(adapter_dir: Path) -> list[Path]:
    """The adapter directories (those with an adapter_config.json) directly under `adapter_dir`, sorted by name."""
    if not adapter_dir.is_dir():
        raise ValueError(f"--adapter-dir {adapter_dir}: not a directory")
    paths = sorted(p for p in adapter_dir.iterdir() if (p / "adapter_config.json").is_file())
    if not paths:
        raise ValueError(f"--adapter-dir {adapter_dir}: no adapter directories (with an adapter_config.json) in it")
    return paths


def model_identity(model_dir: Path) -> Path:
    """The file that identifies a model for the adapter cache: tenfold's record of a generated model, else its
    config.json."""
    generated = model_dir / "tenfold_tiny_llama.json"
    return generated if generated.is_file() else model_dir / "config.json"


def adapter_info(paths: list[Path]) -> dict:
    """Family (`mixed` when they differ), the largest rank (what max_lora_rank must hold) and the mean bytes of the
    adapters' own factors."""
    from ..adapters import load_adapter

    adapters = [load_adapter(p) for p in paths]
    families = {a.family for a in adapters}
    return {"family": families.pop() if len(families) == 1 else "mixed", "rank": max(a.rank for a in adapters),
            "adapter_bytes": round(sum(a.nbytes() for a in adapters) / len(adapters))}


def vllm_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds `rank`."""
    return next(r for r in LORA_RANKS if r >= rank)


@dataclass(frozen=True)
class Popularity:
    """How requests pick adapters: uniform, or Zipf(alpha) over adapter ranks (adapter 0 the most popular)."""

    kind: str = "uniform"
    alpha: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "Popularity":
        kind, _, alpha = text.partition(":")
        if kind == "uniform" and not alpha:
            return cls()
        if kind == "zipf":
            try:
                value = float(alpha or 1.0)
            except ValueError:
                value = -1.0
            if value > 0:
                return cls("zipf", value)
        raise ValueError(f"popularity {text!r}: expected 'uniform' or 'zipf:ALPHA' with ALPHA > 0")

    def __str__(self) -> str:
        return "uniform" if self.kind == "uniform" else f"zipf:{self.alpha:g}"

    def choose(self, num_adapters: int, num_requests: int, rng: random.Random) -> list[int]:
        if self.kind == "uniform":
            # every adapter in turn, shuffled: each is used as evenly as the request count allows
            picks = [i % num_adapters for i in range(num_requests)]
            rng.shuffle(picks)
            return picks
        weights = [1.0 / (k + 1) ** self.alpha for k in range(num_adapters)]
        return rng.choices(range(num_adapters), weights=weights, k=num_requests)


@dataclass(frozen=True)
class Lengths:
    """A token-length distribution: a fixed length 'N' or a uniform range 'LO-HI' (inclusive)."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> "Lengths":
        low, sep, high = text.partition("-")
        try:
            lengths = cls(int(low), int(high) if sep else int(low))
        except ValueError:
            lengths = None
        if lengths is None or not 1 <= lengths.low <= lengths.high:
            raise ValueError(f"length {text!r}: expected N or LO-HI with 1 <= LO <= HI")
        return lengths

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


def make_requests(num_requests: int, num_adapters: int, popularity: Popularity, prompt_len: Lengths,
                  output_len: Lengths, vocab_size: int, rate: float | None, seed: int) -> list[dict]:
    """The request stream: adapter index (None without adapters), prompt token ids, output length, and arrival
    offset in seconds (Poisson at `rate` requests/s; all at 0 when `rate` is None)."""
    rng = random.Random(seed)
    adapters = popularity.choose(num_adapters, num_requests, rng) if num_adapters else [None] * num_requests
    requests, clock = [], 0.0
    for adapter in adapters:
        if rate is not None:
            clock += rng.expovariate(rate)
        prompt = [rng.randrange(3, vocab_size) for _ in range(prompt_len.sample(rng))]  # ids 0-2 are special
        requests.append({"adapter": adapter, "prompt": prompt, "max_tokens": output_len.sample(rng),
                         "arrival_s": clock if rate is not None else 0.0})
    return requests


def distinct_used(requests: list[dict]) -> int:
    return len({r["adapter"] for r in requests if r["adapter"] is not None})


# CPU features that decide bf16 speed on CPU: emulated without AVX512-BF16, tile matmuls with AMX
BF16_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_model() -> dict:
    """The CPU's model name and its bf16-relevant features, from /proc/cpuinfo (empty where there is none):
    figures from machines without the same features are not comparable."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in lines if ":" in line)  # the last CPU's values; all cores agree
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"cpu_model": fields.get("model name"), "cpu_features": [f for f in BF16_FEATURES if f in flags]}


def machine_info() -> dict:
    import torch

    try:
        from vllm.version import __version__ as vllm_version
    except ImportError:
        vllm_version = None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            **cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "vllm": vllm_version, "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}

