"""Benchmarks: the benchmark() function, `ctxagg bench` outputs, the resolution sweep and the zoo columns.
No timing assertions (machines are noisy): structure and positivity only."""
import contextlib
import csv
import json

import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import ctxagg  # noqa: F401
from ctxagg.bench.complexity import SDPA_FLOP_FORMULAS, count_gmacs, meta_model
from ctxagg.bench.sweep import predict_cost, resolution_sweep
from ctxagg.bench.throughput import benchmark, summarise_times
from ctxagg.bench.zoo import format_table, model_rows
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
    code = cli_main(["bench", "throughput", "--models", "container_light", "--batch-sizes", "2", "--img-sizes", "32",
                     "--dtypes", "fp32,bf16", "--memory-formats", "contiguous,channels_last", "--warmup", "1",
                     "--repeats", "2", "--model-kwargs", json.dumps(TINY), "--output", str(tmp_path)])
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
    code = cli_main(["bench", "throughput", "--models", "container_mlp", "--img-sizes", "32", "--repeats", "1",
                     "--warmup", "0", "--model-kwargs", json.dumps(dict(TINY, img_size=64)), "--output", str(tmp_path)])
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
    assert rows[0]["params_m"] * 1e6 == 20_633_643  # the official container_v1_light count
    assert rows[0]["activations_m"] > 0 and rows[0]["gmacs"] > 0
    table = format_table(rows, 64)
    assert "img/s (fp32, batch 1)" in table and "GMACs @64" in table and "acts (M)" in table
    plain = format_table(model_rows(["container_light"], flops=False))
    assert "img/s" not in plain and "acts" not in plain


def test_zoo_row_of_deit_s_is_its_hand_count():
    """DeiT-S at 224² (197 tokens, C=384, 6 heads of 64, 12 blocks), written out by hand: the zoo counts
    attention (whichever SDPA kernel runs), and its activations are Table 3's 11.947M."""
    n, c, heads, blocks = 197, 384, 6, 12
    block_macs = n * c * 3 * c + 2 * heads * n * n * (c // heads) + n * c * c + 2 * n * c * 4 * c
    macs = 196 * c * 3 * 16 * 16 + blocks * block_macs + c * 1000  # patch embedding, blocks, head
    block_acts = n * 3 * c + heads * n * n + n * c + n * c + n * 4 * c + n * c  # qkv, QKᵀ, A·V, proj, fc1, fc2
    (row,) = model_rows(["deit_s"], img_size=224)
    assert row["gmacs"] * 1e9 == pytest.approx(macs, rel=1e-9)  # 4.598882304
    assert row["activations_m"] * 1e6 == pytest.approx(196 * c + blocks * block_acts, rel=1e-9)  # 11.947272
    assert row["params_m"] * 1e6 == 22_050_664 and row["paper_params_m"] == 22.051
    assert row["paper_gflops"] == 4.608 and row["gflops_gap"] == pytest.approx(macs / 4.608e9 - 1)


def test_old_linglos_fig4_module_still_exports_the_counter():
    from ctxagg.bench.linglos_fig4 import PeakTensorBytes

    with PeakTensorBytes() as counter:
        torch.ones(1024)
    assert counter.peak == 4096


# --- MAC counting that does not depend on the attention kernel ---------------------------------------------
B, HEADS, N_Q, N_K, D, D_V = 2, 3, 5, 7, 8, 4
HAND_MACS = B * HEADS * N_Q * N_K * D + B * HEADS * N_Q * N_K * D_V  # Q·Kᵀ (N_q×N_k over d), then A·V (over N_k)
HAND_MACS_SAME_D = 2 * B * HEADS * N_Q * N_K * D  # flash kernels need d_v = d


class _OneAttention(torch.nn.Module):
    """Cuts q, k, v of (B, heads, N, d) out of its input and runs F.scaled_dot_product_attention on them."""

    def __init__(self, d_v: int):
        super().__init__()
        self.d_v = d_v

    def forward(self, x):
        flat = x.flatten()
        q = flat[: B * HEADS * N_Q * D].view(B, HEADS, N_Q, D)
        k = flat[: B * HEADS * N_K * D].view(B, HEADS, N_K, D)
        v = flat[: B * HEADS * N_K * self.d_v].view(B, HEADS, N_K, self.d_v)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("backend,d_v", [(None, D_V), (None, D), (SDPBackend.MATH, D_V),
                                         (SDPBackend.FLASH_ATTENTION, D)])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_attention_macs_equal_the_hand_count_under_every_cpu_backend(backend, d_v, device):
    """None: torch's own choice (on CPU ``_scaled_dot_product_flash_attention_for_cpu``, which the stock
    torch.utils.flop_counter charges 0; on meta the math path); MATH decomposes into bmm; FLASH_ATTENTION
    forces the fused CPU kernel (it needs d_v = d)."""
    model = _OneAttention(d_v).to(device)
    model.register_buffer("anchor", torch.zeros(1, device=device))  # count_gmacs makes its input here
    size = (1, B * HEADS * N_K * D)
    with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
        macs = count_gmacs(model, size) * 1e9
    assert macs == (HAND_MACS if d_v == D_V else HAND_MACS_SAME_D)
    assert HAND_MACS == 2 * 3 * 5 * 7 * (8 + 4)


_FUSED_CALLS = {  # every fused kernel, called directly on meta tensors (the GPU kernels cannot run here)
    "_scaled_dot_product_flash_attention_for_cpu": lambda q, k, v: (q, k, v),
    "_scaled_dot_product_flash_attention": lambda q, k, v: (q, k, v),
    "_scaled_dot_product_efficient_attention": lambda q, k, v: (q, k, v, None, False),
    "_scaled_dot_product_cudnn_attention": lambda q, k, v: (q, k, v, None, False),
    "_scaled_dot_product_fused_attention_overrideable": lambda q, k, v: (q, k, v),
}


@pytest.mark.parametrize("op", list(_FUSED_CALLS))
@pytest.mark.parametrize("d_v", [D_V, D])
def test_every_fused_attention_kernel_is_counted_as_its_hand_count(op, d_v):
    if not hasattr(torch.ops.aten, op):
        pytest.skip(f"this torch has no aten.{op}")
    if "flash" in op and d_v != D:
        pytest.skip("flash kernels need the value head size to equal the query's")
    assert getattr(torch.ops.aten, op) in SDPA_FLOP_FORMULAS
    q, k, v = (torch.empty(B, HEADS, n, d, device="meta") for n, d in ((N_Q, D), (N_K, D), (N_K, d_v)))
    counter = FlopCounterMode(display=False, custom_mapping=SDPA_FLOP_FORMULAS)
    with counter:
        getattr(torch.ops.aten, op)(*_FUSED_CALLS[op](q, k, v))
    assert counter.get_total_flops() == 2 * (HAND_MACS if d_v == D_V else HAND_MACS_SAME_D)


def test_meta_device_count_equals_the_cpu_count():
    """On meta, SDPA decomposes (math backend); on CPU it runs the fused kernel: same number, and the same as
    timm's DeiT-Tiny (192 wide, 3 heads, 197 tokens, 12 blocks) counted by hand."""
    torch.manual_seed(0)
    cpu = timm.create_model("vit_tiny_patch16_224").eval()
    meta = meta_model("vit_tiny_patch16_224")
    assert all(p.is_meta for p in meta.parameters())
    n, c = 197, 192
    block = n * c * 3 * c + 2 * n * n * c + n * c * c + 2 * n * c * 4 * c
    hand = 196 * c * 768 + 12 * block + c * 1000
    assert count_gmacs(meta) * 1e9 == pytest.approx(hand, rel=1e-12)
    assert count_gmacs(cpu) * 1e9 == pytest.approx(hand, rel=1e-12)
