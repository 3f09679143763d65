#!/usr/bin/env bash
# The whole GPU check in one command, on a machine with one NVIDIA GPU and no network:
#
#     bash bench/gpu_suite.sh OUTDIR [all|loss|7b]          # default: all
#
# loss: 0. micro-checks (bench/micro.py, ~15 s estimated): fp32 tl.atomic_add throughput with sem="acq_rel" vs
#       "relaxed" vs a plain load+add+store (the ceiling), and torch.addmm(acc32, a_bf16, b_bf16,
#       out_dtype=torch.float32, out=acc32) (error vs float64, time vs the fp32-upcast fallback and a bf16 mm),
#       1. correctness of impl="triton" against the dense fp32 reference at real sizes (bf16; judged relative
#       to the same-dtype dense error), and of the packed attention's CUDA kernels (flash-attn / torch varlen,
#       forward and backward, plain and shared-prompt rows) against the CPU sdpa path in float64
#       (bench/attention_correctness.py, a few seconds estimated), and of Liger's backbone kernels against the
#       model without them (bench/backbone_correctness.py), 2. the loss
#       microbenchmarks, one provider per head backward choice (ours_fwdgrad, ours_recompute, ours_atomic,
#       ours_atomic_filter) beside dense, dense+compile, Liger, CCE and the bare GEMMs: the Llama-3-8B preset in
#       every mode, then Mistral-7B, Gemma-7B and the published CE heads' shape (M=4096, H=4096, V=128256),
#       then the presets with a reference head, then sweeps, 3. the training-step benchmark (Llama-3.2-1B and
#       Mistral-7B configs, random weights, bf16, gradient checkpointing): `python -m bench.run`, writing
#       results.csv (row by row, so a timeout keeps what was measured), summary.md, meta.json, log.txt,
#       vs_V.png, vs_N.png. log.txt says how long each stage took. If bench.run was killed before writing
#       summary.md, `python -m bench.report OUTDIR` rebuilds it and the plots from results.csv here.
# 7b:   the 7B memory modes through the trainer's own packed step (bench/gpu_7b.py: random-init Mistral-7B,
#       full fine-tuning in every optimizer memory mode and LoRA under a 24 GiB cap; peak memory, tokens/s and
#       the planner's prediction): writes gpu_7b.csv, appends a "## 7B memory modes" section to summary.md and
#       its output to log.txt.
# all:  loss, then 7b, inside one 10-minute device call.
# Each part also writes nvidia-smi.csv. In all, at most 8 flat files (a lent machine returns at most 8).
#
# Time (the device allows 600 s per command; the suite must end by 570 s). Every part is budgeted (no new work
# starts after its budget; bench.run stops between points, gpu_7b.py between modes) and runs under `timeout`
# with SIGTERM at a hard limit, on which both still write what they measured, then SIGKILL 15 s later.
#   loss alone: BUDGET_S=450, HARD_LIMIT_S=510 (as before 7b joined the suite).
#   7b alone:   GPU7B_HARD_LIMIT_S=510, GPU7B_BUDGET_S = hard limit - 60.
#   all:        loss gets BUDGET_S=320, HARD_LIMIT_S=360: micro-checks, correctness and the Llama-3-8B targets
#               (run first) need ~120 s, the other presets ~60 s (both estimated, not yet measured), bench.run keeps
#               130 s of its budget for its training steps (the points after the presets are cut first), and
#               40 s covers the point in flight plus the summary and plots. 7b then gets as its hard limit what
#               is left of TOTAL_LIMIT_S=555 since START (set before the wheel installs and nvidia-smi) less the
#               15 s SIGKILL grace, at most GPU7B_HARD_LIMIT_S when set: after a loss part stopped at its hard
#               limit, 180 s less the setup time (wheel installs, nvidia-smi; 165 s less it if the loss part
#               needed the SIGKILL); more when the loss part ends earlier.
#               Its budget is the hard limit less 60 s: ~25 s of start-up (imports, a random-init 7.24e9-parameter
#               model, the first Triton compile), then ~5-15 s per mode (4 steps of 4096 tokens; both estimated,
#               not yet measured), so the first 5-6 modes would fit; 60 s is the longest an eager mode started
#               just before the budget runs. The compiled-optimizer mode (tens of seconds of torch.compile) runs
#               last, and gpu_7b.csv is written row by row, so a SIGTERM loses at most the mode in flight. Its
#               SIGKILL falls at TOTAL_LIMIT_S, so the suite ends about 555 s after START at the very worst.
#               With under 60 s left the 7B part is skipped and summary.md says so.
# Every limit above can be set by its environment variable. Exit status: the loss part's when nonzero (1: a
# correctness check failed; 124: stopped at its hard limit), else the 7B part's (124: stopped at its hard limit,
# or skipped for having under 60 s left). A loss part stopped at its hard limit says so in bold in summary.md and
# in meta.json ("stopped"), lists the points it did not reach as skipped, and the exit lines below go to log.txt.
#
# Installs nothing from a network. Peers missing from the GPU image (liger-kernel, cut-cross-entropy, trl and
# its datasets), and the transformers/peft versions CI tests, are installed into a temporary folder from wheels
# in .whl/ (or $RPO_BENCH_WHEELS) when there are any: bench/fetch_wheels.sh downloads them where PyPI is
# reachable; carry .whl to the GPU machine (device tool: carry=[".whl"]).
# Without them those providers are skipped and the summary says so. rpo_fast itself runs from this checkout
# (no install needed: bench/env.py maps kernels/ to rpo_fast.kernels).
#
# The commit: a working tree copied without its .git (as the device tool copies it) cannot tell its commit, so
# pass it: RPO_BENCH_COMMIT=$(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo +dirty), e.g.
#     RPO_BENCH_COMMIT=abc1234 bash bench/gpu_suite.sh OUTDIR all
# (set on the machine that has the checkout, then written into the command). Without it and without .git the
# run records "unknown (no .git)", never the commit of a repository the copy happens to sit in.
#
# RPO_BENCH_SUITE=gpu-dryrun rehearses on a CPU at toy sizes: bench.run's gpu-dryrun suite (impl=triton
# interpreted) and gpu_7b.py --dry-run. Extra arguments: RPO_BENCH_ARGS (bench.run), RPO_GPU7B_ARGS (gpu_7b.py).
set -uo pipefail
USAGE="usage: bash bench/gpu_suite.sh OUTDIR [all|loss|7b]"
OUT=${1:?$USAGE}
PART=${2:-all}
case "$PART" in
    all|loss|7b) ;;
    *) echo "gpu_suite: PART: expected all, loss or 7b, got '$PART' ($USAGE)" >&2; exit 2 ;;
esac
START=$(date +%s)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${RPO_BENCH_WHEELS:-.whl}
SUITE=${RPO_BENCH_SUITE:-gpu}
KILL_GRACE_S=15

if compgen -G "$WHEELS/*.whl" > /dev/null; then
    SITE=$(mktemp -d /tmp/rpo-bench-site.XXXXXX)
    trap 'rm -rf "$SITE"' EXIT
    for whl in "$WHEELS"/*.whl; do  # one at a time: a wheel for another Python must not block the rest
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
                "$whl" 2>/dev/null; then
            echo "gpu_suite: installed $(basename "$whl")"
        else
            echo "gpu_suite: could not install $(basename "$whl") (wrong Python or platform?); skipped"
        fi
    done
    # The carried transformers (the version CI tests) must import against the image's torch and tokenizers;
    # where it does not, the image's own runs instead of nothing.
    if ! PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "import transformers, peft" 2> "$SITE.err"; then
        echo "gpu_suite: the carried transformers/peft do not import here ($(tail -n 1 "$SITE.err")); using the image's"
        rm -rf "$SITE"/transformers "$SITE"/transformers-* "$SITE"/peft "$SITE"/peft-* "$SITE"/regex "$SITE"/regex-*
    fi
    rm -f "$SITE.err"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "gpu_suite: no wheels in $WHEELS: liger, cce and trl run only if the image has them, on the image's" \
         "transformers (bench/fetch_wheels.sh)"
fi

nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv > "$OUT/nvidia-smi.csv" 2>&1 || echo "nvidia-smi failed" >> "$OUT/nvidia-smi.csv"

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
rc_loss=0
rc_7b=0

if [ "$PART" != 7b ]; then
    if [ "$PART" = all ]; then budget=${BUDGET_S:-320}; hard=${HARD_LIMIT_S:-360}
    else budget=${BUDGET_S:-450}; hard=${HARD_LIMIT_S:-510}; fi
    echo "gpu_suite: loss benchmarks, budget ${budget} s, hard limit ${hard} s"
    timeout -s TERM -k "$KILL_GRACE_S" "$hard" "$PY" -m bench.run --suite "$SUITE" --out "$OUT" \
        --budget-s "$budget" ${RPO_BENCH_ARGS:-}
    rc_loss=$?
    # Into log.txt too (one of the files that come back): a part stopped at its hard limit must not look complete.
    stop_note=""
    if [ "$rc_loss" -eq 124 ] || [ "$rc_loss" -eq 137 ]; then stop_note=" (stopped at its hard limit of ${hard} s: incomplete)"; fi
    echo "gpu_suite: loss part: exit $rc_loss after $(( $(date +%s) - START )) s$stop_note" | tee -a "$OUT/log.txt"
    if [ -s "$OUT/results.csv" ] && [ ! -s "$OUT/summary.md" ]; then  # killed before its summary: rebuild it
        timeout -s KILL 30 "$PY" -m bench.report "$OUT" --suite "$SUITE" 2>&1 | tee -a "$OUT/log.txt"
    fi
fi

if [ "$PART" != loss ]; then
    if [ "$PART" = all ]; then
        hard=$(( ${TOTAL_LIMIT_S:-555} - ($(date +%s) - START) - KILL_GRACE_S ))
        if [ -n "${GPU7B_HARD_LIMIT_S:-}" ] && [ "$GPU7B_HARD_LIMIT_S" -lt "$hard" ]; then hard=$GPU7B_HARD_LIMIT_S; fi
    else
        hard=${GPU7B_HARD_LIMIT_S:-510}
    fi
    budget=${GPU7B_BUDGET_S:-$(( hard - 60 ))}
    DRY=""
    if [ "$SUITE" = gpu-dryrun ]; then DRY="--dry-run"; fi
    if [ "$hard" -lt 60 ]; then
        msg="gpu_suite: only ${hard} s left of TOTAL_LIMIT_S=${TOTAL_LIMIT_S:-555}: the 7B memory modes were not run"
        echo "$msg" | tee -a "$OUT/log.txt"
        printf '\n## 7B memory modes\n\nNot run: %s.\n' "${msg#gpu_suite: }" >> "$OUT/summary.md"
        rc_7b=124
    else
        echo "gpu_suite: 7B memory modes, budget ${budget} s, hard limit ${hard} s" | tee -a "$OUT/log.txt"
        timeout -s TERM -k "$KILL_GRACE_S" "$hard" "$PY" bench/gpu_7b.py "$OUT" --budget-s "$budget" \
            --summary "$OUT/summary.md" $DRY ${RPO_GPU7B_ARGS:-} 2>&1 | tee -a "$OUT/log.txt"
        rc_7b=${PIPESTATUS[0]}
        echo "gpu_suite: 7B part: exit $rc_7b, $(( $(date +%s) - START )) s since the start" | tee -a "$OUT/log.txt"
    fi
fi

rc=$rc_loss
if [ "$rc" -eq 0 ]; then rc=$rc_7b; fi
echo "gpu_suite: $PART: exit $rc (loss $rc_loss, 7b $rc_7b) after $(( $(date +%s) - START )) s; results in $OUT" \
    | tee -a "$OUT/log.txt"
exit $rc
