"""Command line: `rpo-fast train` and `rpo-fast precompute-ref` (also `python -m rpo_fast.cli ...`).

    rpo-fast train --config configs/demo.yaml [--key=value ...] [--resume | --overwrite]
    rpo-fast precompute-ref --config configs/demo.yaml [--key=value ...]
    rpo-fast plan-memory --model mistral-7b --max-length 1024 --micro-batch 2 [--gpu-gb 80 ...]
    rpo-fast plan-memory --config configs/demo.yaml [--key=value ...]

Keys are the fields of `rpo_fast.config.TrainConfig` (`rpo-fast train --help` lists them with their
defaults); a bare `--flag` sets a boolean key to true. Exit status: 0 done, 2 a bad argument, config, data
file or model path, or a path that cannot be read or written (one line naming the key or the path, no
traceback), 3 too many non-finite steps, 4 CUDA out of memory, 143 / 130 stopped by SIGTERM / SIGINT (a
checkpoint saved at the step's end; --resume continues); plan-memory: 0 fits, 1 does not fit, 2 bad arguments.
Multi-process: on GPUs `accelerate launch --multi_gpu --num_processes N -m rpo_fast.cli train ...` (FSDP
through an accelerate config file); on the CPU `torchrun --nproc_per_node N -m rpo_fast.cli train ...`
(gloo; `accelerate launch --cpu` starts one process unless given an MPI hostfile).
"""
from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning. With busy-waiting, a CPU run that shares its cores with
# another process slows down 5-10x (threads spin at every barrier while their partner is descheduled);
# passive waiting costs little on an idle machine. Must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402

from .config import describe_keys, load_config, parse_overrides  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rpo-fast", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("plan-memory", help="predict the peak GPU memory of a training step from a model config "
                        "(options: rpo-fast plan-memory --help)", add_help=False)
    for name, text in (("train", "RPO-train a model"),
                       ("precompute-ref", "cache the reference log-probs of the train/eval sets on disk")):
        sub = commands.add_parser(
            name, help=text, formatter_class=argparse.RawDescriptionHelpFormatter,
            description=f"{text}. Any config key below can be given as --key=value (a bare --flag sets a boolean "
                        "key to true);\nprecedence, lowest first: defaults < preset < --config file < --key=value.",
            epilog="config keys (defaults shown):\n" + describe_keys()
                   + "\n\nexit status: 0 done, 2 bad argument/config/data/model path, 3 too many non-finite steps, "
                     "4 CUDA out of memory, 143 / 130 stopped by SIGTERM / SIGINT (checkpoint saved)")
        sub.add_argument("--config", help="YAML config file (optional: defaults and overrides alone also work)")
        sub.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plan-memory"]:  # its own options: rpo_fast/memory_plan.py
        from . import memory_plan

        return memory_plan.main(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        config = load_config(args.config, parse_overrides(extra))
    except (ValueError, OSError) as e:
        parser.exit(2, f"rpo-fast {args.command}: error: {e}\n")
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0

    import torch

    from . import trainer  # heavy imports (torch, transformers) only once the arguments are valid

    try:
        if args.command == "train":
            trainer.train(config)
        else:
            trainer.precompute_reference(config)  # it prints each cache file (on the main process)
    except (ValueError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError) as e:
        # a path that cannot be read or written is a bad path argument; other OSErrors (a full disk, an I/O
        # error) keep their traceback
        print(f"rpo-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except trainer.NonFiniteLossError as e:
        print(f"rpo-fast {args.command}: {e}", file=sys.stderr)
        return 3
    except trainer.oom.TrainingOutOfMemoryError as e:
        print(f"rpo-fast {args.command}: {e}", file=sys.stderr)
        return 4
    except torch.OutOfMemoryError as e:  # outside a training step: loading models, eval, reference, saving
        print(f"rpo-fast {args.command}: CUDA out of memory outside a training step's forward, backward and "
              f"update (loading the models, eval, the reference log-probs or a checkpoint): "
              f"{str(e).splitlines()[0] if str(e) else 'no details'}\n"
              "`rpo-fast plan-memory --config CONFIG` predicts the run's peak and lists what lowers it.",
              file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
