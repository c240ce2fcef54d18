"""`tenfold bench` results: per-run summaries (medians and spread over repeats, latency percentiles), ratios to
the base model, the terminal table and the PNG plots."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import numpy as np


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("tenfold bench: plots need matplotlib (pip install 'tenfold[bench]'), or pass --no-plots")


def _percentiles(values: list[float], scale: float = 1.0) -> dict:
    if not values:
        return {"p50": None, "p99": None}
    p50, p99 = np.percentile(np.asarray(values) * scale, [50, 99])
    return {"p50": float(p50), "p99": float(p99)}


def summarize(run: dict, result: dict) -> dict:
    """One results row: the run's settings, its raw measurements and their summaries (ms for latencies)."""
    row = {**run, **result}
    if "tok_s" in result:
        row.update(tok_s_median=statistics.median(result["tok_s"]), tok_s_min=min(result["tok_s"]),
                   tok_s_max=max(result["tok_s"]), req_s_median=statistics.median(result["req_s"]),
                   ttft_ms=_percentiles(result["ttft_s"], 1e3), tpot_ms=_percentiles(result["tpot_s"], 1e3),
                   load_ms=_percentiles(result["load_ms"]) | {"samples": result["load_ms"]})
    return row


POOLED = ("seconds", "tok_s", "req_s", "ttft_s", "tpot_s", "load_ms")


def merge_rounds(results: list[dict]) -> dict:
    """One run's results over its rounds: measurements pooled, the peak memory the largest; the first error wins
    (a mode that failed once is reported as failed)."""
    failed = next((r for r in results if "error" in r), None)
    if failed is not None:
        return failed
    merged = {key: [v for r in results for v in r[key]] for key in POOLED}
    merged.update(output_tokens=results[0]["output_tokens"], resident_adapters=results[-1]["resident_adapters"],
                  peak_rss_bytes=max(r["peak_rss_bytes"] for r in results),
                  engine_start_s=[r["engine_start_s"] for r in results],
                  enforce_eager=results[0].get("enforce_eager"), compiled=results[0].get("compiled"),
                  load_avg_1min_before=[r["load_avg_1min_before"] for r in results])
    return merged


def add_ratios(rows: list[dict]) -> None:
    """ratio_to_base: the median, over rounds, of a run's median output tok/s over that of the base run of its own
    group and round (`paired_ratios`, filled by the runner); 1 for base; None when base did not run."""
    for row in rows:
        if row["mode"] == "base":
            row["ratio_to_base"] = 1.0 if "tok_s_median" in row else None
        else:
            paired = row.get("paired_ratios") or []
            row["ratio_to_base"] = statistics.median(paired) if paired and "tok_s_median" in row else None


def one_line(row: dict) -> str:
    if "error" in row:
        return "FAILED: " + row["error"].splitlines()[0][:160]
    return f"{row['tok_s_median']:.1f} tok/s (median of {len(row['tok_s'])})"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _execution(row: dict) -> str:
    compiled = row.get("compiled")
    return "-" if compiled is None else "compiled" if compiled else "eager"


def format_table(rows: list[dict]) -> str:
    header = (f"{'run':<30}{'tok/s median [min-max]':<26}{'vs base':>8}{'req/s':>8}{'TTFT p50/p99 ms':>18}"
              f"{'TPOT p50/p99 ms':>18}{'load p50 ms':>12}{'resident':>9}{'adapter B':>11}{'peak MiB':>9}{'exec':>10}")
    lines = [header]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['label']:<30}FAILED: {row['error'].splitlines()[0][:150]}")
            error_type = row["error"].split(":")[0]
            cause = next((line for line in row.get("log_errors", []) if error_type not in line), None)
            if cause:  # e.g. EngineDeadError: the root cause was raised in another process
                lines.append(f"{'':<30}log: {cause[:150]}")
            continue
        spread = f"{row['tok_s_median']:.1f} [{row['tok_s_min']:.1f}-{row['tok_s_max']:.1f}]"
        ttft = f"{_fmt(row['ttft_ms']['p50'], '.1f')}/{_fmt(row['ttft_ms']['p99'], '.1f')}"
        tpot = f"{_fmt(row['tpot_ms']['p50'], '.1f')}/{_fmt(row['tpot_ms']['p99'], '.1f')}"
        ratio = f"{row['ratio_to_base']:.2f}x" if row.get("ratio_to_base") is not None else "-"
        lines.append(f"{row['label']:<30}{spread:<26}{ratio:>8}{row['req_s_median']:>8.2f}{ttft:>18}{tpot:>18}"
                     f"{_fmt(row['load_ms']['p50'], '.1f'):>12}{row['resident_adapters']:>9}"
                     f"{_fmt(row.get('adapter_bytes'), ','):>11}{row['peak_rss_bytes'] / 2**20:>9.0f}"
                     f"{_execution(row):>10}")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> list[Path]:
    """throughput.png: output tok/s against the number of adapters, one line per mode and family (the base model as
    a horizontal line); latency_cdf.png: TTFT and TPOT distributions of every run at the largest adapter count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    base = next((r for r in ok if r["mode"] == "base"), None)
    series: dict[str, list[tuple[int, float]]] = {}
    for row in ok:
        if row["mode"] != "base":
            # by the run's own label: a vllm-lora row's family is its LoRA form ("lora") whatever group it runs in
            series.setdefault(row["label"].rpartition("@")[0], []).append((row["num_adapters"], row["tok_s_median"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    # colour per family, marker and line style per mode: 14 series stay apart where one colour cycle would repeat
    families = sorted({name.partition(":")[2] for name in series})
    modes = sorted({name.partition(":")[0] for name in series})
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-.")]
    for name, points in sorted(series.items()):
        mode, _, family = name.partition(":")
        marker, linestyle = styles[modes.index(mode) % len(styles)]
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, linestyle=linestyle, label=name,
                color=plt.get_cmap("tab10")(families.index(family) % 10))
    if base is not None:
        ax.axhline(base["tok_s_median"], color="black", linestyle="--", label="base model")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distinct adapters")
    ax.set_ylabel("output tokens/s (median)")
    ax.set_title("Throughput against the number of adapters")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    throughput = out / "throughput.png"
    fig.savefig(throughput, dpi=120)
    plt.close(fig)

    largest = max((r["num_adapters"] for r in ok), default=0)
    latest = [r for r in ok if r["mode"] == "base" or r["num_adapters"] == largest]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, title in ((axes[0], "ttft_s", "time to first token"), (axes[1], "tpot_s", "time per output token")):
        for row in latest:
            values = np.sort(np.asarray(row[key]) * 1e3)
            if values.size:
                ax.plot(values, np.arange(1, values.size + 1) / values.size, label=row["label"])
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{title} ({largest} adapters)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    latency = out / "latency_cdf.png"
    fig.savefig(latency, dpi=120)
    plt.close(fig)
    return [throughput, latency]


def error_lines(log_path: Path, keep: int = 8) -> list[str]:
    """The last distinct exception lines of a run's log: an error seen by the runner (e.g. EngineDeadError) often
    only points to a root cause raised in the engine or server process, which lands in the log."""
    if not log_path.is_file():
        return []
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines()]
    found = [line for line in lines if re.search(r"\b\w+(Error|Exception|Exit)\b:", line)]
    return list(dict.fromkeys(found))[-keep:]
