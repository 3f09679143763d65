"""Optimizer memory modes: step-in-backward equals AdamW, low-precision AdamW tracks fp32 AdamW."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from rpo_fast import fused_linear_rpo_loss
from rpo_fast import modeling, optim
from rpo_fast.live_memory import LiveTensorTracker
from rpo_fast.optim import (InBackwardOptimizer, LowPrecisionAdamW, build_optimizer, nearest_bf16_as_fp32,
                            stochastic_round_to_bf16)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_llama(tied: bool = False, checkpointing: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=301, hidden_size=48, intermediate_size=100,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=12, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if checkpointing:
        modeling.enable_gradient_checkpointing(model)
    return model.train()


def rpo_step_loss(model, gen):
    """One packed RPO micro-batch of 2 pairs x 19 tokens through the backbone and the fused loss."""
    n_seq, length = 4, 19
    ids = torch.randint(0, model.config.vocab_size, (1, n_seq * length), generator=gen)
    pos = torch.arange(length).repeat(n_seq)[None]
    hidden = model.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state[0]
    rows = (torch.arange(n_seq)[:, None] * length + torch.arange(4, length - 1)[None]).reshape(-1)
    targets = ids[0, rows + 1]
    cu = torch.arange(0, rows.numel() + 1, rows.numel() // n_seq, dtype=torch.int32)
    ref = torch.randn(n_seq, generator=gen)
    return fused_linear_rpo_loss(hidden[rows], model.lm_head.weight, targets, cu, ref_logps=ref, beta=0.5,
                                 impl="torch").loss


def train(model, optimizer, steps, scheduler=None, clip_norms=None):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        rpo_step_loss(model, gen).backward()
        if clip_norms is not None:  # records the pre-step global norm without clipping
            clip_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("tied,checkpointing", [(False, False), (True, False), (False, True)])
def test_in_backward_equals_adamw(tied, checkpointing):
    reference = tiny_llama(tied, checkpointing)
    model = copy.deepcopy(reference)
    opt_ref = build_optimizer(reference, "adamw", lr=3e-3, weight_decay=0.1)
    opt = build_optimizer(model, "adamw_fused_in_backward", lr=3e-3, weight_decay=0.1)
    assert isinstance(opt, InBackwardOptimizer) and opt.steps_in_backward
    norms = []
    train(reference, opt_ref, 3, clip_norms=norms)
    train(model, opt, 3)
    for (name, p_ref), p in zip(reference.named_parameters(), model.parameters()):
        assert torch.equal(p_ref, p), name
        assert p.grad is None, name  # freed in backward
    assert opt.last_grad_norm == pytest.approx(norms[-1], rel=1e-4)
    moved = sum((p - q).abs().sum() for p, q in zip(model.parameters(), tiny_llama(tied).parameters()))
    assert moved > 0


def test_in_backward_lr_scheduler_and_state_dict():
    reference = tiny_llama()
    model = copy.deepcopy(reference)
    opt_ref = build_optimizer(reference, "adamw", lr=1e-2)
    opt = build_optimizer(model, "adamw_in_backward", lr=1e-2)
    decay = lambda step: 1.0 / (1 + step)  # noqa: E731
    train(reference, opt_ref, 3, torch.optim.lr_scheduler.LambdaLR(opt_ref, decay))
    train(model, opt, 3, torch.optim.lr_scheduler.LambdaLR(opt, decay))
    assert all(g["lr"] == pytest.approx(1e-2 / 4) for g in opt.param_groups)
    for p_ref, p in zip(reference.parameters(), model.parameters()):
        assert torch.equal(p_ref, p)
    # Resuming from a state dict continues identically.
    clone = copy.deepcopy(model)
    opt_clone = build_optimizer(clone, "adamw_in_backward", lr=1e-2)
    opt_clone.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if through torch.save
    assert opt_clone.param_groups[0] is next(iter(opt_clone._inner.values())).param_groups[0]
    train(model, opt, 1)
    train(clone, opt_clone, 1)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="per-parameter optimizer states"):
        opt_clone.load_state_dict({"inner": []})


@pytest.mark.parametrize("mode", ["adamw_bf16", "adamw_bf16_sr"])
def test_low_precision_state_dict_resumes_the_rounding_noise(mode):
    """Stochastic rounding draws from the optimizer's own generator: its state travels in state_dict, so a
    reloaded optimizer continues exactly as the original (without it, the next step's noise restarts)."""
    model = tiny_llama().to(torch.bfloat16)
    opt = build_optimizer(model, mode, lr=1e-3, seed=3)
    train(model, opt, 2)
    clone = copy.deepcopy(model)
    opt_clone = build_optimizer(clone, mode, lr=1e-3, seed=3)
    opt_clone.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(model, opt, 2)
    train(clone, opt_clone, 2)
    for (name, p), q in zip(model.named_parameters(), clone.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("mode", ["adamw_bf16", "adamw_bf16_sr_in_backward"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_low_precision_states_stay_bf16_through_load_state_dict(mode, dtype):
    """torch's load_state_dict casts floating states to the parameter's dtype: fp16 would flush small second
    moments (a resumed fp16 run's updates blow up) and fp32 would double the states' memory. A reloaded
    optimizer keeps its bf16 states and continues bit for bit."""
    model = tiny_llama().to(dtype)
    opt = build_optimizer(model, mode, lr=1e-3, seed=3)
    train(model, opt, 2)
    clone = copy.deepcopy(model)
    opt_clone = build_optimizer(clone, mode, lr=1e-3, seed=3)
    opt_clone.load_state_dict(copy.deepcopy(opt.state_dict()))
    inners = list(opt_clone._inner.values()) if isinstance(opt_clone, InBackwardOptimizer) else [opt_clone]
    states = [state for inner in inners for state in inner.state.values()]
    assert states and all(value.dtype == torch.bfloat16 for state in states
                          for name, value in state.items() if name != "step"), mode
    train(model, opt, 2)
    train(clone, opt_clone, 2)
    for (name, p), q in zip(model.named_parameters(), clone.parameters()):
        assert torch.equal(p, q), name


def test_in_backward_halts_at_the_first_nonfinite_gradient():
    """A NaN entering the backward between two layers: the layer after it (whose gradient arrives first)
    is stepped, the layer before it is not; step() reports the partial update and re-arms the guard."""
    torch.manual_seed(0)
    first, second = torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)
    opt = build_optimizer([*first.parameters(), *second.parameters()], "adamw_in_backward", lr=1e-2)
    before = [p.detach().clone() for p in (*first.parameters(), *second.parameters())]
    x = torch.randn(4, 6)
    hidden = first(x)
    hidden.register_hook(lambda g: torch.full_like(g, float("nan")))  # poison what flows into `first`
    second(hidden).square().sum().backward()
    opt.step()
    assert opt.last_params_updated == 2 and not opt.last_step_complete
    assert not math.isfinite(opt.last_grad_norm)
    after = [p.detach() for p in (*first.parameters(), *second.parameters())]
    assert all(torch.equal(b, a) for b, a in zip(before[:2], after[:2]))  # first: untouched
    assert all(not torch.equal(b, a) for b, a in zip(before[2:], after[2:]))  # second: stepped
    assert all(p.grad is None for p in (*first.parameters(), *second.parameters()))
    # The next backward is clean again: every parameter steps.
    second(first(x)).square().sum().backward()
    opt.step()
    assert opt.last_params_updated == 4 and opt.last_step_complete and math.isfinite(opt.last_grad_norm)
    # Without the guard every finite gradient steps and the NaN one poisons its parameter.
    layer = torch.nn.Linear(6, 5)
    unguarded = InBackwardOptimizer([{"params": list(layer.parameters())}],
                                    lambda g: torch.optim.AdamW(g, lr=1e-2), skip_nonfinite=False)
    layer(x).sum().mul(float("nan")).backward()
    unguarded.step()
    assert unguarded.last_params_updated == 2 and unguarded.last_step_complete
    assert torch.isnan(layer.weight).all()


def test_in_backward_refuses_accumulation_and_clipping():
    model = tiny_llama()
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1, got 4"):
        build_optimizer(model, "adamw_in_backward", gradient_accumulation_steps=4)
    with pytest.raises(ValueError, match="max_grad_norm=None, got 1.0"):
        build_optimizer(model, "adamw_bf16_in_backward", max_grad_norm=1.0)
    build_optimizer(model, "adamw", gradient_accumulation_steps=4, max_grad_norm=1.0)  # fine without


def test_build_optimizer_modes_and_groups():
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    opt = build_optimizer(model, "adamw", weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.ndim == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.ndim == 1 for p in plain["params"])
    assert not any(p is model.model.embed_tokens.weight for g in opt.param_groups for p in g["params"])
    assert isinstance(build_optimizer(model, "adamw_bf16"), LowPrecisionAdamW)
    sr = build_optimizer(model, "adamw_bf16_sr_in_backward")
    assert isinstance(sr, InBackwardOptimizer) and sr.param_groups[0]["lr"] == 5e-7
    sr.remove_hooks()
    with pytest.raises(ValueError, match="optimizer: expected one of"):
        build_optimizer(model, "sgd")
    with pytest.raises(ValueError, match="at least one parameter"):
        build_optimizer(model.requires_grad_(False), "adamw")


def test_adamw8bit_needs_cuda_and_bitsandbytes():
    model = tiny_llama()
    with pytest.raises(ValueError, match="needs CUDA parameters"):
        build_optimizer(model, "adamw8bit")
    if not torch.cuda.is_available():
        pytest.skip("8-bit AdamW runs on CUDA only")
    pytest.importorskip("bitsandbytes")
    model = model.cuda()
    opt = build_optimizer(model, "adamw8bit", lr=1e-3)
    train(model, opt, 2)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t) and t.device.type == "cuda")
    expected = sum(optim.state_bytes("adamw8bit", p.numel(), 4) for p in model.parameters())
    assert abs(state - expected) <= 0.05 * expected


@pytest.mark.parametrize("mode", ["adamw", "adamw_bf16", "adamw_bf16_sr", "adamw_bf16_in_backward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_bytes_match_what_is_allocated(mode, dtype):
    """The planner's optimizer-state bytes are what build_optimizer allocates."""
    model = tiny_llama().to(dtype)
    opt = build_optimizer(model, mode, lr=1e-3)
    train(model, opt, 1)
    inners = opt._inner.values() if isinstance(opt, InBackwardOptimizer) else [opt]
    allocated = sum(t.numel() * t.element_size() for o in inners for s in o.state.values() for k, t in s.items()
                    if torch.is_tensor(t) and k != "step")
    expected = sum(optim.state_bytes(mode, p.numel(), dtype.itemsize) for p in model.parameters())
    assert allocated == expected


def test_nearest_and_stochastic_rounding():
    x = torch.randn(10000) * torch.logspace(-20, 20, 10000)
    special = torch.tensor([float("inf"), -float("inf"), 0.0, 1.0, -2.5, 1 + 2**-8, 1 + 3 * 2**-8])
    x = torch.cat([x, special])
    assert torch.equal(nearest_bf16_as_fp32(x), x.to(torch.bfloat16).float())
    # Exact bf16 values and infinities are kept; others go to a neighbour, unbiased.
    exact = x.to(torch.bfloat16).float()
    assert torch.equal(stochastic_round_to_bf16(exact).float(), exact)
    gen = torch.Generator().manual_seed(0)
    value = 1 + 2**-10  # a quarter of the way from 1 to the next bf16, 1 + 2**-7... (ulp 2**-7)
    samples = stochastic_round_to_bf16(torch.full((200000,), value), gen).float()
    assert set(samples.unique().tolist()) == {1.0, 1 + 2**-7}
    assert samples.mean().item() == pytest.approx(value, abs=3e-5)  # 6 sigma of the Bernoulli mean
    negative = stochastic_round_to_bf16(torch.full((200000,), -value), gen).float()
    assert negative.mean().item() == pytest.approx(-value, abs=3e-5)
    with pytest.raises(ValueError, match="float32"):
        stochastic_round_to_bf16(torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_low_precision_first_step_is_adamw(layout):
    """fp32 weights: the first step's update is torch AdamW's (only the stored states are bf16), for a
    non-contiguous parameter too (a transposed view: updated in a contiguous copy, written back)."""
    w0 = torch.randn(40, 25)
    grad = torch.randn(40, 25)
    results = []
    for make in (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
                 lambda p: LowPrecisionAdamW(p, lr=1e-2, weight_decay=0.1)):
        p = torch.nn.Parameter(w0.clone() if layout == "contiguous" else w0.t().contiguous().t())
        assert p.is_contiguous() == (layout == "contiguous")
        p.grad = grad.clone()
        make([p]).step()
        results.append(p.detach())
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-7)
    assert not torch.equal(results[1], w0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["adamw_bf16", "adamw_bf16_sr"])
def test_low_precision_step_leaves_the_gradient_alone(mode, dtype):
    """The update squares the gradient in an fp32 copy: an fp32 gradient is that dtype already, and must not be
    squared in place (a caller may read it after the step, e.g. to log or to accumulate)."""
    p = torch.nn.Parameter(torch.randn(1000).to(dtype))
    p.grad = torch.randn(1000).to(dtype)
    grad = p.grad.clone()
    build_optimizer([p], mode, lr=1e-3).step()
    assert torch.equal(p.grad, grad)


def _quadratic_run(dtype, make, steps=300, n=4096):
    """AdamW on 0.5 * sum(s * (w - t)^2) with gradient noise; weights ~0.02 (a 7B model's scale) and
    lr 1e-4, so one update is ~1/4 of a bf16 half-ulp: plain bf16 rounding drops most of them."""
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(n, generator=gen) * 0.02
    scale = torch.rand(n, generator=gen) + 0.5
    w0 = torch.randn(n, generator=gen) * 0.02
    p = torch.nn.Parameter(w0.clone().to(dtype))
    opt = make([p])
    for _ in range(steps):
        p.grad = (scale * (p.detach().float() - target) + 0.01 * torch.randn(n, generator=gen)).to(dtype)
        opt.step()
    return w0, p.detach().float()


def _relative_error(make, dtype=torch.bfloat16):
    w0, ref = _quadratic_run(torch.float32, lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.01))
    _, got = _quadratic_run(dtype, make)
    return ((got - ref).norm() / (ref - w0).norm()).item()


def test_low_precision_adamw_tracks_fp32_adamw():
    """Error after 300 steps relative to the distance travelled by fp32 AdamW (fp32 weights and states)."""
    kahan = _relative_error(lambda p: LowPrecisionAdamW(p, lr=1e-4, weight_decay=0.01))
    stochastic = _relative_error(lambda p: LowPrecisionAdamW(p, lr=1e-4, weight_decay=0.01,
                                                             weight_update="stochastic"))
    plain_bf16 = _relative_error(lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.01))
    assert kahan < 0.01  # measured 0.0044 (bf16 states alone: 0.0039)
    assert stochastic < 0.05  # measured 0.027
    assert plain_bf16 > 0.3  # measured 0.47: the failure the two modes exist to prevent


def test_dpo_learning_rate_updates_survive():
    """At DPO's lr (5e-7, zephyr-7b-beta) one AdamW step is 1/60-1/120 of a bf16 half-ulp of a ~0.02 weight:
    torch AdamW on bf16 weights barely moves them, the compensated weights move as fp32 AdamW does."""
    n, steps = 200_000, 50
    w0 = torch.randn(n) * 0.02
    moved = {}
    for name, make, dtype in [("fp32", lambda p: torch.optim.AdamW(p, lr=5e-7), torch.float32),
                              ("bf16", lambda p: torch.optim.AdamW(p, lr=5e-7), torch.bfloat16),
                              ("kahan", lambda p: LowPrecisionAdamW(p, lr=5e-7), torch.bfloat16)]:
        gen = torch.Generator().manual_seed(1)
        direction = torch.randn(n, generator=gen)
        p = torch.nn.Parameter(w0.clone().to(dtype))
        opt = make([p])
        for _ in range(steps):
            p.grad = (direction + 0.5 * torch.randn(n, generator=gen)).to(dtype)
            opt.step()
        weight = p.detach().float() + opt.state[p].get("compensation", torch.zeros(())).float()
        moved[name] = (weight - w0.to(dtype).float()).abs().mean().item()
    assert moved["bf16"] < 0.05 * moved["fp32"]  # measured 0.7%
    assert moved["kahan"] == pytest.approx(moved["fp32"], rel=0.02)


def test_low_precision_compiled_matches_eager():  # a cold CPU inductor compile: ~25 s
    compiled = _relative_error(lambda p: LowPrecisionAdamW(p, lr=1e-4, weight_decay=0.01, compile=True))
    assert compiled < 0.01  # inductor elides float round trips: the Kahan residual uses integer rounding


def test_low_precision_step_workspace():
    """The step's transient bytes stay within the bound the planner uses."""
    n = 2**20 + 123
    p = torch.nn.Parameter(torch.randn(n, dtype=torch.bfloat16))
    opt = LowPrecisionAdamW([p], lr=1e-3)
    p.grad = torch.randn(n, dtype=torch.bfloat16)
    opt.step()  # allocates states
    tracker = LiveTensorTracker().track(p, p.grad, opt)
    base = tracker.live
    with tracker:
        opt.step()
    transient = tracker.peak - base
    bound = optim.step_workspace_bytes("adamw_bf16", n)
    assert 0.75 * bound <= transient <= bound


def test_in_backward_parameters_draw_independent_rounding_noise():
    """In-backward modes make one optimizer per parameter; each must round with its own random stream. Two
    equal bf16 parameters with equal gradients: stochastic rounding must not land them on the same values
    everywhere (before, every inner optimizer was seeded alike, so every layer drew the same noise)."""
    torch.manual_seed(0)
    value = torch.randn(64, 64).to(torch.bfloat16)
    a, b = (torch.nn.Parameter(value.clone()) for _ in range(2))
    opt = build_optimizer([a, b], "adamw_bf16_sr_in_backward", lr=1e-3, seed=3)
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    ((x @ a).square().sum() + (x @ b).square().sum()).backward()
    opt.remove_hooks()
    assert not torch.equal(a, value) and not torch.equal(b, value)  # both stepped
    assert not torch.equal(a, b)
