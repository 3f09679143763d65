"""`python -m bench.overopt.run [--quick] [--out DIR]`: the DPO vs RPO overoptimization experiment.

Trains SmolLM2-135M-Instruct (LoRA) with plain DPO and RPO variants on data/train.jsonl (same data
order, seeds and steps for every variant), evaluates on data/eval.jsonl, and writes to DIR
(default bench/overopt/results): overopt.csv (long: variant, seed, step, metric, value), meta.json,
overopt.png and REPORT.md. The CSV is rewritten after every finished run, so an interrupted run
keeps what it finished (`--resume` then runs only what is missing); `--report-only` redraws the
figure and report from DIR's CSV and meta.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .experiment import REPO, Experiment, Setup, make_variants

FIELDS = ("variant", "seed", "step", "metric", "value")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few steps of each variant, one seed (minutes)")
    p.add_argument("--out", default=str(REPO / "bench" / "overopt" / "results"))
    p.add_argument("--work", default=None, help="scratch dir (reference cache, checkpoints); default a temp dir")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--variants", nargs="+", default=None, help="subset of: dpo rpo_sum rpo_seq_mean rpo_sum_paper_eta")
    p.add_argument("--eta", type=float, default=1.0, help="RPO weight in the paper's form: alpha = eta * beta")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-pairs", type=int, default=48, help="first n rows of data/train.jsonl (0 = all 280)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--pairs-per-step", type=int, default=4)
    p.add_argument("--eval-pairs", type=int, default=24, help="first n held-out pairs for log-prob metrics")
    p.add_argument("--gold-samples", type=int, default=30, help="first n held-out prompts for the gold accuracy")
    p.add_argument("--eval-every", type=int, default=8)
    p.add_argument("--gold-every", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=None, help="model dir or alias (default SmolLM2-135M-Instruct from PyPI)")
    p.add_argument("--lora-target-modules", default=None,
                   help="peft target_modules (default: every linear layer of blocks 20-29, a regex)")
    p.add_argument("--resume", action="store_true",
                   help="keep the (variant, seed) runs already in DIR's CSV and run only the missing ones")
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def setup_from_args(args) -> Setup:
    setup = Setup(train_pairs=args.train_pairs, eval_pairs=args.eval_pairs, gold_samples=args.gold_samples,
                  pairs_per_step=args.pairs_per_step, num_epochs=args.epochs, eval_every=args.eval_every,
                  gold_every=args.gold_every, beta=args.beta, learning_rate=args.lr)
    if args.model:
        setup.model = args.model
    if args.lora_target_modules:
        setup.lora_target_modules = args.lora_target_modules
    if args.quick:
        setup.max_steps, setup.eval_every, setup.gold_every = 4, 2, 4
        setup.eval_pairs, setup.gold_samples, setup.train_pairs = 8, 8, 16
    return setup


def git_commit() -> str:
    """HEAD's short hash, with "-dirty" when tracked files differ from it (the run measured other code)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    try:
        return git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain", "--untracked-files=no")
                                                      else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{**r, "seed": int(r["seed"]), "step": int(r["step"]), "value": float(r["value"])}
                for r in csv.DictReader(f)]


def finish(out: Path) -> None:
    from . import plot, report

    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    rows = read_csv(out / "overopt.csv")
    labels = {v["name"]: v["label"] for v in meta["variants"]}
    s = meta["setup"]
    title = (f"SmolLM2-135M-Instruct, LoRA, {meta['n_train']} train pairs x {s['num_epochs']} epochs, "
             f"beta={s['beta']}, lr={s['learning_rate']:g}; mean over seeds {sorted({r['seed'] for r in rows})} "
             "(band: min-max); dotted: epoch boundaries")
    epoch_steps = meta["n_train"] // s["pairs_per_step"] if not s["max_steps"] else 0
    plot.plot(rows, labels, out / "overopt.png", title, epoch_steps)
    report.write_report(rows, meta, out / "REPORT.md")
    print(f"wrote {out / 'overopt.csv'}, {out / 'overopt.png'}, {out / 'REPORT.md'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        finish(out)
        return 0
    import torch

    torch.set_num_threads(args.threads)
    setup = setup_from_args(args)
    variants = make_variants(setup.beta, args.eta)
    if args.variants:
        variants = [v for v in variants if v.name in args.variants]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="overopt-"))
    start = time.perf_counter()
    experiment = Experiment(setup, work)
    meta = {"command": " ".join(["python -m bench.overopt.run", *(argv if argv is not None else sys.argv[1:])]),
            "commit": git_commit(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), torch {torch.__version__}, "
                       f"{args.threads} threads", "setup": {k: v for k, v in vars(setup).items() if k != "extra"},
            "eta": args.eta, "n_train": experiment.n_train, "n_eval_logp": len(experiment.logp_examples),
            "n_gold": experiment.gold_samples, "variants": [vars(v) for v in variants], "runs": []}
    rows: list[dict] = []
    if args.resume and (out / "overopt.csv").exists():
        old = json.loads((out / "meta.json").read_text(encoding="utf-8"))
        if old["setup"] != meta["setup"] or old["eta"] != meta["eta"]:
            raise ValueError(f"--resume: {out / 'meta.json'} was made with another setup; rerun without --resume")
        rows = read_csv(out / "overopt.csv")
        meta["runs"], meta["started"] = old["runs"], old["started"]
        meta["command"] = old["command"] + " ; then " + meta["command"]
        if old["commit"] != meta["commit"]:
            meta["commit"] = f"{old['commit']} (first runs), {meta['commit']} (resumed runs)"
        meta["wall_before_resume_s"] = old.get("wall_s", 0.0)  # already includes earlier resumes
    done = {(r["variant"], r["seed"]) for r in meta["runs"]}
    for seed in args.seeds:  # seed-major: an interrupted run still has whole seeds
        for variant in variants:
            if (variant.name, seed) in done:
                continue
            run_rows, info = experiment.run(variant, seed)
            rows.extend(run_rows)
            meta["runs"].append(info)
            meta["wall_s"] = time.perf_counter() - start + meta.get("wall_before_resume_s", 0.0)
            write_csv(rows, out / "overopt.csv")
            (out / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    finish(out)
    print(f"total wall time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
