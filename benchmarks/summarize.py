"""The markdown tables of benchmarks/README.md, printed from the results JSON files (so every number in the README
comes from a run and can be regenerated):

    .venv/bin/python benchmarks/summarize.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def group(label: str) -> str:
    """'native:lorta@32' -> 'lorta@32': the family group a run belongs to."""
    return label.partition(":")[2]


def throughput_table(bench: dict) -> str:
    """One row per run of a `tenfold bench` results.json: pooled median tok/s with its spread, the ratio to the
    base runs of the same family group (median over rounds, each round's value in brackets), latencies, load."""
    rows = bench["results"]
    # vLLM LoRA at equal rank: the vllm-lora run of the same group (the family's LoRA form); families without one
    # (loretta_adp, bat) are compared with plain LoRA's group at the same adapter count
    vllm = {group(r["label"]): r["ratio_to_base"] for r in rows if r["mode"] == "vllm-lora" and r.get("ratio_to_base")}
    lines = ["| run | tok/s median [min-max] | vs base (per round) | vs vLLM LoRA's ratio | TTFT p50 ms | TPOT p50 ms "
             "| hot-load p50 ms | adapter bytes | peak RSS MB | execution |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error'].splitlines()[0][:80]} | | | | | | | | |")
            continue
        rounds = ", ".join(f"{x:.2f}" for x in r.get("paired_ratios", []))
        ratio = f"{r['ratio_to_base']:.2f}x" + (f" ({rounds})" if rounds else "")
        reference = vllm.get(group(r["label"])) or vllm.get(f"lora@{r['num_adapters']}")
        versus = f"{r['ratio_to_base'] / reference:.1f}x" if reference and r["mode"] == "native" else ""
        load = r["load_ms"]["p50"]
        lines.append(f"| {r['label']} | {r['tok_s_median']:.0f} [{r['tok_s_min']:.0f}-{r['tok_s_max']:.0f}] | {ratio} "
                     f"| {versus} | {r['ttft_ms']['p50']:.0f} | {r['tpot_ms']['p50']:.1f} | "
                     f"{'-' if load is None else f'{load:.1f}'} | {r.get('adapter_bytes') or '-'} | "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} | {execution(r)} |")
    return "\n".join(lines)


def execution(row: dict) -> str:
    """compiled / eager as the run recorded it; runs before 2026-12-03 recorded only enforce_eager."""
    if row.get("compiled") is not None:
        return "compiled" if row["compiled"] else "eager"
    return "eager" if row.get("enforce_eager") else "-"


def paired_table(paired: dict) -> str:
    lines = ["| family | with / without adapters, median [min-max] | tok/s without | tok/s with |", "|---|---|---|---|"]
    for r in paired["results"]:
        lines.append(f"| {r['family']} | {r['ratio_median']:.3f} [{r['ratio_min']:.3f}-{r['ratio_max']:.3f}] | "
                     f"{statistics.median(r['tok_s_without_adapters']):.0f} | "
                     f"{statistics.median(r['tok_s_with_adapters']):.0f} |")
    return "\n".join(lines)


def costs_table(costs: dict, adapters: int = 32) -> str:
    lines = [f"| family | slot row (fp32) | read per step ({adapters} adapters) | apply MACs per token | vs base MACs |",
             "|---|---|---|---|---|"]
    for r in costs["families"]:
        row = r["slot_row_bytes_fp32"]
        lines.append(f"| {r['family']} | {row / 1024:.0f} KB | {adapters * row / 2**20:.1f} MB | "
                     f"{r['apply_macs_per_token'] / 1e6:.2f} M | {r['apply_macs_vs_base']:.3f} |")
    return "\n".join(lines)


def malloc_table() -> str:
    runs = {}
    for path in sorted(RESULTS.glob("malloc_*/results.json")):
        setting = path.parent.name.split("_")[1]
        runs.setdefault(setting, []).extend(json.loads(path.read_text())["results"][0]["tok_s"])
    if not runs:
        return ""
    lines = ["| TENFOLD_CPU_MALLOC | base tok/s median [min-max] | batches |", "|---|---|---|"]
    for setting, values in sorted(runs.items()):
        lines.append(f"| {setting} | {statistics.median(values):.0f} [{min(values):.0f}-{max(values):.0f}] | "
                     f"{len(values)} |")
    return "\n".join(lines)


def main() -> None:
    for title, name in (("SmolLM2-135M-Instruct, bf16, 32 adapters per family",
                         "bench_smollm2_bf16_compiled/results.json"),
                        ("32 adapters per family", "bench_cpu_32/results.json"),
                        ("4096 LoRTA adapters, Zipf(1.0)", "bench_cpu_4096_zipf/results.json")):
        bench = load(name)
        if bench:
            print(f"### {title}\n\n    {bench['command']}\n\n{bench['date']}\n\n{throughput_table(bench)}\n")
    paired = load("paired_adapter_cost.json")
    if paired:
        print(f"### Paired in one engine\n\n    {paired['command']}\n\n{paired['date']}\n\n{paired_table(paired)}\n")
    costs = load("family_costs.json")
    if costs:
        print(f"### Costs per family\n\n{costs_table(costs)}\n")
    table = malloc_table()
    if table:
        print(f"### glibc malloc settings\n\n{table}\n")


if __name__ == "__main__":
    main()
