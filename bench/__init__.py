"""rpo-fast benchmarks: loss microbenchmarks against every peer, a training-step benchmark, the GPU suite.

Entry point: `python -m bench.run [--quick] [--out DIR]` (CPU quick mode in `make bench`); on a GPU
machine `bash bench/gpu_suite.sh OUTDIR`. Every run writes one long-format CSV (`results.csv`), a
markdown summary with the targets of issue 4 (`summary.md`), the run's metadata (`meta.json`) and
PNG plots under one folder. Modules:

    env.py         device, git sha, versions, output folder
    timing.py      p20/p50/p80 timing (CUDA events on GPU, perf_counter on CPU), interleaved providers
    memory.py      peak extra memory (max_memory_allocated on GPU; allocator events of torch.profiler on CPU)
    shapes.py      presets (Mistral-7B, Llama-3-8B, Gemma-7B) and sweeps
    providers.py   dense, dense+torch.compile, Liger, Cut Cross-Entropy, ours (torch, triton), GEMM floor
    loss_bench.py  the microbenchmark loop -> rows
    train_step.py  tokens/s and peak memory of full RPO training steps
    correctness.py triton path vs the dense reference at real sizes (GPU)
    report.py      CSV, printed table, targets, plots
    gpu_7b.py      7B memory modes through the trainer's step: peak memory vs the planner, tokens/s (GPU)
    gpu_suite.sh   the one-command GPU check; fetch_wheels.sh fetches the peers the GPU image lacks
    RESULTS.md     the committed results, device/date/commit per run, and the targets
"""
