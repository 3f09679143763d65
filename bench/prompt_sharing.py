"""Shared-prompt packing vs two full sequences per pair: training-step tokens/s, interleaved in one process.

    python -m bench.prompt_sharing [--steps 4] [--threads 2] [--cases demo,ultrafeedback] [--out FILE.json]

Each step is the trainer's own (rpo_fast.trainer.run_step): pack the micro-batch, the reference forward
(LoRA adapter off), the policy forward, fused head and loss, backward, then AdamW; SmolLM2-135M-Instruct
as `make demo` loads it (configs/demo.yaml: LoRA r=16 on every linear layer, fp32). Both layouts count the
unshared tokens (both full sequences of every pair), so tokens/s compares the same work. The two layouts
alternate step by step on the same micro-batches (the order flips every step), after one warm-up step each,
and the ratio is taken from the medians, so load from other processes hits both alike.

Cases:
    demo            the embedded data (data/train.jsonl) packed as the demo packs it (token_budget 2048,
                    8 pairs per micro-batch): prompt ~45, responses ~11 tokens. Goal: >= 1.5x.
    ultrafeedback   synthetic pairs with UltraFeedback-like lengths (prompt ~160, chosen ~300, rejected ~250
                    tokens, +-25%, random token ids), 2 pairs per micro-batch. Goal: >= 1.15x.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch

from bench import env
from rpo_fast import modeling
from rpo_fast.config import load_config
from rpo_fast.data import PreferenceExample
from rpo_fast.packing import batch_by_token_budget
from rpo_fast.trainer import Reference, TrainHooks, build_optimizer, finish_policy, load_examples, make_accelerator
from rpo_fast.trainer import run_step

GOALS = {"demo": 1.5, "ultrafeedback": 1.15}


def ultrafeedback_like(n: int, vocab: int, seed: int = 0) -> list[PreferenceExample]:
    rng = random.Random(seed)

    def ids(mean: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(rng.randint(int(mean * 0.75), int(mean * 1.25)))]

    return [PreferenceExample(ids(160), ids(300), ids(250), k) for k in range(n)]


def micro_batches(case: str, config, tokenizer, steps: int) -> list[list[PreferenceExample]]:
    if case == "demo":
        _, examples = load_examples(config.train_file, tokenizer, config, log=lambda *a: None)
        groups = batch_by_token_budget(examples, config.token_budget, max_pairs=config.max_pairs_per_micro_batch,
                                       shuffle=True, seed=config.seed, epoch=0)
    else:
        examples = ultrafeedback_like(2 * steps, len(tokenizer))
        groups = [[2 * k, 2 * k + 1] for k in range(steps)]
    return [[examples[i] for i in g] for g in groups[:steps]]


def measure(case: str, steps: int) -> dict:
    config = load_config("configs/demo.yaml", {"progress": False, "eval_file": None, "gold_eval_samples": 0})
    accelerator = make_accelerator(config)
    tokenizer = modeling.load_tokenizer(config.model, config.gguf_file)
    batches = micro_batches(case, config, tokenizer, steps + 1)
    policy = finish_policy(modeling.load_causal_lm(config.model, config.gguf_file, dtype=config.dtype), config)
    assert modeling.shared_prompt_unsupported(policy) is None
    model = modeling.PackedRPOModel(policy, beta=config.beta, alpha=config.alpha, sft_norm=config.sft_norm,
                                    loss_type=config.loss_type, impl=config.impl)
    optimizer, _ = build_optimizer(model, config, steps + 1)
    model, optimizer = accelerator.prepare(model, optimizer)
    reference = Reference("adapter", policy=policy, wrapped=model)  # through the prepared model, as in the trainer
    configs = {share: load_config("configs/demo.yaml", {"share_prompt": share}) for share in (True, False)}

    times: dict[bool, list[float]] = {True: [], False: []}
    tokens: dict[bool, list[int]] = {True: [], False: []}
    for k, group in enumerate(batches):
        examples = group
        for share in ((True, False) if k % 2 == 0 else (False, True)):
            start = time.perf_counter()
            _, n_tokens, _ = run_step(model, reference, examples, [list(range(len(examples)))], accelerator,
                                      configs[share], k + 1, TrainHooks())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - start
            print(f"  {case} step {k} ({'warm-up' if k == 0 else 'timed'}), {'shared' if share else 'unshared'}: "
                  f"{n_tokens} tokens in {elapsed:.2f} s", flush=True)
            if k > 0:  # step 0 warms up both layouts
                times[share].append(elapsed)
                tokens[share].append(n_tokens)
    assert tokens[True] == tokens[False]
    pair_tokens = [sum(ex.num_tokens for ex in g) for g in batches[1:]]
    shared_tokens = [sum(len(ex.prompt_ids) + len(ex.chosen_ids) + len(ex.rejected_ids) for ex in g)
                     for g in batches[1:]]
    rate = {share: sum(tokens[share]) / sum(times[share]) for share in (True, False)}
    median = {share: statistics.median(n / t for n, t in zip(tokens[share], times[share])) for share in (True, False)}
    return {"case": case, "steps": steps, "pairs_per_step": statistics.mean(len(g) for g in batches[1:]),
            "unshared_tokens_per_step": statistics.mean(pair_tokens),
            "shared_tokens_per_step": statistics.mean(shared_tokens),
            "tokens_per_s_shared": rate[True], "tokens_per_s_unshared": rate[False],
            "median_tokens_per_s_shared": median[True], "median_tokens_per_s_unshared": median[False],
            "speedup": median[True] / median[False], "goal": GOALS[case],
            "step_s_shared": times[True], "step_s_unshared": times[False]}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per layout and case (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a busy machine)")
    parser.add_argument("--cases", default="demo,ultrafeedback")
    parser.add_argument("--out", default=None, help="also write the results as JSON here, with the run's meta")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # make_accelerator's choice
    meta = dict(device=env.device_name(device), timestamp=env.timestamp(), commit=env.git_sha(),
                versions=env.versions(), threads=args.threads, steps=args.steps,
                command="python -m bench.prompt_sharing " + " ".join(argv if argv is not None else sys.argv[1:]))
    results = []
    for case in args.cases.split(","):
        r = measure(case, args.steps)
        results.append(r)
        print(f"{case}: {r['pairs_per_step']:.1f} pairs/step, {r['unshared_tokens_per_step']:.0f} tokens unshared -> "
              f"{r['shared_tokens_per_step']:.0f} packed; tokens/s (unshared count, median of {args.steps} steps) "
              f"shared {r['median_tokens_per_s_shared']:.0f}, unshared {r['median_tokens_per_s_unshared']:.0f}: "
              f"{r['speedup']:.2f}x (goal >= {r['goal']}x)", flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(dict(meta=meta, rows=results), f, indent=1)
    return results


if __name__ == "__main__":
    main()
