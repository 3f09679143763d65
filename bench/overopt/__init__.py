"""Overoptimization study: plain DPO vs RPO (sum and seq-mean SFT terms) on SmolLM2-135M-Instruct.

`python -m bench.overopt.run` trains every variant with `rpo_fast.trainer.train`, evaluates held-out
log-probs and a gold (verifiable-answer) accuracy at fixed steps through a `TrainHooks.on_step_end`
hook, and writes `results/overopt.csv`, `results/overopt.png` and `results/REPORT.md`.
"""
