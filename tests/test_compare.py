"""`ctxagg compare`: mixer variants, parameter matching, seeds and the mean ± std table."""
import json

import pytest
import timm
import torch

import ctxagg  # noqa: F401
from ctxagg.errors import ConfigError
from ctxagg.train import TrainConfig
from ctxagg.train.compare import Variant, compare, format_compare, match_parameters, mixer_variants

TINY = dict(dims=(8, 16, 16, 32), depths=(1, 1, 1, 1), head_dim=8)


def _backbone_params_by_hand(model: str, kwargs: dict) -> int:
    net = timm.create_model(model, num_classes=10, img_size=32, patch_sizes=(2, 2, 2, 2), **kwargs)
    return sum(p.numel() for name, p in net.named_parameters() if not name.startswith("head."))


def test_mixer_variants_put_the_spec_in_every_stage_or_one_per_stage():
    one, per_stage = mixer_variants("container_hdeit_s", ["mix(sa,dw5)", "dw3/dw3/dw5/sa"])
    assert one.kwargs["mixers"] == ("mix(sa,dw5)",) * 4 and one.folder == "mix_sa_dw5"
    assert per_stage.kwargs["mixers"] == ("dw3", "dw3", "dw5", "sa")
    with pytest.raises(ConfigError, match="every stage or 4"):
        mixer_variants("container_hdeit_s", ["dw3/sa"])


def test_matched_variants_have_the_reference_parameter_count_within_tolerance():
    variants = [Variant(v.label, v.model, {**TINY, **v.kwargs})
                for v in mixer_variants("container_hdeit_s", ["sa", "dw3", "conv3"])]
    matched = match_parameters(variants, img_size=32, tolerance=0.05)
    target = _backbone_params_by_hand("container_hdeit_s", variants[0].kwargs)
    counts = [_backbone_params_by_hand(v.model, v.kwargs) for v in matched]
    assert counts[0] == target and all(abs(c - target) <= 0.05 * target for c in counts)
    # unmatched they differ by far more than 5%: the matching did the work
    assert abs(_backbone_params_by_hand("container_hdeit_s", variants[2].kwargs) - target) > 0.2 * target
    assert matched[1].kwargs["mlp_ratios"][0] > 4 > matched[2].kwargs["mlp_ratios"][0]  # dw is lighter than sa
    assert all(m.kwargs["mixers"] == v.kwargs["mixers"] for m, v in zip(matched, variants))


def test_matching_that_cannot_reach_the_target_says_which_variant():
    variants = [Variant("dw3", "container_hdeit_s", {**TINY, "mixers": ("dw3",) * 4}),
                Variant("conv3", "container_hdeit_s", {**TINY, "dims": (64, 64, 64, 64), "mixers": ("conv3",) * 4})]
    with pytest.raises(ConfigError, match="conv3: no channel-MLP width"):
        match_parameters(variants, img_size=32)


def test_table_shows_mean_and_sample_std_over_seeds():
    runs = [dict(label="a", fraction=0.1, seed=s, best_top1=b, seconds=1.0, curve=[b - 10, b])
            for s, b in enumerate((50.0, 52.0, 54.0))]
    table = format_compare(runs, [Variant("a", "m")], [0.1], {"a": 1_500_000}, {}, None)
    assert "| a | 1.500 | 52.00 ± 2.00 | 3s |" in table
    assert "| a | 42.00 ± 2.00 | 52.00 ± 2.00 |" in table  # per-epoch curve


def test_compare_trains_every_variant_with_every_seed(tmp_path):
    base = TrainConfig(model="container_hdeit_s", data="digits", img_size=32, batch_size=16, epochs=1, fraction=0.1,
                       max_steps=2, recipe="light", model_kwargs=dict(TINY))
    variants = mixer_variants("container_hdeit_s", ["sa", "dw3"])
    result = compare(variants, base, [0.1], str(tmp_path / "cmp"), progress=False, seeds=[1, 2])
    assert [(r["label"], r["seed"]) for r in result["runs"]] == [("sa", 1), ("sa", 2), ("dw3", 1), ("dw3", 2)]
    for label, seed in (("sa", 1), ("dw3", 2)):
        run_cfg = json.loads((tmp_path / "cmp" / f"{label}-f0.1-s{seed}" / "config.json").read_text())
        assert run_cfg["seed"] == seed and run_cfg["model_kwargs"]["mixers"] == [label] * 4
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["seeds"] == [1, 2] and (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    assert " ± " in (tmp_path / "cmp" / "compare.md").read_text()


def test_vary_makes_one_variant_per_value_of_one_model_argument():
    from ctxagg.cli import _vary
    from ctxagg.train.compare import kwarg_variants
    key, values = _vary("attn-norm=softmax,scale_relu")
    variants = kwarg_variants("deit_s", key, values)
    assert [(v.label, v.kwargs) for v in variants] == [("attn_norm=softmax", {"attn_norm": "softmax"}),
                                                      ("attn_norm=scale_relu", {"attn_norm": "scale_relu"})]
    assert _vary("depth=2,4") == ("depth", [2, 4])
    with pytest.raises(ConfigError, match="KEY=VALUE1,VALUE2"):
        _vary("attn_norm")


@pytest.mark.slow
def test_parallel_jobs_give_the_same_runs_as_one_after_another(tmp_path):
    base = TrainConfig(model="container_hdeit_s", data="digits", img_size=32, batch_size=16, epochs=1, fraction=0.1,
                       max_steps=2, recipe="light", model_kwargs=dict(TINY))
    variants = mixer_variants("container_hdeit_s", ["dw3"])
    one = compare(variants, base, [0.1], str(tmp_path / "one"), progress=False, seeds=[1, 2])
    two = compare(variants, base, [0.1], str(tmp_path / "two"), progress=False, seeds=[1, 2], jobs=2)
    assert [r["curve"] for r in one["runs"]] == [r["curve"] for r in two["runs"]]


def test_an_interrupted_comparison_resumes_and_reads_finished_runs_back(tmp_path):
    base = TrainConfig(model="container_hdeit_s", data="digits", img_size=32, batch_size=16, epochs=1, fraction=0.1,
                       max_steps=2, recipe="light", model_kwargs=dict(TINY))
    variants = mixer_variants("container_hdeit_s", ["dw3"])
    first = compare(variants, base, [0.1], str(tmp_path / "cmp"), progress=False, seeds=[1])
    (tmp_path / "cmp" / "compare.md").unlink()  # as if stopped before the table
    again = compare(variants + mixer_variants("container_hdeit_s", ["sa"]), base, [0.1], str(tmp_path / "cmp"),
                    progress=False, seeds=[1], resume=True)
    assert again["runs"][0]["curve"] == first["runs"][0]["curve"] and len(again["runs"]) == 2
    with pytest.raises(Exception, match="--overwrite|holds"):
        compare(variants, base, [0.1], str(tmp_path / "cmp"), progress=False, seeds=[1])  # no --resume: refused
