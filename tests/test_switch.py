"""Learned dynamic-path switches (issue #19): the hard concrete gate, the switched mixture and block, removal for
deployment, the cost penalty and its budget, container_auto and exact resume with switches.

References are written from the papers' equations (Louizos et al. 2018 Eq. 10-12; Container Eq. 9) with float64
arithmetic and explicit formulas, or are independent modules (a plain static block), never the code under test."""
import copy
import json
import math

import pytest
import timm
import torch
from timm.utils.model import reparameterize_model

import ctxagg  # noqa: F401  (registers the models)
from ctxagg.affinity import DepthwiseConvAffinity, SelfAttentionAffinity, build_affinity
from ctxagg.affinity.mixture import AffinityMixture, HardConcreteSwitch
from ctxagg.bench import count_params
from ctxagg.bench.complexity import count_gmacs
from ctxagg.blocks import AggregationBlock
from ctxagg.errors import ConfigError
from ctxagg.train import TrainConfig, train
from ctxagg.train.budget import DynamicBudget, switched_paths
from ctxagg.train.checkpoint import load_checkpoint

TAU, GAMMA, ZETA = 2 / 3, -0.1, 1.1  # Louizos et al. 2018 §4.2
TINY = dict(dims=(8, 8, 16, 16), depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2), head_dim=8)
SMALL_32 = dict(TINY, img_size=32, patch_sizes=(2, 2, 2, 2), num_classes=5)
AT_16 = dict(TINY, img_size=16, patch_sizes=(2, 2, 2, 2))  # what `ctxagg train --img-size 16` builds (small input)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _switch(log_alpha: float) -> HardConcreteSwitch:
    s = HardConcreteSwitch()
    with torch.no_grad():
        s.log_alpha.fill_(log_alpha)
    return s


# --- the hard concrete gate ---------------------------------------------------------------------------------------
def test_switch_known_answers():
    """Evaluation value clamp(sigmoid(log α)(ζ−γ)+γ, 0, 1) and P(z≠0) = sigmoid(log α − τ log(−γ/ζ)), by hand."""
    assert _switch(0.0).eval()().item() == pytest.approx(0.5)          # 0.5·1.2 − 0.1
    assert _switch(2.5).eval()().item() == 1.0                         # 0.924·1.2 − 0.1 = 1.009 -> 1 (starts on)
    assert _switch(-3.0).eval()().item() == 0.0                        # 0.047·1.2 − 0.1 < 0 -> exactly 0
    assert _switch(0.0).prob_on().item() == pytest.approx(0.831822, abs=1e-6)  # sigmoid((2/3)·ln 11 = 1.5986)
    assert HardConcreteSwitch().eval()().item() == 1.0
    off = _switch(5.0)
    off.fix(False)
    assert off.eval()().item() == 0.0 and off.train()().item() == 0.0 and off.prob_on().item() == 0.0 and off.fixed


@pytest.mark.parametrize("log_alpha", [-1.0, 0.5, 2.0])
def test_switch_samples_follow_the_hard_concrete_distribution(log_alpha):
    """Training draws: exact zeros and ones occur, and their frequencies match the closed forms
    P(z=0) = sigmoid(τ·logit(−γ/(ζ−γ)) − log α) and P(z=1) = sigmoid(log α − τ·logit((1−γ)/(ζ−γ)))."""
    torch.manual_seed(0)
    s = _switch(log_alpha).train()
    z = torch.cat([s() for _ in range(20000)]).double()
    assert ((z >= 0) & (z <= 1)).all()
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    p_zero = _sigmoid(TAU * logit(-GAMMA / (ZETA - GAMMA)) - log_alpha)
    p_one = _sigmoid(log_alpha - TAU * logit((1 - GAMMA) / (ZETA - GAMMA)))
    assert (z == 0).double().mean().item() == pytest.approx(p_zero, abs=0.015)
    assert (z == 1).double().mean().item() == pytest.approx(p_one, abs=0.015)
    assert (z > 0).double().mean().item() == pytest.approx(s.prob_on().item(), abs=0.015)  # Eq. 12 is P(z ≠ 0)


def test_switch_traces_with_fx():
    """No Python control flow on tensor values: the switch traces in both modes (fixed state included)."""
    for mode in (True, False):
        s = _switch(0.3).train(mode)
        traced = torch.fx.symbolic_trace(s)
        torch.manual_seed(1)
        expected = s()
        torch.manual_seed(1)
        torch.testing.assert_close(traced(), expected)


# --- the switched mixture and block -------------------------------------------------------------------------------
DIM, HEADS, GRID = 16, 4, (5, 6)


def _mixture(gate="convex", log_alpha=0.0):
    torch.manual_seed(0)
    mix = build_affinity("mix(sa,dw5)", dim=DIM, heads=HEADS, grid=GRID, gate=gate, switch=True).double()
    with torch.no_grad():
        mix.switch.log_alpha.fill_(log_alpha)
        if gate != "free":
            mix.gate_logit.copy_(torch.linspace(0.4, -0.6, mix.gate_logit.numel()))  # per head: distinct values
    return mix.eval()


def _vqk():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, DIM, *GRID, generator=g, dtype=torch.float64) for _ in range(3)]


def test_switched_mixture_weights_are_z_alpha_and_stay_convex():
    v, q, k = _vqk()
    mix = _mixture(log_alpha=0.0)  # z = 0.5 in evaluation
    alpha = _sigmoid(0.4)
    dyn, static = mix.dynamic_affinity(v, q, k), mix.static_affinity(v)
    torch.testing.assert_close(mix(v, q, k), 0.5 * alpha * dyn + (1 - 0.5 * alpha) * static)
    torch.testing.assert_close(mix(v, q, k), mix.reference(v, q, k))  # matrix() and bias follow the switch
    free = _mixture("free", log_alpha=-3.0)  # z = 0: only β·A_static V is left
    torch.testing.assert_close(free(v, q, k), 0.5 * free.static_affinity(v))
    assert isinstance(build_affinity("mix(sa,dw5)", dim=DIM, heads=HEADS).switch, type(None))  # default: none


@pytest.mark.parametrize("gate", ["convex", "free", "per_head"])
def test_fold_switch_is_exact(gate):
    v, q, k = _vqk()
    mix = _mixture(gate, log_alpha=0.0)
    before = mix(v, q, k)
    mix.fold_switch()
    assert mix.switch is None
    torch.testing.assert_close(mix(v, q, k), before, rtol=1e-12, atol=1e-12)


def _block(log_alpha, gate="convex", proj="linear"):
    torch.manual_seed(0)
    aff = build_affinity("mix(sa,dw5)", dim=DIM, heads=HEADS, gate=gate, switch=True)
    block = AggregationBlock(DIM, aff, mlp_ratio=2, proj=proj).double()
    with torch.no_grad():
        aff.switch.log_alpha.fill_(log_alpha)
        for bn in [m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)]:  # non-trivial statistics,
            bn.running_mean.uniform_(-0.5, 0.5)  # so the folds are tested
            bn.running_var.uniform_(0.5, 2.0)
    return block.eval()


def _static_block(switched: AggregationBlock, beta: float, proj: str) -> AggregationBlock:
    """An independent plain dw5 block carrying the switched block's weights: the V output of proj_in (rows 2C..3C of
    the 1×1 conv, or CvT's third branch), the static part's kernels, β multiplied into proj_out."""
    block = AggregationBlock(DIM, DepthwiseConvAffinity(DIM, 5), mlp_ratio=2, proj=proj).double().eval()
    state = {}
    for key, value in switched.state_dict().items():
        if "dynamic_affinity" in key or ".switch." in key or key.endswith(("gate_logit", ".alpha", ".beta")):
            continue
        if key.startswith("proj_in.branches."):
            if not key.startswith("proj_in.branches.2."):
                continue
            key = key.replace("proj_in.branches.2.", "proj_in.branches.0.")
        elif key.startswith("proj_in."):
            value = value[2 * DIM:]
        state[key.replace("affinity.static_affinity.", "affinity.")] = value
    state["proj_out.weight"] = state["proj_out.weight"] * beta
    block.load_state_dict(state)
    return block


@pytest.mark.parametrize("gate, beta, proj", [("convex", 1.0, "linear"), ("free", 0.5, "linear"),
                                              ("per_head", 1.0, "linear"), ("convex", 1.0, "conv3")])
def test_a_switched_off_block_is_exactly_the_static_only_block_and_deploys_without_dynamic_weights(gate, beta, proj):
    x = torch.randn(2, DIM, 6, 5, dtype=torch.float64)
    block = _block(-3.0, gate, proj)
    reference = _static_block(block, beta, proj)
    expected = reference(x)
    torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)
    block.train()  # a fixed-off switch is off in training too
    block.switch.fix(False)
    torch.testing.assert_close(block.eval()(x), expected, rtol=1e-12, atol=1e-12)
    deployed = copy.deepcopy(block)
    deployed.reparameterize()
    torch.testing.assert_close(deployed(x), expected, rtol=1e-10, atol=1e-10)
    names = [n for n, _ in deployed.named_parameters()]
    assert not [n for n in names if "dynamic" in n or "switch" in n or "gate" in n]
    assert isinstance(deployed.affinity, DepthwiseConvAffinity)
    kept = sum(q.numel() for q in deployed.proj_in.parameters())
    assert kept <= sum(q.numel() for q in reference.proj_in.parameters())
    # the counter sees exactly the analytic dynamic cost disappear (both projection kinds)
    static_macs = count_gmacs(reference.float(), (DIM, 6, 5))
    assert count_gmacs(deployed.float(), (DIM, 6, 5)) == static_macs
    assert count_gmacs(block.float(), (DIM, 6, 5)) * 1e9 == pytest.approx(static_macs * 1e9 + block.dynamic_macs(30))


def test_an_on_block_deploys_as_the_mixture_without_the_switch():
    x = torch.randn(2, DIM, 6, 5, dtype=torch.float64)
    block = _block(0.0)
    before = block(x)
    deployed = copy.deepcopy(block)
    deployed.reparameterize()
    assert isinstance(deployed.affinity, AffinityMixture) and deployed.switch is None
    torch.testing.assert_close(deployed(x), before, rtol=1e-10, atol=1e-10)


def test_dynamic_path_cost_by_hand():
    """SA at N tokens, C channels: Q·Kᵀ and A·V cost 2·N²·C; the Q, K rows of proj_in 2·C²·N."""
    block = _block(0.0)
    n = 30
    assert block.dynamic_macs(n) == 2 * n * n * DIM + 2 * DIM * DIM * n == 28_800 + 15_360
    with pytest.raises(ValueError, match="not a mixture"):
        AggregationBlock(DIM, SelfAttentionAffinity(DIM, HEADS)).dynamic_macs(n)


# --- container_auto -------------------------------------------------------------------------------------------
def test_container_auto_starts_as_container():
    auto, full = timm.create_model("container_auto"), timm.create_model("container")
    assert count_params(auto) == count_params(full) + 18 == 22_434_252  # + one switch logit per mixture block
    torch.manual_seed(0)
    auto = timm.create_model("container_auto", **SMALL_32).eval()
    full = timm.create_model("container", **SMALL_32).eval()
    missing, unexpected = full.load_state_dict(auto.state_dict(), strict=False)
    assert not missing and all(".switch." in k for k in unexpected)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(auto(x), full(x), rtol=0, atol=0)
    assert auto.dynamic_pattern() == [[True]] * 4
    assert timm.create_model("container_light", **SMALL_32).dynamic_pattern() == [[False]] * 3 + [[True]]
    assert auto.no_weight_decay() >= {f"stages.{i}.blocks.0.affinity.switch.log_alpha" for i in range(4)}


def test_learned_pattern_rebuilds_as_a_fixed_container():
    torch.manual_seed(0)
    kw = dict(SMALL_32, depths=(1, 2, 1, 1))
    auto = timm.create_model("container_auto", **kw).eval()
    auto.stages[0].blocks[0].switch.fix(False)
    auto.stages[1].blocks[1].switch.fix(False)
    mixers = auto.learned_mixers()
    assert mixers == ("dw5", ("mix(sa,dw5)", "dw5"), "mix(sa,dw5)", "mix(sa,dw5)")
    settled = copy.deepcopy(auto)
    for block in settled.modules():
        if isinstance(block, AggregationBlock):
            block.settle_switch()
    fixed = timm.create_model("container", mixers=mixers, **kw).eval()
    fixed.load_state_dict(settled.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fixed(x), auto(x), rtol=1e-6, atol=1e-6)
    deployed = reparameterize_model(auto, inplace=False)
    assert not [n for n, _ in deployed.named_parameters() if "switch" in n or "stages.0.blocks.0.affinity.dyn" in n]
    torch.testing.assert_close(deployed(x), auto(x), rtol=1e-5, atol=1e-5)


# --- the budget ---------------------------------------------------------------------------------------------------
def _budget(budget=None, lam=None):
    torch.manual_seed(0)
    model = timm.create_model("container_auto", **SMALL_32)
    return model, DynamicBudget(model, 32, budget, lam)


def test_costs_match_the_mac_counter_for_every_pattern_kind():
    model, b = _budget()
    tokens = [p.tokens for p in b.paths]
    assert tokens == [256, 64, 16, 4]  # 16², 8², 4², 2² at 32² with patches 2, 2, 2, 2
    assert [p.macs for p in b.paths] == [2 * n * n * c + 2 * c * c * n for n, c in zip(tokens, (8, 8, 16, 16))]
    for pattern in ([True] * 4, [False] * 4, [False, True, False, True]):
        for path, on in zip(b.paths, pattern):
            path.block.switch.fix(on)
        deployed = reparameterize_model(copy.deepcopy(model).eval(), inplace=True)
        assert round(count_gmacs(deployed, (3, 32, 32)) * 1e9) == b.pattern_macs(pattern)


def test_the_penalty_gradient_reaches_every_gate_in_proportion_to_its_cost():
    """d/d log α_b of λ·(E[MACs] − target)/C_dyn = λ·cost_b·P_b(1 − P_b)/C_dyn (above the target)."""
    model, b = _budget(lam=2.0)  # no budget: λ prices the expected dynamic MACs
    logits = [0.3, -0.7, 1.2, 2.5]
    with torch.no_grad():
        for path, value in zip(b.paths, logits):
            path.block.switch.log_alpha.fill_(value)
    b.loss(0.1).backward()
    total = sum(p.macs for p in b.paths)
    for path, value in zip(b.paths, logits):
        p = _sigmoid(value + TAU * math.log(ZETA / -GAMMA))
        expected = 2.0 * path.macs * p * (1 - p) / total
        assert path.block.switch.log_alpha.grad.item() == pytest.approx(expected, rel=1e-5)


def test_the_budget_target_ramps_and_the_hinge_is_zero_below_it():
    _, probe = _budget()
    full, static = probe.full_macs, probe.static_macs
    model, b = _budget(budget=(static + 0.5 * (full - static)) / 1e9)
    assert b.lam == 1.0 and b.target(0.0) == full
    assert b.target(0.125) == pytest.approx(full - 0.5 * (full - b.budget))  # half-way down the ramp (search 0.5)
    assert b.target(0.25) == pytest.approx(b.budget) and b.target(0.9) == pytest.approx(b.budget)
    assert b.loss(0.0).item() == 0.0  # at the start the target is the full model
    assert b.loss(0.3).item() == pytest.approx((b.expected_macs().item() - b.budget) / (full - static), rel=1e-6)
    with pytest.raises(ConfigError, match="below what the model costs with every dynamic path off"):
        _budget(budget=0.5 * static / 1e9)
    with pytest.raises(ConfigError, match="has no switchable dynamic paths"):
        DynamicBudget(timm.create_model("container_light", **SMALL_32), 32, 1.0)


def test_fixing_keeps_the_most_likely_paths_within_the_budget():
    model, b = _budget(budget=1.0)
    costs = [p.macs for p in b.paths]
    b.budget = b.static_macs + costs[0] + costs[2]  # room for paths 0 and 2 only (0 is by far the dearest)
    with torch.no_grad():
        for path, value in zip(b.paths, [6.0, 2.5, 5.0, 3.0]):  # all on; P(on) ranks 0 > 2 > 3 > 1
            path.block.switch.log_alpha.fill_(value)
    assert b.fix() == [True, False, True, False]
    assert b.fixed and b.pattern_macs(b.current_pattern()) <= b.budget
    # room for paths 1, 2 and 3 exactly: dropping by P(on) removes 1, 3, 2 and then 0 (the budget cannot hold it);
    # switching back on, most likely first, restores 2, 3 and 1, which fit together
    model, b = _budget(budget=1.0)
    b.budget = b.static_macs + costs[1] + costs[2] + costs[3]
    with torch.no_grad():
        for path, value in zip(b.paths, [6.0, 2.5, 5.0, 3.0]):
            path.block.switch.log_alpha.fill_(value)
    assert b.fix() == [False, True, True, True] and b.pattern_macs([False, True, True, True]) == b.budget
    model, b = _budget()  # no budget: the evaluation value decides alone
    with torch.no_grad():
        b.paths[1].block.switch.log_alpha.fill_(-3.0)
    assert b.fix() == [True, False, True, True]


# --- training -----------------------------------------------------------------------------------------------------
def _cfg(tmp_path, name, **kw):
    base = dict(model="container_auto", data="digits", output=str(tmp_path / name), img_size=16, batch_size=32,
                epochs=3, fraction=0.25, model_kwargs=dict(TINY), recipe="light", seed=3, ema_decay=0.9,
                dynamic_lr=0.5, warmup_epochs=0)
    base.update(kw)
    return TrainConfig(**base)


def test_a_small_run_learns_a_pattern_within_the_budget(tmp_path, capsys):
    probe = timm.create_model("container_auto", **AT_16)
    paths, full = switched_paths(probe, 16)
    static = full - sum(p.macs for p in paths)
    budget = (static + 0.3 * (full - static)) / 1e9
    result = train(_cfg(tmp_path, "run", dynamic_budget=budget, epochs=2), progress=False)
    report = json.loads((tmp_path / "run" / "dynamic_pattern.json").read_text())
    assert report["fixed"] and report["deployed_gmacs"] <= budget
    assert report["budget_gmacs"] == pytest.approx(budget, abs=1e-9)
    assert report["deployed_gmacs"] == pytest.approx(report["pattern_gmacs"], abs=1e-9)
    assert 0 < sum(b["on"] for b in report["blocks"]) < 4
    assert result.history[-1]["gmacs"] == pytest.approx(report["pattern_gmacs"])
    printed = capsys.readouterr().out
    assert "fixed architecture: ContainerNet(mixers=(" in printed and "within" in printed
    # the fixed architecture drops the 4 switch logits and, per switched-off block, the Q, K rows of proj_in
    # (2·d² weights + 2·d biases) and the mixture's gate logit (the attention has no weights of its own)
    fixed = timm.create_model("container", mixers=report["mixers"], **AT_16)
    removed = sum(2 * d * d + 2 * d + 1 for d, b in zip(TINY["dims"], report["blocks"]) if not b["on"])
    assert count_params(fixed) == count_params(probe) - 4 - removed
    assert report["deployed_params"] < count_params(fixed)  # deployment also folds the BatchNorms
    _the_pattern_is_shown_by_inspect_models_and_the_map(tmp_path, report, result)


def _the_pattern_is_shown_by_inspect_models_and_the_map(tmp_path, report, result):
    """`ctxagg inspect`, `ctxagg models --checkpoint` and the run map all show the learned pattern; model_best is an
    epoch of the fixed architecture (epoch 1 fixed the switches, so epoch 0 may not be "best")."""
    from ctxagg.analysis.inspect import inspect_model, load_model
    from ctxagg.analysis.switch_map import switch_report
    from ctxagg.bench.zoo import format_table, model_rows

    learned = " ".join(report["pattern"])
    assert [h["dynamic_fixed"] for h in result.history] == [False, True]
    model, info = load_model(checkpoint=str(tmp_path / "run"))
    numbers = inspect_model(model, torch.zeros(1, 3, 16, 16))["numbers"]
    assert numbers["dynamic_paths"].replace("|", " ") == learned
    switches = [w for w in numbers["mixture_weights"].values() if "dynamic_on" in w]
    assert [w["dynamic_on"] for w in switches] == [b["on"] for b in report["blocks"]]
    rows = model_rows([], img_size=16, activations=False, checkpoints=[str(tmp_path / "run")])
    assert rows[0]["dynamic_paths"].replace("|", " ") == learned and rows[0]["gmacs"] == pytest.approx(
        report["deployed_gmacs"], abs=1e-9)
    assert learned in format_table(rows, 16)
    out = switch_report([str(tmp_path / "run")], str(tmp_path / "map"))
    assert out["rows"][0]["pattern"].replace("|", " ") == learned
    assert out["rows"][0]["best_top1"] == pytest.approx(result.history[1]["val_top1"])
    assert (tmp_path / "map" / "switch_map.png").stat().st_size > 0 and learned in out["table"]


def test_resume_with_switches_reproduces_the_uninterrupted_run(tmp_path):
    """The switches are fixed in the middle of epoch 2; a run stopped after epoch 1 and resumed must match."""
    probe = timm.create_model("container_auto", **AT_16)
    paths, full = switched_paths(probe, 16)
    budget = (full - 0.5 * sum(p.macs for p in paths)) / 1e9
    full_run = train(_cfg(tmp_path, "full", dynamic_budget=budget), progress=False)
    steps = full_run.history[0]["steps"]
    train(_cfg(tmp_path, "part", dynamic_budget=budget, max_steps=steps), progress=False)
    resumed = train(_cfg(tmp_path, "part", dynamic_budget=budget), resume=str(tmp_path / "part"), progress=False)
    for key in ("train_loss", "val_loss", "ema_val_top1", "gmacs", "expected_gmacs", "dynamic_on"):
        assert [h[key] for h in resumed.history] == pytest.approx([h[key] for h in full_run.history], rel=1e-6), key
    a, _ = load_checkpoint(tmp_path / "full" / "last.safetensors")
    b, _ = load_checkpoint(tmp_path / "part" / "last.safetensors")
    switch_keys = [k for k in a if ".switch." in k]
    assert switch_keys and all(torch.equal(a[k], b[k]) for k in switch_keys if k.endswith("state"))
    for key in a:
        if not key.startswith("rng."):
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_budget_flags_are_checked():
    with pytest.raises(ConfigError, match="--dynamic-search must be in"):
        TrainConfig(dynamic_search=1.0).validate()
    with pytest.raises(ConfigError, match="--dynamic-budget must be a positive number"):
        TrainConfig(dynamic_budget=-1.0).validate()
