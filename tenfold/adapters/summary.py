"""What `tenfold inspect` reports about an adapter directory."""

from __future__ import annotations

from pathlib import Path

from .base import Adapter


def directory_bytes(directory) -> int:
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file())


def summarize(adapter: Adapter, directory) -> dict:
    """family, target_modules, rank, params, bytes (on disk), lora_equivalent_bytes (the same update as per-layer
    dense factors at the adapter's dtype; None without a base model), exact_lora, details."""
    element = next(iter(adapter.tensors().values())).element_size()
    return {
        "family": adapter.family,
        "target_modules": adapter.target_modules(),
        "rank": adapter.rank,
        "params": adapter.num_params(),
        "bytes": directory_bytes(directory),
        "lora_equivalent_bytes": adapter.dense_equivalent_params() * element if adapter.spec is not None else None,
        "exact_lora": adapter.has_exact_lora,
        "details": adapter.describe(),
    }


def format_summary(summary: dict, directory) -> str:
    dense = summary["lora_equivalent_bytes"]
    lines = [
        f"adapter        {directory}",
        f"family         {summary['family']}",
        f"targets        {', '.join(summary['target_modules'])}",
        f"rank           {summary['rank']}",
        f"parameters     {summary['params']:,}",
        f"bytes on disk  {summary['bytes']:,}",
        "dense LoRA     " + (f"{dense:,} bytes ({dense / max(summary['bytes'], 1):.1f}x the files)" if dense is not None
                             else "unknown: pass --base MODEL_DIR to size it against a base model"),
        f"exact LoRA     {'yes' if summary['exact_lora'] else 'no (served on the native path only)'}",
    ]
    lines += [f"{key:<15}{value}" for key, value in summary["details"].items()]
    return "\n".join(lines)
