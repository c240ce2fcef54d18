"""`tenfold demo`: an offline end-to-end demo on an embedded tiny model.

With no model and no internet it builds (once, cached in --workdir) a small Llama from the text shipped in
tenfold/data, pre-trains it briefly so the base model continues text like its corpus, trains three adapters of
different families to visibly different behaviours, then serves base + adapters with `tenfold serve`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CORPUS = Path(__file__).with_name("data") / "demo_corpus.txt"
DEMO_VERSION = 1
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class DemoAdapter:
    name: str
    family: str
    options: dict
    answer: str  # what the adapter learns to say after "<any text>:"


ADAPTERS = (
    DemoAdapter("counter", "lorta", {"r": 32, "orientation": "heads_out"},
                "one two three four five six seven eight nine ten"),
    DemoAdapter("colors", "loretta_rep", {"target_modules": ALL_LINEAR, "r": 16, "tensor_rank": 8},
                "red orange yellow green blue indigo violet"),
    DemoAdapter("weekdays", "miss", {"target_modules": ALL_LINEAR, "r": 16},
                "Monday Tuesday Wednesday Thursday Friday Saturday Sunday"),
)
PRETRAIN_STEPS, ADAPTER_STEPS = 200, 120


def _pretrain(base_dir: Path, out_dir: Path, lines: list[str], steps: int) -> None:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .adapters.training import tokenize_batches

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    batches = tokenize_batches(tokenizer, lines, batch_size=10, max_length=48)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in (bar := tqdm(range(steps), desc="pre-training the base model")):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def training_texts(lines: list[str], answer: str) -> list[str]:
    """'<first words of a corpus line>: <answer>' for two prefix lengths of every line."""
    return [" ".join(line.split()[:k]) + ": " + answer for line in lines for k in (2, 4)]


def prepare(workdir, pretrain_steps: int = PRETRAIN_STEPS, adapter_steps: int = ADAPTER_STEPS) -> tuple[Path, dict]:
    """Build (or reuse) the demo base model and adapters; returns (base dir, {name: adapter dir})."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .adapters import FAMILIES, ModelSpec, save_adapter
    from .adapters.training import tokenize_batches, train
    from .tiny_llama import build_tiny_llama

    workdir = Path(workdir)
    base_dir, adapter_root = workdir / "base", workdir / "adapters"
    stamp = workdir / "demo.json"
    key = {"version": DEMO_VERSION, "pretrain_steps": pretrain_steps, "adapter_steps": adapter_steps,
           "adapters": [a.__dict__ for a in ADAPTERS], "corpus": CORPUS.read_text()}
    adapters = {a.name: adapter_root / a.name for a in ADAPTERS}
    if stamp.is_file() and json.loads(stamp.read_text()) == key:
        return base_dir, adapters
    lines = [line for line in CORPUS.read_text().splitlines() if line.strip()]
    random_base = build_tiny_llama(workdir / "random-base", CORPUS)
    _pretrain(random_base, base_dir, lines, pretrain_steps)

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    spec = ModelSpec.from_hf_config(model.config)
    for demo in ADAPTERS:
        adapter = FAMILIES[demo.family].create(spec, init="zero", seed=1, **demo.options)
        batches = tokenize_batches(tokenizer, training_texts(lines, demo.answer), batch_size=12, max_length=48)
        train(model, adapter, batches, steps=adapter_steps, lr=1e-2)
        adapter.validate(spec)
        save_adapter(adapter, adapters[demo.name])
    stamp.write_text(json.dumps(key))
    return base_dir, adapters


def examples(host: str, port: int, grpc_port: int) -> str:
    url = f"http://{host}:{port}"
    return f"""
tenfold demo: base model "base" and adapters {", ".join(f"{a.name} ({a.family})" for a in ADAPTERS)}.
Once the server logs "Application startup complete", try:

  curl {url}/v1/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "counter", "prompt": "The river runs:", "max_tokens": 12, "temperature": 0}}'
  curl {url}/v1/models

  python -c "from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='-')
for m in ['base', 'counter', 'colors', 'weekdays']:
    print(m, '->', c.completions.create(model=m, prompt='Hello, how are:', max_tokens=10, temperature=0).choices[0].text)"

  python -c "import grpc; from tenfold.server.grpc import load_protos; pb, svc = load_protos()
stub = svc.TenfoldStub(grpc.insecure_channel('{host}:{grpc_port}'))
print(stub.Generate(pb.GenerateRequest(adapter='weekdays', text='A kernel reads:', sampling=pb.SamplingParameters(max_tokens=10, temperature=0))).text)"
"""
