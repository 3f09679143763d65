#!/usr/bin/env bash
# The whole GPU check in one command, on a machine with one NVIDIA GPU and no network:
#
#     bash bench/gpu_suite.sh OUTDIR
#
# 1. correctness of impl="triton" against the dense fp32 reference at real sizes (bf16; judged relative to
#    the same-dtype dense error), 2. the loss microbenchmarks (presets, then sweeps), 3. the training-step
#    benchmark (Llama-3.2-1B and Mistral-7B configs, random weights, bf16, gradient checkpointing). Budgeted:
#    no new work starts after BUDGET_S (default 450 s) and a hard stop at HARD_LIMIT_S (default 510 s) still
#    writes the summary, so it ends inside 9 minutes. Writes at most 7 flat files to OUTDIR (results.csv,
#    summary.md, meta.json, log.txt, vs_V.png, vs_N.png, nvidia-smi.csv): a lent machine returns at most 8.
#
# Installs nothing from a network. Peers missing from the GPU image (liger-kernel, cut-cross-entropy, trl and
# its datasets) are installed into a temporary folder from wheels in .whl/ (or $RPO_BENCH_WHEELS) when there
# are any: bench/fetch_wheels.sh downloads them where PyPI is reachable; carry .whl to the GPU machine.
# Without them those providers are skipped and the summary says so. rpo_fast itself runs from this checkout
# (no install needed: bench/env.py maps kernels/ to rpo_fast.kernels).
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_suite.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${RPO_BENCH_WHEELS:-.whl}
START=$(date +%s)

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
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "gpu_suite: no wheels in $WHEELS: liger, cce and trl run only if the image has them (bench/fetch_wheels.sh)"
fi

nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv > "$OUT/nvidia-smi.csv" 2>&1 || echo "nvidia-smi failed" >> "$OUT/nvidia-smi.csv"

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# RPO_BENCH_SUITE=gpu-dryrun runs the same script on a CPU at toy sizes (impl=triton interpreted): a rehearsal.
timeout -s TERM -k 20 "${HARD_LIMIT_S:-510}" "$PY" -m bench.run --suite "${RPO_BENCH_SUITE:-gpu}" --out "$OUT" \
    --budget-s "${BUDGET_S:-450}" ${RPO_BENCH_ARGS:-}
rc=$?
echo "gpu_suite: exit $rc after $(( $(date +%s) - START )) s; results in $OUT"
exit $rc
