"""Run-to-run spread of the trainer-level equality tests, to set their tolerances from measurements.

    .venv/bin/python tools/trainer_spread.py [--optim adamw_torch_fused|sgd]    # ~1 minute

Runs the comparisons of tests/test_integrations_hf.py (RPOTrainerMixin against a dense full-logits Trainer)
and tests/test_integrations_trl.py (RPOFastDPOTrainer against TRL's DPOTrainer) and prints, per case, the
largest differences between the two runs: losses and grad norms (relative), final weights (absolute and as
a fraction of the largest weight change of the run). Run it under the kernels other machines would use,
e.g. `OMP_NUM_THREADS=1|2`, `ATEN_CPU_CAPABILITY=default|avx2|avx512` (what this CPU supports),
`MKL_ENABLE_INSTRUCTIONS=SSE4_2|AVX|AVX2|AVX512`, `MKL_CBWR=COMPATIBLE`, and set the tolerances above the
largest value seen, with margin.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402

import test_integrations_hf as hf_tests  # noqa: E402
import test_integrations_trl as trl_tests  # noqa: E402


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def _weights(ours, theirs, base):
    abs_diff = max((q.detach() - p.detach()).abs().max().item()
                   for p, q in zip(theirs.parameters(), ours.parameters()))
    start = dict(base.named_parameters())
    moved = max(((p.detach() - start[name].detach()).abs().max().item() for name, p in theirs.named_parameters()
                 if name in start and start[name].shape == p.shape), default=float("nan"))  # nan: PEFT names
    return abs_diff, abs_diff / max(moved, 1e-30)


def _logs(ours, theirs, keys=("loss", "grad_norm")):
    return {k: max(_rel(a[k], b[k]) for a, b in zip(ours, theirs)) for k in keys}


def hf_cases(optim):
    for params in ([("ref_model", "sum", False, 1), ("ref_model", "seq_mean", True, 2),
                    ("precomputed", "seq_mean", True, 1), ("peft", "token_mean", False, 1)]):
        with tempfile.TemporaryDirectory() as tmp:
            (ours, ours_model), (dense, dense_model), base = hf_tests.mixin_and_dense_runs(*params, Path(tmp),
                                                                                          optim=optim)
        yield f"hf {'-'.join(map(str, params))}", _logs(ours[:-1], dense[:-1]), _weights(ours_model, dense_model, base)
    with tempfile.TemporaryDirectory() as tmp:
        runs = hf_tests.token_mean_runs(Path(tmp), optim=optim)
    for other in ("ga1", "dense"):
        yield f"hf token_mean ga2 vs {other}", _logs(runs["ga2"][0], runs[other][0]), \
            _weights(runs["ga2"][1], runs[other][1], runs["base"][1])


def trl_cases(optim):
    tokenizer, dataset = trl_tests.make_tokenizer(), trl_tests.make_dataset()
    for case in trl_tests.CASES:
        with tempfile.TemporaryDirectory() as tmp:
            (ours, ours_model), (stock, stock_model), base = trl_tests.trl_and_ours_runs(
                case, tokenizer, dataset, Path(tmp), optim=optim)
        keys = [k for k in stock[0] if k not in trl_tests._TIMING_KEYS and isinstance(stock[0][k], float)]
        logs = _logs(ours, stock, keys)
        worst = max(logs, key=logs.get)
        yield f"trl {case}", {"loss": logs["loss"], f"worst log ({worst})": logs[worst]}, \
            _weights(ours_model, stock_model, base)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optim", default="adamw_torch_fused")
    optim = parser.parse_args().optim
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
                                          "MKL_CBWR")}
    print(f"# {env} torch capability {torch.backends.cpu.get_cpu_capability()} optim {optim}")
    for cases in (hf_cases, trl_cases):
        for name, logs, (weight_abs, weight_frac) in cases(optim):
            logs_text = " ".join(f"{k} {v:.2e}" for k, v in logs.items())
            print(f"{name:<34} {logs_text:<60} weights abs {weight_abs:.2e} ({weight_frac:.2e} of largest move)")


if __name__ == "__main__":
    main()
