"""Entry point: `python -m bench.run [--quick] [--out DIR] [--suite NAME] ...`.

Runs, in order: on the GPU suites the micro-checks (micro.py), correctness of our fast paths against the
dense reference (on the GPU suites also the packed attention's and Liger's backbone kernels), the loss
microbenchmarks, the training-step benchmark; then writes into the output folder (flat, at most 6 files,
so that a lent GPU machine returns all of it; bench/gpu_suite.sh adds nvidia-smi.csv and bench/gpu_7b.py's gpu_7b.csv, and
appends the 7B memory modes to summary.md and log.txt):

    results.csv   one long-format row per measurement (see loss_bench.py for the metrics)
    summary.md    targets (judged on ours_fwdgrad), tables, skipped providers
    meta.json     device, commit, versions, command, suite, wall time, skipped (with why: unavailable, failed,
                  time budget, or not reached when the run was stopped), the summary's notes, and `stopped` for a
                  run stopped early (at the hard time limit: SIGTERM from `timeout`, exit status 124)
    vs_V.png, vs_N.png   time and peak memory per provider along the sweeps
    log.txt       everything printed

Suites: `cpu-quick` (`make bench`: one thread, about 2-6 minutes on a 2-core machine), `cpu` (all cores,
longer), `gpu` (bf16 on one GPU, budgeted to finish inside --budget-s), `gpu-dryrun` (the gpu suite's code at toy sizes on CPU,
impl="triton" interpreted: a rehearsal, not a measurement), `tiny` (the test suite's, seconds). The default is `gpu`
when CUDA is available, else `cpu-quick` with --quick and `cpu` without.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import torch

from . import attention_correctness, backbone_correctness, correctness, env, micro, providers, report, shapes, train_step
from .loss_bench import LossBench, unfinished_points
from .shapes import GPU_SUITES, Shape

SUITES = {"cpu-quick": shapes.cpu_quick_suite, "cpu": shapes.cpu_full_suite, "gpu": shapes.gpu_suite,
          "tiny": shapes.tiny_suite, "gpu-dryrun": shapes.gpu_dryrun_suite}
# (table heading, what it judges, run(device, emit, log) -> passed): the GPU suites' checks of CUDA kernels
KERNEL_CHECKS = (
    ("Attention correctness", "the packed attention's kernels vs the CPU sdpa path in float64",
     attention_correctness.run),
    ("Backbone kernels", "Liger's RMSNorm/RoPE/SwiGLU (the trainer's default on CUDA) vs fp32 without",
     backbone_correctness.run))


class Log:
    """Prints and writes to log.txt; section headers ('== ...') carry the seconds since the start."""

    def __init__(self, path: str):
        self._file = open(path, "w", encoding="utf-8")
        self._start = time.monotonic()

    def __call__(self, msg: str) -> None:
        if msg.startswith("== ") or msg.startswith("["):
            msg = f"{msg}  (t={time.monotonic() - self._start:.0f}s)"
        print(msg, flush=True)
        self._file.write(msg + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU: the quick suite (make bench)")
    ap.add_argument("--suite", choices=["auto", *SUITES], default="auto")
    ap.add_argument("--out", help="output folder (default bench/results/<device>-<date>-<sha>)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--providers", help="comma-separated subset of " + ",".join(providers.ORDER))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: 1 for cpu-quick, else torch's one per core); recorded in "
                         "the device name")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting new work after this many seconds (gpu default 480)")
    ap.add_argument("--no-correctness", action="store_true")
    ap.add_argument("--no-micro", action="store_true", help="skip the GPU micro-checks (bench/micro.py)")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--no-trl", action="store_true", help="leave TRL out of the training-step benchmark")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    if args.providers is not None:
        try:
            args.providers = providers.parse_names(args.providers)
        except ValueError as exc:
            ap.error(str(exc))
    return args


def _train_plan(suite: str, device: torch.device):
    """[(model config, StepShape, dtype, checkpointing, steps, warmup)]"""
    S = train_step.StepShape
    if suite == "gpu":
        return [("llama-3.2-1b", S(4, 256, 768), torch.bfloat16, True, 4, 2),
                ("mistral-7b", S(4, 256, 768), torch.bfloat16, True, 3, 1)]
    if suite == "tiny":
        return [("micro-llama", S(1, 8, 24), torch.float32, False, 2, 1)]
    if suite == "gpu-dryrun":
        return [("micro-llama", S(2, 8, 24), torch.bfloat16, True, 2, 1)]
    return [("tiny-llama", S(2, 32, 96), torch.float32, False, 3, 1)]


def _checks(suite: str):
    if suite == "gpu":
        return correctness.gpu_checks(), torch.bfloat16, "triton"
    if suite == "tiny":
        return [("tiny-irregular+bias", Shape(61, 24, 517, pairs=2), True)], torch.float32, "torch"
    if suite == "gpu-dryrun":
        return ([(label, Shape(max(61, s.n // 64), max(32, s.h // 64), max(257, s.v // 256), s.pairs), bias)
                 for label, s, bias in correctness.gpu_checks()], torch.bfloat16, "triton")
    return correctness.cpu_checks(), torch.float32, "torch"


HARD_STOP = 124  # the exit status of `timeout`, and ours when its SIGTERM stops the run
_sigterm_received = False  # set by the handler too: its SystemExit raised inside a weakref callback, a __del__
# or a GC finalizer is swallowed, and the run must then stop at the next _check_stop


def _suite_providers(suite, only) -> list[str]:
    """The providers that the suite's points name (all, for a point naming none), within `only` when given."""
    named = set()
    for point in suite.points:
        named.update(point.providers or providers.ORDER)
    return [name for name in providers.ORDER if name in named and (only is None or name in only)]


def _exit_on_sigterm(signum, frame):
    # `timeout` sends SIGTERM: leave through the `finally` below, which writes the summary of what ran (and is
    # not itself interrupted by a second SIGTERM).
    global _sigterm_received
    _sigterm_received = True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(HARD_STOP)


def _check_stop() -> None:
    """Raises the hard stop a SIGTERM asked for: called between stages, points, modes and training steps, so
    that a stop whose exception was swallowed (see _sigterm_received) still ends the run before SIGKILL."""
    if _sigterm_received:
        raise SystemExit(HARD_STOP)


def _stop_reason(exc: BaseException) -> str:
    if isinstance(exc, SystemExit) and exc.code == HARD_STOP:
        return "hard time limit"
    return f"stopped by {type(exc).__name__}"


def main(argv=None) -> int:
    global _sigterm_received
    args = parse_args(argv)
    t_start = time.monotonic()
    _sigterm_received = False
    if argv is None:  # run as a program, not from a test
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    suite_name = args.suite
    if suite_name == "auto":
        suite_name = "gpu" if device.type == "cuda" else ("cpu-quick" if args.quick else "cpu")
    if suite_name == "gpu" and device.type != "cuda":
        raise SystemExit("--suite gpu: expected a CUDA device, got none (torch.cuda.is_available() is False)")
    if suite_name == "gpu-dryrun":
        # The interpreter must be on before the kernels are imported (it swaps @triton.jit at import).
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ[providers.ALLOW_INTERPRETER] = "1"
    suite = SUITES[suite_name]()
    threads = args.threads or (suite.threads if device.type == "cpu" else None)
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    budget = args.budget_s if args.budget_s is not None else (480.0 if suite_name == "gpu" else None)
    deadline = None if budget is None else t_start + budget
    train_reserve = 130.0 if suite_name == "gpu" else 0.0

    out = args.out or env.default_out_dir(device)
    os.makedirs(out, exist_ok=True)
    log = Log(os.path.join(out, "log.txt"))
    meta = dict(device=env.device_name(device), device_type=device.type, git_sha=env.git_sha(),
                versions=env.versions(), timestamp=env.timestamp(), suite=suite_name,
                command="python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:]),
                load_avg_start=round(os.getloadavg()[0], 2))
    log(f"rpo-fast bench: {meta['device']} | commit {meta['git_sha']} | {meta['versions']}")
    notes: list[str] = []
    if device.type == "cuda" or suite_name == "gpu-dryrun":
        try:
            log(f"rpo_fast.kernels from {env.ensure_kernels_importable()}")
        except Exception as exc:  # the Triton paths then fail one by one, each recorded with its reason
            reason = f"{type(exc).__name__}: {str(exc)[:300]}"
            log(f"rpo_fast.kernels not importable ({reason})")
            notes.append(f"**rpo_fast.kernels did not import** ({reason}): the Triton paths fail.")
    log(f"suite {suite_name}, output {out}" + (f", budget {budget:.0f}s" if budget else ""))
    if device.type == "cpu":
        log(f"note: CPU timings on a shared machine are noisy (load average {os.getloadavg()[0]:.2f} at start); "
            "providers are interleaved repeat by repeat so that load hits them alike")
    results = report.Results(os.path.join(out, "results.csv"), meta)
    only = args.providers  # a validated tuple of names, or None: every provider
    meta["providers"] = {name: providers.configuration(name, device) for name in _suite_providers(suite, only)
                         if providers.unavailable(name, device) is None}
    ok = True
    skipped: dict[str, str] = {}
    bench = None
    stopped = None  # what stopped the run early, if anything
    stage = "start-up"  # what ran when a stop came
    trained: list[str] = []  # training steps finished, failed or skipped
    try:
        if suite_name in GPU_SUITES and not args.no_micro:
            _check_stop()
            stage = "micro-checks"
            log("== micro-checks: fp32 atomics (acq_rel / relaxed), addmm into an fp32 accumulator")
            t0 = time.monotonic()
            micro.run(device, results.emit, log)
            log(f"   micro-checks took {time.monotonic() - t0:.0f} s")
        if not args.no_correctness:
            _check_stop()
            stage = "correctness checks"
            checks, dtype, impl = _checks(suite_name)
            log(f"== correctness: impl={impl} and the loss through each head backward vs dense in higher precision, {str(dtype).replace('torch.', '')}")
            t0 = time.monotonic()
            ok = correctness.run_checks(device, dtype, impl, checks, results.emit, log, deadline)
            log(f"   correctness took {time.monotonic() - t0:.0f} s")
            if not ok:
                notes.append(f"**Correctness check FAILED for impl={impl}**: see the correctness table.")
            for table, what, check in KERNEL_CHECKS if suite_name in GPU_SUITES else ():
                _check_stop()
                log(f"== {table.lower()}: {what}")
                t0 = time.monotonic()
                try:
                    passed, why = check(device, results.emit, log), f"see the {table.lower()} table"
                except Exception as exc:  # one check breaking must not end the run
                    passed, why = False, f"it failed to run: {type(exc).__name__}: {str(exc)[:200]}"
                    log(f"  {table} {why}")
                if not passed:
                    ok = False
                    notes.append(f"**{table} FAILED**: {why}.")
                log(f"   {table.lower()} took {time.monotonic() - t0:.0f} s")
        _check_stop()
        stage = "loss microbenchmarks"
        log("== loss microbenchmarks")
        bench = LossBench(suite, device, results.emit, providers=only,
                          deadline=None if deadline is None else deadline - train_reserve, log=log,
                          check_stop=_check_stop)
        t0 = time.monotonic()
        bench.run()
        log(f"   loss microbenchmarks took {time.monotonic() - t0:.0f} s")
        if not args.no_train:
            stage = "training steps"
            log("== training steps")
            for name, shape, dtype, ckpt, steps, warmup in _train_plan(suite_name, device):
                _check_stop()
                if deadline is not None and time.monotonic() > deadline:
                    log(f"  time budget spent: skipping training step {name}")
                    skipped.setdefault("train " + name, "time budget")
                    trained.append(name)
                    continue
                try:
                    train_step.bench_model(name, shape, device, dtype, results.emit, steps=steps, warmup=warmup,
                                           checkpointing=ckpt, log=log, deadline=deadline, with_trl=not args.no_trl)
                except Exception as exc:
                    log(f"  training step {name} failed: {type(exc).__name__}: {str(exc)[:300]}")
                    skipped.setdefault("train " + name, f"{type(exc).__name__}")
                trained.append(name)
            if args.no_trl:
                skipped["trl"] = "--no-trl"
            elif train_step.trl_unavailable():
                skipped["trl"] = train_step.trl_unavailable()
    except BaseException as exc:  # a SIGTERM at the hard limit (SystemExit 124), Ctrl-C, a bug: say so, re-raise
        stopped = _stop_reason(exc)
        in_flight = f" (point {bench.current})" if stage == "loss microbenchmarks" and bench and bench.current else ""
        meta["stopped"] = f"{stopped} during the {stage}{in_flight}"
        raise
    finally:
        if bench is not None:
            skipped.update(bench.skipped)
            skipped.update(bench.failed)
        if stopped:  # what was never measured, so that a stopped run cannot pass for a complete one
            skipped.update(bench.unfinished(stopped) if bench else unfinished_points(suite, stopped))
            if not args.no_train:
                skipped.update({f"train {name}": f"{stopped}: not finished"
                                for name, *_ in _train_plan(suite_name, device) if name not in trained})
            notes.insert(0, f"**Run stopped early ({meta['stopped']}): it is incomplete. The tables hold what was "
                            "measured before the stop; the points and steps it did not reach are listed as skipped.**")
        results.close()
        meta["wall_s"] = time.monotonic() - t_start
        meta["load_avg_end"] = round(os.getloadavg()[0], 2)
        rows = results.rows
        if suite_name == "gpu-dryrun":
            notes.append("**Dry run of the GPU suite on CPU at toy sizes (impl=triton in the Triton interpreter): "
                         "it checks that the suite runs; none of its numbers is a measurement.**")
        if device.type == "cpu":
            notes.append(f"CPU timings come from a {os.cpu_count()}-core machine shared with other processes (1-minute "
                         f"load average {meta['load_avg_start']} at the start, {meta['load_avg_end']} at the end): "
                         "expect tens of percent of noise between runs; p20/p80 show the spread within this run.")
        text = report.summary_markdown(rows, meta, skipped, notes)
        with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
            f.write(text)
        with open(os.path.join(out, "meta.json"), "w", encoding="utf-8") as f:
            json.dump({**meta, "skipped": skipped, "notes": notes}, f, indent=1)
        if not args.no_plots and rows:
            try:
                report.plot(rows, os.path.join(out, ""))
            except Exception as exc:  # plots are a convenience; the CSV is the record
                log(f"plots failed: {type(exc).__name__}: {exc}")
        log("")
        log(text)
        log(f"wrote {out} in {meta['wall_s']:.0f}s")
        log.close()
        torch.set_num_threads(threads_before)  # main() also runs inside tests
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
