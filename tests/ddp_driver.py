"""Runs `rpo_fast.trainer.train` under DDP on CPU processes (launched by torchrun, gloo) and prints, per process,
whether every trainable parameter's gradient was a view into DDP's all-reduce buckets at the end of each step,
and the seed its training steps drew from (dropout masks differ between processes).

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_driver.py OVERRIDES.json
"""
import json
import sys
from pathlib import Path

import torch
from accelerate.state import PartialState

from rpo_fast import trainer
from rpo_fast.config import load_config


def main() -> None:
    overrides = json.loads(Path(sys.argv[1]).read_text())
    views, seeds = [], []

    def on_step_end(step, record, policy):
        trainable = [p for p in policy.parameters() if p.requires_grad]
        views.append(all(p.grad is not None and p.grad._base is not None for p in trainable))
        seeds.append(torch.initial_seed())

    trainer.train(load_config(None, overrides), trainer.TrainHooks(on_step_end=on_step_end))
    state = PartialState()
    print(f"rank {state.process_index} ({state.distributed_type}): gradients were bucket views at step ends "
          f"{views}; training seed {seeds[0]}", flush=True)


if __name__ == "__main__":
    main()
