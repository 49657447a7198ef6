"""Affinity analysis: locality / diagonal-share numbers on hand-built affinities, row extraction against
``matrix()``, mixture weights, and `ctxagg inspect` end to end (untrained and trained)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import ctxagg  # noqa: F401
from ctxagg.affinity import AffinityMixture, conv_toeplitz
from ctxagg.analysis.affinity_maps import (affinity_rows, capture_affinity_calls, conv_rows, diagonal_share,
                                           layer_statistics, locality_score, mixture_weights, sample_queries,
                                           uniform_locality)
from ctxagg.analysis.inspect import inspect_model, run_inspect
from ctxagg.cli import main as cli_main

TINY = dict(dims=(8, 8, 16, 16), depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2), head_dim=8)
PNGS = ("static_affinity.png", "dynamic_attention.png", "mixture_weights.png", "locality.png")


# ---------------------------------------------------------------- the numbers, on affinities with known answers

def test_identity_affinity_is_perfectly_local_and_all_diagonal():
    a = torch.eye(16)
    assert locality_score(a, (4, 4), 0) == pytest.approx(1.0)
    assert diagonal_share(a) == pytest.approx(1.0)


def test_uniform_affinity_on_a_4x4_grid():
    a = torch.ones(2, 3, 16, 16)  # batch and heads are averaged over
    assert locality_score(a, (4, 4), 0) == pytest.approx(1 / 16)
    # r = 1: corners see 4 keys, edges 6, the 4 interior cells 9 -> (4·4 + 8·6 + 4·9) / 16 / 16
    assert locality_score(a, (4, 4), 1) == pytest.approx(100 / 256)
    assert locality_score(a, (4, 4), 3) == pytest.approx(1.0)
    assert diagonal_share(a) == pytest.approx(1 / 16)
    assert uniform_locality((4, 4), 1) == pytest.approx(100 / 256)


def test_box_kernel_toeplitz_is_local_at_radius_one():
    a = conv_toeplitz(torch.ones(1, 3, 3), 5, 5)  # 3×3 box filter, zero padded
    assert locality_score(a, (5, 5), 1) == pytest.approx(1.0)
    per_query = locality_score(a, (5, 5), 0, reduce=False).view(5, 5)
    torch.testing.assert_close(per_query[1:4, 1:4], torch.full((3, 3), 1 / 9))  # interior: 1 of 9 keys
    assert per_query[0, 0] == pytest.approx(1 / 4) and per_query[0, 2] == pytest.approx(1 / 6)
    interior = torch.tensor([6, 12, 18])
    assert locality_score(a[:, interior], (5, 5), 0, rows=interior) == pytest.approx(1 / 9)
    assert diagonal_share(a[:, interior], rows=interior) == pytest.approx(1 / 9)


def test_class_token_keys_count_as_non_local_and_its_query_is_ignored():
    a = torch.zeros(17, 17)  # one class token then a 4×4 grid
    a[:, 0] = 1.0  # all mass on the class token
    assert locality_score(a, (4, 4), 3) == pytest.approx(0.0)
    a[1:, 1:] = torch.eye(16)
    a[1:, 0] = 0.0
    assert locality_score(a, (4, 4), 0) == pytest.approx(1.0)  # row 0 (the class token) does not count


def test_conv_rows_equal_the_toeplitz_rows():
    kernel = torch.randn(3, 5, 5)
    rows = torch.tensor([0, 4, 13, 20, 41])
    torch.testing.assert_close(conv_rows(kernel, (6, 7), rows), conv_toeplitz(kernel, 6, 7)[:, rows])
    assert len(sample_queries((56, 56), 256)) <= 256 and len(sample_queries((4, 4), 256)) == 16


# ---------------------------------------------------------------- rows and weights of real models

def _tiny_container(**kw):
    torch.manual_seed(0)
    return timm.create_model("container", **TINY, **kw).eval()


def test_affinity_rows_match_matrix_for_every_block():
    model = _tiny_container()
    # 64² gives 16², 8², 4², 2² grids (conv_toeplitz, the matrix() reference, needs a grid of at least k // 2)
    _, calls = capture_affinity_calls(model, torch.randn(1, 3, 64, 64))
    assert len(calls) == 4 and all(isinstance(c.affinity, AffinityMixture) for c in calls)
    for call in calls:
        full = call.affinity.matrix(call.v_shape, call.q, call.k)
        rows = torch.arange(0, call.tokens, 3)
        torch.testing.assert_close(affinity_rows(call.affinity, call, rows), full[..., rows, :], rtol=1e-5, atol=1e-6)
        stats = layer_statistics(call, radius=1)
        assert set(stats["locality"]) == {"static", "dynamic", "combined"}
        expected = locality_score(full, call.grid, 1)
        assert stats["locality"]["combined"] == pytest.approx(expected, abs=1e-5)


def test_mixture_weights_read_the_gates_set_by_hand():
    model = _tiny_container()
    mixtures = [m for m in model.modules() if isinstance(m, AffinityMixture)]
    for i, m in enumerate(mixtures):
        m.gate_logit.data.fill_(math.log(0.2 * (i + 1) / (1 - 0.2 * (i + 1))))  # α = 0.2, 0.4, 0.6, 0.8
    weights = mixture_weights(model)
    assert [round(w["alpha"], 6) for w in weights.values()] == [0.2, 0.4, 0.6, 0.8]
    assert all(w["alpha"] + w["beta"] == pytest.approx(1.0) and w["gate"] == "convex" for w in weights.values())
    free = _tiny_container(gate="free")
    m = next(m for m in free.modules() if isinstance(m, AffinityMixture))
    m.alpha.data.fill_(0.3)
    m.beta.data.fill_(1.7)
    first = next(iter(mixture_weights(free).values()))
    assert (first["alpha"], first["beta"]) == (pytest.approx(0.3), pytest.approx(1.7))


def test_lesa_shares_come_from_the_lesa_analysis():
    torch.manual_seed(0)
    model = timm.create_model("resnet50_lesa", layers=(1, 1, 1, 1), img_size=64, num_classes=10).eval()
    numbers = inspect_model(model, torch.randn(1, 3, 64, 64))["numbers"]
    lesa = numbers["lesa"]
    assert 0 < lesa["mean_diagonal_share"] < 1
    unary, binary = lesa["mean_fusion_share"]
    assert unary + binary == pytest.approx(1.0) and 0 < unary < 1
    layer = next(l for l in numbers["layers"] if l["type"] == "RelativeSelfAttention2d")
    assert layer["diagonal_share"]["dynamic"] == pytest.approx(lesa["diagonal_share"][layer["name"]], rel=1e-4)


# ---------------------------------------------------------------- `ctxagg inspect` end to end

@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("img") / "img.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(path)
    return str(path)


def _check_outputs(out: Path, mixtures: int) -> dict:
    for name in PNGS:
        assert (out / name).stat().st_size > 1000, name
    numbers = json.loads((out / "inspect.json").read_text())
    assert numbers["layers"] and not numbers["skipped"]
    for layer in numbers["layers"]:
        assert 0 <= layer["locality"]["combined"] <= 1 + 1e-6
        assert 0 <= layer["uniform_locality"] <= 1 + 1e-6
    assert len(numbers["mixture_weights"]) == mixtures
    return numbers


def test_inspect_an_untrained_tiny_model(tmp_path, image):
    code = cli_main(["inspect", "--model", "container_light", "--image", image, "--output", str(tmp_path),
                     "--img-size", "64", "--model-kwargs", json.dumps(TINY), "--query", "32,32", "0,63"])
    assert code == 0
    numbers = _check_outputs(tmp_path, mixtures=1)
    assert numbers["queries_px"] == [[32, 32], [0, 63]] and numbers["img_size"] == 64
    static = [l for l in numbers["layers"] if l["type"] == "DepthwiseConvAffinity"]
    assert [l["grid"] for l in static] == [[16, 16], [8, 8], [4, 4]]
    for layer in static[:2]:  # a 5×5 kernel on a grid wider than it: more local than a uniform affinity
        assert layer["locality"]["static"] > layer["uniform_locality"]


def test_inspect_a_trained_checkpoint(tmp_path, image):
    from ctxagg.train import TrainConfig, train

    run = tmp_path / "run"
    train(TrainConfig(model="container_light", data="digits", img_size=16, epochs=1, fraction=0.1, batch_size=32,
                      model_kwargs=TINY, output=str(run)), progress=False)
    report = run_inspect(None, image, str(tmp_path / "inspect"), checkpoint=str(run / "model_best.safetensors"),
                         radius=1)
    numbers = _check_outputs(tmp_path / "inspect", mixtures=1)
    assert numbers["model"] == "container_light" and numbers["img_size"] == 16 and numbers["radius"] == 1
    assert len(numbers["top5"]) == 5 and all(isinstance(c, str) for c, _ in numbers["top5"])  # digit class names
    assert [l["grid"] for l in numbers["layers"]] == [[8, 8], [4, 4], [2, 2], [1, 1]]  # the run's 2,2,2,2 patches
    first = numbers["layers"][0]
    assert first["uniform_locality"] < first["locality"]["static"] < 1  # a 5×5 kernel reaches beyond radius 1
    alpha = next(iter(numbers["mixture_weights"].values()))["alpha"]
    assert 0 < alpha < 1
    assert "locality" in report["summary"]
