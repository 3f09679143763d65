#!/usr/bin/env bash
# Downloads, on a machine that reaches PyPI, the pure-Python wheels that the GPU image lacks, into .whl/
# (git-ignored), for Python 3.12 on x86-64. Carry the folder to the GPU machine (device tool: carry=[".whl"]);
# bench/gpu_suite.sh installs whatever it finds there into a temporary folder, nothing else.
#   liger-kernel, cut-cross-entropy   loss peers of the microbenchmarks
#   trl, datasets, dill, multiprocess  TRL's DPOTrainer in the training-step benchmark
#   transformers, peft, regex          the versions CI tests (the image's transformers is older: 5.17 when
#                                      last read); regex because transformers checks its version at import
# Everything else they need (accelerate, pandas, pyarrow, xxhash, huggingface-hub, ...) is in the GPU image.
# 17 MiB in all (the device tool carries at most 64 MiB per call).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${1:-.whl}
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any -d "$DEST" \
    liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    transformers==5.24.0 peft==0.21.2 regex==2026.11.19
ls -la "$DEST"
