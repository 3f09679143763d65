"""rpo-fast benchmarks: loss microbenchmarks against every peer, a training-step benchmark, the GPU suite.

Entry point: `python -m bench.run [--quick] [--out DIR]` (CPU quick mode in `make bench`); on a GPU
machine `bash bench/gpu_suite.sh OUTDIR`. Every run writes one long-format CSV (`results.csv`), a
markdown summary with the targets, judged on `ours_fwdgrad` (`summary.md`), the run's metadata
(`meta.json`), `log.txt` and PNG plots under one folder. Modules:

    env.py         device, git sha, versions, output folder
    timing.py      p20/p50/p80 timing (CUDA events on GPU, perf_counter on CPU), interleaved providers
    memory.py      peak extra memory (max_memory_allocated on GPU; allocator events of torch.profiler on CPU)
    shapes.py      presets (Mistral-7B, Llama-3-8B, Gemma-7B), sweeps and suites
    providers.py   dense, dense+torch.compile, Liger, Cut Cross-Entropy, one rpo_fast provider per head
                   backward (ours_fwdgrad, ours_recompute, ours_atomic, ours_atomic_filter), GEMM floor
    loss_bench.py  the microbenchmark loop -> rows
    train_step.py  tokens/s and peak memory of full RPO training steps
    correctness.py linear_logprobs and the loss through each head backward vs the dense reference in higher
                   precision (impl="torch" on CPU, "triton" on GPU)
    attention_correctness.py  the packed attention's CUDA kernels vs the CPU sdpa path in float64 (GPU)
    backbone_correctness.py   Liger's RMSNorm/RoPE/SwiGLU kernels vs the model without them (GPU)
    micro.py       GPU micro-checks: fp32 atomic_add (acq_rel / relaxed / plain), addmm into an fp32 accumulator
    report.py      CSV, printed table, targets, plots
    chunk_sweep.py the fwdgrad head's chunk_tokens time/memory trade-off (results.json, summary.md, frontier.png)
    prompt_sharing.py  training-step tokens/s, shared-prompt packing vs two full sequences per pair
    gpu_7b.py      7B memory modes through the trainer's step: peak memory vs the planner, tokens/s (GPU)
    plot_7b.py     measured peak vs the planner's prediction per 7B mode, from gpu_7b.csv
    gpu_suite.sh   the one-command GPU check; fetch_wheels.sh fetches the peers the GPU image lacks
    overopt/       the DPO vs RPO overoptimization experiment (SmolLM2-135M, CPU) and its report
    RESULTS.md     the committed results, device/date/commit per run, and the targets
"""
