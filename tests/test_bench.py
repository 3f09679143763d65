"""The benchmark harness: its CPU memory tracker is right, and the quick path runs on tiny shapes and writes a
well-formed long-format CSV, the summary and the plots. Seconds in all; the numbers themselves are not judged
here (they are benchmark results, not test results)."""
import csv
import inspect
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import report
from bench.memory import measure_memory
from bench.run import main

CPU = torch.device("cpu")


def test_memory_tracker_counts_live_tensor_bytes():
    def fn():
        a = torch.empty(1000, 1000)  # 4 MB
        b = torch.empty(500, 1000)  # 2 MB: 6 MB live
        del a  # 2 MB live
        c = torch.empty(2000, 1000)  # 8 MB: 10 MB live, the peak
        return b.numel() + c.numel()  # b and c die with the call

    use = measure_memory(fn, CPU)
    assert use.peak == 10_000_000
    assert use.end == 0


def test_memory_tracker_sees_temporaries_inside_one_op():
    # logsumexp allocates a full-size buffer inside its kernel, which a TorchDispatchMode would not see.
    x = torch.randn(1000, 1000)
    use = measure_memory(lambda: torch.logsumexp(x, dim=-1), CPU)
    assert use.peak >= 4_000_000 + 4_000
    assert use.end == 4_000  # the returned [1000] result is still alive at the end of the call


def test_memory_tracker_on_the_head_dense_vs_chunked():
    from rpo_fast import dense_linear_logprobs, linear_logprobs

    n, h, v = 256, 32, 8192
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    targets = torch.randint(0, v, (n,))

    def step(fn):
        hidden.grad = weight.grad = None
        fn().sum().backward()

    dense = measure_memory(lambda: step(lambda: dense_linear_logprobs(hidden, weight, targets)), CPU)
    assert dense.peak >= 2 * n * v * 4  # fp32 logits and their log_softmax live together
    chunked = measure_memory(lambda: step(lambda: linear_logprobs(hidden, weight, targets, impl="torch")), CPU)
    assert chunked.peak < dense.peak


def test_quick_path_on_tiny_shapes_writes_csv_summary_and_plots(tmp_path):
    out = tmp_path / "run"
    assert main(["--suite", "tiny", "--out", str(out), "--no-trl"]) == 0

    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == report.COLUMNS
        rows = list(reader)
    assert rows
    for r in rows:
        assert r["device"] and r["git_sha"] and "torch=" in r["versions"] and r["timestamp"]
        json.loads(r["config"])
        if r["metric"] != "failed":
            assert not math.isnan(float(r["p50"])), r
    head = [r for r in rows if r["op"] == "rpo_head"]
    providers = {r["provider"] for r in head}
    assert {"dense", "ours_recompute", "gemm"} <= providers
    from bench.providers import has_backward_keyword
    if has_backward_keyword():  # every backward choice that runs on CPU is a provider
        assert "ours_fwdgrad" in providers
    assert not [r for r in head if r["metric"] == "failed"]
    times = [r for r in head if r["metric"] == "time"]
    assert {r["mode"] for r in times} == {"forward", "backward", "full"}
    assert all(float(r["p20"]) <= float(r["p50"]) <= float(r["p80"]) and float(r["p50"]) > 0 for r in times)
    # Every provider computes the same loss, and the same gradients.
    assert all(float(r["p50"]) < 1e-4 for r in head if r["metric"] == "loss_rel_diff")
    same = [r for r in head if r["metric"] == "same_result"]
    assert same and all(float(r["p50"]) == 1.0 for r in same)

    def peak(provider):
        return next(float(r["p50"]) for r in head if r["provider"] == provider and r["metric"] == "peak_mem"
                    and r["mode"] == "full" and json.loads(r["config"])["label"] == "tiny-head"
                    and not json.loads(r["config"])["ref"])
    assert peak("ours_recompute") < peak("dense")

    train = {(r["provider"], r["metric"]) for r in rows if r["op"] == "train_step"}
    assert {("ours", "tokens_per_s"), ("dense", "tokens_per_s"), ("ours", "peak_step_extra")} <= train
    checks = [r for r in rows if r["op"] == "correctness" and r["metric"].startswith("pass")]
    assert checks and all(float(r["p50"]) == 1.0 for r in checks)

    summary = (out / "summary.md").read_text()
    assert "## Targets" in summary and "not measured: no GPU in this run" in summary
    meta = json.loads((out / "meta.json").read_text())
    assert meta["suite"] == "tiny"
    # How each peer was configured is part of the record: Liger compiled, as it runs by default.
    assert "liger" in providers and "compiled=True" in meta["providers"]["liger"]
    assert f"- `liger`: {meta['providers']['liger']}" in summary
    for name in ("vs_V.png", "vs_N.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A run killed before its summary (no summary.md, meta.json or plots; bench/gpu_7b.py then appended its
    # section to a new summary.md): `python -m bench.report` rebuilds them from results.csv.
    for name in ("summary.md", "meta.json", "vs_V.png", "vs_N.png"):
        (out / name).unlink()
    seven_b = "\n## 7B memory modes\n\n| mode | peak |\n|---|---|\n| full | 68.3 |\n"
    (out / "summary.md").write_text(seven_b)
    assert report.main([str(out), "--suite", "tiny"]) == 0
    rebuilt = (out / "summary.md").read_text()
    assert "rebuilt from results.csv" in rebuilt and "No meta.json" in rebuilt and rebuilt.endswith(seven_b)

    def first_cells(text):  # every table row's first cell: the same tables, rows and order
        return [line.split("|")[1] for line in text.splitlines() if line.startswith("| ")]
    assert first_cells(rebuilt) == first_cells(summary) + [" mode ", " full "] and len(first_cells(summary)) > 20
    for name in ("vs_V.png", "vs_N.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path)])  # no results.csv there
    assert exit_info.value.code == 2


def test_gpu_suite_7b_part_in_a_dry_run(tmp_path):
    """`RPO_BENCH_SUITE=gpu-dryrun bash bench/gpu_suite.sh OUT 7b` runs gpu_7b.py --dry-run: its CSV, a summary
    section and its output in log.txt, within the 8 flat files a lent machine returns."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    env = dict(os.environ, RPO_BENCH_SUITE="gpu-dryrun", PYTHON=sys.executable,
               RPO_GPU7B_ARGS="--modes full_adamw_bf16,lora_24gb")
    result = subprocess.run(["bash", str(root / "bench/gpu_suite.sh"), str(out), "7b"], capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    with open(out / "gpu_7b.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["mode"], r["metric"]) for r in rows} >= {("full_adamw_bf16", "peak_memory"),
                                                        ("lora_24gb", "peak_memory")}
    assert all(json.loads(r["config"])["path"] == "packed" for r in rows)
    summary = (out / "summary.md").read_text()
    assert "## 7B memory modes" in summary and "| full_adamw_bf16 | packed |" in summary
    log = (out / "log.txt").read_text()
    assert "full_adamw_bf16" in log and "wrote 8 rows" in log  # 4 metrics x 2 modes
    assert sorted(p.name for p in out.iterdir()) == ["gpu_7b.csv", "log.txt", "nvidia-smi.csv", "summary.md"]


def _gpu_7b_csv(out) -> list[dict]:
    with open(out / "gpu_7b.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_gpu_7b_keeps_a_measured_mode_whose_prediction_fails(tmp_path, monkeypatch):
    """The planner raising after a mode was measured: its measured rows stay, an "error" row says why there is no
    prediction, and the summary shows it."""
    from bench import gpu_7b

    def broken_plan(self, settings, impl):
        raise ValueError("injected: no plan")

    monkeypatch.setattr(gpu_7b.Bench, "plan", broken_plan)
    summary = tmp_path / "summary.md"
    assert gpu_7b.main([str(tmp_path), "--dry-run", "--modes", "full_adamw_bf16", "--summary", str(summary)]) == 0
    rows = _gpu_7b_csv(tmp_path)
    assert [r["metric"] for r in rows] == ["peak_memory", "step_time", "tokens_per_s", "error"]
    assert json.loads(rows[-1]["config"])["reason"] == "planner: ValueError: injected: no plan"
    assert "| full_adamw_bf16 | packed |" in summary.read_text() and "planner: ValueError" in summary.read_text()


def test_gpu_7b_a_mode_that_breaks_outside_its_measurement_leaves_the_next(tmp_path, monkeypatch):
    """Whatever a mode raises (here its whole run_mode) is that mode's "error" row; the next mode is measured."""
    from bench import gpu_7b

    run_mode = gpu_7b.Bench.run_mode

    def broken_first(self, mode):
        if mode == "full_adamw_bf16":
            raise KeyError("injected")
        return run_mode(self, mode)

    monkeypatch.setattr(gpu_7b.Bench, "run_mode", broken_first)
    assert gpu_7b.main([str(tmp_path), "--dry-run", "--modes", "full_adamw_bf16,full_adamw"]) == 0
    rows = _gpu_7b_csv(tmp_path)
    assert [(r["mode"], r["metric"]) for r in rows][:2] == [("full_adamw_bf16", "error"), ("full_adamw", "peak_memory")]
    assert json.loads(rows[0]["config"])["reason"] == "KeyError: 'injected'"


def test_micro_checks_on_cpu():
    """The GPU suite's micro-checks rehearse on CPU: the atomics kernel in the Triton interpreter (every add
    lands), addmm with out_dtype reported unsupported, the upcast fallback exact to fp32 precision."""
    from bench import micro

    rows, lines = [], []
    micro.run(CPU, rows.append, lines.append)
    assert not [r for r in rows if r["metric"] == "failed"], lines
    atomics = [r for r in rows if r["x_value"] == "atomics"]
    assert len(atomics) == len(micro.SEMANTICS)
    assert all(json.loads(r["config"])["exact"] and r["p50"] > 0 for r in atomics)
    by = {(r["provider"], r["metric"]): r for r in rows if r["x_value"] == "addmm"}
    assert by[("rpo_fast.gemm probe", "uses_out_dtype")]["p50"] == 0.0
    assert by[("rpo_fast.gemm probe", "accumulates_in_place")]["p50"] == 0.0
    assert ("addmm out_dtype=fp32", "unsupported") in by
    assert by[("fp32 upcast + addmm_", "rel_err_vs_fp64")]["p50"] < 1e-6
    assert "**Micro-checks**" in "\n".join(report.micro_table(rows))


def test_chunk_sweep_writes_the_frontier(tmp_path):
    """`python -m bench.chunk_sweep` at a tiny shape: its three files, the plan's GEMM work, and smaller chunks
    holding less memory (one chunk of logits alive), the measured fact the sweep exists to show."""
    from bench import chunk_sweep

    rows = chunk_sweep.main(["--n", "64", "--h", "16", "--v", "512", "--pairs", "2", "--chunks", "auto,16,8",
                             "--reps", "1", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frontier.png", "results.json", "summary.md"]
    by_chunk = {r["chunk_tokens"]: r for r in rows if r["name"].startswith("fwdgrad")}
    # Pairs of 32 rows: chunks of 16 keep 16 of each pair's rows and compute the other 16 again; of 8, 24.
    assert [by_chunk[c]["gemm_work"] for c in (16, 8)] == [(192 + 32) / 192, (192 + 48) / 192]
    auto = max(by_chunk)
    assert by_chunk[auto]["gemm_work"] == 1.0
    assert by_chunk[8]["peak"] < by_chunk[16]["peak"] < by_chunk[auto]["peak"]
    assert "| fwdgrad chunk=8 | 8 | 1.250 |" in (tmp_path / "summary.md").read_text()
    with pytest.raises(ValueError, match="--chunks"):
        chunk_sweep.parse_chunks("auto,0")


def test_attention_correctness_catches_a_kernel_that_drops_the_window(monkeypatch):
    """The GPU suite's attention check, run through the CUDA branch on the CPU with a stand-in of torch's varlen
    kernel (tests/test_attention.py): it passes the documented kernel, and fails one that ignores the window."""
    from torch.nn.attention import varlen

    from bench import attention_correctness
    from test_attention import use_cuda_backend

    calls = use_cuda_backend(monkeypatch, "torch_varlen")
    errors = attention_correctness.check_layout(CPU, "torch_varlen", shared=True, window=24)
    assert calls and all(err <= 2 * cpu + attention_correctness.TOL for err, cpu in errors.values()), errors
    documented = varlen.varlen_attn
    signature = inspect.signature(documented)

    def windowless(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments["window_size"] = (-1, 0)  # causal, the window dropped
        return documented(*bound.args, **bound.kwargs)

    windowless.__signature__ = signature
    monkeypatch.setattr(varlen, "varlen_attn", windowless)
    errors = attention_correctness.check_layout(CPU, "torch_varlen", shared=True, window=24)
    assert errors["out"][0] > 2 * errors["out"][1] + attention_correctness.TOL, errors


def test_an_attention_backend_probe_that_raises_fails_the_check_not_the_run(monkeypatch):
    """The probe imports flash-attn; a broken install can raise anything (not only ImportError): the attention
    check fails with a pass_run row of 0 and a FAIL line, and returns."""
    from bench import attention_correctness

    def broken(device):
        raise AttributeError("injected: flash_attn half-imported")

    monkeypatch.setattr(attention_correctness, "backends", broken)
    rows, lines = [], []
    assert attention_correctness.run(CPU, rows.append, lines.append) is False
    assert [(r["provider"], r["metric"], r["p50"]) for r in rows] == [("backend probe", "pass_run", 0.0)]
    assert any(line.startswith("  FAIL attention backend probe: failed to run (AttributeError") for line in lines)


def test_a_kernel_check_that_raises_fails_and_the_run_goes_on(tmp_path, monkeypatch):
    """bench.run's kernel checks (attention, backbone) on the GPU suites: one that raises is a failed check with
    its reason in the summary; the next check and the loss benchmarks still run, and the run exits 1."""
    from bench import correctness, providers
    from bench import run as bench_run

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # what the gpu-dryrun suite sets: restored afterwards
    monkeypatch.setenv(providers.ALLOW_INTERPRETER, "1")
    monkeypatch.setattr(correctness, "run_checks", lambda *args, **kwargs: True)  # the head's: not under test
    ran = []

    def broken(device, emit, log):
        raise KeyError("injected")

    monkeypatch.setattr(bench_run, "KERNEL_CHECKS", (("Broken check", "raises", broken),
                                                     ("Next check", "passes", lambda *args: not ran.append(1))))
    out = tmp_path / "run"
    assert main(["--suite", "gpu-dryrun", "--out", str(out), "--providers", "gemm", "--no-micro", "--no-train",
                 "--no-plots"]) == 1
    assert ran == [1]
    meta = json.loads((out / "meta.json").read_text())
    assert "**Broken check FAILED**: it failed to run: KeyError: 'injected'." in meta["notes"]
    with open(out / "results.csv", newline="") as f:
        assert any(r["provider"] == "gemm" and r["metric"] == "time" for r in csv.DictReader(f))


def test_backbone_correctness_judges_a_patch(monkeypatch):
    """The GPU suite's check of Liger's backbone kernels, with stand-in patches on the CPU (Liger's kernels
    need CUDA): a patch that changes nothing passes; one that breaks every RMSNorm (epsilon 1) fails; where
    the kernels do not apply (here: the CPU) the family is skipped, not passed."""
    from bench import backbone_correctness as bc

    def no_change(model):
        return True

    def broken_norms(model):
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.variance_epsilon = 1.0
        return True

    errors = bc.check_family("mistral", CPU, no_change)
    assert all(err <= 2 * plain + bc.TOL for err, plain in errors.values()), errors
    errors = bc.check_family("mistral", CPU, broken_norms)
    assert errors["grads"][0] > 2 * errors["grads"][1] + bc.TOL, errors
    rows, lines = [], []
    assert bc.run(CPU, rows.append, lines.append) and rows == [] and len(lines) == len(bc.FAMILIES)
    assert "the kernels do not apply here" in lines[0]


def test_backbone_correctness_judges_a_module_level_rope_patch_and_undoes_it(monkeypatch):
    """Liger rebinds the family's RoPE function in the transformers module, for every model of the process.
    The check must judge it against models that run without it, and leave later models stock."""
    from transformers.models.mistral import modeling_mistral

    from bench import backbone_correctness as bc

    stock = modeling_mistral.apply_rotary_pos_emb

    def no_rotation(q, k, *args, **kwargs):  # a RoPE kernel that forgets to rotate
        return q, k

    def module_level_rope(model):
        modeling_mistral.apply_rotary_pos_emb = no_rotation
        return True

    errors = bc.check_family("mistral", CPU, module_level_rope)
    assert modeling_mistral.apply_rotary_pos_emb is stock
    assert errors["grads"][0] > 2 * errors["grads"][1] + bc.TOL, errors


def test_a_misspelled_provider_name_is_an_error(tmp_path, capsys):
    """`--providers dense,ligr` must fail with a message naming `ligr`, not run without Liger."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--suite", "tiny", "--out", str(tmp_path / "run"), "--providers", "dense,ligr", "--no-train",
              "--no-correctness", "--no-plots"])
    assert exit_info.value.code == 2
    assert "'ligr'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_commit_of_a_copied_tree_is_given_or_unknown_never_a_wrong_one(tmp_path):
    """A copy of the checkout without .git (a lent GPU machine) sitting inside some other repository must not
    record that repository's commit: 'unknown (no .git)', or what $RPO_BENCH_COMMIT says."""
    root = Path(__file__).resolve().parents[1]
    outer = tmp_path / "outer"
    tree = outer / "copy"
    (tree / "bench").mkdir(parents=True)
    for name in ("__init__.py", "env.py"):
        (tree / "bench" / name).write_bytes((root / "bench" / name).read_bytes())
    git = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    subprocess.run(["git", "init", "-q", str(outer)], check=True, env=git)
    (outer / "README").write_text("another project\n")
    subprocess.run(["git", "-C", str(outer), "add", "README"], check=True, env=git)
    subprocess.run(["git", "-C", str(outer), "commit", "-q", "-m", "x"], check=True, env=git)

    def commit(**extra):
        env = {k: v for k, v in os.environ.items() if k != "RPO_BENCH_COMMIT"}
        out = subprocess.run([sys.executable, "-c", "from bench import env; print(env.git_sha())"], cwd=tree,
                             env=dict(env, PYTHONPATH=str(tree), **extra), capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert commit() == "unknown (no .git)"
    assert commit(RPO_BENCH_COMMIT="abc1234+dirty") == "abc1234+dirty"


def test_every_gpu_timing_sample_comes_from_cuda_events(monkeypatch):
    """On a GPU each sample is the time between two CUDA events; a sample taken with the wall clock around
    synchronize (launch and sync latency included) must not join them. Stand-in events read a stand-in GPU
    clock that each call moves 1 ms while taking 20 ms of wall time: every sample must read 1 ms, the first
    call excepted. The micro-checks (bench/micro.py) obey the same rule, and time their short kernels several
    calls to a sample so that each sample holds at least 1 ms of GPU work."""
    import time

    from bench import micro
    from bench.timing import Candidate, time_interleaved

    gpu_ms, samples_ms = [0.0], []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.at = None

        def record(self):
            self.at = gpu_ms[0]

        def elapsed_time(self, other):
            samples_ms.append(other.at - self.at)
            return samples_ms[-1]

    def call(ms, wall_s):
        def run(*_):
            gpu_ms[0] += ms
            time.sleep(wall_s)

        return run

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    cand = Candidate("slow_launch", lambda: None, call(1.0, 0.02))
    times, first = time_interleaved([cand], torch.device("cuda"), min_reps=3, max_reps=3, budget_s=0.0)
    q = times["slow_launch"]
    assert q.n == 3 and q.p20 == q.p50 == q.p80 == 1e-3, q
    assert first["slow_launch"] >= 0.02  # the first call is wall time (compilation is host time)

    samples_ms.clear()
    seconds, calls = micro._median_s(call(0.25, 0.002), torch.device("cuda"), 3, budget_s=0.0)
    assert seconds == pytest.approx(0.25e-3)
    assert samples_ms[1:] == [1.0, 1.0] and calls == 1 + 1 + 2 * 4  # warm-up, sizing call, 2 samples of 4 calls


def _flaky(monkeypatch, name, fail_from_call, message="CUDA out of memory (simulated)"):
    """Makes provider `name`'s forward raise from its `fail_from_call`-th call on (1: at the first call)."""
    from bench import providers

    build = providers.build

    def flaky_build(provider, inp):
        run = build(provider, inp)
        if provider == name:
            forward, calls = run.forward, [0]

            def flaky_forward():
                calls[0] += 1
                if calls[0] >= fail_from_call:
                    raise RuntimeError(message)
                return forward()

            run.forward = flaky_forward
        return run

    monkeypatch.setattr(providers, "build", flaky_build)


def _one_point_bench(modes=("full", "forward", "backward"), providers=("dense", "ours_fwdgrad", "ours_recompute", "gemm")):
    """LossBench's rows and log over one tiny point."""
    from bench.loss_bench import LossBench
    from bench.shapes import Point, Shape, Suite

    point = Point(Shape(64, 16, 256, pairs=2), "V", 256, modes=modes, providers=providers, label="one")
    suite = Suite("float32", [point], headline="one", min_reps=2, max_reps=2, budget_s=0.0, matmul_size=64)
    rows, lines = [], []
    LossBench(suite, CPU, rows.append, log=lines.append).run()
    return [r for r in rows if r["op"] == "rpo_head"], lines


def test_a_provider_failing_while_timed_loses_only_its_own_rows(monkeypatch):
    """ours_recompute runs out of memory from its 3rd call on (past its first call, inside the timing loop):
    the other providers keep their times and memory in every mode, and a `failed` row says why it is missing."""
    _flaky(monkeypatch, "ours_recompute", 3)
    rows, lines = _one_point_bench()
    have = {(r["provider"], r["mode"], r["metric"]) for r in rows}
    for p in ("dense", "ours_fwdgrad", "gemm"):
        for mode in ("full", "forward", "backward"):
            assert (p, mode, "time") in have, (p, mode, lines)
        if p != "gemm":
            assert {(p, "full", "peak_mem"), (p, "forward", "peak_mem")} <= have, (p, lines)
    assert not [r for r in rows if r["provider"] == "ours_recompute" and r["metric"] in ("time", "peak_mem")]
    failed = [r for r in rows if r["metric"] == "failed"]
    assert [r["provider"] for r in failed] == ["ours_recompute"]
    assert json.loads(failed[0]["config"])["reason"] == "timing full: out of memory"
    assert any("ours_recompute: failed (timing full: out of memory)" in line for line in lines)


def test_memory_is_measured_even_when_timing_fails_as_a_whole(monkeypatch):
    from bench import loss_bench

    timer = loss_bench.time_interleaved

    def broken_timer(cands, *args, **kwargs):
        if cands[0].name == "mm":  # the matmul rate
            return timer(cands, *args, **kwargs)
        raise RuntimeError("timer broke")

    monkeypatch.setattr(loss_bench, "time_interleaved", broken_timer)
    rows, lines = _one_point_bench(modes=("full",), providers=("dense", "ours_fwdgrad"))
    assert {r["provider"] for r in rows if r["metric"] == "peak_mem"} == {"dense", "ours_fwdgrad"}, lines
    assert not [r for r in rows if r["metric"] == "time"]


def test_a_failed_matmul_rate_costs_only_its_own_rows(monkeypatch):
    """The matmul rate (the denominator of frac_mm_peak) is measured first: when it fails, a `failed` row says why
    and the loss points are measured all the same, without frac_mm_peak."""
    from bench import loss_bench
    from bench.shapes import Point, Shape, Suite

    def broken(*args, **kwargs):
        raise RuntimeError("injected: no matmul")

    monkeypatch.setattr(loss_bench, "matmul_rate", broken)
    point = Point(Shape(64, 16, 256, pairs=2), "V", 256, modes=("full",), providers=("dense", "gemm"), label="one")
    suite = Suite("float32", [point], headline="one", min_reps=2, max_reps=2, budget_s=0.0, matmul_size=64)
    rows, lines = [], []
    bench = loss_bench.LossBench(suite, CPU, rows.append, log=lines.append)
    bench.run()
    matmul = [r for r in rows if r["op"] == "matmul"]
    assert [r["metric"] for r in matmul] == ["failed"] and "injected" in json.loads(matmul[0]["config"])["reason"]
    assert bench.failed == {"matmul rate": "failed: RuntimeError: injected: no matmul"}, lines
    timed = {r["provider"] for r in rows if r["metric"] == "time"}
    assert timed == {"dense", "gemm"} and not [r for r in rows if r["metric"] == "frac_mm_peak"]


def _loss_row(provider, metric, p50, *, label="", x_name="N", x_value=4096, n=4096, h=4096, v=128256, ref=False,
              mode="full", **config):
    """One rpo_head row as loss_bench emits it."""
    cfg = dict(N=n, H=h, V=v, pairs=4, dtype="bfloat16", ref=ref, label=label, **config)
    return dict(op="rpo_head", provider=provider, mode=mode, metric=metric, unit="", x_name=x_name, x_value=x_value,
                p50=p50, p20=p50, p80=p50, config=json.dumps(cfg), device="GPU", git_sha="abc", versions="",
                timestamp="")


def test_two_points_of_one_shape_never_mix_in_the_report():
    """The published-ce point and an N-sweep step of the same shape are separate timing runs: each table,
    sweep cell and target reads the rows of one point (time and memory alike)."""
    from bench.shapes import gpu_suite

    ce = dict(label="published-ce", x_name="preset", x_value="published-ce")
    llama = dict(label="llama-3-8b", x_name="preset", x_value="llama-3-8b", n=16384)
    rows = [_loss_row("ours_fwdgrad", "time", 0.020, **ce), _loss_row("gemm", "time", 0.010, **ce),
            _loss_row("ours_fwdgrad", "peak_mem", 100 * 2**20, **ce),
            _loss_row("ours_fwdgrad", "time", 0.020, **llama), _loss_row("gemm", "time", 0.010, **llama),
            _loss_row("ours_fwdgrad", "time", 0.030),  # the N=4096 sweep step: same shape, a later run
            _loss_row("gemm", "time", 0.012), _loss_row("ours_fwdgrad", "peak_mem", 300 * 2**20)]
    ce_table = "\n".join(report.published_ce_table(rows))
    assert "| 20.00 |" in ce_table and "30.00" not in ce_table
    target = next(t for t in report.targets(rows, "gpu") if "published-ce" in t["name"])
    assert target["measured"] == pytest.approx(0.020 / 0.01733)
    _, data = report.sweep_series(rows, "N")
    t, mem = data["ours_fwdgrad"][4096]
    assert (t["p50"], mem["p50"]) == (0.020, 100 * 2**20)  # both from the published-ce point
    # The GPU suite measures each (shape, reference setting) once: the N sweep reuses published-ce and the preset.
    measured = [(p.shape, ref) for p in gpu_suite().points for ref in p.with_ref]
    assert len(measured) == len(set(measured))


def test_failed_providers_are_reported_with_their_reason(tmp_path, monkeypatch):
    """A provider that fails shows in summary.md (its table row, the sweep, the skipped list) and in meta.json's
    skipped, with the reason; a target missing a provider says why (failed), not a guess (not installed?)."""
    _flaky(monkeypatch, "ours_recompute", 3)
    out = tmp_path / "run"
    assert main(["--suite", "tiny", "--out", str(out), "--providers", "dense,ours_fwdgrad,ours_recompute,gemm",
                 "--no-train", "--no-correctness", "--no-plots"]) == 0
    summary = (out / "summary.md").read_text()
    failed_row = r"\| rpo_fast backward=recompute \(`ours_recompute`\) \| \*\*failed\*\*: timing (\w+): out of memory \|"
    assert len(re.findall(failed_row, summary)) == 6, summary  # tiny-head: 3 modes, with and without reference
    sweep = summary[summary.index("**Sweep over V**"):]
    assert "| `ours_recompute` | failed | failed |" in sweep
    skipped = json.loads((out / "meta.json").read_text())["skipped"]
    assert re.fullmatch(r"failed: timing \w+: out of memory", skipped["ours_recompute at tiny-head"])
    assert "`ours_recompute at N=256` (failed: timing full: out of memory)" in summary

    llama = dict(label="llama-3-8b", x_name="preset", x_value="llama-3-8b", n=16384)
    rows = [_loss_row("ours_fwdgrad", "time", 0.02, **llama), _loss_row("gemm", "time", 0.01, **llama),
            _loss_row("liger", "failed", math.nan, reason="first call: out of memory", **llama)]
    liger = next(t for t in report.targets(rows, "gpu") if t["name"].startswith("GPU llama-3-8b full: Liger"))
    assert liger["note"] == "`liger` failed (first call: out of memory)"
    liger = next(t for t in report.targets(rows[:2], "gpu", {"liger": "liger_kernel not installed"})
                 if t["name"].startswith("GPU llama-3-8b full: Liger"))
    assert liger["note"] == "`liger` skipped (liger_kernel not installed)"


def test_correctness_pass_needs_every_check_and_liger_ratio_is_liger_over_ours():
    """The correctness table's pass column is 'yes' only when every pass_* check of the path is 1; the Liger target
    is Liger's time over ours (>= 1.5 is met: 0.05 s / 0.02 s = 2.5), not ours over Liger."""
    def row(provider, metric, value):
        return dict(op="correctness", provider=provider, metric=metric, x_value="tiny", p50=value)

    rows = [row(p, f"rel_err_{q}", 1e-6) for p in ("dense", "ours_fwdgrad", "ours_recompute")
            for q in ("logprobs", "dhidden", "dweight")]
    rows += [row("ours_fwdgrad", f"pass_{q}", 1.0) for q in ("logprobs", "dhidden", "dweight")]
    rows += [row("ours_recompute", "pass_logprobs", 1.0), row("ours_recompute", "pass_dhidden", 0.0),
             row("ours_recompute", "pass_dweight", 1.0)]
    table = "\n".join(report.correctness_table(rows))
    assert "| tiny | linear_logprobs impl=fwdgrad |" in table and "| tiny | linear_logprobs impl=recompute |" in table
    passed = {line.split(" | ")[1]: line.split(" | ")[-1] for line in table.splitlines() if line.startswith("| tiny")}
    assert passed == {"linear_logprobs impl=fwdgrad": "yes |", "linear_logprobs impl=recompute": "NO |"}

    llama = dict(label="llama-3-8b", x_name="preset", x_value="llama-3-8b", n=16384)
    rows = [_loss_row("ours_fwdgrad", "time", 0.02, **llama), _loss_row("gemm", "time", 0.01, **llama),
            _loss_row("liger", "time", 0.05, **llama)]
    liger = next(t for t in report.targets(rows, "gpu") if t["name"].startswith("GPU llama-3-8b full: Liger"))
    assert liger["measured"] == pytest.approx(2.5) and liger["met"] is True


def test_the_mode_the_targets_need_is_timed_first():
    """A run stopped at its hard limit must lose the informational modes, not `full`, on which the targets are
    judged: at a point timed in every mode, `full` comes first."""
    from bench.shapes import ALL_MODES, gpu_suite

    assert gpu_suite().points[0].modes == ALL_MODES
    rows, _ = _one_point_bench(modes=ALL_MODES, providers=("dense", "gemm"))
    assert [r["mode"] for r in rows if r["metric"] == "time"][:2] == ["full", "full"]


def test_a_run_stopped_at_its_hard_limit_says_so(tmp_path, monkeypatch):
    """The SIGTERM of `timeout` (SystemExit 124 in bench.run) during the second point: the run exits 124, and
    summary.md and meta.json say it stopped, naming the point in flight and the points never reached."""
    from bench.loss_bench import LossBench

    run_point, calls = LossBench._run_point, []

    def stopped_on_the_second(self, point, with_ref):
        calls.append(point)
        if len(calls) == 2:
            raise SystemExit(124)
        return run_point(self, point, with_ref)

    monkeypatch.setattr(LossBench, "_run_point", stopped_on_the_second)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["--suite", "tiny", "--out", str(out), "--providers", "dense,gemm", "--no-correctness", "--no-plots"])
    assert exit_info.value.code == 124
    meta = json.loads((out / "meta.json").read_text())
    assert meta["stopped"] == "hard time limit during the loss microbenchmarks (point tiny-head +ref)"
    assert meta["skipped"]["point tiny-head +ref"] == "hard time limit: stopped during it (partly measured)"
    assert meta["skipped"]["point V=512"] == meta["skipped"]["point N=256"] == "hard time limit: not reached"
    assert meta["skipped"]["train micro-llama"] == "hard time limit: not finished"
    assert "point tiny-head" not in meta["skipped"]  # measured before the stop
    summary = (out / "summary.md").read_text()
    assert "**Run stopped early (hard time limit during the loss microbenchmarks (point tiny-head +ref))" in summary
    assert "`point V=512` (hard time limit: not reached)" in summary


def _swallowed_sigterm(monkeypatch):
    """Calls bench.run's SIGTERM handler as the signal would, inside code that swallows its SystemExit (a weakref
    callback, a __del__, a GC finalizer: "Exception ignored in ..."); the test's own SIGTERM handler and
    bench.run's flag are restored afterwards."""
    import signal

    from bench import run as bench_run

    monkeypatch.setattr(bench_run, "_sigterm_received", False, raising=False)
    previous = signal.getsignal(signal.SIGTERM)

    def fire():
        try:
            bench_run._exit_on_sigterm(signal.SIGTERM, None)
        except SystemExit:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)

    return fire


def test_a_sigterm_whose_exit_is_swallowed_still_stops_the_loss_benchmarks(tmp_path, monkeypatch):
    """The SIGTERM lands while dense runs at the first point, and its SystemExit is swallowed: the run stops at the
    next check (before the next provider), exits 124 and says so, rather than running on until SIGKILL."""
    from bench import providers

    fire, build, forwards = _swallowed_sigterm(monkeypatch), providers.build, []

    def build_with_sigterm(provider, inp):
        run = build(provider, inp)
        forward = run.forward

        def forward_with_sigterm():
            forwards.append(provider)
            if len(forwards) == 1:
                fire()
            return forward()

        run.forward = forward_with_sigterm
        return run

    monkeypatch.setattr(providers, "build", build_with_sigterm)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["--suite", "tiny", "--out", str(out), "--providers", "dense,gemm", "--no-correctness", "--no-plots"])
    assert exit_info.value.code == 124
    assert forwards == ["dense"]  # gemm never started
    meta = json.loads((out / "meta.json").read_text())
    assert meta["stopped"] == "hard time limit during the loss microbenchmarks (point tiny-head)"
    assert meta["skipped"]["point V=512"] == "hard time limit: not reached"


def test_a_sigterm_whose_exit_is_swallowed_still_stops_the_training_steps(tmp_path, monkeypatch):
    """Likewise during the first of two training-step benchmarks: the second never starts."""
    from bench import run as bench_run
    from bench import train_step

    fire, trained = _swallowed_sigterm(monkeypatch), []

    def bench_model(name, *args, **kwargs):
        trained.append(name)
        fire()

    plan = bench_run._train_plan("tiny", CPU)[0]
    monkeypatch.setattr(bench_run, "_train_plan", lambda suite, device: [plan, ("second", *plan[1:])])
    monkeypatch.setattr(train_step, "bench_model", bench_model)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["--suite", "tiny", "--out", str(out), "--providers", "gemm", "--no-correctness", "--no-plots"])
    assert exit_info.value.code == 124 and trained == [plan[0]]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["stopped"] == "hard time limit during the training steps"
    assert meta["skipped"]["train second"] == "hard time limit: not finished"
    assert f"train {plan[0]}" not in meta["skipped"]


def test_kernels_that_do_not_import_leave_the_run_going(tmp_path, monkeypatch):
    """bench.run makes rpo_fast.kernels importable first (GPU suites): if that raises, the run goes on (the Triton
    paths then fail one by one) and its summary and meta.json say why."""
    from bench import env, providers

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # what the gpu-dryrun suite sets: restored afterwards
    monkeypatch.setenv(providers.ALLOW_INTERPRETER, "1")

    def broken():
        raise RuntimeError("injected: the kernels do not import")

    monkeypatch.setattr(env, "ensure_kernels_importable", broken)
    out = tmp_path / "run"
    assert main(["--suite", "gpu-dryrun", "--out", str(out), "--providers", "gemm", "--no-micro", "--no-correctness",
                 "--no-train", "--no-plots"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert any("rpo_fast.kernels did not import** (RuntimeError: injected" in note for note in meta["notes"])
    assert "injected: the kernels do not import" in (out / "summary.md").read_text()
    with open(out / "results.csv", newline="") as f:
        assert any(r["provider"] == "gemm" and r["metric"] == "time" for r in csv.DictReader(f))


def test_gpu_suite_logs_a_loss_part_stopped_at_its_hard_limit(tmp_path):
    """gpu_suite.sh writes the loss part's exit line into log.txt (a file the lent machine returns), saying that a
    part stopped at its hard limit is incomplete. A stand-in python that outlives a 1 s limit."""
    root = Path(__file__).resolve().parents[1]
    slow = tmp_path / "slow_python"
    slow.write_text("#!/bin/sh\nexec sleep 60\n")
    slow.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(slow), HARD_LIMIT_S="1", RPO_BENCH_WHEELS=str(tmp_path / "no-wheels"))
    result = subprocess.run(["bash", str(root / "bench/gpu_suite.sh"), str(out), "loss"], capture_output=True,
                            text=True, timeout=60, env=env)
    assert result.returncode == 124, result.stdout + result.stderr
    log = (out / "log.txt").read_text()
    assert "gpu_suite: loss part: exit 124" in log and "stopped at its hard limit of 1 s: incomplete" in log
    assert "gpu_suite: loss: exit 124" in log


def test_a_provider_with_a_wrong_result_is_flagged(monkeypatch):
    """'All compute the same loss' is checked: a NaN loss, and a loss with the right value but doubled gradients,
    are both flagged in the rows, the log, the point's table and the summary's notes; NaN reads NaN, never '—'."""
    from bench import providers

    build = providers.build

    def wrong_build(name, inp):
        run = build(name, inp)
        forward = run.forward
        if name == "ours_recompute":
            run.forward = lambda: forward() * float("nan")
        if name == "ours_fwdgrad":
            def doubled_gradients():
                loss = forward()
                return 2 * loss - loss.detach()  # the same value
            run.forward = doubled_gradients
        return run

    monkeypatch.setattr(providers, "build", wrong_build)
    rows, lines = _one_point_bench(modes=("full",), providers=("dense", "ours_fwdgrad", "ours_recompute", "gemm"))
    same = {r["provider"]: r for r in rows if r["metric"] == "same_result"}
    assert set(same) == {"dense", "ours_fwdgrad", "ours_recompute"}  # the floor computes no loss
    assert same["dense"]["p50"] == 1.0
    assert same["ours_fwdgrad"]["p50"] == 0.0 and "dh rel diff 1.0e+00" in json.loads(same["ours_fwdgrad"]["config"])["why"]
    why = json.loads(same["ours_recompute"]["config"])["why"]
    assert same["ours_recompute"]["p50"] == 0.0 and "loss not finite" in why and "loss rel diff nan" in why
    loss_diff = {r["provider"]: r["p50"] for r in rows if r["metric"] == "loss_rel_diff"}
    assert loss_diff["ours_fwdgrad"] < 1e-6 and math.isnan(loss_diff["ours_recompute"])
    assert any("ours_recompute: RESULT DIFFERS" in line for line in lines)
    table = "\n".join(report.headline_tables(rows))
    assert "| **NaN / NaN / NaN: DIFFERS (loss not finite" in table
    assert len(re.findall(r"\*\*`ours_\w+` at one: the result differs", "\n".join(report.result_notes(rows)))) == 2


def test_honest_providers_agree_with_dense_in_bf16():
    """The tolerances leave room for rounding: in bf16 every provider's loss and gradients pass."""
    from bench.loss_bench import LossBench
    from bench.shapes import Point, Shape, Suite

    point = Point(Shape(128, 64, 512, pairs=2), "V", 512, providers=("dense", "ours_fwdgrad", "ours_recompute"),
                  label="bf16")
    rows = []
    LossBench(Suite("bfloat16", [point], headline="bf16", min_reps=1, max_reps=1, budget_s=0.0, matmul_size=64),
              CPU, rows.append, log=lambda line: None).run()
    same = [r for r in rows if r.get("metric") == "same_result"]
    assert len(same) == 3 and all(r["p50"] == 1.0 for r in same), same


def test_liger_runs_compiled_on_cpu_as_by_default(monkeypatch):
    """Liger's default is compiled=True and it works on CPU; dense_compile and cce are compiled there too, so an
    uncompiled Liger would be handicapped. The provider must build it compiled on every device."""
    import liger_kernel.chunked_loss

    from bench import providers
    from bench.shapes import Shape

    made = []

    class Recorder:
        def __init__(self, **kwargs):
            made.append(kwargs)

    monkeypatch.setattr(liger_kernel.chunked_loss, "LigerFusedLinearDPOLoss", Recorder)
    providers.build("liger", providers.make_inputs(Shape(16, 8, 32, pairs=2), torch.float32, CPU, with_ref=False))
    assert made and made[0]["compiled"] is True
    assert "compiled=True" in providers.configuration("liger", CPU)


def test_the_summary_says_what_gradient_filters_skip_on_random_inputs():
    """cce (on a GPU) and ours_atomic_filter skip tiles whose entries are all below a bf16-scale threshold; on
    random unit-scale logits they skip far fewer than in training, and the summary must say so wherever they were
    timed."""
    meta = dict(device="GPU", timestamp="", git_sha="abc", versions="", suite="gpu", command="", device_type="cuda")
    rows = [_loss_row("cce", "time", 0.02, label="llama-3-8b"), _loss_row("ours_atomic_filter", "time", 0.02,
                                                                           label="llama-3-8b")]
    summary = report.summary_markdown(rows, meta, {}, [])
    assert "Gradient filters: `cce` and `ours_atomic_filter` skip" in summary
    assert "understate what the filter saves in training" in summary
    cpu = dict(meta, suite="cpu", device_type="cpu")
    assert "Gradient filters" not in report.summary_markdown(rows[:1], cpu, {}, [])  # on CPU cce does not filter
