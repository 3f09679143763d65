"""Mutation check: does the correctness matrix catch realistic bugs? Not run by CI (a few minutes).

    .venv/bin/python tools/mutation_check.py                  # every mutation, each against its test files
    .venv/bin/python tools/mutation_check.py -k ipo smoothing  # mutations whose name contains any word
    .venv/bin/python tools/mutation_check.py --all-files tests/test_numerical_edges.py   # these files, each run

The repository's tracked and untracked (not ignored) files are copied once to a scratch folder, with
`kernels/` also placed at `rpo_fast/kernels/` there (the editable install maps `rpo_fast.kernels` to the
worktree's `kernels/`; the copy must import its own). Each mutation replaces exact snippets of one file in
that copy, runs the test files from the copy's root with this interpreter (`python -m pytest -x`, one
process, TRITON_INTERPRET=1 OMP_NUM_THREADS=1), then restores the file. Before anything runs, the copy's
`rpo_fast` and `rpo_fast.kernels` are checked to be the ones imported.

A mutation runs its own test files, named beside it (the loss/head matrix for the loss, head and kernel code;
the packing, attention, data, trainer, integration, optimizer or memory-plan files for the rest), or the files
named on the command line.
Files run in order and, unless --all-files, stop at the first that fails: the table says which file and
test caught each mutation, "NOT CAUGHT", or "not applicable" when a snippet is no longer in the code (update
the list after changing that code). Exit status 1 if any applicable mutation was not caught.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MATRIX = ("tests/test_rpo_loss.py", "tests/test_linear_logprobs.py", "tests/test_head_backward.py")
# The integrations (about 15, 10, 15, 30 and 30 s).
INTEGRATIONS = ("tests/test_rpo_loss_module.py", "tests/test_liger_parity.py", "tests/test_liger_swap.py",
                "tests/test_padded.py", "tests/test_integrations_hf.py", "tests/test_integrations_trl.py")
DATA = ("tests/test_data.py", "tests/test_hostile_data.py")
MEMORY = ("tests/test_optim.py", "tests/test_memory_plan.py")
ROW_TESTS = ("tests/test_logit_grad_kernel.py",) + MATRIX  # the fwdgrad row kernels
# The trainer's pipeline, cheapest first (about 15, 15, 15, 20 and 60 s).
PIPELINE = ("tests/test_packing.py", "tests/test_prompt_sharing.py", "tests/test_attention.py", "tests/test_data.py",
            "tests/test_trainer.py")
ENV = {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    edits: tuple[tuple[str, str], ...]  # (exact old snippet, replacement), each old snippet unique in the file
    description: str
    tests: tuple[str, ...] = MATRIX  # test files to run, in order, unless the command line names others


LOSS, CHUNKED, FWDGRAD = "rpo_fast/loss.py", "rpo_fast/chunked.py", "rpo_fast/fwdgrad.py"
ROW_PASSES = "rpo_fast/row_passes.py"
FWD_KERNEL, BWD_KERNEL = "kernels/linear_logprobs_fwd.py", "kernels/linear_logprobs_bwd.py"
TILES, ROW_KERNELS, TRAINER = "kernels/tiles.py", "kernels/logit_grad.py", "rpo_fast/trainer.py"
RESUME = "rpo_fast/resume.py"
MODEL_HEAD = "rpo_fast/integrations/_model.py"
OPTIM = "rpo_fast/optim.py"
SEGMENTS = "rpo_fast/segments.py"
MUTATIONS = [
    # The preference term.
    Mutation("smoothing_dropped", LOSS, ((
        "return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)",
        "return -F.logsigmoid(z)"),), "cDPO label smoothing ignored"),
    Mutation("smoothing_sign", LOSS, ((
        "- label_smoothing * F.logsigmoid(-z)", "+ label_smoothing * F.logsigmoid(-z)"),),
        "cDPO's second term added with the wrong sign"),
    Mutation("smoothing_swapped", LOSS, ((
        "return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)",
        "return -label_smoothing * F.logsigmoid(z) - (1 - label_smoothing) * F.logsigmoid(-z)"),),
        "cDPO's two weights swapped (invisible at label_smoothing 0.5)"),
    Mutation("ipo_no_inverse_beta", LOSS, ((
        "return (z / beta - 1 / (2 * beta)) ** 2", "return (z - 1 / 2) ** 2"),), "IPO without its 1/beta"),
    Mutation("ipo_summed_logps", LOSS, ((
        'return average_log_prob or loss_type == "ipo"', "return average_log_prob"),),
        "IPO on summed instead of per-token-averaged log-probs"),
    Mutation("hinge_margin", LOSS, (("return torch.relu(1 - z)", "return torch.relu(-z)"),),
             "hinge without its margin of 1"),
    Mutation("avg_logp_policy_only", LOSS, ((
        "logratios = (policy - ref) / scale", "logratios = policy / scale - ref"),),
        "average_log_prob applied to the policy but not the reference"),
    Mutation("swapped_chosen_rejected", LOSS, ((
        "z = beta * (logratios[:n_pairs] - logratios[n_pairs:])",
        "z = beta * (logratios[n_pairs:] - logratios[:n_pairs])"),), "chosen and rejected swapped in z"),
    Mutation("pairs_summed", LOSS, ((
        "pref_loss = preference_losses(z, beta, loss_type, label_smoothing).mean()",
        "pref_loss = preference_losses(z, beta, loss_type, label_smoothing).sum()"),),
        "preference term summed over pairs instead of averaged"),
    Mutation("rewards_without_beta", LOSS, ((
        "rewards = (beta * logratios).detach()", "rewards = logratios.detach()"),), "rewards missing beta"),
    Mutation("reference_not_detached", LOSS, ((
        "ref = torch.zeros_like(policy) if ref_logps is None else ref_logps.detach().float()",
        "ref = torch.zeros_like(policy) if ref_logps is None else ref_logps.float()"),),
        "gradient flows into given reference log-probs"),
    # The SFT term.
    Mutation("seq_mean_wrong_count", LOSS, ((
        "if empty_ok else chosen_counts)).mean()", "if empty_ok else chosen_counts).float().mean()).mean()"),),
        "seq_mean divides every sequence by the mean count"),
    Mutation("token_mean_per_sequence", LOSS, ((
        "return -chosen_logps.sum() / (total.clamp(min=1) if empty_ok else total)",
        "return -(chosen_logps / chosen_counts.clamp(min=1)).mean()"),),
        "token_mean computed as a mean of per-sequence means"),
    Mutation("sum_norm_summed", LOSS, (("return -chosen_logps.mean()", "return -chosen_logps.sum()"),),
             'sft_norm="sum" summed over pairs instead of averaged'),
    Mutation("nll_on_rejected", LOSS, ((
        "nll = sft_nll(policy[:n_pairs], counts[:n_pairs], sft_norm)",
        "nll = sft_nll(policy[n_pairs:], counts[n_pairs:], sft_norm)"),), "SFT term on the rejected responses"),
    Mutation("alpha_dropped", LOSS, ((
        "loss=pair_weight * pref_loss + nll_weight * alpha * nll if alpha",
        "loss=pair_weight * pref_loss + nll_weight * nll if alpha"),),
        "alpha not applied to the NLL"),
    # Counting and summing.
    Mutation("counts_include_ignored", LOSS, ((
        "counts = segment_sum((targets != ignore_index).float(), lengths)", "counts = lengths.float()"),),
        "token counts include ignored tokens"),
    Mutation("segments_shifted", SEGMENTS, ((
        "lengths.to(values.device))", "lengths.roll(1).to(values.device))"),),
        "segment_sum uses the wrong sequence boundaries"),
    Mutation("segment_sums_in_fp32", SEGMENTS, ((
        "torch.zeros(size, dtype=torch.float64", "torch.zeros(size, dtype=torch.float32"),
        ("values.double()).float()", "values.float())")),
        "per-sequence sums accumulated one token at a time in fp32", ("tests/test_numerical_edges.py",)),
    # The chunked head.
    Mutation("ignored_logprob_kept", CHUNKED, (("return lp.masked_fill_(ignored, 0.0), lse", "return lp, lse"),),
             "log-probs of ignored targets not zeroed"),
    Mutation("ignored_tokens_get_gradient", CHUNKED, ((
        "g = grad_lp.float().masked_fill(ignored, 0.0)", "g = grad_lp.float()"),),
        "ignored positions pass gradient"),
    Mutation("lse_off_by_constant", CHUNKED, ((
        ".sub_(lse[rows, None])", ".sub_(lse[rows, None] - 1e-3)"),),
        "the backward's recomputed softmax uses lse off by 1e-3"),
    Mutation("dw_accumulated_in_input_dtype", CHUNKED, (
        ("grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_dw else None",
         "grad_weight = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device) if want_dw else None"),
        ("addmm_f32_(grad_weight, dlogits.T, h)",
         "grad_weight.addmm_(dlogits.T.to(weight.dtype), hidden[rows])")),
        "the weight gradient accumulated across chunks in bf16/fp16"),
    Mutation("bias_gradient_dropped", CHUNKED, (("grad_bias.addmv_(probs.T, neg_g)", "grad_bias.add_(0)"),),
             "bias gradient left at zero"),
    Mutation("unrequested_dhidden", CHUNKED, ((
        "want_dh, want_dw, want_db = needs_grad", "want_dh, want_dw, want_db = True, needs_grad[1], needs_grad[2]"),),
        "dhidden computed though not requested"),
    Mutation("onehot_missing", CHUNKED, ((
        "probs.scatter_add_(1, cols[:, None], minus_one)", "pass"),),
        "the target's one-hot left out of the gradient"),
    # The forward-time-gradient head (fused_linear_rpo_loss's default wherever a gradient is needed).
    Mutation("fwdgrad_onehot_missing", ROW_PASSES, ((
        "probs.scatter_add_(1, targets.masked_fill(~counted, 0)[:, None], g[:, None])  # + g * onehot", "pass"),),
        "fwdgrad: the target's one-hot left out of the gradient"),
    Mutation("fwdgrad_ignored_tokens_get_gradient", ROW_PASSES, ((
        "g = g.float().masked_fill(~counted, 0.0)", "g = g.float()"),),
        "fwdgrad: tokens with ignored targets get their sequence's gradient"),
    Mutation("fwdgrad_bias_gradient_dropped", FWDGRAD, ((
        "db32 += dlogits.sum(0)\n", "db32 += 0\n"),), "fwdgrad: bias gradient left at zero"),
    Mutation("fwdgrad_bias_gradient_of_half_dlogits", FWDGRAD, ((
        "db32 += dlogits.sum(0)\n                dlogits = dlogits.to(op_dtype)",
        "dlogits = dlogits.to(op_dtype)\n                db32 += dlogits.sum(0, dtype=torch.float32)"),),
        "fwdgrad on CUDA: the bias gradient summed from the bf16/fp16 dlogits, not before their cast",
        ("tests/test_cuda_branches.py",)),
    Mutation("fp16_auto_takes_fwdgrad", LOSS, ((
        "and dtype != torch.float16 else", "else"),),
        "backward='auto' forms fp16 gradients in forward, before a loss scale can reach them"),
    Mutation("fwdgrad_lse_off_by_constant", ROW_PASSES, ((
        "lse = row_max + row_sum.log()", "lse = row_max + row_sum.log() - 0.01"),),
        "fwdgrad: log-probs from a logsumexp off by 0.01"),
    Mutation("fwdgrad_softmax_unnormalized", ROW_PASSES, ((
        "block.div_(row_sum[rows, None])", "pass"),),
        "fwdgrad: the gradient from exp(logits - max), not normalized to the softmax"),
    Mutation("fwdgrad_recomputed_piece_raw_logits", ROW_PASSES, ((
        "return RowPasses(row_logprobs_to_probs_, logit_grad_from_probs_, softmax_from_lse_)",
        "return RowPasses(row_logprobs_to_probs_, logit_grad_from_probs_, _logits_stay)"),),
        "fwdgrad: a recomputed piece of a long pair handed to the torch gradient pass as raw logits"),
    Mutation("fwdgrad_recomputed_piece_probabilities_to_kernel", ROW_PASSES, ((
        "return RowPasses(kernels.row_logprobs, kernels.logit_grad_, _logits_stay)",
        "return RowPasses(kernels.row_logprobs, kernels.logit_grad_, softmax_from_lse_)"),),
        "fwdgrad: a recomputed piece handed to the Triton gradient kernel (which reads logits) as probabilities"),
    Mutation("fwdgrad_recomputed_piece_lse_of_another_piece", FWDGRAD, ((
        "logits = passes.reload_(gemm.logits_f32(h[piece], w_op, b32), lse[piece])",
        "logits = passes.reload_(gemm.logits_f32(h[piece], w_op, b32), lse[:piece.stop - piece.start])"),),
        "fwdgrad: a recomputed piece normalized with the first piece's logsumexps"),
    Mutation("fwdgrad_grad_output_ignored", FWDGRAD, ((
        "scale = float(grad_output)", "scale = 1.0"),),
        "fwdgrad: the stored gradients are not scaled by the loss's upstream gradient"),
    Mutation("fwdgrad_grad_output_rounded_to_half", FWDGRAD, ((
        "g if scale == 1.0 else g * scale for g", "g if scale == 1.0 else g * grad_output.to(g.dtype) for g"),),
        "fwdgrad: bf16 gradients scaled by grad_output rounded to bf16 (1/3 -> 0.333984)"),
    Mutation("fwdgrad_empty_chunk_not_skipped", FWDGRAD, ((
        "        if not chunk.rows:  # pairs with no response tokens", "        if False:  # pairs with no response tokens"),),
        "fwdgrad: a chunk of pairs with no rows reaches torch.cat([])"),
    # The Triton kernels (run in the interpreter).
    Mutation("triton_ignored_gradient", BWD_KERNEL, ((
        "g = tl.where(targets == ignore_index, 0.0, g)", "g = g"),),
        "Triton backward: ignored positions pass gradient"),
    Mutation("triton_last_group_of_blocks", BWD_KERNEL, (
        ("pid_n = first_n + (pid % per_group) % group_rows", "pid_n = first_n + (pid % per_group) % GROUP_N"),
        ("pid_v = (pid % per_group) // group_rows", "pid_v = (pid % per_group) // GROUP_N")),
        "Triton backward: the grouped order assumes every group has GROUP_N token blocks (the last may not)"),
    Mutation("triton_running_sum_not_rescaled", FWD_KERNEL, ((
        "sumexp = sumexp * tl.exp(m - m_safe) + tl.sum(tl.exp(logits - m_safe[:, None]), axis=1)",
        "sumexp = sumexp + tl.sum(tl.exp(logits - m_safe[:, None]), axis=1)"),),
        "Triton forward: the online logsumexp does not rescale its running sum when the max grows"),
    Mutation("triton_target_from_first_split", FWD_KERNEL, ((
        "tgt_part.sum(0) - lse", "tgt_part[0] - lse"),),
        "Triton forward: the target logit taken from the first vocabulary split only"),
    Mutation("triton_padded_columns_kept", TILES, ((
        'return tl.where(col_in[None, :], acc, float("-inf"))', "return acc"),),
        "Triton logit tile: columns past V enter the logsumexp as logits of 0"),
    Mutation("triton_ragged_hidden_unmasked", TILES, ((
        "k_in = ks < H - h0", "k_in = ks < H"),),
        "Triton logit tile: the last hidden tile of a ragged H reads past the row"),
    Mutation("triton_row_sum_not_rescaled", ROW_KERNELS, ((
        "sumexp = sumexp * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)",
        "sumexp = sumexp + tl.sum(tl.exp(x - m_safe), axis=0)"),),
        "Triton row log-probs (fwdgrad): the online logsumexp does not rescale its running sum",
        ROW_TESTS),
    Mutation("triton_row_logprob_at_ignored", ROW_KERNELS, ((
        "tl.where(target != ignore_index, target_logit - lse, 0.0)", "target_logit - lse"),),
        "Triton row log-probs (fwdgrad): an ignored target reports -lse instead of 0",
        ROW_TESTS),
    Mutation("triton_logit_grad_at_ignored", ROW_KERNELS, ((
        "g = tl.where(target == ignore_index, 0.0, g)", "g = g"),),
        "Triton logit gradient (fwdgrad): a row whose target is ignored keeps its g",
        ROW_TESTS),
    Mutation("triton_logit_grad_onehot_missing", ROW_KERNELS, ((
        "onehot = tl.where(v0 + cols == target, 1.0, 0.0)", "onehot = tl.where(v0 + cols == target, 0.0, 0.0)"),),
        "Triton logit gradient (fwdgrad): dlogits = -g * softmax, without the target's one-hot",
        ROW_TESTS),
    # The trainer's pipeline: packing, shared-prompt attention, truncation, reference cache, micro-batch weights.
    Mutation("packed_row_is_the_target", "rpo_fast/packing.py", ((
        "+ prompt_lengths[seq_of_row] - 1 + row_in_seq", "+ prompt_lengths[seq_of_row] + row_in_seq"),),
        "packing: a response token predicted from its own position instead of the one before", PIPELINE),
    Mutation("shared_first_row_not_the_prompt", "rpo_fast/packing.py", ((
        "rows[kind].append([prompt[-1]] + own[:-1])", "rows[kind].append(own)"),),
        "shared prompt: each response token predicted from its own position", PIPELINE),
    Mutation("shared_positions_restart", "rpo_fast/packing.py", ((
        "positions += range(n_prompt, n_prompt + len(response))", "positions += range(len(response))"),),
        "shared prompt: response positions restart at 0 instead of going on from the prompt", PIPELINE),
    Mutation("shared_rejected_sees_chosen", "rpo_fast/packing.py", ((
        "keys += prompt + own", "keys += list(range(start, first + len(response)))"),),
        "shared prompt: the rejected response attends to the chosen one (everything before it in the pair)",
        PIPELINE),
    Mutation("attention_causality_top_left", "rpo_fast/attention.py", ((
        "torch.arange(n_q, device=device)[:, None] + (n_k - n_q) - torch.arange",
        "torch.arange(n_q, device=device)[:, None] - torch.arange"),),
        "attention: a response's causal mask aligned top-left (it does not see the prompt's end)", PIPELINE),
    Mutation("attention_window_one_wider", "rpo_fast/attention.py", ((
        "mask &= distance < sliding_window", "mask &= distance <= sliding_window"),),
        "attention: the sliding window keeps one key too many", PIPELINE),
    Mutation("prompt_right_truncated", "rpo_fast/data.py", ((
        "prompt_ids = prompt_ids[-max_prompt_length:]", "prompt_ids = prompt_ids[:max_prompt_length]"),),
        "data: the prompt keeps its beginning instead of its end (next to the response)", PIPELINE),
    Mutation("plain_responses_without_eos", "rpo_fast/data.py", ((
        "return ids if eos is None or ids[-1:] == [eos] else ids + [eos]", "return ids"),),
        "data: plain-text responses without the EOS TRL appends (the model never learns to stop)", DATA),
    Mutation("template_prompt_not_cut_to_common_prefix", "rpo_fast/data.py", ((
        "prompt_text = _common_prefix(prompt_text, *full_texts)", "pass"),),
        "data: a generation prompt the full rendering lacks (DeepSeek-R1's <think>) stays in the prompt", DATA),
    Mutation("response_budget_ignores_prompt", "rpo_fast/data.py", ((
        "budget = max(max_length - len(prompt_ids), 0)", "budget = max_length"),),
        "data: responses cut to max_length instead of max_length minus the prompt", DATA),
    Mutation("template_prefix_from_chosen_only", "rpo_fast/data.py", ((
        "prompt_text = _common_prefix(prompt_text, *full_texts)",
        "prompt_text = _common_prefix(prompt_text, full_texts[0])"),),
        "data: prompt cut to the prefix shared with the chosen rendering only (rejected loses its start)", DATA),
    Mutation("gold_joins_any_digit_groups", "rpo_fast/gold.py", ((
        r'_THOUSANDS_SEPARATOR = re.compile(r"(?<=\d)[, ](?=\d{3}(?!\d))")',
        r'_THOUSANDS_SEPARATOR = re.compile(r"(?<=\d)[, ](?=\d)")'),),
        "gold: '8 5' graded as 85", DATA),
    Mutation("gold_words_read_beside_digits", "rpo_fast/gold.py", ((
        "    if not re.search(r\"\\d\", segment):\n        segment = _NUMBER_WORD",
        "    if True:\n        segment = _NUMBER_WORD"),),
        "gold: number words read even when the answer text has digits", DATA),
    Mutation("data_fingerprint_without_rejected", "rpo_fast/ref_cache.py", ((
        "ex.chosen_ids.tolist(),\n                            ex.rejected_ids.tolist()))",
        "ex.chosen_ids.tolist()))"),),
        "reference cache: the key ignores the rejected responses (a stale cache is used)", PIPELINE[-1:]),
    Mutation("model_fingerprint_without_values", "rpo_fast/ref_cache.py", ((
        'digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")',
        "pass"),), "reference cache: the key hashes names and shapes, not the weights", PIPELINE[-1:]),
    Mutation("reference_cache_interleaved", "rpo_fast/ref_cache.py", ((
        "torch.cat([picked[:, 0], picked[:, 1]])", "picked.reshape(-1)"),),
        "reference cache: a batch's log-probs interleaved (c0 r0 c1 r1) instead of chosen first", PIPELINE),
    Mutation("micro_batches_weighted_equally", TRAINER, ((
        "pair_weight=batch.n_pairs * world / step_pairs", "pair_weight=world / len(step_groups)"),),
        "trainer: gradient accumulation averages micro-batch means (unequal micro-batches mis-weighted)",
        PIPELINE[-1:]),
    Mutation("token_mean_nll_per_pair", TRAINER, ((
        "return total_pairs * chosen_tokens / total_chosen_tokens", "return None"),),
        "trainer: sft_norm=token_mean weights a micro-batch's NLL by its pairs, not its chosen tokens",
        PIPELINE[-1:]),
    Mutation("trainer_token_mean_counts_rejected", TRAINER, ((
        "step_chosen_tokens = sum(len(examples[i].chosen_ids) for g in step_groups for i in g)",
        "step_chosen_tokens = sum(len(examples[i].chosen_ids) + len(examples[i].rejected_ids) "
        "for g in step_groups for i in g)"),),
        "trainer: the token_mean NLL normalizer counts the rejected tokens too (alpha effectively halved)",
        PIPELINE[-1:]),
    Mutation("resume_rng_not_restored", RESUME, ((
        'checkpoint.set_rng_state(checkpoint.load_torch(rng if rng.exists() else directory / "rng-rank0.pt"))',
        "pass"),), "resume: the RNG states (dropout) start from the seed, not where the run stopped",
        ("tests/test_checkpoint.py",)),
    Mutation("reference_head_bias_dropped", "rpo_fast/modeling.py", ((
        "return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)",
        "return hidden.to(dtype), weight.to(dtype), None"),),
        "reference: the frozen reference's LM-head bias dropped (ref log-probs of biased heads wrong)",
        PIPELINE[-1:]),
    Mutation("every_epoch_planned_as_epoch_0", TRAINER, ((
        "plan, plan_epoch = epoch_steps(train_examples, config, state.epoch, world), state.epoch",
        "plan, plan_epoch = epoch_steps(train_examples, config, 0, world), state.epoch"),),
        "trainer: every epoch replays epoch 0's shuffle (the same pairs left over each epoch)", PIPELINE[-1:]),
    Mutation("eval_token_mean_total_wrong", TRAINER, ((
        "    chosen_tokens = sum(len(ex.chosen_ids) for ex in examples)\n    world = accelerator.num_processes",
        "    chosen_tokens = sum(len(ex.chosen_ids) for ex in examples[:1])\n    world = accelerator.num_processes"),),
        "evaluate: token_mean eval/nll normalized by another total (scaled uniformly)", PIPELINE[-1:]),
    Mutation("window_dropped_one_early", "rpo_fast/attention.py", ((
        "if sliding_window is not None and max_k <= sliding_window:",
        "if sliding_window is not None and max_k <= sliding_window + 1:"),),
        "attention: a sliding window that masks exactly one key is dropped", ("tests/test_attention.py",)),
    Mutation("token_budget_resume_free", "rpo_fast/run_dir.py", ((
        '"resume", "overwrite", "output_dir",  # how this invocation was asked for',
        '"resume", "overwrite", "output_dir", "token_budget",  # how this invocation was asked for'),),
        "resume: another token_budget (another batch plan) accepted", ("tests/test_run_folder.py",)),
    Mutation("final_eval_twice", TRAINER, ((
        "state.step % config.eval_every == 0 and state.step < steps:",
        "state.step % config.eval_every == 0 and state.step <= steps:"),),
        "trainer: the final step evaluated twice (a duplicate eval record)", PIPELINE[-1:]),
    Mutation("reference_cache_with_dropout", "rpo_fast/ref_cache.py", ((
        "model.eval()  # no dropout in the reference", "pass"),),
        "ref cache: reference log-probs computed with dropout on", PIPELINE[-1:]),
    Mutation("python_rng_not_restored", "rpo_fast/checkpoint.py", (('random.setstate(state["python"])', "pass"),),
        "resume: Python's RNG not restored (hooks diverge)", ("tests/test_checkpoint.py",)),
    Mutation("numpy_rng_not_restored", "rpo_fast/checkpoint.py", (('np.random.set_state(state["numpy"])', "pass"),),
        "resume: numpy's RNG not restored", ("tests/test_checkpoint.py",)),
    Mutation("resume_scheduler_not_restored", RESUME, ((
        'scheduler.load_state_dict(checkpoint.load_torch(directory / "scheduler.pt"))', "pass"),),
        "resume: the learning-rate schedule restarts from its warmup", ("tests/test_checkpoint.py",)),
    # The low-precision optimizer and the logged metrics.
    Mutation("adamw_no_bias_correction2", OPTIM, ((
        "v32.sqrt().div_(bias_correction2_sqrt)", "v32.sqrt()"),),
        "low-precision AdamW: the second moment's bias correction left out", ("tests/test_optim.py",)),
    Mutation("adamw_decay_without_lr", OPTIM, ((
        "w32.mul_(1 - lr * weight_decay)", "w32.mul_(1 - weight_decay)"),),
        "low-precision AdamW: weight decay not scaled by the learning rate", ("tests/test_optim.py",)),
    Mutation("kahan_compensation_ignored", OPTIM, ((
        "w32.add_(comp.float())", "w32.add_(0)"),),
        "low-precision AdamW: the Kahan compensation not added back", ("tests/test_optim.py",)),
    Mutation("stochastic_rounding_biased", OPTIM, ((
        "bits = torch.randint(0, 1 << 16, x.shape", "bits = torch.randint(0, 1 << 15, x.shape"),),
        "stochastic rounding: noise over half the dropped bits (rounds down too often)", ("tests/test_optim.py",)),
    Mutation("nearest_rounding_ties_up", OPTIM, ((
        "bits.add(lsb).add_(0x7FFF)", "bits.add(0x8000)"),),
        "nearest bf16 rounding: ties away from zero instead of to even", ("tests/test_optim.py",)),
    Mutation("bf16_states_cast_on_load", OPTIM, ((
        "                if name in BF16_STATES:", "                if False:"),),
        "low-precision AdamW: a loaded state dict leaves its states in the parameters' dtype (fp16: underflow)",
        ("tests/test_optim.py",)),
    Mutation("accuracy_counts_ties", "rpo_fast/metrics.py", ((
        "(c > r).double().sum()", "(c >= r).double().sum()"),),
        "metrics: a pair with equal rewards counted as ranked right (accuracy 1 before any training)",
        ("tests/test_metrics.py",) + PIPELINE[-1:]),
    Mutation("logged_nll_weighted_by_pairs", "rpo_fast/metrics.py", ((
        "nll * nll_pairs, c.sum()", "nll * n_pairs, c.sum()"),),
        "metrics: the logged token_mean NLL averages micro-batch means", ("tests/test_metrics.py",) + PIPELINE[-1:]),
    Mutation("logged_rejected_logps_from_chosen", "rpo_fast/metrics.py", ((
        "out.rejected_logps.detach().double().sum()]", "out.chosen_logps.detach().double().sum()]"),),
        "metrics: logps/rejected summed from the chosen half", ("tests/test_metrics.py",) + PIPELINE[-1:]),
    Mutation("logged_rewards_swapped", "rpo_fast/metrics.py", ((
        "c.sum(), r.sum(), (c - r).sum()", "r.sum(), c.sum(), (c - r).sum()"),),
        "metrics: rewards/chosen and rewards/rejected swapped", ("tests/test_metrics.py",) + PIPELINE[-1:]),
    # The memory planner's arithmetic.
    Mutation("adamw_state_counts_one_moment", OPTIM, ((
        "return 2 * param_bytes * numel", "return param_bytes * numel"),),
        "memory: torch AdamW's state counted as one moment, not two", MEMORY),
    Mutation("planner_shared_kv_not_counted", "rpo_fast/memory_plan.py", ((
        "tokens, kv_tokens = tokens - prompts, tokens + prompts", "tokens, kv_tokens = tokens - prompts, tokens"),),
        "planner: shared-prompt gathered key/value rows not counted", MEMORY[::-1]),
    Mutation("planner_tied_sum_once", "rpo_fast/memory_plan.py", ((
        "gradients=g_head + shard(g_all - g_head) + 2 * g_tied,",
        "gradients=g_head + shard(g_all - g_head) + g_tied,"),),
        "planner: tied head+embedding gradients' out-of-place sum counted once", MEMORY[::-1]),
    Mutation("planner_flash_repeats_kv", "rpo_fast/memory_plan.py", ((
        'repeat = self.attention != "flash" and K != Q', "repeat = K != Q"),),
        "planner: flash attention counted with repeated GQA keys/values", MEMORY[::-1]),
    Mutation("planner_checkpoint_input_fp32", "rpo_fast/memory_plan.py", ((
        "a_ckpt = tokens * H * b  # a checkpointed layer keeps its input", "a_ckpt = tokens * H * 4"),),
        "planner: a checkpointed layer's input counted in fp32", MEMORY[::-1]),
    Mutation("planner_cuda_context_on_cpu", "rpo_fast/memory_plan.py", ((
        'context = CUDA_CONTEXT if self.options["device"] == "cuda" else 0', "context = CUDA_CONTEXT"),),
        "planner: the CUDA context counted on the CPU", MEMORY[::-1]),
    Mutation("planner_headroom_multiplied", "rpo_fast/memory_plan.py", ((
        "return math.ceil((self.peak_bytes + context) / (1 - headroom))",
        "return math.ceil((self.peak_bytes + context) * (1 + headroom))"),),
        "planner: the fragmentation headroom added as peak x 1.05, not peak / 0.95", MEMORY[::-1]),
    Mutation("mlp_activations_undercounted", "rpo_fast/memory_plan.py", ((
        'per_token += 3 * b * I + b * I * self._input_kept(("down_proj",))',
        'per_token += 2 * b * I + b * I * self._input_kept(("down_proj",))'),),
        "memory: a layer's saved MLP activations counted as 2 of their 3 [T, I] tensors", MEMORY[::-1]),
    # The integrations: Liger's signature, the HF Trainer mixin, TRL's fused head.
    Mutation("head_bias_unscaled", MODEL_HEAD, ((
        "bias = None if bias is None else bias * scale", "bias = bias"),),
        "integrations: a scaled head's bias left unscaled", INTEGRATIONS),
    Mutation("head_scaling_not_inverted", MODEL_HEAD, ((
        'else 1.0 / float(scaling)', 'else float(scaling)'),),
        "integrations: Granite's logits_scaling multiplied instead of divided", INTEGRATIONS),
    Mutation("hf_labels_unshifted", "rpo_fast/integrations/hf_trainer.py", ((
        "shifted[:, :-1] = labels[:, 1:]", "shifted[:, :] = labels"),),
        "HF mixin: position t scores its own label instead of the next one", INTEGRATIONS),
    Mutation("hf_first_token_scored", "rpo_fast/integrations/hf_trainer.py", ((
        "return shifted.masked_fill(~attention_mask.bool(), -100)", "return shifted"),),
        "HF mixin: with left padding, a padding position predicts its row's first token", INTEGRATIONS),
    Mutation("trl_rows_shifted", "rpo_fast/integrations/trl.py", ((
        "backbone_out.last_hidden_state[:, :-1], labels[:, 1:]",
        "backbone_out.last_hidden_state[:, 1:], labels[:, 1:]"),),
        "TRL: each label scored from its own position's hidden state", INTEGRATIONS),
    Mutation("liger_logits_mean_over_both", "rpo_fast/liger_compat.py", ((
        "denom = n_pairs * seq_len * lin_weight.shape[0]", "denom = n_seqs * seq_len * lin_weight.shape[0]"),),
        "Liger signature: the chosen/rejected logits means divided by both halves' size", INTEGRATIONS),
    Mutation("liger_nll_always", "rpo_fast/liger_compat.py", ((
        "alpha=self.alpha if self.compute_nll_loss else 0.0", "alpha=self.alpha"),),
        "Liger signature: the NLL enters the loss with compute_nll_loss=False", INTEGRATIONS),
    Mutation("liger_sft_norm_dropped", "rpo_fast/liger_compat.py", ((
        "sft_norm=self.sft_norm,", 'sft_norm="token_mean",'),),
        "Liger signature: RPOLoss(sft_norm=) not passed on", INTEGRATIONS),
    Mutation("liger_smoothing_dropped", "rpo_fast/liger_compat.py", ((
        "label_smoothing=self.label_smoothing,", "label_smoothing=0.0,"),),
        "Liger signature: RPOLoss(label_smoothing=) not passed on", INTEGRATIONS),
    Mutation("hf_smoothing_dropped", "rpo_fast/integrations/hf_trainer.py", ((
        "label_smoothing=label_smoothing, average_log_prob=", "label_smoothing=0.0, average_log_prob="),),
        "HF mixin: RPOArguments.label_smoothing not passed to the loss", INTEGRATIONS[-2:]),
    Mutation("hf_loss_type_dropped", "rpo_fast/integrations/hf_trainer.py", ((
        "sft_norm=sft_norm, loss_type=loss_type,", 'sft_norm=sft_norm, loss_type="sigmoid",'),),
        "HF mixin: RPOArguments.loss_type not passed to the loss", INTEGRATIONS[-2:]),
    Mutation("hf_nll_weight_static_accumulation", "rpo_fast/integrations/hf_trainer.py", ((
        "float(chosen_token_count(inputs) * self.current_gradient_accumulation_steps",
        "float(chosen_token_count(inputs) * self.args.gradient_accumulation_steps"),),
        "HF mixin: a last, shorter accumulation window weights its NLL by the configured steps", INTEGRATIONS[-2:]),
    Mutation("hf_nll_weight_without_world", "rpo_fast/integrations/hf_trainer.py", ((
        "* self.accelerator.num_processes / num_items_in_batch)", "/ num_items_in_batch)"),),
        "HF mixin: nll_weight ignores the process count (DDP halves the NLL on 2 GPUs)", INTEGRATIONS[-2:]),
    Mutation("hf_accuracy_counts_ties", "rpo_fast/integrations/hf_trainer.py", ((
        '("rewards/accuracies", (margins > 0).float())', '("rewards/accuracies", (margins >= 0).float())'),),
        "HF mixin: a pair with equal rewards counted as ranked right (accuracy 1 before training)", INTEGRATIONS[-2:]),
    Mutation("wpo_probs_not_squared", MODEL_HEAD, ((
        "torch.logsumexp(2 * (z - lse[:, None]), dim=-1)", "torch.logsumexp(z - lse[:, None], dim=-1)"),),
        "TRL: WPO's log_sum_sq_probs sums the probabilities instead of their squares", INTEGRATIONS[-1:]),
    Mutation("mean_logits_fast_path_no_bias", MODEL_HEAD, ((
        'out["mean_logits"] = (rows.float() @ weight.sum(0, dtype=torch.float32) + bias_sum) / vocab',
        'out["mean_logits"] = (rows.float() @ weight.sum(0, dtype=torch.float32)) / vocab'),),
        "TRL stats: mean_logits alone (token_metrics=False) drops the head bias", INTEGRATIONS[-1:]),
    Mutation("trl_temperature_multiplies", "rpo_fast/integrations/trl.py", ((
        'scale=logit_scale / options["temperature"]', 'scale=logit_scale * options["temperature"]'),),
        "TRL: install_fused_head's temperature multiplies the logits", INTEGRATIONS[-1:]),
    # ignore_index other than -100.
    Mutation("chunked_fwd_ignore_index_fixed", CHUNKED, ((
        "    ignored = targets == ignore_index\n    safe_targets = targets.masked_fill(ignored, 0)\n    w_op =",
        "    ignored = targets == -100\n    safe_targets = targets.masked_fill(ignored, 0)\n    w_op ="),),
        "chunked forward: ignored targets found by -100, not by ignore_index"),
    Mutation("fwdgrad_grad_ignore_index_fixed", ROW_PASSES, ((
        "counted = targets != ignore_index", "counted = targets != -100"),),
        "fwdgrad: the dlogits pass finds ignored targets by -100, not by ignore_index"),
    # Non-finite rows and masked vocabularies.
    Mutation("chunked_bwd_dead_rows_kept", CHUNKED, ((
        "dead = dead if bool(dead.any()) else None", "dead = None"),),
        "recompute backward: an ignored row with overflowing logits puts NaN into all of dW",
        ("tests/test_numerical_edges.py",)),
    Mutation("fwdgrad_dead_rows_kept_on_cuda", ROW_PASSES, ((
        "        probs.masked_fill_(dead[:, None], 0.0)", "        pass"),),
        "fwdgrad on CUDA: an ignored row with overflowing logits puts NaN into dW (the fill that avoids a sync)",
        ("tests/test_numerical_edges.py",)),
    Mutation("fwdgrad_dead_rows_kept_on_cpu", ROW_PASSES, ((
        "        probs[dead] = 0.0", "        pass"),),
        "fwdgrad on CPU: an ignored row with overflowing logits puts NaN into dW", ("tests/test_numerical_edges.py",)),
    Mutation("in_backward_optimizers_seeded_alike", OPTIM, ((
        "seed=next(seeds), compile=compile)", "seed=seed, compile=compile)"),),
        "in-backward low-precision modes: every parameter's optimizer draws the same rounding noise",
        ("tests/test_optim.py",)),
    Mutation("resume_refuses_the_memory_savers", "rpo_fast/run_dir.py", ((
        '    "gradient_checkpointing", "impl", "head_backward",', '    "impl", "head_backward",'),),
        "resume: --gradient_checkpointing=true (the out-of-memory advice) refused as a changed key",
        ("tests/test_run_folder.py",)),
    Mutation("dpo_nll_metric_divides_by_zero", LOSS, ((
        "return -chosen_logps.sum() / (total.clamp(min=1) if empty_ok else total)",
        "return -chosen_logps.sum() / total"),),
        "alpha=0 token_mean nll metric NaN when no chosen token counts", ("tests/test_numerical_edges.py",)),
    Mutation("row_kernel_minus_inf_unguarded", ROW_KERNELS, ((
        'm_safe = tl.where(m_new == float("-inf"), 0.0, m_new)', "m_safe = m_new"),),
        "row kernel: a row whose first vocab tile is all -inf gets NaN (exp(-inf - -inf))", ROW_TESTS),
    Mutation("fwd_kernel_minus_inf_unguarded", FWD_KERNEL, ((
        'm_safe = tl.where(m_new == float("-inf"), 0.0, m_new)', "m_safe = m_new"),),
        "fused forward kernel: a row whose first vocab tile or split is all -inf gets NaN",
        ("tests/test_head_kernels.py",)),
    # The public functions under autocast, and the reference's device.
    Mutation("autocast_inputs_not_cast", "rpo_fast/autocast.py", ((
        "            if dtype is None:\n                return function(*args, **kwargs)",
        "            if True:\n                return function(*args, **kwargs)"),),
        "the head runs under the caller's autocast: bf16 logits, fp32 buffers refused",
        ("tests/test_autocast.py",)),
    Mutation("reference_device_unchecked", "rpo_fast/checks.py", ((
        "or not ref_logps.is_floating_point() or ref_logps.device != device):",
        "or not ref_logps.is_floating_point()):"),),
        "ref_logps on another device reaches the loss (a RuntimeError, not a ValueError naming it)",
        ("tests/test_bad_inputs.py",)),
    # Gaps found by an independent mutation audit (each caught by a test added for it).
    Mutation("pd_label_holes_accepted", "rpo_fast/integrations/padded.py", ((
        "if first is None or first == 0 or lab[first:] != tokens[first:]:", "if first is None or first == 0:"),),
        "pairs_from_padded shares the prompt of a batch whose response labels have a hole or another value "
        "(the shared layout scores the tokens, not the labels)", ("tests/test_prompt_sharing.py",)),
    Mutation("md_forward_bound_to_original", MODEL_HEAD, ((
        "        return forward.__func__\n", "        return functools.partial(_call_unbound, forward)\n"),),
        "integrations: the saved forward stays bound to the module it was read from", INTEGRATIONS[-1:]),
    Mutation("md_hyperclovax_divides", MODEL_HEAD, ((
        'return float(scaling) if getattr(text_config, "model_type", "") == "hyperclovax" else 1.0 / float(scaling)',
        "return 1.0 / float(scaling)"),),
        "integrations: HyperCLOVA X's logits_scaling divided instead of multiplied",
        ("tests/test_integrations_hf.py",)),
    Mutation("oo_seq_mean_alpha_eta", "bench/overopt/experiment.py", ((
        'Variant("rpo_seq_mean", f"RPO seq_mean (alpha={eta * beta:g})", eta * beta, "seq_mean")',
        'Variant("rpo_seq_mean", f"RPO seq_mean (alpha={eta * beta:g})", eta, "seq_mean")'),),
        "overopt: the seq_mean variant trained with alpha = eta instead of eta * beta", ("tests/test_overopt.py",)),
    Mutation("oo_claim_any_seed", "bench/overopt/report.py", ((
        '+ ("reproduced." if all(d < 0 for d in dpo) else', '+ ("reproduced." if any(d < 0 for d in dpo) else'),),
        "overopt report: claim 1 called reproduced when any seed shows it", ("tests/test_overopt.py",)),
    Mutation("oo_train_margin_first_epoch", "bench/overopt/report.py", ((
        "for k in sorted(series)[-epoch:]]", "for k in sorted(series)[:epoch]]"),),
        "overopt report: the 'last epoch' training margin averages the first epoch", ("tests/test_overopt.py",)),
    Mutation("oo_change_from_first_eval", "bench/overopt/report.py", ((
        "return {seed: series[max(series)] - series[0] for",
        "return {seed: series[max(series)] - series[min(s for s in series if s > 0)] for"),),
        "overopt report: changes measured from the first eval after step 0", ("tests/test_overopt.py",)),
    Mutation("rp_pass_any", "bench/report.py", ((
        '"yes" if passes and all(v == 1 for v in passes) else "NO"',
        '"yes" if passes and any(v == 1 for v in passes) else "NO"'),),
        "bench report: a correctness path passes when any of its checks passes", ("tests/test_bench.py",)),
    Mutation("rp_liger_ratio_inverted", "bench/report.py", ((
        '_ratio(t_liger, val(llama, False, "full", FUSED, "time"))',
        '_ratio(val(llama, False, "full", FUSED, "time"), t_liger)'),),
        "bench report: the Liger / ours target ratio inverted", ("tests/test_bench.py",)),
    Mutation("oom_smaller_budget_predicts_original", "rpo_fast/oom.py", ((
        "smaller_peak = _planned_peak(model_config, config, smaller, world)",
        "smaller_peak = _planned_peak(model_config, config, config.token_budget, world)"),),
        "out-of-memory advice: the peak printed for the halved token_budget is the current one's",
        ("tests/test_memory_plan.py",)),
    Mutation("rc_unreadable_not_recomputed", "rpo_fast/ref_cache.py", ((
        "        except ValueError:\n            pass  # unreadable: recompute and overwrite",
        "        except ValueError:\n            raise"),),
        "reference cache: an unreadable cache file aborts the run instead of being recomputed",
        ("tests/test_trainer.py",)),
    Mutation("cli_oom_exit_1", "rpo_fast/cli.py", ((
        "    except trainer.oom.TrainingOutOfMemoryError as e:\n"
        '        print(f"rpo-fast {args.command}: {e}", file=sys.stderr)\n        return 4',
        "    except trainer.oom.TrainingOutOfMemoryError as e:\n"
        '        print(f"rpo-fast {args.command}: {e}", file=sys.stderr)\n        return 1'),),
        "cli: out of memory in a training step exits 1, not the documented 4", ("tests/test_cli.py",)),
    Mutation("pf_offline_only_1", "rpo_fast/preflight.py", ((
        'os.environ.get(name, "").upper() in _TRUE', 'os.environ.get(name, "") == "1"'),),
        "preflight: HF_HUB_OFFLINE=true not read as offline", ("tests/test_cli.py",)),
    Mutation("pf_gguf_suffix_case", "rpo_fast/preflight.py", ((
        'if path.suffix.lower() != ".gguf":', 'if path.suffix != ".gguf":'),),
        "preflight: a model file named X.GGUF refused", ("tests/test_cli.py",)),
    Mutation("met_table_keeps_skipped", "rpo_fast/metrics.py", ((
        'rows = [r for r in train_records if "loss" in r and not r.get("skipped")]',
        'rows = [r for r in train_records if "loss" in r]'),),
        "final table: skipped (non-finite) steps averaged in", ("tests/test_metrics.py",)),
    Mutation("met_cpu_peak_kib_as_mb", "rpo_fast/metrics.py", ((
        "ru_maxrss / 1024  # Linux", "ru_maxrss / 1  # Linux"),),
        "CPU peak memory: KiB reported as MB", ("tests/test_metrics.py",)),
    Mutation("opt_noncontiguous_not_written_back", OPTIM, ((
        "        if not p.is_contiguous():\n            p.copy_(work.view_as(p))", "        pass"),),
        "low-precision AdamW: a non-contiguous parameter is never updated", ("tests/test_optim.py",)),
    Mutation("ck_last_span_unchecked", "rpo_fast/checks.py", ((
        "    for i in range(n_seqs):\n        if values[i + 1] < values[i]:",
        "    for i in range(n_seqs - 1):\n        if values[i + 1] < values[i]:"),),
        "cu_seqlens: a decreasing last boundary accepted (a negative last span)", ("tests/test_bad_inputs.py",)),
    Mutation("gold_question_first_user", "rpo_fast/gold.py", ((
        "            return user[-1]", "            return user[0]"),),
        "gold: a conversation graded on its first user message, not its last", ("tests/test_data.py",)),
]


def copy_repo(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    for name in files:
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    shutil.copytree(dest / "kernels", dest / "rpo_fast" / "kernels")


def scratch_path(scratch: Path, path: str) -> Path:
    return scratch / ("rpo_fast/" + path if path.startswith("kernels/") else path)


def check_imports(scratch: Path, env: dict) -> None:
    code = "import rpo_fast, rpo_fast.kernels; print(rpo_fast.__file__); print(rpo_fast.kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=scratch, env=env, check=True, capture_output=True,
                         text=True).stdout.split()
    for f in out:
        if not Path(f).resolve().is_relative_to(scratch.resolve()):
            raise SystemExit(f"the scratch copy is not what gets imported: {f}")


def run_tests(scratch: Path, env: dict, path: str) -> tuple[int, str]:
    """(pytest's exit code, the first failing test id or the error line)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:xdist", "-p",
                           "no:cacheprovider", path], cwd=scratch, env=env, capture_output=True, text=True)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
    if failed:
        return proc.returncode, failed[0].split("::", 1)[-1]
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "Error" in ln]
    return proc.returncode, (lines[-1][:60] if lines else f"exit {proc.returncode}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-k", nargs="*", default=[], help="only mutations whose name contains one of these")
    parser.add_argument("--all-files", action="store_true", help="run every file, not only up to the first catch")
    parser.add_argument("files", nargs="*", help="test files, in order, for every mutation (default: each "
                        "mutation's own)")
    args = parser.parse_args()
    mutations = [m for m in MUTATIONS if not args.k or any(k in m.name for k in args.k)]
    env = {**os.environ, **ENV, "PYTHONPATH": ""}
    rows, missed = [], 0
    with tempfile.TemporaryDirectory(prefix="mutation_check_") as tmp:
        scratch = Path(tmp)
        copy_repo(scratch)
        env["PYTHONPATH"] = str(scratch)
        check_imports(scratch, env)
        used = list(dict.fromkeys(args.files or [f for m in mutations for f in m.tests]))
        clean = [run_tests(scratch, env, f) for f in used] if args.all_files else []
        if any(code != 0 for code, _ in clean):
            raise SystemExit(f"the unmutated tests fail: {clean}")
        for m in mutations:
            target = scratch_path(scratch, m.path)
            original = target.read_text()
            if any(original.count(old) != 1 for old, _ in m.edits):
                rows.append((m, "not applicable (snippet not found once)"))
                continue
            mutated = original
            for old, new in m.edits:
                mutated = mutated.replace(old, new)
            target.write_text(mutated)
            try:
                caught = []
                for f in args.files or m.tests:
                    code, first = run_tests(scratch, env, f)
                    if code == 1 or code == 2 or code == 3:
                        caught.append(f"{Path(f).name}::{first}")
                        if not args.all_files:
                            break
                    elif code != 0:
                        caught.append(f"{Path(f).name}: pytest exit {code} ({first})")
            finally:
                target.write_text(original)
            missed += not caught
            rows.append((m, "; ".join(caught) or "NOT CAUGHT"))
            print(f"{m.name}: {rows[-1][1]}", file=sys.stderr, flush=True)
    width = max(len(m.name) for m, _ in rows)
    print(f"\n{'mutation':<{width}}  {'caught by (file::first failing test)':<60}  what")
    for m, result in rows:
        print(f"{m.name:<{width}}  {result:<60}  {m.path}: {m.description}")
    print(f"\n{len(rows) - missed} of {len(rows)} caught or not applicable; {missed} NOT CAUGHT")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
