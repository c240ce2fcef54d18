"""`tenfold bench`: the workload generator, and the harness end to end on the tiny model (offline and Poisson
against a server), checking what it reports, never how fast anything ran."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tenfold.bench.workload import Lengths, Popularity, make_requests

REPO = Path(__file__).resolve().parent.parent
CPU_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "HF_HUB_OFFLINE": "1"}


def test_zipf_popularity_favours_the_first_adapters_and_uniform_uses_all_evenly():
    import random

    zipf = collections.Counter(Popularity.parse("zipf:1.2").choose(64, 4000, random.Random(0)))
    assert zipf[0] > zipf[1] > zipf[7] > zipf.get(40, 0), zipf.most_common(5)
    uniform = collections.Counter(Popularity.parse("uniform").choose(16, 64, random.Random(0)))
    assert set(uniform.values()) == {4}


def test_requests_are_reproducible_and_poisson_arrivals_increase():
    args = (50, 8, Popularity("zipf", 1.0), Lengths.parse("4-9"), Lengths.parse("3"), 512, 10.0)
    first, again, other = make_requests(*args, seed=1), make_requests(*args, seed=1), make_requests(*args, seed=2)
    assert first == again and first != other
    arrivals = [r["arrival_s"] for r in first]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0
    assert {len(r["prompt"]) for r in first} <= set(range(4, 10)) and {r["max_tokens"] for r in first} == {3}
    offline = make_requests(5, 0, Popularity(), Lengths(2, 2), Lengths(2, 2), 512, None, seed=0)
    assert all(r["adapter"] is None and r["arrival_s"] == 0.0 for r in offline)


@pytest.mark.parametrize("text", ["zipf:0", "zipf:x", "pareto", "uniform:2"])
def test_bad_popularity_is_refused_with_the_expected_forms(text):
    with pytest.raises(ValueError, match="uniform' or 'zipf:ALPHA'"):
        Popularity.parse(text)


def test_cli_refuses_bad_workloads_before_starting_anything():
    for argv, message in ((["--arrival", "poisson:-1"], "poisson:RATE"), (["--lengths"], "unrecognized"),
                          (["--output-len", "9-3"], "LO <= HI"), (["--modes", "native,fast"], "choose from")):
        done = subprocess.run([sys.executable, "-m", "tenfold.cli", "bench", *argv], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, (argv, done.stderr[-400:])


def test_replica_bench_refuses_bad_routings_and_base_only_modes_and_reports_ratios_against_single_and_random():
    from tenfold.bench import cluster

    for argv, message in ((["--replicas", "2", "--routing", "affinity,sticky"], "comma list of single"),
                          (["--replicas", "2", "--modes", "base"], "must name native or convert")):
        done = subprocess.run([sys.executable, "-m", "tenfold.cli", "bench", *argv], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode != 0 and message in done.stderr, (argv, done.stderr[-400:])
    rows = [{"routing": routing, "replicas": replicas, "family": "lora", "num_adapters": 64,
             "result": {"output_tok_s": tok_s, "served_where_resident": share, "loads_per_1000": loads,
                        "per_replica": spread, "errors": 0}}
            for routing, replicas, tok_s, share, loads, spread in (
                ("single", 1, 70.0, 0.5, 500.0, {"a": 192}), ("affinity", 2, 140.0, 0.75, 250.0, {"a": 90, "b": 102}),
                ("random", 2, 112.0, 0.48, 520.0, {"a": 97, "b": 95}))]
    cluster.add_ratios(rows)
    affinity = rows[1]
    assert affinity["x_single"] == pytest.approx(2.0) and affinity["x_random"] == pytest.approx(1.25)
    assert "x_single" not in rows[0] and rows[2]["x_single"] == pytest.approx(1.6)
    table = cluster.format_table(rows).splitlines()
    assert "| affinity | 2 | lora | 64 | 140.0 | 2.00x | 1.25x | 75.0% | 250 | 90, 102 | 0 |" in table


def test_bench_model_names_a_directory_a_known_model_or_random(tmp_path, tiny_model_dirs):
    from tenfold.bench.workload import DEFAULT_MODEL, model_dtype, resolve_model
    from tenfold.model_zoo import KNOWN_MODELS

    assert DEFAULT_MODEL in KNOWN_MODELS
    assert resolve_model(str(tiny_model_dirs["gqa"]), tmp_path) == tiny_model_dirs["gqa"]
    assert model_dtype(tiny_model_dirs["gqa"]) == "float32"  # --dtype auto: the dtype the model is saved in
    with pytest.raises(SystemExit, match="not a model directory .* known model name .*smollm2, random"):
        resolve_model("no-such-model", tmp_path)


def run_bench(tmp_path, model_dir, *argv) -> dict:
    out = tmp_path / "out"
    env = {**os.environ, **CPU_ENV}
    done = subprocess.run([sys.executable, "-m", "tenfold.cli", "bench", "--model", str(model_dir),
                           "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--prompt-len", "6-12",
                           "--output-len", "4", "--repeats", "1", *argv], capture_output=True, text=True,
                          timeout=900, env=env, cwd=REPO)
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in sorted((out / "logs").glob("*.log")))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:] + logs
    return json.loads((out / "results.json").read_text())


def check_row(row, requests, adapters, runs=1):
    assert "error" not in row, row.get("error")
    assert row["output_tokens"] == 4 * requests and all(t > 0 for t in row["tok_s"])
    assert len(row["ttft_s"]) == requests * runs and row["ttft_ms"]["p50"] > 0 and row["tpot_ms"]["p99"] > 0
    assert row["peak_rss_bytes"] > 0
    if adapters:
        assert row["resident_adapters"] == adapters and len(row["load_ms"]["samples"]) == adapters
        assert row["adapter_bytes"] > 0


def test_offline_bench_runs_every_mode_side_by_side_and_writes_results_and_plots(tmp_path, tiny_model_dirs):
    results = run_bench(tmp_path, tiny_model_dirs["gqa"], "--families", "lorta,bat", "--adapters", "2",
                        "--modes", "base,native,convert,vllm-lora", "--requests", "4")
    labels = [row["label"] for row in results["results"]]
    # bat has no LoRA form: native only
    assert labels == ["base", "native:lorta@2", "convert:lorta@2", "vllm-lora:lorta@2", "native:bat@2"]
    base = results["results"][0]
    assert len(base["tok_s"]) == 2, "a base run opens each family's group (lorta, bat)"
    # every run as vLLM runs it: the base model and tenfold's native mode compiled (inductor on CPU), vLLM's own
    # LoRA (convert, vllm-lora) eager, because vLLM's CPU platform turns compilation off for it
    assert [r["compiled"] for r in results["results"]] == [True, True, False, False, True]
    assert not any(r["enforce_eager"] for r in results["results"])
    for log in ("base.log", "native_lorta_2.log"):
        text = (tmp_path / "out" / "logs" / log).read_text()
        assert "DYNAMO_TRACE_ONCE" in text and "'backend': 'inductor'" in text, text[-3000:]
    for row in results["results"]:
        check_row(row, 4, 0 if row["mode"] == "base" else 2, runs=2 if row["mode"] == "base" else 1)
        if row["mode"] != "base":  # against its own group's base run (repeats=1: that run's one measurement)
            (paired,) = row["paired_ratios"]
            assert row["ratio_to_base"] == paired
            assert any(paired == pytest.approx(row["tok_s_median"] / b) for b in base["tok_s"])
    vllm_row = results["results"][3]
    assert vllm_row["adapter_bytes"] > results["results"][1]["adapter_bytes"], "the LoRA form is the larger one"
    for png in ("throughput.png", "latency_cdf.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_poisson_bench_drives_a_running_server_through_the_openai_api(tmp_path, tiny_model_dirs):
    results = run_bench(tmp_path, tiny_model_dirs["mha"], "--families", "miss", "--adapters", "3", "--modes",
                        "native", "--requests", "5", "--arrival", "poisson:20", "--popularity", "zipf:1.0",
                        "--no-plots")
    (row,) = results["results"]
    check_row(row, 5, 3)
    assert results["settings"]["arrival"] == "poisson:20" and not (tmp_path / "out" / "throughput.png").exists()


def test_bench_serves_a_directory_of_the_users_adapters_of_mixed_families(tmp_path, tiny_model_dirs, specs):
    from adapter_cases import make
    from tenfold.adapters import save_adapter

    adapters = tmp_path / "my-adapters"
    for i, case in enumerate(["lorta_heads_out", "miss", "lora"]):
        save_adapter(make(case, specs["gqa"], seed=70 + i), adapters / f"a{i}-{case}")
    (adapters / "notes").mkdir()  # not an adapter directory: skipped
    results = run_bench(tmp_path, tiny_model_dirs["gqa"], "--adapter-dir", str(adapters), "--adapters", "2",
                        "--modes", "native,vllm-lora", "--requests", "4", "--no-plots")
    assert [row["label"] for row in results["results"]] == ["native:dir:my-adapters@2", "vllm-lora:dir:my-adapters@2"]
    for row in results["results"]:
        check_row(row, 4, 2)
    assert results["settings"]["adapter_dir"] == str(adapters)


@pytest.mark.parametrize("problem", ["empty", "too-few"])
def test_bench_refuses_an_unusable_adapter_directory_before_starting_an_engine(tmp_path, tiny_model_dirs, specs,
                                                                              problem):
    from adapter_cases import make
    from tenfold.adapters import save_adapter

    adapters = tmp_path / "adapters"
    adapters.mkdir()
    if problem == "too-few":
        save_adapter(make("miss", specs["gqa"], seed=1), adapters / "only-one")
    done = subprocess.run([sys.executable, "-m", "tenfold.cli", "bench", "--model", str(tiny_model_dirs["gqa"]),
                           "--adapter-dir", str(adapters), "--adapters", "2", "--out", str(tmp_path / "out"),
                           "--no-plots"], capture_output=True, text=True, timeout=300, env={**os.environ, **CPU_ENV})
    assert done.returncode != 0
    expected = "no adapter directories" if problem == "empty" else "holds 1 adapter directories"
    assert expected in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "out" / "logs").exists() or not list((tmp_path / "out" / "logs").iterdir())
