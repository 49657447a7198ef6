"""Benchmarks: the benchmark() function, `ctxagg bench` outputs, the resolution sweep and the zoo columns.
No timing assertions (machines are noisy): structure and positivity only."""
import csv
import json

import pytest
import timm
import torch

import ctxagg  # noqa: F401
from ctxagg.bench.sweep import predict_cost, resolution_sweep
from ctxagg.bench.throughput import benchmark, summarise_times
from ctxagg.bench.zoo import activation_counter, format_table, model_rows
from ctxagg.cli import main as cli_main

TINY = dict(dims=(8, 8, 16, 16), depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2), head_dim=8)


def _positive_timing(r: dict) -> None:
    assert r["throughput"] > 0 and r["latency_ms"] > 0 and r["latency_min_ms"] > 0
    assert r["latency_q1_ms"] <= r["latency_ms"] <= r["latency_q3_ms"] and r["latency_iqr_ms"] >= 0
    assert r["throughput_q1"] <= r["throughput"] <= r["throughput_q3"]


def test_summary_statistics():
    s = summarise_times([4.0, 1.0, 3.0, 2.0], batch_size=2)
    assert (s["latency_ms"], s["latency_q1_ms"], s["latency_q3_ms"]) == (2.5, 1.75, 3.25)
    assert s["latency_iqr_ms"] == 1.5 and s["throughput"] == pytest.approx(2 * 1000 / 2.5)


def test_benchmark_a_built_module_and_a_name():
    torch.manual_seed(0)
    module = timm.create_model("container_light", **TINY)
    r = benchmark(module, batch_size=2, img_size=32, warmup=1, repeats=2)
    _positive_timing(r)
    assert len(r["times_ms"]) == 2 and r["peak_mb"] > 0 and r["params_m"] > 0
    assert not module.training  # benchmark() measures inference
    r = benchmark("container_light", 2, 32, dtype="bf16", memory_format="channels_last", warmup=0, repeats=2,
                  model_kwargs=TINY)
    _positive_timing(r)
    assert r["dtype"] == "bf16" and r["memory_format"] == "channels_last" and r["peak_mb"] > 0
    with pytest.raises(ValueError, match="memory format"):
        benchmark(module, memory_format="nhwc")


def test_cli_writes_json_csv_and_png(tmp_path):
    code = cli_main(["bench", "--models", "container_light", "--batch-sizes", "2", "--img-sizes", "32",
                     "--dtypes", "fp32,bf16", "--memory-formats", "contiguous,channels_last", "--warmup", "1",
                     "--repeats", "2", "--model-kwargs", json.dumps(TINY), "--out", str(tmp_path)])
    assert code == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert len(rows) == 4 and not any(r.get("error") for r in rows)
    assert {(r["dtype"], r["memory_format"]) for r in rows} == {
        ("fp32", "contiguous"), ("bf16", "contiguous"), ("fp32", "channels_last"), ("bf16", "channels_last")}
    for r in rows:
        _positive_timing(r)
    table = list(csv.DictReader(open(tmp_path / "bench.csv")))
    assert len(table) == 4 and all(float(r["throughput"]) > 0 for r in table)
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_cli_reports_a_configuration_that_cannot_run(tmp_path):
    # MLP affinities have a fixed token count: built for 32², refused at another size, reported in its row
    code = cli_main(["bench", "--models", "mlp", "--img-sizes", "32", "--repeats", "1", "--warmup", "0",
                     "--model-kwargs", json.dumps(dict(TINY, img_size=64)), "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert code == 1 and "error" in rows[0]


def test_resolution_sweep_predicts_everywhere_and_measures_within_budget():
    model = timm.create_model("container", **TINY).eval()
    gmacs, peak = predict_cost(model, 2, 32)
    assert gmacs > 0 and peak > 0
    rows = resolution_sweep(sizes=(64, 128), batch=1, families=("linglos",), max_seconds=1e-6)
    assert [(r["model"], r["size"]) for r in rows] == [
        ("linglo_b0 key-only", 64), ("linglo_b0 key-only", 128), ("linglo_b0 dot-product", 64),
        ("linglo_b0 dot-product", 128)]
    for r in rows:
        assert r["gmacs"] > 0 and r["materialised_peak_mb"] > 0
    first, second = rows[0], rows[1]
    assert first["status"] == "measured" and first["latency_ms"] > 0 and first["peak_mb"] > 0
    assert second["status"].startswith("skipped") and second.get("latency_ms") is None  # over the tiny budget
    # at 128² (1024 tokens in stage 1), materialised dot-product attention holds more than key-only attention
    assert rows[3]["materialised_peak_mb"] > 2 * rows[1]["materialised_peak_mb"]


def test_zoo_throughput_and_activation_columns():
    rows = model_rows(["container_light"], flops=True, img_size=64, throughput=True, repeats=1)
    assert rows[0]["throughput"] > 0 and rows[0]["throughput_batch"] == 1
    table = format_table(rows, 64)
    assert "img/s (fp32, batch 1)" in table and "GMACs @64" in table
    if activation_counter() is not None:
        assert rows[0]["activations_m"] > 0 and "acts (M)" in table
    plain = format_table(model_rows(["container_light"], flops=False))
    assert "img/s" not in plain and "acts" not in plain


def test_old_linglos_fig4_module_still_exports_the_counter():
    from ctxagg.bench.linglos_fig4 import PeakTensorBytes

    with PeakTensorBytes() as counter:
        torch.ones(1024)
    assert counter.peak == 4096
