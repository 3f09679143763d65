"""Forward-time gradients for the fused RPO head: chunks of whole pairs, gradients formed while a chunk's
logits are at hand.

Every term of the RPO loss depends on the logits only through the per-token log-probs, and once a pair's
two summed log-probs are known (its reference log-probs were computed first) its share of the loss and its
derivative `ds_j = dLoss/ds_j` are known too: the pair terms need nothing but the pair, and the NLL is linear
in `s` with batch-global normalizers (B pairs; the batch's chosen-token count for token_mean). So a chunk of
whole pairs can do all of its work at once:

    logits = h_chunk @ W.T (+ b)                     [C, V] fp32 (fp32 out of bf16/fp16 operands on CUDA)
    lp, lse = log-softmax at the targets             [C]
    s = per-sequence sums                            [2b]
    ds = d(pair_weight * pref + nll_weight * alpha * nll) / ds     autograd through the loss's own formulas
    g = ds of each token's sequence                  [C] (0 at ignored targets)
    dlogits = g * (onehot - softmax)                 in the logits buffer (bf16/fp16 on CUDA: a copy in that dtype)
    dhidden[rows] = dlogits @ W;  dW32 += dlogits.T @ h;  db32 += dlogits.sum(0)     (the sum in fp32, before the cast)

Three head GEMMs per token, none recomputed (the floor), and the loss's backward only scales the stored
gradients by `grad_output`, as Liger's fused linear cross entropy does. The gradient of the loss formulas
comes from autograd through the same function that computes the value (`loss.rpo_terms`, handed in by
`fused_linear_rpo_loss`), so there is one copy of them.

The stored gradients are rounded to the inputs' dtype at the loss's scale of 1, before `grad_output` is known:
not for fp16 under loss scaling, so `backward="auto"` picks the recompute backward for fp16 (why:
`loss.resolve_head_backward`); an explicit "fwdgrad" still runs.

A pair longer than the chunk budget is split into row pieces of at most `chunk_tokens`: the first pass
keeps each piece's logsumexp and the last (a full) piece's logits, and the gradient pass starts with that piece and
recomputes the others' logits (the recompute design, for that pair only, with the same fp32 logits and
fp32 dW accumulation; one chunk of logits alive at a time). The fallback is per pair,
not per call: one long pair in a packed batch must not cost the other pairs a recompute.

With `use_kernels` (CUDA tensors and an impl that resolves to "triton") the per-chunk log-softmax and dlogits
passes are fused Triton kernels (`kernels.logit_grad`); otherwise (CPU, or impl="torch" on CUDA) they are the
torch passes of `rpo_fast.row_passes`, which compute the same values (they keep the probabilities in the buffer
between the two passes, where the kernels keep the logits: `row_passes.RowPasses`). No atomics in the head's
passes; the per-sequence sums are `index_add_`, which on CUDA is deterministic only under
`torch.use_deterministic_algorithms(True)` (the trainer's `deterministic` option sets it).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

from . import gemm, host_sync
from .row_passes import row_passes
from .segments import sum_by_index

# Elements of one chunk's fp32 logits when `chunk_tokens` is not given. CUDA: 2**28 (1 GiB, plus for bf16/fp16
# inputs a 512 MiB dlogits copy in their dtype; none for fp32): ~2048 tokens at a 128k vocabulary, enough rows
# for the GEMMs to run at tensor-core speed.
# CPU: 2**23 (32 MiB): 262 tokens at a 32000-token vocabulary, which holds a pair of the CPU benchmark's
# 128-token responses, and rows enough for the fp32 GEMMs' full speed (bench/RESULTS.md).
FWDGRAD_CHUNK_ELEMENTS = 2**23
FWDGRAD_CUDA_CHUNK_ELEMENTS = 2**28


def default_chunk_tokens(vocab_size: int, device: torch.device) -> int:
    """Tokens per chunk when the caller does not say: as many as fit the device's logits budget."""
    budget = FWDGRAD_CUDA_CHUNK_ELEMENTS if device.type == "cuda" else FWDGRAD_CHUNK_ELEMENTS
    return max(1, budget // max(1, vocab_size))


# --- chunks of whole pairs ---


class Chunk(NamedTuple):
    """Pairs `first..last-1`: rows `chosen` then `rejected` of the packed batch (two contiguous slices)."""

    first: int
    last: int
    chosen: slice
    rejected: slice

    @property
    def rows(self) -> int:
        return self.chosen.stop - self.chosen.start + self.rejected.stop - self.rejected.start


def plan_chunks(bounds: list[int], chunk_tokens: int) -> list[Chunk]:
    """Greedy runs of consecutive pairs with at most `chunk_tokens` rows; a longer pair is a chunk alone.

    `bounds`: cu_seqlens as a list (2B + 1 ints, chosen sequences first)."""
    n_pairs = (len(bounds) - 1) // 2

    def chunk(first, last):
        return Chunk(first, last, slice(bounds[first], bounds[last]),
                     slice(bounds[n_pairs + first], bounds[n_pairs + last]))

    chunks, first = [], 0
    for i in range(n_pairs):
        if i > first and chunk(first, i + 1).rows > chunk_tokens:
            chunks.append(chunk(first, i))
            first = i
    if n_pairs:
        chunks.append(chunk(first, n_pairs))
    return chunks


def row_pieces(rows: int, chunk_tokens: int) -> list[slice]:
    """A chunk's rows in pieces of at most `chunk_tokens`: one piece when it fits (a chunk of whole pairs), else
    (a pair longer than the budget) full pieces after a shorter first one. The last piece is the one whose
    logits outlive the first pass, so a full last piece keeps the most rows and recomputes the fewest:
    rows - chunk_tokens of them (a pair of 256 rows in pieces of 112: 144 recomputed, where 112, 112, 32 would
    recompute 224)."""
    return [slice(max(0, stop - chunk_tokens), stop) for stop in reversed(range(rows, 0, -chunk_tokens))]


class _FirstOrderOnly(torch.autograd.Function):
    """The identity (aliases, no copies) on the gradients `_StoredGradients.backward` returns under
    `create_graph=True`, whose own backward raises."""

    @staticmethod
    def forward(ctx, *grads):
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx, *grad_outputs):
        raise RuntimeError(
            "fused_linear_rpo_loss(backward='fwdgrad') has no second derivative: its gradients are formed in "
            "forward and are constants to autograd, so a derivative of them (create_graph=True: a gradient "
            "penalty, a Hessian-vector product) would be 0. impl='dense' differentiates twice.")


class _StoredGradients(torch.autograd.Function):
    """`value` as a function of `inputs` whose gradients were formed in forward: backward scales them.

    First order only. Under `create_graph=True` the gradients it returns carry a grad_fn that raises
    (`_FirstOrderOnly`), so differentiating them is an error rather than a silent 0. (`once_differentiable`
    would not do: it raises only where `grad_output` requires grad, and `autograd.grad(loss, x,
    create_graph=True)` seeds a constant.)"""

    @staticmethod
    def forward(ctx, value, grads, *inputs):
        ctx.save_for_backward(*grads)  # saved, so that autograd frees them after backward
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        # A Python float, not grad_output.to(g.dtype): rounding e.g. 1/3 (gradient accumulation's scale) to bf16
        # would scale every bf16 gradient by 0.333984. The product is computed in fp32 and rounded once.
        scale = float(grad_output)
        scaled = [None if g is None else g if scale == 1.0 else g * scale for g in ctx.saved_tensors]
        if torch.is_grad_enabled():  # create_graph=True
            aliases = iter(_FirstOrderOnly.apply(*(g.detach().requires_grad_() for g in scaled if g is not None)))
            scaled = [None if g is None else next(aliases) for g in scaled]
        return None, None, *scaled


SequenceLoss = Callable[[torch.Tensor], tuple[torch.Tensor, Any]]


def fwdgrad_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    bounds: list[int],
    sequence_loss: SequenceLoss,
    *,
    ignore_index: int = -100,
    chunk_tokens: int | None = None,
    use_kernels: bool = False,
) -> tuple[torch.Tensor, Any]:
    """A loss of the per-sequence summed log-probs of a packed pair batch, with its gradients formed in forward.

    Args:
        hidden: [N, H] bf16/fp16/fp32; weight: [V, H] same dtype; bias: [V] or None (not checked here:
            `fused_linear_rpo_loss` checks its inputs before calling).
        targets: [N] int64. bounds: cu_seqlens as a list of 2B + 1 ints (chosen sequences first).
        sequence_loss: `s [2B] fp32 -> (scalar loss, anything)`, differentiable in s, such that the derivative
            for the sequences of some pairs does not depend on the other pairs' values (a sum over pairs of
            terms of the pair's two sequences, plus a linear function of s: the RPO loss is one).
        chunk_tokens: rows per chunk (None: `default_chunk_tokens`).
        use_kernels: the per-row passes as the Triton kernels of `kernels.logit_grad` (CUDA), else torch.

    Returns:
        (loss, what `sequence_loss` returned besides the loss, at the batch's s). The loss (fp32 scalar) carries
        the gradient of hidden / weight / bias (those that require grad while grad mode is on).
    """
    n_seqs, vocab = len(bounds) - 1, weight.shape[0]
    grad_on = torch.is_grad_enabled()
    want_dh = grad_on and hidden.requires_grad
    want_dw = grad_on and weight.requires_grad
    want_db = grad_on and bias is not None and bias.requires_grad
    chunk_tokens = chunk_tokens or default_chunk_tokens(vocab, hidden.device)
    passes = row_passes(use_kernels)
    inputs = (hidden, weight, bias)
    hidden, weight = hidden.detach(), weight.detach()
    bias = None if bias is None else bias.detach()

    # GEMM operands: bf16/fp16 straight into tensor cores with fp32 results where that works; elsewhere (CPU)
    # upcast once, so that each chunk's products are fp32 ones without a fresh [V, H] copy per chunk.
    w_op = gemm.gemm_operand(weight)
    op_dtype = w_op.dtype
    b32 = None if bias is None else bias.float()
    dh = torch.empty_like(hidden) if want_dh else None
    dw32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_dw else None
    db32 = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if want_db else None
    policy_logps = torch.zeros(n_seqs, dtype=torch.float32, device=hidden.device)

    def sequence_grads(s, seqs):
        """dLoss/ds for the chunk's sequences `seqs` [2b]; the other sequences are held at 0, constants the
        chunk's derivative does not depend on."""
        with torch.enable_grad():
            s = s.detach().requires_grad_()
            everyone = torch.zeros(n_seqs, dtype=torch.float32, device=s.device).index_copy(0, seqs, s)
            return torch.autograd.grad(sequence_loss(everyone)[0], s)[0]

    chunks = plan_chunks(bounds, chunk_tokens)
    # Each chunk's sequences (chosen, then rejected) and their lengths, built on the host and copied to the device
    # at once, through pinned memory on CUDA (a copy from pageable memory would wait for the device).
    seq_lists = [[*range(c.first, c.last), *range(n_seqs // 2 + c.first, n_seqs // 2 + c.last)] for c in chunks]
    flat = [j for seq_list in seq_lists for j in seq_list]
    index = host_sync.to_device(torch.tensor(flat + [bounds[j + 1] - bounds[j] for j in flat]), hidden.device)
    sizes = [len(seq_list) for seq_list in seq_lists]
    for chunk, seq_list, seqs, lengths in zip(chunks, seq_lists, index[:len(flat)].split(sizes),
                                              index[len(flat):].split(sizes)):
        if not chunk.rows:  # pairs with no response tokens (all ignored): log-probs 0 (already), no gradient
            continue
        h = torch.cat([hidden[chunk.chosen], hidden[chunk.rejected]]).to(op_dtype)
        t = torch.cat([targets[chunk.chosen], targets[chunk.rejected]])
        token_seq = torch.repeat_interleave(torch.arange(len(seq_list), device=hidden.device), lengths,
                                            output_size=chunk.rows)
        # The last piece's logits stay for the gradient pass, which starts with it; the others are computed again.
        pieces = row_pieces(chunk.rows, chunk_tokens)
        lp, lse = [], []
        logits = None
        for piece in pieces:
            logits = None  # the previous piece's logits are freed before the next are made
            logits = gemm.logits_f32(h[piece], w_op, b32)
            piece_lp, piece_lse = passes.row_logprobs(logits, t[piece], ignore_index)
            lp.append(piece_lp)
            lse.append(piece_lse)
        lp, lse = torch.cat(lp), torch.cat(lse)
        s = sum_by_index(lp, token_seq, len(seq_list))
        policy_logps[seqs] = s
        if not (want_dh or want_dw or want_db):
            continue
        g = sequence_grads(s, seqs)[token_seq]
        dh_chunk = torch.empty_like(h) if want_dh else None
        for piece in pieces[-1:] + pieces[:-1]:
            if logits is None:  # a recomputed piece: its logsumexps are known from the first pass
                logits = passes.reload_(gemm.logits_f32(h[piece], w_op, b32), lse[piece])
            # With a bias gradient, dlogits stay fp32 (in the logits buffer) until their column sum is taken; then
            # they are cast to the GEMMs' operand dtype, as the passes would have cast them.
            dlogits = passes.logit_grad_(logits, t[piece], lse[piece], g[piece],
                                          torch.float32 if want_db else op_dtype, ignore_index=ignore_index)
            logits = None
            if want_db:
                db32 += dlogits.sum(0)
                dlogits = dlogits.to(op_dtype)
            if want_dh:
                dh_chunk[piece] = dlogits @ w_op
            if want_dw:
                gemm.addmm_f32_(dw32, dlogits.T, h[piece])
            del dlogits
        if want_dh:
            n_chosen = chunk.chosen.stop - chunk.chosen.start
            dh[chunk.chosen] = dh_chunk[:n_chosen]
            dh[chunk.rejected] = dh_chunk[n_chosen:]

    with torch.no_grad():
        value, extra = sequence_loss(policy_logps)
    if want_dh or want_dw or want_db:
        grads = (dh, None if dw32 is None else dw32.to(weight.dtype), None if db32 is None else db32.to(weight.dtype))
        value = _StoredGradients.apply(value, grads, *inputs)
    return value, extra
