"""The trainer on a tiny random-init Llama (CPU): the packed step against a plain unpacked computation,
the reference modes against each other, non-finite steps, the outputs of a run, and refused models."""
import json
import math
import re

import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, GraniteConfig, GraniteForCausalLM,
                          LlamaConfig)

from conftest import assert_close
from rpo_fast import modeling
from rpo_fast.config import load_config
from rpo_fast.data import load_preference_rows, tokenize_pairs
from rpo_fast.metrics import PAIR_METRICS
from rpo_fast.packing import pack_pairs
from rpo_fast.trainer import NonFiniteLossError, TrainHooks, epoch_steps, train
from tiny_lm import build_tiny_model_dir, tiny_overrides, write_rows


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory):
    """Large logits: token log-probs that differ from token to token (and so NLLs between micro-batches)."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("sharp"), logit_scale=30.0)


@pytest.fixture(scope="module")
def examples(tiny_model_dir, tmp_path_factory):
    tokenizer = modeling.load_tokenizer(str(tiny_model_dir))
    rows = load_preference_rows(write_rows(tmp_path_factory.mktemp("rows") / "t.jsonl", 6))
    return tokenize_pairs(rows, tokenizer, max_length=96, max_prompt_length=64)[0]


def unpacked_sequence_logps(model, ex, response):
    """Summed log-probs of `response` after ex.prompt_ids: one unpadded sequence, full logits, float64 softmax."""
    ids = torch.tensor([(ex.prompt_ids + response).tolist()])
    logits = model(input_ids=ids, use_cache=False).logits[0].double()
    logp = torch.log_softmax(logits[:-1], -1)
    start = len(ex.prompt_ids) - 1
    return logp[start:].gather(1, ids[0, start + 1:, None]).sum()


@pytest.mark.parametrize("head_bias,share_prompt", [(False, False), (True, False), (False, True)])
def test_packed_step_equals_unpacked_dense(tiny_model_dir, examples, head_bias, share_prompt):
    """PackedRPOModel (packing, either layout, varlen attention, response rows only, fused head) vs per-sequence
    forwards with full logits, and the RPO formula written out: same loss, log-probs and gradients."""
    model = modeling.load_causal_lm(str(tiny_model_dir))
    if head_bias:  # an untied head with a bias
        weight = model.lm_head.weight.detach().clone()
        model.lm_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=True)
        model.lm_head.weight.data.copy_(weight)
        torch.nn.init.normal_(model.lm_head.bias, std=0.5)
        model.config.tie_word_embeddings = False
    ref_logps = torch.randn(2 * 4) * 3
    beta, alpha = 0.7, 0.3
    packed = modeling.PackedRPOModel(model, beta=beta, alpha=alpha, sft_norm="sum")
    batch = pack_pairs(examples[:4], share_prompt=share_prompt)
    out = packed(batch, ref_logps=ref_logps)
    out.loss.backward()
    got_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    model.config._attn_implementation = "sdpa"
    chosen = torch.stack([unpacked_sequence_logps(model, ex, ex.chosen_ids) for ex in examples[:4]])
    rejected = torch.stack([unpacked_sequence_logps(model, ex, ex.rejected_ids) for ex in examples[:4]])
    ref = ref_logps.double()
    z = beta * ((chosen - ref[:4]) - (rejected - ref[4:]))
    loss = (-torch.nn.functional.logsigmoid(z)).mean() + alpha * (-chosen).mean()
    loss.backward()

    assert_close(out.chosen_logps, chosen, atol=1e-3, rtol=1e-5, name="chosen logps")
    assert_close(out.rejected_logps, rejected, atol=1e-3, rtol=1e-5, name="rejected logps")
    assert_close(out.loss, loss, atol=1e-4, rtol=1e-5, name="loss")
    for name, param in model.named_parameters():
        assert_close(got_grads[name], param.grad, atol=1e-5, rtol=1e-3, name=f"grad {name}")


def unpacked_pair_logps(model, pairs) -> torch.Tensor:
    """[len(pairs), 2] float64: each pair's (chosen, rejected) summed log-probs, each sequence run alone through
    `model` with sdpa (the reference the packed paths are judged against)."""
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        return torch.stack([torch.stack([unpacked_sequence_logps(model, ex, ex.chosen_ids),
                                         unpacked_sequence_logps(model, ex, ex.rejected_ids)]) for ex in pairs])


def test_reference_log_probs_go_through_a_biased_head(tiny_model_dir, examples):
    """A reference with an untied head and a bias (the cache and the frozen copy both take its head from
    reference_head_inputs): its log-probs are those of each unpacked sequence's full logits (bias included), in
    float64, not those of the head without its bias."""
    from rpo_fast.ref_cache import compute_reference_logps

    model = modeling.load_causal_lm(str(tiny_model_dir))
    weight = model.lm_head.weight.detach().clone()
    model.lm_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=True)
    model.lm_head.weight.data.copy_(weight)
    torch.nn.init.normal_(model.lm_head.bias, std=0.5)
    model.config.tie_word_embeddings = False
    got = compute_reference_logps(model, examples[:4], token_budget=4000, impl="torch")
    assert_close(got.double(), unpacked_pair_logps(model, examples[:4]), atol=1e-3, rtol=1e-5,
                 name="reference logps")


def test_reference_log_probs_of_a_model_in_train_mode_have_no_dropout(tiny_model_dir, examples):
    """compute_reference_logps on a model in train mode with attention dropout (the policy, for `reference:
    cache`): the eval-mode log-probs of each unpacked sequence (float64), and the model left in train mode."""
    from rpo_fast.ref_cache import compute_reference_logps

    model = modeling.load_causal_lm(str(tiny_model_dir))
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.3
    model.train()
    torch.manual_seed(0)
    got = compute_reference_logps(model, examples[:4], token_budget=4000, impl="torch")
    assert model.training
    model.eval()
    assert_close(got.double(), unpacked_pair_logps(model, examples[:4]), atol=1e-3, rtol=1e-5,
                 name="reference logps")


def test_epoch_steps_partition(tiny_model_dir, examples):
    config = load_config(None, {"token_budget": "300", "max_pairs_per_micro_batch": "1",
                                "gradient_accumulation_steps": "2", "max_length": "96", "max_prompt_length": "64"})
    steps = epoch_steps(examples, config, epoch=0, world_size=2)
    assert len(steps) == 1 and all(len(step) == 4 for step in steps)  # 6 micro-batches -> 1 step, 2 dropped
    flat = [i for step in steps for group in step for i in group]
    assert len(set(flat)) == len(flat) == 4
    assert epoch_steps(examples, config, 1, 2) != steps  # reshuffled per epoch
    with pytest.raises(ValueError, match="token_budget"):
        epoch_steps(examples, config, 0, world_size=4)


def records_of(result):
    return [r for r in result.records if "loss" in r]


def test_reference_modes_agree(tiny_model_dir, tmp_path):
    """A frozen copy, the cached log-probs of the same model, and (for LoRA) the policy with its adapter
    off are the same reference: the runs log the same metrics step by step."""
    runs = {}
    for name, extra in {"model": dict(reference="model"), "cache": dict(reference="cache"),
                        "lora-model": dict(finetune="lora", reference="model", lora_r=4),
                        "lora-adapter": dict(finetune="lora", reference="adapter", lora_r=4)}.items():
        (tmp_path / name).mkdir()
        runs[name] = records_of(train(load_config(None, tiny_overrides(tiny_model_dir, tmp_path / name, max_steps=4,
                                                                        **extra))))
    for a, b in (("model", "cache"), ("lora-model", "lora-adapter")):
        for ra, rb in zip(runs[a], runs[b]):
            for key in PAIR_METRICS:
                assert math.isclose(ra[key], rb[key], rel_tol=1e-4, abs_tol=1e-4), (a, b, ra["step"], key)
    assert any(abs(r["rewards/margins"]) > 1e-3 for r in runs["model"][1:])  # the reference mattered
    assert len(list((tmp_path / "cache" / "ref_cache").glob("ref-logps-*.pt"))) == 2  # train and eval


def test_shared_prompt_run_equals_unshared(tiny_model_dir, tmp_path):
    """The trainer's default layout (shared prompt) and the unshared one log the same metrics step by step, with
    the same token counts (both count the unshared tokens), LoRA with the adapter-off reference, eval included."""
    runs = {}
    for share in (True, False):
        (tmp_path / str(share)).mkdir()
        overrides = tiny_overrides(tiny_model_dir, tmp_path / str(share), max_steps=3, finetune="lora", lora_r=4,
                                   reference="adapter", share_prompt=share, gradient_checkpointing=True)
        runs[share] = train(load_config(None, overrides))
    for ra, rb in zip(records_of(runs[True]), records_of(runs[False]), strict=True):
        assert ra["tokens"] == rb["tokens"] and ra["response_tokens"] == rb["response_tokens"]
        for key in PAIR_METRICS + ("grad_norm",):
            assert math.isclose(ra[key], rb[key], rel_tol=1e-4, abs_tol=1e-5), (ra["step"], key, ra[key], rb[key])
    evals = [[r for r in run.records if "eval/loss" in r] for run in runs.values()]
    assert len(evals[0]) == len(evals[1]) == 2
    for ea, eb in zip(*evals):
        assert math.isclose(ea["eval/loss"], eb["eval/loss"], rel_tol=1e-5, abs_tol=1e-6)


def test_nonfinite_step_is_skipped_and_counted(tiny_model_dir, tmp_path):
    snapshots = {}

    def snapshot(step, record, policy):
        snapshots[step] = {k: v.clone() for k, v in policy.state_dict().items()}

    def nan_at_step_2(step, loss):
        return loss * float("nan") if step == 2 else loss

    config = load_config(None, tiny_overrides(tiny_model_dir, tmp_path, max_steps=3, eval_file="none"))
    result = train(config, TrainHooks(on_step_end=snapshot, transform_loss=nan_at_step_2))
    steps = records_of(result)
    assert [r["skipped"] for r in steps] == [False, True, False] and result.state.skipped_steps == 1
    for key, value in snapshots[1].items():  # step 2 left the weights untouched
        assert torch.equal(snapshots[2][key], value), key
    assert any(not torch.equal(snapshots[3][k], v) for k, v in snapshots[2].items())  # step 3 trained again

    (tmp_path / "stop").mkdir()
    config = load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "stop", max_steps=6, eval_file="none",
                                              max_nonfinite_steps=2))
    with pytest.raises(NonFiniteLossError, match="2 consecutive steps"):
        train(config, TrainHooks(transform_loss=lambda step, loss: loss * float("inf") if step >= 2 else loss))


def test_infinite_nll_without_sft_term_trains_and_logs_the_preference_loss(tiny_model_dir, tmp_path, monkeypatch):
    """alpha=0 (plain DPO): the NLL is a metric only, so an infinite one (a chosen token of probability 0) leaves
    the loss and its gradient finite: the step trains, and the logged loss is the preference loss, not
    0 * inf = NaN (which would skip every such step)."""
    forward = modeling.PackedRPOModel.forward

    def infinite_nll(self, batch, *args, **kwargs):
        out = forward(self, batch, *args, **kwargs)
        return out if kwargs.get("head_inputs_only") else out._replace(nll=torch.full_like(out.nll, math.inf))

    monkeypatch.setattr(modeling.PackedRPOModel, "forward", infinite_nll)
    config = load_config(None, tiny_overrides(tiny_model_dir, tmp_path, max_steps=2, alpha=0.0))
    result = train(config)
    steps = records_of(result)
    assert [r["skipped"] for r in steps] == [False, False] and result.state.skipped_steps == 0
    for r in steps + [r for r in result.records if "eval/loss" in r]:
        prefix = "eval/" if "eval/loss" in r else ""
        assert r[prefix + "nll"] == math.inf and r[prefix + "loss"] == r[prefix + "pref_loss"], r


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_in_backward_optimizer_trains_like_adamw_and_skips_nonfinite_steps(tiny_model_dir, tmp_path, finetune):
    """optimizer=adamw_in_backward gives AdamW's run exactly (no clipping); a NaN loss never reaches backward
    and a NaN gradient behind a finite loss updates nothing (it reaches the first hook): both are skipped."""
    runs = {}
    lora = dict(finetune="lora", reference="adapter", lora_r=4) if finetune == "lora" else {}
    for optimizer in ("adamw", "adamw_in_backward"):
        (tmp_path / optimizer).mkdir()
        config = load_config(None, tiny_overrides(tiny_model_dir, tmp_path / optimizer, max_steps=3, eval_file="none",
                                                  optimizer=optimizer, max_grad_norm=0, **lora))
        runs[optimizer] = train(config)
    for a, b in zip(records_of(runs["adamw"]), records_of(runs["adamw_in_backward"])):
        assert a["loss"] == b["loss"] and math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-5)
    expected, got = runs["adamw"].model.state_dict(), runs["adamw_in_backward"].model.state_dict()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key

    snapshots = {}

    def snapshot(step, record, policy):
        snapshots[step] = {k: v.clone() for k, v in policy.state_dict().items()}

    def poison(step, loss):
        if step == 2:
            return loss * float("nan")
        if step == 3:  # finite loss, NaN gradients
            loss = loss.clone()
            loss.register_hook(lambda grad: grad * float("nan"))
        return loss

    (tmp_path / "nan").mkdir()
    config = load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "nan", max_steps=4, eval_file="none",
                                              optimizer="adamw_in_backward", max_grad_norm=0, **lora))
    result = train(config, TrainHooks(on_step_end=snapshot, transform_loss=poison))
    steps = records_of(result)
    assert [r["skipped"] for r in steps] == [False, True, True, False] and result.state.skipped_steps == 2
    assert math.isfinite(steps[2]["loss"]) and steps[2]["params_updated"] == 0
    for step in (2, 3):
        for key, value in snapshots[1].items():
            assert torch.equal(snapshots[step][key], value), (step, key)
    assert any(not torch.equal(snapshots[4][k], v) for k, v in snapshots[3].items())  # step 4 trained again


def test_in_backward_optimizer_needs_one_process(tiny_model_dir, tmp_path, monkeypatch):
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    config = load_config(None, tiny_overrides(tiny_model_dir, tmp_path, max_steps=1, eval_file="none",
                                              optimizer="adamw_bf16_in_backward", max_grad_norm=0))
    with pytest.raises(ValueError, match="optimizer: 'adamw_bf16_in_backward' steps during backward.*got 2"):
        train(config)


@pytest.mark.parametrize("sft_norm", ["sum", "seq_mean", "token_mean"])
def test_one_micro_batch_equals_two_accumulated(sharp_model_dir, tmp_path, sft_norm):
    """The same 4 pairs per step as one micro-batch, or as two unequal ones (3 pairs, then 1 long pair that
    the token budget puts on its own) accumulated: the same objective (logged loss and NLL) and the same
    training. That needs each micro-batch weighted by its pairs (a mean of micro-batch means weights the
    lone pair 3x), and for token_mean its NLL weighted by its chosen tokens (averaging per micro-batch, as
    TRL and Liger do, makes the runs differ)."""
    rows = [json.loads(line) for line in write_rows(tmp_path / "rows.jsonl", 16).read_text().splitlines()]
    for i, row in enumerate(rows):  # every 4th pair has a long chosen response (cut at max_length)
        row["chosen"][0]["content"] += " ok" * (300 * (i % 4 == 3))
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    runs = {}
    for name, pairs, budget, accumulation in (("one", 4, 4000, 1), ("two", 3, 400, 2)):
        (tmp_path / name).mkdir()
        config = load_config(None, tiny_overrides(sharp_model_dir, tmp_path / name, sft_norm=sft_norm, alpha=2.0,
                                                  token_budget=budget, max_pairs_per_micro_batch=pairs,
                                                  gradient_accumulation_steps=accumulation, max_grad_norm=0,
                                                  train_file=str(train_file), max_length=256, shuffle=False))
        if name == "two":
            tokenizer = modeling.load_tokenizer(str(sharp_model_dir))
            examples = tokenize_pairs(load_preference_rows(train_file), tokenizer, max_length=256,
                                      max_prompt_length=config.max_prompt_length)[0]
            assert [[len(g) for g in step] for step in epoch_steps(examples, config, 0, 1)] == [[3, 1]] * 4
        runs[name] = train(config)
    one, two = records_of(runs["one"]), records_of(runs["two"])
    assert len(one) == len(two) == 4 and [r["pairs"] for r in two] == [4] * 4
    for a, b in zip(one, two):
        for key in ("loss", "nll", "pref_loss", "grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5), (a["step"], key, a[key], b[key])
    eval_one, eval_two = runs["one"].state.eval_history[-1], runs["two"].state.eval_history[-1]
    assert math.isclose(eval_one["eval/nll"], eval_two["eval/nll"], rel_tol=1e-5)
    expected, got = runs["one"].model.state_dict(), runs["two"].model.state_dict()
    for key, value in expected.items():
        assert_close(got[key], value, atol=1e-5, rtol=1e-4, name=key)


def test_token_mean_step_equals_the_formula(sharp_model_dir, tmp_path):
    """One step, sft_norm=token_mean, alpha=2, one micro-batch of 3 pairs of unequal lengths, against the formulas
    in float64 on full logits of each unpacked sequence: the logged nll is the chosen log-probs summed over the
    chosen tokens (-sum s_i / sum n_i), the logged loss pref + alpha * nll, and grad_norm the norm of that loss's
    gradient (an NLL normalized by other tokens, the rejected ones too, changes all three)."""
    beta, alpha = 0.5, 2.0
    config = load_config(None, tiny_overrides(sharp_model_dir, tmp_path, sft_norm="token_mean", alpha=alpha,
                                              beta=beta, max_steps=1, max_grad_norm=0, shuffle=False,
                                              max_pairs_per_micro_batch=3, token_budget=4000, eval_file=None))
    tokenizer = modeling.load_tokenizer(str(sharp_model_dir))
    examples = tokenize_pairs(load_preference_rows(config.train_file), tokenizer, max_length=config.max_length,
                              max_prompt_length=config.max_prompt_length)[0]
    first_step = epoch_steps(examples, config, 0, 1)[0]
    assert len(first_step) == 1  # one micro-batch
    pairs = [examples[i] for i in first_step[0]]
    assert len(pairs) == 3 and len({len(ex.chosen_ids) for ex in pairs}) > 1
    record, = records_of(train(config))

    model = modeling.load_causal_lm(str(sharp_model_dir))
    model.config._attn_implementation = "sdpa"
    chosen = torch.stack([unpacked_sequence_logps(model, ex, ex.chosen_ids) for ex in pairs])
    rejected = torch.stack([unpacked_sequence_logps(model, ex, ex.rejected_ids) for ex in pairs])
    ref_chosen, ref_rejected = chosen.detach(), rejected.detach()  # the reference is the starting model
    z = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    pref = (-torch.nn.functional.logsigmoid(z)).mean()
    nll = -chosen.sum() / sum(len(ex.chosen_ids) for ex in pairs)
    loss = pref + alpha * nll
    loss.backward()
    expected = {"nll": nll.item(), "pref_loss": pref.item(), "loss": loss.item(),
                "grad_norm": math.sqrt(sum((p.grad.double() ** 2).sum().item() for p in model.parameters()))}
    for key, value in expected.items():
        assert math.isclose(record[key], value, rel_tol=1e-4 if key == "grad_norm" else 1e-5), \
            (key, record[key], value)


def test_each_epoch_runs_its_own_shuffle(tiny_model_dir, tmp_path, monkeypatch):
    """Two shuffled epochs (4 steps of 2 micro-batches each): the trainer runs epoch e's plan, epoch_steps(...,
    e, ...), in epoch e. Replaying epoch 0's order in every epoch would leave, whenever an epoch has a left-over,
    the same pairs out of every epoch."""
    from rpo_fast import trainer

    config = load_config(None, tiny_overrides(tiny_model_dir, tmp_path, num_epochs=2, shuffle=True,
                                              gradient_accumulation_steps=2, eval_file="none", learning_rate=1e-4))
    examples = trainer.load_examples(config.train_file, modeling.load_tokenizer(config.model), config,
                                     lambda *_: None)[1]
    seen = []
    run_step = trainer.run_step

    def recording_run_step(model, reference, train_examples, step_groups, *args, **kwargs):
        seen.append(step_groups)
        return run_step(model, reference, train_examples, step_groups, *args, **kwargs)

    monkeypatch.setattr(trainer, "run_step", recording_run_step)
    train(config)
    plans = [epoch_steps(examples, config, epoch, 1) for epoch in (0, 1)]
    assert plans[0] != plans[1] and 0 < len(plans[0]) == len(plans[1])
    assert seen == plans[0] + plans[1]


def test_token_mean_eval_nll_equals_the_formula(sharp_model_dir, tmp_path):
    """sft_norm=token_mean: the eval before training logs eval/nll = -(sum of the eval set's chosen log-probs) /
    (its chosen tokens), the starting model's float64 log-probs of each unpacked sequence."""
    from rpo_fast import trainer

    config = load_config(None, tiny_overrides(sharp_model_dir, tmp_path, sft_norm="token_mean", max_steps=1,
                                              max_pairs_per_micro_batch=3))
    result = train(config)
    before, = [r for r in result.state.eval_history if r["step"] == 0]
    examples = trainer.load_examples(config.eval_file, modeling.load_tokenizer(config.model), config,
                                     lambda *_: None)[1]
    model = modeling.load_causal_lm(str(sharp_model_dir))
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        chosen = sum(unpacked_sequence_logps(model, ex, ex.chosen_ids).item() for ex in examples)
    nll = -chosen / sum(len(ex.chosen_ids) for ex in examples)
    assert math.isclose(before["eval/nll"], nll, rel_tol=1e-5), (before["eval/nll"], nll)


def test_run_outputs(tiny_model_dir, tmp_path, capsys):
    config = load_config(None, tiny_overrides(tiny_model_dir, tmp_path, finetune="lora", reference="adapter",
                                              lora_r=4, max_steps=3, plot=True, gold_eval_samples=4,
                                              gold_max_new_tokens=4, learning_rate=1e-3, eval_every=1))
    result = train(config)
    assert "warning: gold_max_new_tokens=4 is shorter than 4 of the 4 gold-eval prompts' chosen answers" \
        in capsys.readouterr().out
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3]
    for key in (*PAIR_METRICS, "tokens/s", "peak_mem_mb", "lr", "grad_norm"):
        assert all(math.isfinite(r[key]) for r in train_records), key
    evals = [r for r in lines if "eval/loss" in r]
    # eval_every=1: after each step, the last step once (by the loop or after it)
    assert [r["step"] for r in evals] == [0, 1, 2, 3] and all(0 <= r["eval/gold_accuracy"] <= 1 for r in evals)
    assert (run / "metrics.png").stat().st_size > 10_000
    assert "rewards/margins" in result.table and "eval after" in result.table
    assert (run / "final_metrics.txt").read_text().strip() == result.table
    # the saved model is a plain transformers model (LoRA merged) with its tokenizer
    saved = AutoModelForCausalLM.from_pretrained(run / "model")
    merged = result.model.state_dict()
    assert all(torch.equal(v, merged[k]) for k, v in saved.state_dict().items())
    assert (run / "model" / "tokenizer.json").is_file()


def test_gold_max_new_tokens_fits_every_embedded_eval_answer(tiny_model_dir):
    """The shipped gold_max_new_tokens (the default, the configs that grade the embedded eval set, the
    overoptimization experiment) leave room for every chosen answer of data/eval.jsonl, counted as the answer
    text's own tokens; the trainer warns when the setting would cut one."""
    from bench.overopt.experiment import Setup
    from rpo_fast.config import TrainConfig
    from rpo_fast.gold_eval import gold_answer_tokens, gold_length_warning
    from tiny_lm import REPO

    tokenizer = modeling.load_tokenizer(str(tiny_model_dir))
    rows = load_preference_rows(REPO / "data" / "eval.jsonl")
    examples = tokenize_pairs(rows, tokenizer, max_length=128, max_prompt_length=96)[0]
    assert len(examples) == len(rows)
    answer_tokens = [len(tokenizer(rows[ex.index]["chosen"][0]["content"], add_special_tokens=False)["input_ids"])
                     for ex in examples]
    assert [gold_answer_tokens(tokenizer, ex) for ex in examples] == answer_tokens
    need = max(answer_tokens)
    assert need > 16  # the sort answers: what the old default of 16 cut
    shipped = {"default": TrainConfig().gold_max_new_tokens, "overopt": Setup().gold_max_new_tokens,
               **{name: load_config(str(REPO / "configs" / name), {}).gold_max_new_tokens
                  for name in ("demo.yaml", "dpo_baseline.yaml")}}
    assert all(n >= need for n in shipped.values()), (need, shipped)

    assert gold_length_warning(tokenizer, examples, len(examples), need) is None
    assert gold_length_warning(tokenizer, examples, 0, 1) is None
    cut = sum(n > need - 1 for n in answer_tokens)
    row = max(zip(answer_tokens, [ex.index for ex in examples]))[1]
    assert gold_length_warning(tokenizer, examples, len(examples), need - 1) == (
        f"warning: gold_max_new_tokens={need - 1} is shorter than {cut} of the {len(examples)} gold-eval prompts' "
        f"chosen answers (the longest, eval row {row}, takes {need} tokens): a generation giving exactly that "
        f"answer is cut and graded wrong; set gold_max_new_tokens >= {need}")


def test_bf16_mixed_precision_runs(tiny_model_dir, tmp_path):
    config = load_config(None, tiny_overrides(tiny_model_dir, tmp_path, max_steps=2, eval_file="none",
                                              mixed_precision="bf16"))
    steps = records_of(train(config))
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) and not r["skipped"] for r in steps)


def test_bf16_reference_cache_holds_the_reference_models_log_probs(sharp_model_dir, tmp_path):
    """With mixed_precision bf16, `precompute-ref` runs the reference under the run's autocast, as `reference:
    model` runs it: the cache holds exactly the reference log-probs a `reference: model` run computes on its
    micro-batches (on the CPU the backbone's rows do not depend on the packing), not fp32 ones. A cache computed
    without mixed precision has another key, so neither run reads the other's. The sharp model's large logits
    make the two precisions differ by far more than any rounding."""
    import dataclasses

    from rpo_fast import trainer

    config = load_config(None, tiny_overrides(sharp_model_dir, tmp_path, mixed_precision="bf16", reference="cache",
                                              eval_file="none"))
    bf16_file = trainer.precompute_reference(config)["train"]

    # What a `reference: model` run computes: the frozen copy through Reference.inputs and the fused loss, under
    # the accelerator's autocast, on the run's micro-batches.
    accelerator = trainer.make_accelerator(config)
    examples = trainer.load_examples(config.train_file, modeling.load_tokenizer(config.model), config,
                                     lambda *_: None)[1]
    policy = trainer.build_policy(config, accelerator.device)
    config = trainer.resolve_share_prompt(config, policy, lambda *_: None)  # as precompute-ref and train do
    reference = trainer.build_reference(dataclasses.replace(config, reference="model"), policy, {"train": examples},
                                        accelerator, lambda *_: None)
    model = accelerator.prepare(modeling.PackedRPOModel(policy, beta=config.beta, alpha=config.alpha,
                                                        impl=config.impl))
    expected = torch.full((len(examples), 2), math.nan)
    for step in epoch_steps(examples, config, 0, 1):
        for group in step:
            batch = pack_pairs([examples[i] for i in group], share_prompt=config.share_prompt)
            with torch.no_grad():
                out = model(batch, **reference.inputs(batch, "train", accelerator.autocast))
            expected[group, 0], expected[group, 1] = out.ref_chosen_logps.float(), out.ref_rejected_logps.float()
    assert not expected.isnan().any()

    def cached(path):
        blob = torch.load(path, weights_only=True)
        rows = {int(i): k for k, i in enumerate(blob["example_index"].tolist())}
        return blob["logps"][[rows[ex.index] for ex in examples]]

    assert torch.equal(cached(bf16_file), expected), (cached(bf16_file) - expected).abs().max()
    fp32_file = trainer.precompute_reference(dataclasses.replace(config, mixed_precision="no"))["train"]
    assert bf16_file != fp32_file  # the precision is in the key
    assert (cached(fp32_file) - expected).abs().max() > 1e-2  # fp32 log-probs are another reference


def test_refuses_heads_the_fused_loss_cannot_compute():
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1)
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0 is not supported"):
        modeling.check_head(Gemma2ForCausalLM(Gemma2Config(head_dim=16, **small)))
    with pytest.raises(ValueError, match="logits_scaling=4.0 is not supported"):
        modeling.check_head(GraniteForCausalLM(GraniteConfig(logits_scaling=4.0, **small)))
    with pytest.raises(ValueError, match="expected the LM head to be a plain nn.Linear"):
        llama = AutoModelForCausalLM.from_config(LlamaConfig(**small))
        llama.lm_head = torch.nn.Sequential(llama.lm_head)
        modeling.head(llama)
    # a head that does more than its config says: caught by the numerical check
    model = AutoModelForCausalLM.from_config(LlamaConfig(**small))
    modeling.check_head(model)  # a plain linear head passes
    original = model.forward

    def scaled_forward(*args, **kwargs):
        out = original(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out

    model.forward = scaled_forward
    with pytest.raises(ValueError, match="logits are not hidden @ W.T"):
        modeling.check_head(model)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, examples):
    batch = pack_pairs(examples[:3])
    grads, saved = [], []
    for checkpointing in (False, True):
        model = modeling.load_causal_lm(str(tiny_model_dir))
        if checkpointing:
            modeling.enable_gradient_checkpointing(model)
        model.train()
        count = [0]

        def pack(t):
            count[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = modeling.PackedRPOModel(model, beta=0.3, alpha=1.0)(batch)
        out.loss.backward()
        saved.append(count[0])
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert saved[1] < saved[0] / 2  # checkpointing keeps far fewer activations for backward
    for name, grad in grads[0].items():
        assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, name=name)


def test_reference_cache_key_and_lookup(tmp_path, examples, tiny_model_dir):
    """A stale cache is never used: the key changes with any token or index of the data and any weight."""
    import copy
    import dataclasses

    from rpo_fast.ref_cache import ReferenceCache, cache_key, data_fingerprint, model_fingerprint

    assert data_fingerprint(examples) == data_fingerprint(list(examples))
    assert data_fingerprint(examples[:-1]) != data_fingerprint(examples)
    last = examples[-1]
    for field in ("prompt_ids", "chosen_ids", "rejected_ids"):
        ids = getattr(last, field).tolist()
        changed = dataclasses.replace(last, **{field: ids[:-1] + [ids[-1] + 1]})
        assert data_fingerprint(examples[:-1] + [changed]) != data_fingerprint(examples), field
    assert data_fingerprint(examples[:-1] + [dataclasses.replace(last, index=last.index + 1)]) \
        != data_fingerprint(examples)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    same = copy.deepcopy(model)
    assert model_fingerprint(same) == model_fingerprint(model)
    with torch.no_grad():
        same.lm_head.weight[3, 5] += 1e-3
    assert model_fingerprint(same) != model_fingerprint(model)
    assert model_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) != model_fingerprint(model)
    assert cache_key("m1", "d") != cache_key("m2", "d")
    assert cache_key("m1", "d", "bfloat16") != cache_key("m1", "d")  # mixed precision: another cache
    assert cache_key("m1", "d", None) == cache_key("m1", "d")  # fp32 caches keep their files
    logps = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    cache = ReferenceCache(key="k", example_index=torch.tensor([10, 11, 12, 13, 14, 15]), logps=logps)
    cache.save(tmp_path / "c.pt")
    loaded = ReferenceCache.load(tmp_path / "c.pt", "k")
    # pairs 12 and 10 -> [chosen 12, chosen 10, rejected 12, rejected 10]
    assert loaded.lookup(torch.tensor([12, 10])).tolist() == [4.0, 0.0, 5.0, 1.0]
    with pytest.raises(KeyError, match="example 99"):
        loaded.lookup(torch.tensor([99]))
    with pytest.raises(ValueError, match="expected key other"):
        ReferenceCache.load(tmp_path / "c.pt", "other")


def test_data_fingerprint_is_the_digest_of_the_ids_as_lists():
    """The digest keys reference caches on disk and the run folder's resume check: storing the ids as int32
    arrays must not change it. Pinned to the digest the list-storing code gave for these examples (ids past
    256 and at the int32 limit), and to an independent SHA-256 of the list reprs."""
    import hashlib

    from rpo_fast.data import PreferenceExample
    from rpo_fast.ref_cache import data_fingerprint

    rows = [(0, [0, 1, 128000, 128006], [300, 2**31 - 1, 128009], [7]),
            (41, [128000], [5, 6], [128255, 256, 257, 128009])]
    examples = [PreferenceExample(prompt, chosen, rejected, index) for index, prompt, chosen, rejected in rows]
    pinned = "8d7efb938c05fd88eeee7d480aa7def46c808f5886f60220b60fccaa6be2b336"
    assert hashlib.sha256(b"".join(repr(row).encode() for row in rows)).hexdigest() == pinned
    assert data_fingerprint(examples) == pinned


def test_an_unreadable_reference_cache_is_recomputed_and_rewritten(tmp_path, tiny_model_dir, examples):
    """A cache file under the right key that cannot be read (truncated: a copy cut short, a full disk) is
    recomputed, not an error: the values are each unpacked sequence's float64 log-probs, and the file is
    rewritten, readable."""
    from rpo_fast.ref_cache import ReferenceCache, cache_key, cache_path, data_fingerprint, load_or_compute, \
        model_fingerprint

    model = modeling.load_causal_lm(str(tiny_model_dir)).eval()
    key = cache_key(model_fingerprint(model), data_fingerprint(examples[:4]))
    path = cache_path(tmp_path, key)
    path.write_bytes(b"PK\x03\x04 cut short")
    cache = load_or_compute(model, examples[:4], tmp_path, token_budget=4000, impl="torch")
    assert_close(cache.logps.double(), unpacked_pair_logps(model, examples[:4]), atol=1e-3, rtol=1e-5,
                 name="recomputed reference logps")
    assert torch.equal(ReferenceCache.load(path, key).logps, cache.logps)


def test_out_of_memory_is_reported_with_step_batch_and_advice(tiny_model_dir, tmp_path):
    from rpo_fast.oom import TrainingOutOfMemoryError

    def oom_at_step_2(step, loss):
        if step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return loss

    config = load_config(None, tiny_overrides(tiny_model_dir, tmp_path, max_steps=3, eval_file="none",
                                              reference="model", gradient_checkpointing=False))
    with pytest.raises(TrainingOutOfMemoryError) as info:
        train(config, TrainHooks(transform_loss=oom_at_step_2))
    message = str(info.value)
    assert "at step 2" in message and "packed tokens" in message and f"token_budget={config.token_budget}" in message
    assert "memory planner predicts a peak of" in message  # the planner models the tiny Llama
    assert "--token_budget=" in message and "--gradient_checkpointing=true" in message
    assert "--reference=cache" in message
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)


def test_progress_bars_for_the_steps_and_each_eval_pass(tiny_model_dir, tmp_path, capsys):
    config = load_config(None, tiny_overrides(tiny_model_dir, tmp_path, max_steps=2, progress=True))
    train(config)
    err = capsys.readouterr().err
    # eval before and after training, 8 pairs in micro-batches of 2 (its bar is cleared when done: leave=False)
    assert len(re.findall(r"eval:\s+0%\|[^|]*\| 0/4 ", err)) == 2, err[-3000:]
    assert re.search(r"rpo: 100%\|[^|]*\| 2/2 ", err), err[-3000:]


def test_out_of_memory_in_the_optimizer_update_is_reported_with_the_step(tiny_model_dir, tmp_path, monkeypatch):
    from rpo_fast import trainer
    from rpo_fast.oom import TrainingOutOfMemoryError

    real_update = trainer.apply_update

    def oom_at_step_2(model, optimizer, accelerator, config, loss):
        if optimizer.optimizer.state:  # stepped once already
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real_update(model, optimizer, accelerator, config, loss)

    monkeypatch.setattr(trainer, "apply_update", oom_at_step_2)
    config = load_config(None, tiny_overrides(tiny_model_dir, tmp_path, max_steps=3, eval_file="none",
                                              reference="model", finetune="full", optimizer="adamw"))
    with pytest.raises(TrainingOutOfMemoryError) as info:
        train(config)
    message = str(info.value)
    assert "at step 2, in the optimizer update" in message and "'adamw'" in message
    assert "memory planner predicts a peak of" in message
    assert "--optimizer=adamw_bf16_sr" in message and "--reference=cache" in message
    assert "--token_budget=" not in message  # the batch size does not change the update's memory
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)


def test_start_up_line_counts_the_pairs_an_epoch_leaves_over(tiny_model_dir, tmp_path, capsys):
    """16 pairs in micro-batches of at most 2, 3 micro-batches a step: the last micro-batches of the epoch make
    no step, and the start-up line says how many pairs that leaves untrained."""
    config = load_config(None, tiny_overrides(tiny_model_dir, tmp_path, gradient_accumulation_steps=3,
                                              max_steps=1, eval_file="none"))
    examples = tokenize_pairs(load_preference_rows(config.train_file), modeling.load_tokenizer(config.model),
                              max_length=96, max_prompt_length=64)[0]
    used = sum(len(group) for step in epoch_steps(examples, config, 0, world_size=1) for group in step)
    assert 0 < 16 - used
    train(config)
    assert f"; {16 - used} pairs of the first epoch left over" in capsys.readouterr().out
