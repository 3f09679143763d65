"""RPOFastDPOTrainer / patch_dpo_trainer: TRL's own DPOTrainer run both ways on a tiny random model gives the
same losses, metrics and weights, and the rpo_fast head never builds [tokens, V] logits.

Offline: the tokenizer is a WordLevel `tokenizers` model over made-up words, the model a random LlamaConfig.
"""
import copy
import functools
import os

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed (pip install trl==1.16.0)")
datasets = pytest.importorskip("datasets", reason="datasets is not installed (a trl dependency)")
import transformers  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

import rpo_fast.chunked  # noqa: E402
from rpo_fast.integrations import trl as rpo_trl  # noqa: E402
from conftest import LargestTensorRecorder, assert_close, perturbed_deepcopy  # noqa: E402

VOCAB, HIDDEN = 257, 32
# Logged values that depend on wall time, not on the computation.
_TIMING_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos"}
# Tolerances from measured run-to-run spread (tools/trainer_spread.py; the reasoning for SGD is in
# test_integrations_hf.py: Adam turns a 1e-8 gradient difference on a near-zero gradient into a step of up to
# 2 * lr). Measured with SGD over OMP_NUM_THREADS=1|2, ATEN_CPU_CAPABILITY=default|avx2 and
# MKL_ENABLE_INSTRUCTIONS=SSE4_2: torch head 0 apart from TRL (the same products), Triton head 3.7e-9 in weights
# and up to 2e-7 relative in logs, except rewards, which start at 0 and are compared at LOG_ATOL.
TRAIN_KW = {"optim": "sgd"}
LOG_RTOL, LOG_ATOL = 1e-4, 1e-5
WEIGHT_RTOL, WEIGHT_ATOL = 1e-5, 1e-6



def make_tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                                                unk_token="<unk>")


def make_dataset():
    g = torch.Generator().manual_seed(0)

    def words(low, high):
        n = int(torch.randint(low, high, (1,), generator=g))
        return " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 3, (n,), generator=g))

    return datasets.Dataset.from_list([{"prompt": words(2, 6), "chosen": " " + words(4, 10),
                                        "rejected": " " + words(4, 10)} for _ in range(12)])


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def dataset():
    return make_dataset()


def _tiny_llama(**config_overrides):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=1, tie_word_embeddings=False,
                                      **config_overrides)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _dpo_config(tmp_path, **overrides):
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                   logging_steps=1, report_to="none", loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5],
                   beta=0.1, use_cpu=True, save_strategy="no", bf16=False, gradient_checkpointing=False, seed=0,
                   dataloader_num_workers=0, disable_tqdm=True, **TRAIN_KW)
    return trl.DPOConfig(**{**options, **overrides})


def _run(build, base, reference, tokenizer, dataset, tmp_path, peft_config=None, **config):
    """Trains a copy of `base` for 3 steps; returns the per-step logs and the trained model."""
    model = copy.deepcopy(base)
    ref_model = copy.deepcopy(base).eval() if reference == "ref_model" else None
    trainer = build(model, ref_model=ref_model, args=_dpo_config(tmp_path, **config), train_dataset=dataset,
                    processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h], trainer.model


def _assert_same_logs(ours, stock, skip=()):
    assert len(ours) == len(stock) > 0
    for step, (a, b) in enumerate(zip(ours, stock)):
        for key, value in b.items():
            if key in _TIMING_KEYS or key in skip:
                continue
            assert key in a, f"step {step}: metric {key!r} missing"
            assert a[key] == pytest.approx(value, rel=LOG_RTOL, abs=LOG_ATOL), f"step {step} {key}: {a[key]} vs {value}"


def _assert_same_weights(ours, stock):
    for (name, p), q in zip(stock.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=lambda m: f"{name}: {m}")


CASES = ["rpo_ref_model", "ipo_ref_model", "rpo_peft_adapter", "rpo_precomputed", "rpo_logits_scaling",
         "rpo_triton_kernels", "dpo_wpo_weighting"]


def trl_and_ours_runs(case, tokenizer, dataset, tmp_path, **config):
    """Trains copies of one tiny model with RPOFastDPOTrainer and with TRL's DPOTrainer for `case`: (logs,
    model) of ours and of TRL's, and the starting model."""
    peft_config, reference = None, "ref_model"
    base = _tiny_llama(logits_scaling=2.0) if case == "rpo_logits_scaling" else _tiny_llama()
    ours_cls = rpo_trl.RPOFastDPOTrainer
    if case == "rpo_triton_kernels":  # the Triton kernels themselves, on CPU through the interpreter
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the Triton kernels run on CPU tensors only with TRITON_INTERPRET=1")
        ours_cls = functools.partial(rpo_trl.RPOFastDPOTrainer, impl="triton")
    elif case == "ipo_ref_model":
        config = dict(loss_type=["ipo"], loss_weights=None, **config)
    elif case == "rpo_peft_adapter":
        peft = pytest.importorskip("peft", reason="peft is not installed")
        peft_config, reference = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), None
        config = dict(learning_rate=5e-2, **config)  # LoRA B starts at 0: move it enough to show in the rewards
    elif case == "rpo_precomputed":
        config, reference = dict(precompute_ref_log_probs=True, **config), None
    elif case == "dpo_wpo_weighting":  # WPO weights: TRL asks the head for log_sum_sq_probs (head_statistics).
        # Sigmoid alone: TRL 1.16's WPO weighting multiplies "sft"'s expanded scalar in place and raises.
        config = dict(loss_type=["sigmoid"], loss_weights=None, use_weighting=True, **config)
    stock = _run(trl.DPOTrainer, base, reference, tokenizer, dataset, tmp_path / "stock", peft_config, **config)
    ours = _run(ours_cls, base, reference, tokenizer, dataset, tmp_path / "ours", peft_config, **config)
    return ours, stock, base


@pytest.mark.parametrize("case", CASES)
def test_same_losses_metrics_and_weights_as_trl(case, tokenizer, dataset, tmp_path, monkeypatch):
    head_calls = []
    real_head = rpo_trl.head_logprobs
    monkeypatch.setattr(rpo_trl, "head_logprobs", lambda *a, **k: head_calls.append(1) or real_head(*a, **k))
    (ours, ours_model), (stock, stock_model), _ = trl_and_ours_runs(case, tokenizer, dataset, tmp_path)
    # Per step: policy + reference forward, except with precomputed reference log-probs (policy only, plus
    # one precompute pass per dataset batch through the same head at construction).
    assert len(head_calls) == (3 + 3 if case == "rpo_precomputed" else 6)
    _assert_same_logs(ours, stock)
    assert stock[-1]["rewards/margins"] != 0.0 and stock[-1]["entropy"] > 0
    _assert_same_weights(ours_model, stock_model)


def test_bf16_autocast_matches_trl_to_bf16_rounding(tokenizer, dataset, tmp_path):
    base = _tiny_llama()
    ours, _ = _run(rpo_trl.RPOFastDPOTrainer, base, "ref_model", tokenizer, dataset, tmp_path / "ours", bf16=True,
                   max_steps=1)
    stock, _ = _run(trl.DPOTrainer, base, "ref_model", tokenizer, dataset, tmp_path / "stock", bf16=True,
                    max_steps=1)
    for key in ("loss", "logps/chosen", "logps/rejected", "entropy", "grad_norm"):
        assert ours[0][key] == pytest.approx(stock[0][key], rel=2e-3), key


def test_patch_dpo_trainer_without_token_metrics(tokenizer, dataset, tmp_path):
    base = _tiny_llama()

    def patched(*args, **kwargs):
        return rpo_trl.patch_dpo_trainer(trl.DPOTrainer(*args, **kwargs), token_metrics=False)

    ours, ours_model = _run(patched, base, "ref_model", tokenizer, dataset, tmp_path / "ours")
    stock, stock_model = _run(trl.DPOTrainer, base, "ref_model", tokenizer, dataset, tmp_path / "stock")
    assert not {"entropy", "mean_token_accuracy"} & set(ours[0])
    _assert_same_logs(ours, stock, skip=("entropy", "mean_token_accuracy"))
    _assert_same_weights(ours_model, stock_model)


def _largest_vocab_tensor(trainer):
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with LargestTensorRecorder(dim_size=VOCAB) as rec:
        trainer.compute_loss(trainer.model, inputs).backward()
    n_resp = int(inputs["completion_mask"][:, 1:].sum())
    return rec.largest, n_resp


def test_never_builds_full_logits(tokenizer, dataset, tmp_path, monkeypatch):
    chunk = 8
    monkeypatch.setattr(rpo_fast.chunked, "CHUNK_ELEMENTS", chunk * VOCAB)  # the op's tiles: 8 tokens x V
    base = _tiny_llama()
    ours = rpo_trl.RPOFastDPOTrainer(copy.deepcopy(base), ref_model=copy.deepcopy(base).eval(),
                                     args=_dpo_config(tmp_path / "ours"), train_dataset=dataset,
                                     processing_class=tokenizer, metrics_chunk_size=chunk)
    (numel, shape, op), n_resp = _largest_vocab_tensor(ours)
    assert n_resp > HIDDEN  # so [N_resp, V] logits would outsize the [V, H] head itself
    assert numel <= VOCAB * HIDDEN, f"largest vocab-sized tensor {shape} from {op}"
    stock = trl.DPOTrainer(copy.deepcopy(base), ref_model=copy.deepcopy(base).eval(),
                           args=_dpo_config(tmp_path / "stock"), train_dataset=dataset, processing_class=tokenizer)
    (stock_numel, stock_shape, _), _ = _largest_vocab_tensor(stock)
    assert stock_numel >= n_resp * VOCAB, stock_shape  # TRL's CPU head does build them: the recorder sees it


def test_fused_head_shift_labels_and_fp32_head_match_trls_head():
    """install_fused_head's `shift_labels` (pre-shifted labels, scored unshifted) and `cast_lm_head_to_fp32` (under
    bf16 autocast the head still runs in float32) branches: every FusedCausalLMOutput field and the LM head's
    gradient equal TRL's own add_fused_lm_head with the same options, to float32 rounding."""
    fields = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    ours, stock = _tiny_llama(), _tiny_llama()
    for model in (ours, stock):
        with torch.no_grad():
            model.lm_head.weight.mul_(20.0)  # logits of order 10: a bf16 head is then ~2e-2 off, fp32 ~2e-6
    rpo_trl.install_fused_head(ours, cast_lm_head_to_fp32=True, outputs=fields)
    trl.trainer.utils.add_fused_lm_head(stock, cast_lm_head_to_fp32=True, outputs=fields)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (2, 12), generator=g)
    shift_labels = torch.cat([input_ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    shift_labels[0, :4] = shift_labels[1, :6] = -100  # prompt positions score nothing
    results = []
    for model in (ours, stock):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=input_ids, shift_labels=shift_labels, fused_lm_head=True)
        out.loss.backward()
        results.append((out, model.lm_head.weight.grad))
    (out, grad), (expected, expected_grad) = results
    for name in fields:
        got, want = getattr(out, name), getattr(expected, name)
        assert got.shape == want.shape == shift_labels.shape, name
        if name == "is_top1":
            assert torch.equal(got, want)
        else:
            assert_close(got, want, atol=2e-5, rtol=1e-5, name=name)
    assert_close(out.loss, expected.loss, atol=1e-6, rtol=1e-5, name="loss")
    assert_close(grad, expected_grad, atol=1e-5 * float(expected_grad.abs().max()), rtol=1e-4, name="lm_head grad")


def test_head_statistics_equal_their_float64_definitions():
    """head_statistics on a head with a bias, odd sizes, chunks of rows that do not divide them: each statistic
    alone (mean_logits alone takes a path without a vocabulary pass, (h . sum_v W_v + sum_v b_v) / V, as with
    patch_dpo_trainer(token_metrics=False)) and all together equal TRL's definitions in float64 on full logits."""
    from rpo_fast.integrations._model import head_statistics

    g = torch.Generator().manual_seed(4)
    rows, weight = torch.randn(13, 7, generator=g), torch.randn(37, 7, generator=g)
    bias, targets = torch.randn(37, generator=g) + 2.0, torch.randint(0, 37, (13,), generator=g)
    logits = rows.double() @ weight.double().T + bias.double()
    targets[::3] = logits.argmax(-1)[::3]  # some targets are the top token
    logp = logits.log_softmax(-1)
    expected = {"mean_logits": logits.mean(-1), "entropy": -(logp.exp() * logp).sum(-1),
                "log_sum_sq_probs": torch.logsumexp(2 * logp, -1), "is_top1": logits.argmax(-1) == targets}
    assert 0 < int(expected["is_top1"].sum()) < 13
    for wanted in [{name} for name in expected] + [set(expected)]:
        got = head_statistics(rows, weight, bias, targets, wanted, chunk_size=4)
        assert set(got) == wanted
        for name in wanted:
            if name == "is_top1":
                assert torch.equal(got[name], expected[name]), wanted
            else:
                assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5, name=f"{name} of {sorted(wanted)}")


def test_install_fused_head_divides_the_logits_by_the_temperature():
    """install_fused_head(temperature=2.5): log_probs, entropy and mean_logits are those of the model's own logits
    divided by 2.5 (TRL's temperature-scaled distribution), in float64, at the scored positions."""
    fields = ("log_probs", "entropy", "mean_logits")
    model = _tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)  # logits of order 1 after the temperature
    input_ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(6))
    labels = input_ids.clone()
    labels[0, :3] = labels[1, :5] = -100
    scored = labels[:, 1:] != -100
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[:, :-1].double() / 2.5
        logp = logits.log_softmax(-1)
        expected = {"log_probs": logp.gather(-1, input_ids[:, 1:, None])[..., 0],
                    "entropy": -(logp.exp() * logp).sum(-1), "mean_logits": logits.mean(-1)}
        rpo_trl.install_fused_head(model, temperature=2.5, outputs=fields)
        out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    for name in fields:
        assert_close(getattr(out, name)[scored], expected[name][scored], atol=1e-5, rtol=1e-5, name=name)


def test_lora_on_the_lm_head_is_refused_and_modules_to_save_is_scored():
    """install_fused_head on a PEFT base model whose lm_head is a LoRA layer: refused (the fused head would read the
    base weight alone; TRL's own add_fused_lm_head silently does). With modules_to_save=["lm_head"] the fused
    log-probs equal the model's own logits' log-softmax (the trained copy of the head, not the original)."""
    peft = pytest.importorskip("peft", reason="peft is not installed")
    lora_head = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                   target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="model: expected an LM head without a PEFT adapter"):
        rpo_trl.install_fused_head(lora_head.get_base_model())
    model = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                               modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(3.0)
    input_ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    labels = input_ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[:, :-1]
        expected = logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0] * (labels[:, 1:] != -100)
        rpo_trl.install_fused_head(model.get_base_model())
        out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    assert_close(out.log_probs, expected, atol=1e-5, rtol=1e-5, name="log_probs")


def test_deepcopy_of_an_installed_model_runs_on_its_own_weights():
    """A deepcopy of a model with the fused head installed: its plain forward (generation) and its fused forward
    run on the copy's weights, not on the original's (the saved previous forward was bound to the original)."""
    model = _tiny_llama()
    rpo_trl.install_fused_head(model)
    copied, plain = perturbed_deepcopy(model, _tiny_llama)  # plain: no head installed, the copy's weights
    input_ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = plain(input_ids=input_ids).logits
        assert_close(copied(input_ids=input_ids).logits, logits, atol=1e-6, rtol=1e-5, name="plain forward")
        expected = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0]
        fused = copied(input_ids=input_ids, labels=input_ids, fused_lm_head=True).log_probs
        assert_close(fused, expected, atol=1e-5, rtol=1e-5, name="fused forward")
        assert_close(model(input_ids=input_ids).logits, _tiny_llama()(input_ids=input_ids).logits, atol=1e-6,
                     rtol=1e-5, name="original")


def test_saved_forward_runs_on_the_module_it_is_called_with():
    """The forward a head install saves (`_model.forward_function`) runs on the module it is called with, not on
    the one it was read from: called with another model, it gives that model's logits (an uninstalled model with
    its weights). A deepcopy alone cannot show this: `copy` rebinds a bound method to the copy through its memo."""
    from rpo_fast.integrations._model import forward_function

    model = _tiny_llama()
    other, plain = perturbed_deepcopy(model, _tiny_llama)  # plain: the other's weights
    input_ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close(forward_function(model)(other, input_ids=input_ids).logits, plain(input_ids=input_ids).logits,
                     atol=1e-6, rtol=1e-5, name="saved forward called with another model")


def test_rejects_softcapped_heads():
    model = _tiny_llama()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        rpo_trl.install_fused_head(model)
    with pytest.raises(ValueError, match="impl"):
        rpo_trl.install_fused_head(_tiny_llama(), impl="cuda")


def test_patch_dpo_trainer_keeps_a_prepared_reference_under_autocast(tokenizer, dataset, tmp_path):
    """Built with bf16, DPOTrainer has already wrapped its reference model's forward in accelerate's autocast when
    patch_dpo_trainer installs the head: the reference must still run under it, as the policy does, so that a
    policy equal to its reference starts with rewards of exactly 0, as in TRL."""
    base = _tiny_llama()

    def patched(*args, **kwargs):
        return rpo_trl.patch_dpo_trainer(trl.DPOTrainer(*args, **kwargs))

    ours, _ = _run(patched, base, "ref_model", tokenizer, dataset, tmp_path / "ours", bf16=True, max_steps=1)
    stock, _ = _run(trl.DPOTrainer, base, "ref_model", tokenizer, dataset, tmp_path / "stock", bf16=True,
                    max_steps=1)
    assert stock[0]["rewards/chosen"] == stock[0]["rewards/rejected"] == 0.0
    assert ours[0]["rewards/chosen"] == ours[0]["rewards/rejected"] == 0.0
    for key in ("loss", "logps/chosen", "logps/rejected", "grad_norm"):
        assert ours[0][key] == pytest.approx(stock[0][key], rel=2e-3), key
