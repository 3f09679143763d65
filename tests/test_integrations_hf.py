"""RPOTrainerMixin on transformers.Trainer: a few steps match a dense full-logits Trainer computing the same
RPO loss, for each reference source and SFT normalization, and the fused path never builds [tokens, V] logits."""
import copy
import subprocess
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import rpo_fast.attention  # noqa: E402
import rpo_fast.chunked  # noqa: E402
import rpo_fast.integrations.hf_trainer as hf_trainer  # noqa: E402
from rpo_fast import RPOOutput, rpo_loss  # noqa: E402
from rpo_fast.integrations.hf_trainer import (  # noqa: E402
    PreferenceCollator, RPOArguments, RPOTrainerMixin, chosen_token_count, head_layout, rpo_compute_loss,
    sequence_logps)
from conftest import HeadMatmulCounter, LargestTensorRecorder, assert_close, perturbed_deepcopy  # noqa: E402
from test_ddp import TORCHRUN, free_port  # noqa: E402
from tiny_lm import REPO, subprocess_env  # noqa: E402

VOCAB, HIDDEN, PAD = 211, 32, 0
# Tolerances from measured run-to-run spread (tools/trainer_spread.py), not from one machine. Plain SGD: Adam's
# first step is lr * g / |g| per entry, so a 1e-8 gradient difference on a near-zero gradient entry moves a weight
# by up to 2 * lr, whatever the kernels; on one x86 machine with AVX-512 kernels one weight of 2048 came out 2e-5
# apart, here 4.7e-5 (OMP_NUM_THREADS=1 or 2) and 3.1e-5 (ATEN_CPU_CAPABILITY=default). With SGD the weights are
# linear in the gradients: the largest weight difference measured was 1.5e-8 (1.5e-5 of the largest weight
# change) and the largest relative loss / grad-norm difference 1.0e-6, over OMP_NUM_THREADS=1|2,
# ATEN_CPU_CAPABILITY=default|avx2 (this CPU has no AVX-512) and MKL_ENABLE_INSTRUCTIONS=SSE4_2: the bounds
# below leave a margin of about 100x.
TRAIN_KW = {"optim": "sgd"}
LOSS_RTOL = 1e-4
METRIC_ATOL = 1e-5  # rewards and margins start at 0 with a reference equal to the policy
WEIGHT_RTOL, WEIGHT_ATOL = 1e-5, 1e-6


def _tiny_llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False, pad_token_id=PAD, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _examples(n, generator):
    def ids(low, high):
        return torch.randint(1, VOCAB, (int(torch.randint(low, high, (1,), generator=generator)),),
                             generator=generator).tolist()
    return [{"prompt_ids": ids(2, 6), "chosen_ids": ids(3, 9), "rejected_ids": ids(3, 9)} for _ in range(n)]


def _dense_rpo_terms(model, ref_model, batch, args: RPOArguments):
    """Independent reference: full [2B, T, V] logits, log_softmax, gather, and the RPO formulas written out
    (rpo_fast.loss's docstring): {loss, pref_loss, nll, logps [2B], rewards [2B]}."""
    def seq_logps(m):
        position_ids = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=position_ids,
                   use_cache=False).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        lp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        return (lp * mask).sum(1), mask.sum(1).float()

    logps, counts = seq_logps(model)
    if "ref_chosen_logps" in batch:
        ref = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
    elif ref_model is None and args.reference_free:
        ref = torch.zeros_like(logps)
    else:
        with torch.no_grad():
            if ref_model is None:  # PEFT: the adapter disabled is the reference
                with model.disable_adapter():
                    ref = seq_logps(model)[0]
            else:
                ref = seq_logps(ref_model)[0]
    n = logps.shape[0] // 2
    per_token = args.average_log_prob or args.loss_type == "ipo"  # IPO always compares per-token averages
    rewards = args.beta * ((logps - ref) / counts if per_token else logps - ref)
    z, eps = rewards[:n] - rewards[n:], args.label_smoothing
    if args.loss_type == "sigmoid":  # cDPO: eps of the pairs' labels flipped
        pref = -(1 - eps) * torch.nn.functional.logsigmoid(z) - eps * torch.nn.functional.logsigmoid(-z)
    elif args.loss_type == "hinge":
        pref = torch.relu(1 - z)
    else:
        pref = (z / args.beta - 1 / (2 * args.beta)) ** 2
    chosen, chosen_counts = logps[:n], counts[:n]
    nll = {"sum": -chosen.mean(), "seq_mean": -(chosen / chosen_counts).mean(),
           "token_mean": -chosen.sum() / chosen_counts.sum()}[args.sft_norm]
    return {"loss": pref.mean() + args.alpha * nll, "pref_loss": pref.mean(), "nll": nll, "logps": logps,
            "rewards": rewards}


def _dense_rpo_loss(model, ref_model, batch, args: RPOArguments):
    return _dense_rpo_terms(model, ref_model, batch, args)["loss"]


def _dense_metrics(terms):
    """The batch means RPOTrainerMixin logs, from the dense reference's terms (TRL's metric definitions)."""
    n = terms["logps"].shape[0] // 2
    rewards, logps = terms["rewards"].detach(), terms["logps"].detach()
    margins = rewards[:n] - rewards[n:]
    return {"rewards/chosen": rewards[:n].mean(), "rewards/rejected": rewards[n:].mean(),
            "rewards/accuracies": (margins > 0).float().mean(), "rewards/margins": margins.mean(),
            "logps/chosen": logps[:n].mean(), "logps/rejected": logps[n:].mean(), "nll": terms["nll"].detach(),
            "pref_loss": terms["pref_loss"].detach()}


class RPOTrainer(RPOTrainerMixin, transformers.Trainer):
    pass


class DenseRPOTrainer(transformers.Trainer):
    loss_is_scaled_for_ga = False

    def __init__(self, *a, ref_model=None, rpo_args=None, **kw):
        super().__init__(*a, **kw)
        self.model_accepts_loss_kwargs = False  # so that older transformers divide by the accumulation steps too
        self.ref_model, self.rpo_args = ref_model, rpo_args
        self._dense_logged = {"train": defaultdict(list), "eval": defaultdict(list)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        terms = _dense_rpo_terms(model, self.ref_model, inputs, self.rpo_args)
        for name, value in _dense_metrics(terms).items():  # each micro-batch's mean, averaged at logging
            self._dense_logged["train" if model.training else "eval"][name].append(float(value))
        return terms["loss"]

    def log(self, logs, start_time=None):
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + k: sum(v) / len(v) for k, v in self._dense_logged[mode].items() if v})
        self._dense_logged[mode].clear()
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            return self.compute_loss(model, self._prepare_inputs(inputs)), None, None


def _train(trainer_cls, model, ref_model, examples, rpo_args, tmp_path, **train_kw):
    args = transformers.TrainingArguments(**{
        "output_dir": str(tmp_path), "per_device_train_batch_size": 3, "max_steps": 3, "learning_rate": 1e-2,
        "logging_steps": 1, "report_to": [], "use_cpu": True, "save_strategy": "no", "remove_unused_columns": False,
        "seed": 0, "dataloader_num_workers": 0, "disable_tqdm": True, **train_kw})
    trainer = trainer_cls(model=model, ref_model=ref_model, rpo_args=rpo_args, args=args, train_dataset=examples,
                          eval_dataset=examples[:4], data_collator=PreferenceCollator(pad_token_id=PAD))
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h] + [trainer.evaluate()], model


def _assert_same_weights(ours, theirs, label=""):
    for (name, p), q in zip(theirs.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=lambda m: f"{label}{name}: {m}")


def _peft_model(base):
    peft = pytest.importorskip("peft", reason="peft is not installed")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return peft.get_peft_model(base, config)


def mixin_and_dense_runs(reference, sft_norm, packed, grad_accum, tmp_path, *, rpo_options=None, **train_kw):
    """Trains copies of one tiny model with RPOTrainerMixin and with the dense Trainer: (logs with the eval
    last, model) of each, and the starting model. reference: "ref_model" (a copy of the start), "unlike" (a
    reference unlike it), "precomputed", "peft" or "none" (reference_free); rpo_options: more RPOArguments."""
    base = _tiny_llama()
    if reference == "peft":
        base = _peft_model(base)  # random (not zero) LoRA init: the disabled adapter differs from the policy
    examples = _examples(12, torch.Generator().manual_seed(3))
    rpo_args = RPOArguments(beta=0.1, alpha=0.5, sft_norm=sft_norm, packed=packed, reference_free=reference == "none",
                            **(rpo_options or {}))
    ref_model = {"ref_model": lambda: copy.deepcopy(base).eval(), "unlike": lambda: _reference_unlike(base)}.get(
        reference, lambda: None)()
    if reference == "precomputed":
        collate = PreferenceCollator(pad_token_id=PAD)
        with torch.no_grad():
            for ex in examples:
                logps = sequence_logps(copy.deepcopy(base), collate([ex]), packed=True)[0]
                ex["ref_chosen_logps"], ex["ref_rejected_logps"] = logps.tolist()
    ours, dense = (
        _train(trainer_cls, copy.deepcopy(base), ref_model, [dict(ex) for ex in examples], rpo_args,
               tmp_path / trainer_cls.__name__, gradient_accumulation_steps=grad_accum, **{**TRAIN_KW, **train_kw})
        for trainer_cls in (RPOTrainer, DenseRPOTrainer))
    return ours, dense, base


METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "nll", "pref_loss")


def _assert_same_metrics(ours, dense, label, prefix="", skip=()):
    """Every logged RPO metric of `ours` equals the dense reference's (rewards start at 0: also METRIC_ATOL)."""
    for name in METRICS:
        if name not in skip:
            assert prefix + name in ours, f"{label}: missing metric {prefix + name}"
            assert ours[prefix + name] == pytest.approx(dense[prefix + name], rel=LOSS_RTOL, abs=METRIC_ATOL), \
                f"{label} {prefix + name}: {ours[prefix + name]} vs {dense[prefix + name]}"


@pytest.mark.parametrize("reference, sft_norm, packed, grad_accum", [
    ("ref_model", "sum", False, 1),
    ("ref_model", "seq_mean", True, 2),
    ("precomputed", "seq_mean", True, 1),
    ("peft", "token_mean", False, 1),
])
def test_mixin_matches_dense_trainer(reference, sft_norm, packed, grad_accum, tmp_path):
    """Losses, grad norms, logged metric values and weights of 3 mixin steps and an eval equal the dense Trainer's."""
    (ours, ours_model), (dense, dense_model), _ = mixin_and_dense_runs(reference, sft_norm, packed, grad_accum,
                                                                       tmp_path)
    (ours, ours_eval), (dense, dense_eval) = (ours[:-1], ours[-1]), (dense[:-1], dense[-1])
    assert ours_eval["eval_loss"] == pytest.approx(dense_eval["eval_loss"], rel=LOSS_RTOL)
    _assert_same_metrics(ours_eval, dense_eval, "eval", prefix="eval_")
    assert len(ours) == len(dense) == 3
    for step, (a, b) in enumerate(zip(ours, dense)):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), f"step {step}"
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=LOSS_RTOL), f"step {step}"
        # A reference equal to the starting policy leaves margins within 1e-5 of 0 while the rounding is 1e-7: the
        # sign of a margin, so accuracy, is not compared (it is at eval, and in the PEFT and loss-option runs).
        # Except at step 0 with a ref_model: the same weights score the same batch, so every reward is exactly 0
        # and every pair a tie, which is not ranked right (accuracy 0). (Precomputed log-probs came from
        # one-pair batches: equal up to rounding.)
        if step == 0 and reference == "ref_model":
            assert a["rewards/accuracies"] == 0.0 and a["rewards/margins"] == 0.0, a
        ties = ("rewards/accuracies",) if reference == "precomputed" or reference == "ref_model" and step > 0 else ()
        _assert_same_metrics(a, b, f"step {step}", skip=ties)
    assert ours[-1]["rewards/margins"] != 0.0  # the policy moved away from the reference
    _assert_same_weights(ours_model, dense_model)


@pytest.mark.parametrize("reference, loss_type, label_smoothing, average_log_prob", [
    ("unlike", "sigmoid", 0.2, False),
    ("unlike", "hinge", 0.0, True),
    ("none", "ipo", 0.0, False),
])
def test_mixin_loss_options_match_dense_trainer(reference, loss_type, label_smoothing, average_log_prob, tmp_path):
    """RPOArguments' loss_type, label_smoothing, average_log_prob and reference_free reach the loss: 2 mixin steps
    (losses, grad norms, logged metric values, weights) and an eval equal the dense Trainer's for each."""
    options = dict(loss_type=loss_type, label_smoothing=label_smoothing, average_log_prob=average_log_prob)
    (ours, ours_model), (dense, dense_model), _ = mixin_and_dense_runs(reference, "token_mean", True, 1, tmp_path,
                                                                       rpo_options=options, max_steps=2)
    assert len(ours) == len(dense) == 3
    for step, (a, b) in enumerate(zip(ours, dense)):
        label = "eval" if step == 2 else f"step {step}"
        prefix = "eval_" if step == 2 else ""
        assert a[prefix + "loss"] == pytest.approx(b[prefix + "loss"], rel=LOSS_RTOL), label
        if step < 2:
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=LOSS_RTOL), label
        _assert_same_metrics(a, b, label, prefix=prefix)
    _assert_same_weights(ours_model, dense_model)


def test_eval_metrics_are_pair_means_of_their_own_loop(tmp_path):
    """evaluate() on 5 pairs in batches of 2, 2, 1: each RPO metric is the mean over the 5 pairs (nll and pref_loss
    weighted by each batch's pairs), like eval_loss, not a mean of per-batch means; a predict() before it leaves
    nothing behind in it; metric_key_prefix names them (test_rewards/margins, no eval_ keys), and predict()
    returns them too. Against the dense reference on the same batches."""
    base = _tiny_llama()
    policy = _reference_unlike(base)  # a policy unlike its reference: rewards away from 0
    other, eval_set = _examples(4, torch.Generator().manual_seed(11)), _examples(5, torch.Generator().manual_seed(12))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to=[],
                                          use_cpu=True, remove_unused_columns=False, disable_tqdm=True)
    rpo_args = RPOArguments(beta=0.1, alpha=0.5)
    trainer = RPOTrainer(model=policy, ref_model=copy.deepcopy(base), rpo_args=rpo_args, args=args,
                         data_collator=PreferenceCollator(pad_token_id=PAD))
    trainer.predict(other)
    results = {"eval": trainer.evaluate(eval_set), "test": trainer.evaluate(eval_set, metric_key_prefix="test"),
               "predict": trainer.predict(eval_set).metrics}

    collate = PreferenceCollator(pad_token_id=PAD)
    with torch.no_grad():
        terms = [_dense_rpo_terms(policy, base, collate(eval_set[i:i + 2]), rpo_args) for i in (0, 2, 4)]
    pairs = [2, 2, 1]
    per_pair = {}  # name -> the 5 pairs' values
    for t, n in zip(terms, pairs):
        rewards, logps = t["rewards"], t["logps"]
        for name, value in (("rewards/chosen", rewards[:n]), ("rewards/rejected", rewards[n:]),
                            ("rewards/accuracies", (rewards[:n] > rewards[n:]).float()),
                            ("rewards/margins", rewards[:n] - rewards[n:]), ("logps/chosen", logps[:n]),
                            ("logps/rejected", logps[n:])):
            per_pair.setdefault(name, []).append(value)
    expected = {name: float(torch.cat(values).mean()) for name, values in per_pair.items()}
    for name in ("nll", "pref_loss", "loss"):
        expected[name] = float(sum(t[name] * n for t, n in zip(terms, pairs)) / sum(pairs))
    assert expected["rewards/margins"] != 0.0
    for label, metrics in results.items():
        prefix = "eval_" if label == "eval" else "test_"
        assert not any(k.startswith("eval_" if prefix == "test_" else "test_") for k in metrics), sorted(metrics)
        for name, value in expected.items():
            assert metrics[prefix + name] == pytest.approx(value, rel=LOSS_RTOL, abs=METRIC_ATOL), (label, name)


def token_mean_runs(tmp_path, **train_kw):
    """{name: (logs, model)} for batches of 2 pairs accumulated twice ("ga2"), of 4 pairs ("ga1"), and the dense
    Trainer on batches of 4 ("dense"), all with the token-mean NLL; "base": (None, the starting model). 10 pairs:
    the third step is the epoch's last, shorter window (one batch of 2 pairs in each run: "ga2" accumulates one)."""
    base = _tiny_llama()
    with torch.no_grad():
        base.lm_head.weight.mul_(30.0)
    gen = torch.Generator().manual_seed(7)
    examples = _examples(10, gen)
    for i, ex in enumerate(examples):
        ex["chosen_ids"] = ex["chosen_ids"][:2] if i % 2 else ex["chosen_ids"] * 4
    rpo_args = RPOArguments(beta=0.1, alpha=1.0, sft_norm="token_mean")
    runs = {"base": (None, base)}
    for name, trainer_cls, batch, accumulation in (("ga2", RPOTrainer, 2, 2), ("ga1", RPOTrainer, 4, 1),
                                                   ("dense", DenseRPOTrainer, 4, 1)):
        model = copy.deepcopy(base)
        logs, _ = _train(trainer_cls, model, copy.deepcopy(base).eval(), [dict(ex) for ex in examples], rpo_args,
                         tmp_path / name, **{**TRAIN_KW, **train_kw, "per_device_train_batch_size": batch,
                                             "gradient_accumulation_steps": accumulation})
        runs[name] = (logs[:-1], model)
    return runs


def test_token_mean_is_the_steps_token_mean_under_gradient_accumulation(tmp_path):
    """Batches of 2 pairs accumulated twice == batches of 4 pairs == the dense reference on batches of 4, for the
    token-mean NLL, with chosen responses of very different lengths and a model whose per-token log-probs
    differ (so a mean of per-micro-batch means would not be the step's token mean). The last step accumulates
    one micro-batch, not two (the epoch's 5 batches of 2): its NLL weight counts the window's own micro-batches."""
    runs = token_mean_runs(tmp_path)
    assert all(len(runs[name][0]) == 3 for name in ("ga2", "ga1", "dense"))
    for other in ("ga1", "dense"):
        for step, (a, b) in enumerate(zip(runs["ga2"][0], runs[other][0])):
            assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), (other, step)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=LOSS_RTOL), (other, step)
            # the logged nll is the step's token mean too (it was the mean of the micro-batches' token means)
            _assert_same_metrics(a, b, f"{other} step {step}", skip=("rewards/accuracies",))
        _assert_same_weights(runs["ga2"][1], runs[other][1], f"{other} ")


def hf_ddp_run(out_dir, gradient_accumulation_steps):
    """3 token-mean mixin steps on batches of 2 pairs (of 3 to 8 chosen tokens) per process, plain SGD; under
    torchrun (tests/hf_ddp_driver.py) one batch per process, alone `gradient_accumulation_steps` of them: (the
    logged steps, the trained model, whether this is the main process)."""
    base = _tiny_llama()
    rpo_args = RPOArguments(beta=0.1, alpha=1.0, sft_norm="token_mean")
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=2, gradient_accumulation_steps=gradient_accumulation_steps,
        max_steps=3, learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
        remove_unused_columns=False, seed=0, dataloader_num_workers=0, disable_tqdm=True, **TRAIN_KW)
    trainer = RPOTrainer(model=copy.deepcopy(base), ref_model=copy.deepcopy(base).eval(), rpo_args=rpo_args, args=args,
                         train_dataset=_examples(12, torch.Generator().manual_seed(3)),
                         data_collator=PreferenceCollator(pad_token_id=PAD))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return logs, trainer.model, trainer.accelerator.is_main_process


@pytest.mark.skipif(not TORCHRUN.exists() or not torch.distributed.is_available(), reason="needs torchrun")
def test_mixin_on_two_processes_equals_one_process_with_accumulation(tmp_path):
    """DDP (torchrun, gloo on 2 CPU processes), a batch of 2 pairs per process == 1 process accumulating the same 2
    batches, with the token-mean NLL: each process weights its NLL by its batch's share of both processes' chosen
    tokens, times the process count (DDP averages the gradients over the processes). The same losses, grad
    norms, logged NLLs and weights after 3 steps."""
    cmd = [str(TORCHRUN), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           str(Path(__file__).with_name("hf_ddp_driver.py")), str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = torch.load(tmp_path / "two" / "result.pt")
    one_logs, one_model = hf_ddp_run(tmp_path / "one", gradient_accumulation_steps=2)[:2]
    assert len(one_logs) == len(two["logs"]) == 3
    for step, (a, b) in enumerate(zip(two["logs"], one_logs)):
        for key in ("loss", "grad_norm", "nll", "pref_loss"):
            assert a[key] == pytest.approx(b[key], rel=LOSS_RTOL), (step, key)
    for name, value in one_model.state_dict().items():
        torch.testing.assert_close(two["weights"][name], value, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL,
                                   msg=lambda m: f"{name}: {m}")


def test_bf16_trainer_runs_policy_and_reference_under_autocast(tmp_path, monkeypatch):
    """Trainer(bf16=True), full fine-tuning with a ref_model: accelerate wraps both models' forwards in autocast
    after the mixin installed its head forward, and the head forward must stay inside that wrapper (it was
    installed again over it, and the whole model ran in float32). Every head call of a step and an eval sees
    autocast's bfloat16; the logged loss moves off the float32 run's and stays within bf16 rounding of a dense
    bf16 Trainer's."""
    head_dtypes = []
    real_prepare = hf_trainer.prepare_head_inputs

    def prepare(*args, **kwargs):
        out = real_prepare(*args, **kwargs)
        head_dtypes.append(out[0].dtype)
        return out

    monkeypatch.setattr(hf_trainer, "prepare_head_inputs", prepare)
    (ours, _), (dense, _), base = mixin_and_dense_runs("ref_model", "token_mean", False, 1, tmp_path, bf16=True,
                                                       max_steps=1)
    assert len(head_dtypes) == 4 and set(head_dtypes) == {torch.bfloat16}, head_dtypes  # ref + policy, train + eval
    rpo_args = RPOArguments(beta=0.1, alpha=0.5, sft_norm="token_mean")
    fp32, _ = _train(RPOTrainer, copy.deepcopy(base), copy.deepcopy(base).eval(),
                     _examples(12, torch.Generator().manual_seed(3)), rpo_args, tmp_path / "fp32", max_steps=1,
                     **TRAIN_KW)
    for key in ("loss", "eval_loss"):
        step = -1 if key == "eval_loss" else 0
        assert ours[step][key] == pytest.approx(dense[step][key], rel=1e-3), key
        assert ours[step][key] != fp32[step][key], key


def test_deepcopy_of_an_installed_model_runs_on_its_own_weights():
    """A deepcopy of a model whose head forward is installed (a reference snapshot of the policy, say): its plain
    forward, the one generate() uses, runs on the copy's weights (it ran on the original's: the saved previous
    forward was a method bound to the original), and so does the head path; the original is unchanged."""
    model = _tiny_llama()
    batch = PreferenceCollator(pad_token_id=PAD)(_examples(2, torch.Generator().manual_seed(5)))
    sequence_logps(model, batch)  # installs the head forward
    copied, plain = perturbed_deepcopy(model, _tiny_llama)  # plain: no head installed, the copy's weights
    original = _tiny_llama()
    ids = batch["input_ids"][:1]
    with torch.no_grad():
        assert_close(copied(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-6, rtol=1e-5, name="copy")
        assert_close(model(input_ids=ids).logits, original(input_ids=ids).logits, atol=1e-6, rtol=1e-5,
                     name="original")
        expected = _dense_rpo_terms(plain, None, batch, RPOArguments(reference_free=True))["logps"]
        assert_close(sequence_logps(copied, batch)[0], expected, atol=1e-5, rtol=1e-5, name="copy's head path")


@pytest.mark.parametrize("packed", [False, True])
def test_moe_router_aux_loss_is_in_the_loss(packed):
    """A MoE model with output_router_logits (tiny Mixtral): its own training forward adds router_aux_loss_coef *
    the load-balancing loss, and so does the mixin's loss (it was dropped): loss and every gradient, the
    router's included, equal the dense RPO loss plus that term from the model's own forward (padding masked;
    packed, the row has no padding)."""
    config = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5,
                                        pad_token_id=PAD, max_position_embeddings=64, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config)
    dense_model = copy.deepcopy(model)
    batch = PreferenceCollator(pad_token_id=PAD)(_examples(3, torch.Generator().manual_seed(5)))
    args = RPOArguments(beta=0.2, alpha=0.5, reference_free=True, packed=packed, share_prompt=False)
    fused = rpo_compute_loss(model, batch, **asdict(args)).loss
    position_ids = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
    aux = dense_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      position_ids=position_ids).aux_loss
    dense = _dense_rpo_loss(dense_model, None, batch, args) + 0.5 * aux
    assert_close(fused, dense, atol=1e-6, rtol=1e-5, name="loss")
    fused.backward()
    dense.backward()
    _assert_same_grads(model, dense_model)


def test_missing_reference_is_an_error():
    """No reference is refused; reference_free=True gives the dense loss and rewards with s^ref = 0."""
    model = _tiny_llama()
    batch = PreferenceCollator(pad_token_id=PAD)(_examples(2, torch.Generator().manual_seed(4)))
    with pytest.raises(ValueError, match="reference"):
        rpo_compute_loss(model, batch)
    out = rpo_compute_loss(model, batch, reference_free=True)
    with torch.no_grad():
        expected = _dense_rpo_terms(model, None, batch, RPOArguments(reference_free=True))
    assert_close(out.loss, expected["loss"], atol=1e-6, rtol=1e-5, name="loss")
    assert_close(torch.cat([out.chosen_rewards, out.rejected_rewards]), expected["rewards"], atol=1e-6, rtol=1e-5,
                 name="rewards")
    with pytest.raises(ValueError, match="even number"):
        rpo_compute_loss(model, {k: v[:3] for k, v in batch.items()}, reference_free=True)


def test_a_reference_sharing_the_policys_parameters_is_refused(tmp_path):
    """ref_model=model (or a model sharing a weight with it): the mixin freezes ref_model, which froze the policy
    and crashed at the first backward; refused when the trainer is built, the policy left trainable."""
    model = _tiny_llama()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                          remove_unused_columns=False)
    sharing = _tiny_llama()
    sharing.lm_head.weight = model.lm_head.weight
    for ref_model, what in ((model, "the policy itself"), (sharing, "a model sharing its parameters")):
        with pytest.raises(ValueError, match=f"^ref_model: expected a frozen copy of the policy, separate from model, "
                                             f"got {what}"):
            RPOTrainer(model=model, ref_model=ref_model, args=args, data_collator=PreferenceCollator(pad_token_id=PAD))
        assert all(p.requires_grad for p in model.parameters())


def test_compute_metrics_is_refused(tmp_path):
    """A compute_metrics was silently never called (the mixin's evaluation has no predictions to give it)."""
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                          remove_unused_columns=False)
    with pytest.raises(ValueError, match=r"^compute_metrics: expected None .*, got <function"):
        RPOTrainer(model=_tiny_llama(), args=args, rpo_args=RPOArguments(reference_free=True),
                   data_collator=PreferenceCollator(pad_token_id=PAD), compute_metrics=lambda prediction: {"mine": 1.0})


def test_collator_refuses_rows_it_cannot_batch():
    """PreferenceCollator: TRL-format text rows (a bare KeyError 'prompt_ids' before) and reference columns in
    some rows only (a KeyError when only the first row had them, silently dropped when only later rows did) are
    ValueErrors naming the keys and rows; reference columns in every row are batched."""
    rows = _examples(2, torch.Generator().manual_seed(5))
    collate = PreferenceCollator(pad_token_id=PAD)
    with pytest.raises(ValueError, match=r"^examples: expected keys \['prompt_ids', 'chosen_ids', 'rejected_ids'\].*"
                                         r"row 0 lacks .*got keys \['chosen', 'prompt', 'rejected'\].*tokenize"):
        collate([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)
    ref = {"ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0}
    for batch, rows_with, rows_without in (([{**rows[0], **ref}, rows[1]], 0, 1),
                                           ([rows[0], {**rows[1], **ref}], 1, 0)):
        with pytest.raises(ValueError, match=rf"in all rows of a batch or in none, got them in rows \[{rows_with}\] "
                                             rf"and not in rows \[{rows_without}\]"):
            collate(batch)
    with pytest.raises(ValueError, match=r"both .* or neither in a row, row 1 has only \['ref_chosen_logps'\]"):
        collate([{**rows[0], **ref}, {**rows[1], "ref_chosen_logps": -1.0}])
    batch = collate([{**rows[0], **ref}, {**rows[1], "ref_chosen_logps": -3.0, "ref_rejected_logps": -4.0}])
    assert batch["ref_chosen_logps"].tolist() == [-1.0, -3.0] and batch["ref_rejected_logps"].tolist() == [-2.0, -4.0]
    assert "ref_chosen_logps" not in collate(rows)


@pytest.mark.parametrize("kwargs, name", [(dict(head_backward="fast"), "head_backward"),
                                         (dict(impl="dense", head_backward="fwdgrad"), "head_backward"),
                                         (dict(head_chunk_tokens=0), "head_chunk_tokens"),
                                         # refused when built, not at the first training step
                                         (dict(beta=-1.0), "beta"), (dict(beta=float("nan")), "beta"),
                                         (dict(alpha=-1.0), "alpha"), (dict(label_smoothing=0.9), "label_smoothing"),
                                         (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
                                         (dict(sft_norm="mean"), "sft_norm"), (dict(loss_type="kto"), "loss_type")])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}: expected .*, got"):
        RPOArguments(**kwargs)


@pytest.mark.parametrize("packed", [False, True])
def test_fused_path_never_builds_full_logits(packed, monkeypatch):
    chunk = 8
    monkeypatch.setattr(rpo_fast.chunked, "CHUNK_ELEMENTS", chunk * VOCAB)  # 8-token tiles for the reference
    model, ref_model = _tiny_llama(), _tiny_llama().eval()
    batch = PreferenceCollator(pad_token_id=PAD)(_examples(6, torch.Generator().manual_seed(5)))
    n_resp = int((batch["labels"][:, 1:] != -100).sum())
    assert n_resp > HIDDEN  # so [N_resp, V] logits would outsize the [V, H] head itself
    with LargestTensorRecorder(dim_size=VOCAB) as rec:
        rpo_compute_loss(model, batch, ref_model=ref_model, packed=packed, head_chunk_tokens=chunk).loss.backward()
    assert rec.largest[0] <= VOCAB * HIDDEN, rec.largest  # nothing larger than the head weight / its grad
    with LargestTensorRecorder(dim_size=VOCAB) as dense:
        _dense_rpo_loss(model, ref_model, batch, RPOArguments()).backward()
    assert dense.largest[0] >= n_resp * VOCAB  # the recorder does see full logits when they exist


# --- the policy's loss through fused_linear_rpo_loss (forward-time gradients) against the old path ---


def _old_rpo_compute_loss(model, batch, ref_model, nll_weight, args: RPOArguments):
    """rpo_compute_loss as it was before the fused loss: the policy's per-token log-probs through
    `linear_logprobs` (recompute backward), the reference after them, then `rpo_loss`, then the weighting."""
    layout = dict(packed=args.packed, share_prompt=args.share_prompt)
    logps, counts = sequence_logps(model, batch, **layout)
    with torch.no_grad():
        if ref_model is None:  # PEFT: the adapter disabled is the reference
            with model.disable_adapter():
                ref = sequence_logps(model, batch, **layout)[0]
        else:
            ref = sequence_logps(ref_model, batch, **layout)[0]
    out = rpo_loss(logps, ref, counts, beta=args.beta, alpha=args.alpha, sft_norm=args.sft_norm)
    return out._replace(loss=out.pref_loss + nll_weight * args.alpha * out.nll)


def _reference_unlike(model):
    """A frozen copy of `model` with every weight moved a little: a reference unlike the policy."""
    ref_model = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p in ref_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ref_model


def _assert_same_grads(model, expected_model):
    """Every trainable parameter's gradient in `model` equals `expected_model`'s (fp32 bounds)."""
    grads = [(name, p.grad) for name, p in expected_model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for _, g in grads)
    for (name, expected), p in zip(grads, (p for p in model.parameters() if p.requires_grad)):
        assert_close(p.grad, expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-4, name=f"grad {name}")


def _layout_model(layout, reference):
    """A tiny Llama with an LM-head bias, on the attention the layout needs, and its reference (None: PEFT)."""
    model = _tiny_llama()
    if layout == "shared":
        model.set_attn_implementation(rpo_fast.attention.register())
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.randn(VOCAB) * 0.5)
    if reference == "peft":
        return _peft_model(model), None
    return model, _reference_unlike(model)


@pytest.mark.parametrize("reference", ["ref_model", "peft"])
@pytest.mark.parametrize("layout", ["padded", "packed", "shared"])
def test_fused_loss_equals_the_old_path(layout, reference):
    """Two micro-batches of one token-mean step (each NLL weighted by its share of the step's chosen tokens, as
    RPOTrainerMixin.compute_loss does): the default head (forward-time gradients inside the model's forward) gives
    the old path's per-pair log-probs, loss terms and every parameter gradient, fp32."""
    model, ref_model = _layout_model(layout, reference)
    old_model = copy.deepcopy(model)
    old_ref = None if ref_model is None else copy.deepcopy(ref_model)
    args = RPOArguments(beta=0.2, alpha=0.7, packed=layout != "padded", share_prompt=layout == "shared")
    collate = PreferenceCollator(pad_token_id=PAD, padding_side="left" if layout == "padded" else "right")
    batches = [collate(_examples(n, torch.Generator().manual_seed(11 + n))) for n in (3, 2)]
    if layout == "shared":  # the batches really run as shared-prompt rows
        shapes = [head_layout(model, b, packed=True, share_prompt=True)[0]["input_ids"].shape[1] for b in batches]
        assert shapes < [int(b["attention_mask"].sum()) for b in batches]
    step_tokens = sum(int(chosen_token_count(b)) for b in batches)
    for batch in batches:
        nll_weight = float(chosen_token_count(batch)) * len(batches) / step_tokens
        new = rpo_compute_loss(model, batch, ref_model=ref_model, nll_weight=nll_weight, **asdict(args))
        old = _old_rpo_compute_loss(old_model, batch, old_ref, nll_weight, args)
        for name in RPOOutput._fields:
            assert_close(getattr(new, name), getattr(old, name), atol=1e-6, rtol=1e-5, name=name)
        (new.loss / len(batches)).backward()
        (old.loss / len(batches)).backward()
    _assert_same_grads(model, old_model)


@pytest.mark.parametrize("packed", [False, True])
def test_a_scored_label_under_padding_is_refused(packed):
    """A collator that leaves the pad token as the label of padded positions: refused in every layout (padded,
    the last real token would score the pad after it; packed, the label has no token), by the loss and by
    `sequence_logps` (the reference's and evaluation's entry)."""
    batch = PreferenceCollator(pad_token_id=PAD)(_examples(3, torch.Generator().manual_seed(5)))
    batch["labels"] = batch["labels"].masked_fill(batch["attention_mask"] == 0, PAD)
    assert bool((batch["attention_mask"] == 0).any())
    refused = r"labels: expected -100 at padded positions \(attention_mask == 0\), " f"got {PAD} at"
    with pytest.raises(ValueError, match=refused):
        rpo_compute_loss(_tiny_llama(), batch, reference_free=True, packed=packed, share_prompt=False)
    with pytest.raises(ValueError, match=refused):
        sequence_logps(_tiny_llama(), batch, packed=packed, share_prompt=False)


def test_left_padded_first_token_is_never_scored():
    """Left padding, a row labelled from its first real token: no position predicts that token, so the padded
    layout (where a padding position sits before it) scores the same tokens as the packed one."""
    batch = PreferenceCollator(pad_token_id=PAD, padding_side="left")(_examples(3, torch.Generator().manual_seed(5)))
    row = int(batch["attention_mask"].sum(1).argmin())  # the most padded row
    first = int(batch["attention_mask"][row].argmax())
    batch["labels"][row, first:] = batch["input_ids"][row, first:]
    model = _tiny_llama()
    padded_logps, padded_counts = sequence_logps(model, batch, packed=False)
    packed_logps, packed_counts = sequence_logps(model, batch, packed=True)
    assert int(padded_counts[row]) == int(batch["attention_mask"][row].sum()) - 1
    assert torch.equal(padded_counts, packed_counts)
    assert_close(padded_logps, packed_logps, atol=1e-5, rtol=1e-5, name="sequence log-probs")


def _tiny_qwen2_sliding():
    """A tiny Qwen2 whose first layer has a 4-token sliding window."""
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      sliding_window=4, use_sliding_window=True, max_window_layers=1,
                                      tie_word_embeddings=False, pad_token_id=PAD, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config)


@pytest.mark.parametrize("make", [_tiny_llama, _tiny_qwen2_sliding], ids=["llama", "qwen2_sliding_window"])
def test_packed_attention_model_with_left_padding_and_packed_false(make):
    """A model on rpo_fast's packed attention (the README's HF example) with the mixin's default packed=False and
    left padding: transformers builds no mask for that attention, so padded rows ran plain causal attention over
    their pads; the batch is packed instead. The loss and per-pair log-probs equal the dense loss of the same
    weights on sdpa (the model's own logits, padding masked), also with a sliding window (which that attention's
    padded path ignores: the packing check compares against one sequence per call there)."""
    sdpa = make()
    model = copy.deepcopy(sdpa)
    model.set_attn_implementation(rpo_fast.attention.register())
    examples = _examples(3, torch.Generator().manual_seed(21))
    batch = PreferenceCollator(pad_token_id=PAD, padding_side="left")(examples)
    assert bool((batch["attention_mask"][:, 0] == 0).any())  # some row really is left-padded
    args = RPOArguments(reference_free=True, packed=False)
    with torch.no_grad():
        out = rpo_compute_loss(model, batch, **asdict(args))
        expected = _dense_rpo_terms(sdpa, None, batch, args)
    assert_close(out.loss, expected["loss"], atol=1e-6, rtol=1e-5, name="loss")
    assert_close(torch.cat([out.chosen_logps, out.rejected_logps]), expected["logps"], atol=1e-5, rtol=1e-5,
                 name="log-probs")


def _tiny_opt():
    config = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                                    ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=HIDDEN,
                                    pad_token_id=PAD, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(config).eval()  # OPT has dropout: eval mode, for the dense comparison


def test_packed_refuses_a_model_whose_attention_mixes_packed_sequences(monkeypatch):
    """OPT's attention ignores the restarting position_ids (its learned positions run on across the packed row, and
    its mask is plain causal), so packed=True scored every sequence after the first with the ones before it in
    view: refused on the first packed batch, naming the model type. packed=False matches the dense loss; a
    model that keeps packed sequences apart is checked once and runs packed, also in training mode with dropout
    (GPT-2: the check runs without it and leaves the mode as it was)."""
    batch = PreferenceCollator(pad_token_id=PAD)(_examples(3, torch.Generator().manual_seed(5)))
    opt = _tiny_opt()
    with pytest.raises(ValueError, match=r"^packed: expected a model whose attention keeps packed sequences apart.*"
                                         r"got 'opt' .*use packed=False"):
        rpo_compute_loss(opt, batch, reference_free=True, packed=True)
    with pytest.raises(ValueError, match="got 'opt'"):
        sequence_logps(opt, batch, packed=True)
    args = RPOArguments(reference_free=True, packed=False)
    with torch.no_grad():
        out = rpo_compute_loss(opt, batch, **asdict(args))
        assert_close(out.loss, _dense_rpo_loss(opt, None, batch, args), atol=1e-6, rtol=1e-5, name="padded OPT")
        # unchecked, packed OPT gives other numbers: what the check is for
        packed = rpo_compute_loss(opt, batch, reference_free=True, packed=True, check_packing=False)
    assert abs(float(packed.loss - out.loss)) > 1e-3

    checks = []
    real_check = hf_trainer.check_packed_layout
    monkeypatch.setattr(hf_trainer, "check_packed_layout", lambda *a: checks.append(1) or real_check(*a))
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4,
                                                                 n_positions=64, pad_token_id=PAD)).train()
    for _ in range(2):
        sequence_logps(model, batch, packed=True)
    assert checks == [1] and model.training and model.transformer.drop.training


@pytest.mark.parametrize("packed", [False, True])
def test_scaled_head_with_bias_equals_the_models_own_logits(packed):
    """A head that scales its logits and has a bias: Granite divides `lm_head(h)` by `logits_scaling`, and
    rpo_fast folds that scale into the rows and the bias rather than reading the model's logits. The fused
    loss and every parameter gradient equal the dense RPO loss on the model's own logits, fp32."""
    config = transformers.GraniteConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=False, pad_token_id=PAD, logits_scaling=4.0,
                                        attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.GraniteForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # logits of order 1 after the scale: a scale left out changes the loss
        model.lm_head.bias = torch.nn.Parameter(torch.randn(VOCAB) * 4.0)
    ref_model = _reference_unlike(model)
    dense_model = copy.deepcopy(model)
    args = RPOArguments(beta=0.2, alpha=0.7, sft_norm="seq_mean", packed=packed, share_prompt=False)
    batch = PreferenceCollator(pad_token_id=PAD)(_examples(3, torch.Generator().manual_seed(5)))
    fused = rpo_compute_loss(model, batch, ref_model=ref_model, **asdict(args)).loss
    dense = _dense_rpo_loss(dense_model, ref_model, batch, args)
    assert_close(fused, dense, atol=1e-6, rtol=1e-5, name="loss")
    fused.backward()
    dense.backward()
    _assert_same_grads(model, dense_model)


def test_hyperclovax_head_multiplies_by_logits_scaling():
    """HyperCLOVA X multiplies `lm_head(h)` by `logits_scaling` (Granite, whose class it reuses, divides): the
    head's log-probs equal those of the model's own logits (logits_scaling=4: dividing instead would flatten
    them 16-fold)."""
    config = transformers.HyperCLOVAXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=PAD,
                                            logits_scaling=4.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.HyperCLOVAXForCausalLM(config)
    dense_model = copy.deepcopy(model)
    batch = PreferenceCollator(pad_token_id=PAD)(_examples(2, torch.Generator().manual_seed(5)))
    with torch.no_grad():
        expected = _dense_rpo_terms(dense_model, None, batch, RPOArguments(reference_free=True))["logps"]
        assert_close(sequence_logps(model, batch)[0], expected, atol=1e-5, rtol=1e-5, name="sequence log-probs")


@pytest.mark.parametrize("head_backward, products", [("auto", 3), ("recompute", 4)])
def test_mixin_step_head_matmuls(head_backward, products, tmp_path):
    """One RPOTrainerMixin step (compute_loss, then backward) runs the policy's LM head as three matrix products,
    all in forward (logits, dhidden, dweight), where the linear_logprobs path ran four (its backward recomputes
    the logits). Precomputed reference columns: the count is the policy's alone."""
    model = _tiny_llama()
    examples = _examples(3, torch.Generator().manual_seed(5))
    for ex in examples:
        ex["ref_chosen_logps"], ex["ref_rejected_logps"] = -30.0, -31.0
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                          remove_unused_columns=False, **TRAIN_KW)
    trainer = RPOTrainer(model=model, args=args, rpo_args=RPOArguments(packed=True, head_backward=head_backward),
                         data_collator=PreferenceCollator(pad_token_id=PAD))
    batch = trainer.data_collator(examples)
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # what train() sets before its first step
    with torch.no_grad():  # a model's first packed batch also runs check_packed_layout's two passes, once
        trainer.compute_loss(model, batch, num_items_in_batch=chosen_token_count(batch))
    with HeadMatmulCounter(VOCAB) as forward:
        loss = trainer.compute_loss(model, batch, num_items_in_batch=chosen_token_count(batch))
    with HeadMatmulCounter(VOCAB) as backward:
        loss.backward()
    n_resp = int(batch["labels"][:, 1:].ne(-100).sum())
    assert len(forward.products) + len(backward.products) == products, (forward.products, backward.products)
    assert (VOCAB, HIDDEN) in forward.products + backward.products and model.lm_head.weight.grad is not None
    if head_backward == "auto":
        assert sorted(forward.products) == sorted([(n_resp, VOCAB), (n_resp, HIDDEN), (VOCAB, HIDDEN)])
        assert backward.products == []


def test_lora_on_the_lm_head_is_refused_and_modules_to_save_matches_dense(tmp_path):
    """A LoRA adapter on lm_head: the fused head reads the head's weight, which would leave the adapter out of the
    log-probs and without a gradient, so it is refused (at the trainer's construction and in rpo_compute_loss).
    PEFT's modules_to_save copy of the head is read correctly: loss and every gradient equal the dense RPO loss
    on the model's own logits (the disabled adapter, with the original head, is the reference)."""
    peft = pytest.importorskip("peft", reason="peft is not installed")
    batch = PreferenceCollator(pad_token_id=PAD)(_examples(3, torch.Generator().manual_seed(5)))
    lora_head = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                   target_modules=["q_proj", "lm_head"]))
    refused = "model: expected an LM head without a PEFT adapter"
    with pytest.raises(ValueError, match=refused):
        rpo_compute_loss(lora_head, batch)
    with pytest.raises(ValueError, match=refused):
        sequence_logps(lora_head, batch)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                          remove_unused_columns=False)
    with pytest.raises(ValueError, match=refused):
        RPOTrainer(model=lora_head, args=args, data_collator=PreferenceCollator(pad_token_id=PAD))

    model = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                               target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():  # the trained copy of the head differs from the reference's
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    dense_model = copy.deepcopy(model)
    rpo_args = RPOArguments(beta=0.2, alpha=0.7)
    fused = rpo_compute_loss(model, batch, beta=0.2, alpha=0.7).loss
    dense = _dense_rpo_loss(dense_model, None, batch, rpo_args)
    assert_close(fused, dense, atol=1e-6, rtol=1e-5, name="loss")
    fused.backward()
    dense.backward()
    _assert_same_grads(model, dense_model)
