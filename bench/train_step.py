"""Training-step benchmark: tokens/s and peak memory of full RPO steps on a random-init model.

The step is built here directly (no trainer module): a transformers causal LM built from a real config
with random weights; 2B packed sequences (chosen first) in one row, position_ids restarting per sequence,
no attention mask, no cache; prompt tokens P and response tokens R per sequence; AdamW. Reference
log-probs come from a cache (a fixed [2B] tensor), so the reference forward, which costs every provider
the same, is left out.

    ours   backbone -> hidden at the N response positions -> rpo_fast fused_linear_rpo_loss (impl auto)
    dense  the HF forward with its LM head over every position -> fp32 log_softmax -> gather -> rpo_loss
           (what a trainer that asks the model for logits does)
    trl    TRL's DPOTrainer with loss_type=["sigmoid", "sft"]: skipped unless trl is installed (the CPU pin
           set has it, requirements.txt; the GPU image does not, so the GPU suite carries its wheel, .whl/)

GPU: bf16 weights, AdamW states in bf16 (torch keeps them in the parameter dtype), gradient checkpointing.
CPU quick mode: a tiny config in fp32.
"""
from __future__ import annotations

import gc
import json
import time
from typing import Callable

import torch

from rpo_fast import fused_linear_rpo_loss, rpo_loss

from .memory import quiet_stderr, measure_memory
from .timing import failure_reason, quantiles

# Real shapes (random weights): Llama-3.2-1B and Mistral-7B-v0.1. The sliding window is off: the packed
# sequences are shorter than Mistral's 4096-token window anyway.
MODEL_CONFIGS = {
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, rope_theta=10000.0,
                       max_position_embeddings=32768, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       sliding_window=None),
    # CPU quick mode: tiny backbone, a real vocabulary size, so the head dominates as it does at scale.
    "tiny-llama": dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=32000, rope_theta=10000.0,
                       max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "micro-llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, vocab_size=1024, rope_theta=10000.0,
                        max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False),
}


class StepShape:
    def __init__(self, pairs: int, prompt_len: int, response_len: int):
        self.pairs, self.prompt_len, self.response_len = pairs, prompt_len, response_len

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len

    @property
    def tokens(self) -> int:
        return 2 * self.pairs * self.seq_len

    def as_dict(self) -> dict:
        return dict(pairs=self.pairs, prompt_len=self.prompt_len, response_len=self.response_len, tokens=self.tokens)


def build_model(name: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(MODEL_CONFIGS[name])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        except TypeError:  # transformers < 4.56 spells it torch_dtype
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def make_batch(shape: StepShape, vocab: int, device: torch.device) -> dict:
    """One packed row of 2B sequences; the response positions and their next tokens."""
    gen = torch.Generator(device="cpu").manual_seed(3)
    n_seqs, seq = 2 * shape.pairs, shape.seq_len
    ids = torch.randint(0, vocab, (1, n_seqs * seq), generator=gen)
    pos = torch.arange(seq).repeat(n_seqs)[None]
    # Position t predicts token t+1: scored positions are P-1 .. S-2 of each sequence.
    starts = torch.arange(n_seqs) * seq
    offs = torch.arange(shape.prompt_len - 1, seq - 1)
    score_pos = (starts[:, None] + offs[None, :]).reshape(-1)
    targets = ids[0, score_pos + 1]
    cu = torch.arange(0, n_seqs + 1, dtype=torch.int32) * shape.response_len
    ref_logps = -shape.response_len * (2.0 + torch.rand(n_seqs, generator=gen))  # a reference-logp cache
    return dict(input_ids=ids.to(device), position_ids=pos.to(device), score_pos=score_pos.to(device),
                targets=targets.to(device), cu_seqlens=cu.to(device), ref_logps=ref_logps.to(device),
                counts=torch.full((n_seqs,), float(shape.response_len), device=device))


LOSS = dict(beta=0.1, alpha=1.0, sft_norm="token_mean", loss_type="sigmoid")


def loss_ours(model, b) -> torch.Tensor:
    hidden = model.base_model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                              use_cache=False).last_hidden_state[0]
    head = model.get_output_embeddings()
    return fused_linear_rpo_loss(hidden[b["score_pos"]], head.weight, b["targets"], b["cu_seqlens"], bias=head.bias,
                                 ref_logps=b["ref_logps"], **LOSS).loss


def loss_dense(model, b) -> torch.Tensor:
    logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits[0]
    logps = torch.log_softmax(logits.float(), dim=-1)
    lp = logps[b["score_pos"]].gather(1, b["targets"][:, None]).squeeze(1)
    n_seqs = b["counts"].numel()
    sums = lp.view(n_seqs, -1).sum(1)
    return rpo_loss(sums, b["ref_logps"], b["counts"], **LOSS).loss


LOSSES: dict[str, Callable] = {"ours": loss_ours, "dense": loss_dense}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(name: str, shape: StepShape, device: torch.device, dtype: torch.dtype, emit: Callable[[dict], None],
                *, steps: int = 3, warmup: int = 1, checkpointing: bool = False, log: Callable[[str], None] = print,
                deadline: float | None = None, with_trl: bool = True) -> None:
    """Times `steps` full training steps per provider on one model; emits op="train_step" rows."""
    start = time.perf_counter()
    model = build_model(name, dtype, device)
    n_params = sum(p.numel() for p in model.parameters())
    if checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # in transformers 5.24, not 5.17
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = make_batch(shape, model.config.vocab_size, device)
    log(f"[train {name}] {n_params / 1e9:.2f}B params, {shape.tokens} tokens/step "
        f"({2 * shape.pairs} seqs x {shape.seq_len}), built in {time.perf_counter() - start:.1f}s")
    config = dict(model=name, params=n_params, dtype=str(dtype).replace("torch.", ""), checkpointing=checkpointing,
                  **shape.as_dict())
    for provider, loss_fn in LOSSES.items():
        if deadline is not None and time.monotonic() > deadline:
            log(f"  time budget spent: skipping {provider}")
            continue
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")

        def step():
            loss = loss_fn(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return None

        try:
            for _ in range(warmup):  # allocates the optimizer states
                step()
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                step()
                _sync(device)
                times.append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak_abs = torch.cuda.max_memory_allocated(device)
                peak_extra = peak_abs - base
            else:
                peak_abs = None
                peak_extra = measure_memory(step, device).peak
        except Exception as exc:
            reason = failure_reason(exc)
            log(f"  {provider}: failed ({reason})")
            emit(_row(provider, "failed", "", name, float("nan"), dict(config, reason=reason)))
            times = None
        if times is None:  # after the except block, whose traceback pins the failed step's tensors
            opt.zero_grad(set_to_none=True)
            opt = step = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        _emit_provider(emit, log, provider, name, config, times, shape.tokens, peak_extra, peak_abs)
        opt = step = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    batch = None
    if not with_trl:
        pass
    elif trl_unavailable():
        log(f"  skip trl: {trl_unavailable()}")
    elif deadline is not None and time.monotonic() > deadline:
        log("  time budget spent: skipping trl")
    else:
        try:
            times, peak_extra, peak_abs, tokens = trl_steps(model, shape, device, dtype, steps=steps, warmup=warmup,
                                                            checkpointing=checkpointing)
            _emit_provider(emit, log, "trl", name, dict(config, tokens_trl=tokens), times, shape.tokens, peak_extra,
                           peak_abs)
        except Exception as exc:
            log(f"  trl: failed ({failure_reason(exc, 300)})")
            emit(_row("trl", "failed", "", name, float("nan"), dict(config, reason=failure_reason(exc))))
    model = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def trl_unavailable() -> str | None:
    import importlib.util

    for module in ("trl", "datasets"):
        if importlib.util.find_spec(module) is None:
            return f"{module} not installed"
    return None


def _word_tokenizer(vocab: int):
    """An offline tokenizer whose ids cover the model's vocabulary: word 'w{i}' is token i + 3."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(vocab - 3)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                                                unk_token="<unk>")


def trl_steps(model, shape: StepShape, device: torch.device, dtype: torch.dtype, *, steps: int, warmup: int,
              checkpointing: bool):
    """TRL DPOTrainer with RPO as loss_type=["sigmoid", "sft"] (weights 1, 1; TRL's "sft" is the token-mean
    NLL on chosen), reference log-probs precomputed (TRL's cache, like the other providers), same model,
    same token counts (P prompt + R response words per sequence; TRL appends an EOS to each completion).

    Returns (step times [s], peak extra bytes over a step's start, absolute peak bytes or None, tokens/step).
    """
    import contextlib
    import io
    import tempfile
    import warnings

    import datasets
    import transformers
    import trl

    vocab = model.config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(4)
    words = lambda n: " ".join(f"w{int(i)}" for i in torch.randint(0, vocab - 3, (n,), generator=gen))  # noqa: E731
    n_steps = warmup + steps + (1 if device.type == "cpu" else 0)  # CPU: one more step, profiled for memory
    rows = [{"prompt": words(shape.prompt_len), "chosen": " " + words(shape.response_len),
             "rejected": " " + words(shape.response_len)} for _ in range(shape.pairs * n_steps)]
    timer = _StepTimer(device, warmup, steps)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        args = trl.DPOConfig(
            output_dir=tmp, per_device_train_batch_size=shape.pairs, max_steps=n_steps, learning_rate=1e-6,
            loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0], beta=0.1, precompute_ref_log_probs=True,
            max_length=None, use_cpu=device.type == "cpu", bf16=dtype == torch.bfloat16 and device.type == "cuda",
            gradient_checkpointing=checkpointing, report_to="none", save_strategy="no", logging_steps=10_000,
            seed=0, dataloader_num_workers=0, disable_tqdm=True,
            optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch")
        chatter = io.StringIO()  # TRL's progress bars and the Trainer's final metrics dict
        try:
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                trainer = trl.DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                         processing_class=_word_tokenizer(vocab), callbacks=[timer])
                tokens = sum(len(trainer.train_dataset[i][k]) for i in range(shape.pairs)
                             for k in ("prompt_ids", "chosen_ids", "rejected_ids")
                             if k in trainer.train_dataset.column_names)
                trainer.train()
                del trainer
        except Exception as exc:
            raise RuntimeError(f"{type(exc).__name__}: {exc} | TRL output tail: {chatter.getvalue()[-300:]}") from exc
    gc.collect()
    return timer.times, timer.peak_extra, timer.peak_abs, tokens


class _StepTimer:
    """Trainer callback: times steps warmup..warmup+steps-1; the memory peak over those steps (GPU) or over
    one extra profiled step (CPU)."""

    def __new__(cls, *args, **kwargs):
        import transformers

        class Timer(transformers.TrainerCallback):
            def __init__(self, device, warmup, steps):
                self.device, self.warmup, self.steps = device, warmup, steps
                self.times, self.peak_extra, self.peak_abs, self._prof = [], 0, None, None
                self._base = 0

            def on_step_begin(self, args, state, control, **kw):
                _sync(self.device)
                step = state.global_step
                if self.device.type == "cuda" and step == self.warmup:
                    torch.cuda.reset_peak_memory_stats(self.device)
                    self._base = torch.cuda.memory_allocated(self.device)
                if self.device.type == "cpu" and step == self.warmup + self.steps:
                    from torch.profiler import ProfilerActivity, profile

                    self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
                    # The profiler warns on fd 2 whenever a block allocated before it started is freed.
                    self._quiet = quiet_stderr()
                    self._quiet.__enter__()
                    self._prof.start()
                self._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                _sync(self.device)
                elapsed = time.perf_counter() - self._t0
                step = state.global_step - 1  # already incremented
                if self.warmup <= step < self.warmup + self.steps:
                    self.times.append(elapsed)
                if self.device.type == "cuda" and step == self.warmup + self.steps - 1:
                    self.peak_abs = torch.cuda.max_memory_allocated(self.device)
                    self.peak_extra = self.peak_abs - self._base
                if self._prof is not None:
                    from .memory import peak_of

                    self._prof.stop()
                    self._quiet.__exit__(None, None, None)
                    events = sorted((e.start_ns(), e.nbytes()) for e in self._prof.profiler.kineto_results.events()
                                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
                    self.peak_extra = peak_of(events).peak
                    self._prof = None

        return Timer(*args, **kwargs)


def _emit_provider(emit, log, provider, model, config, times, tokens, peak_extra, peak_abs) -> None:
    q = quantiles(times)
    tok = quantiles([tokens / t for t in times])
    emit(_row(provider, "step_time", "s", model, q, config))
    emit(_row(provider, "tokens_per_s", "tok/s", model, tok, config))
    emit(_row(provider, "peak_step_extra", "bytes", model, float(peak_extra), config))
    if peak_abs is not None:
        emit(_row(provider, "peak_mem", "bytes", model, float(peak_abs), config))
    log(f"  {provider:6s} {q.p50 * 1e3:9.1f} ms/step  {tok.p50:10.0f} tok/s  peak step extra "
        f"{peak_extra / 2**20:9.1f} MiB" + (f"  peak {peak_abs / 2**30:.1f} GiB" if peak_abs else ""))


def _row(provider, metric, unit, model, q, config) -> dict:
    if isinstance(q, float):
        p50 = p20 = p80 = q
    else:
        p50, p20, p80 = q.p50, q.p20, q.p80
    return dict(op="train_step", provider=provider, mode="full", metric=metric, unit=unit, x_name="model",
                x_value=model, p50=p50, p20=p20, p80=p80, config=json.dumps(config))
