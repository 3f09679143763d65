"""Runs `rpo_fast.trainer.train` under accelerate's FSDP2 on CPU processes (launched by torchrun, gloo).

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_driver.py OVERRIDES.json [KILL_AT_STEP]

accelerate selects FSDP only for accelerator devices: with `cpu=True` it runs DDP (MULTI_CPU) whatever
ACCELERATE_USE_FSDP says. torch's FSDP2 (`fully_shard`) itself runs on CPU tensors over gloo, so this driver
sets accelerate's distributed type to FSDP (FSDP2, one unit per decoder layer, as configs/accelerate_fsdp2.yaml
does on GPUs) after the Accelerator is built, and the trainer then takes its FSDP paths unchanged: sharding in
`accelerator.prepare`, sharded checkpoints, gathered export. With KILL_AT_STEP every process SIGKILLs itself at
the end of that step (after that step's checkpoint, if any, is committed).
"""
import json
import os
import signal
import sys
from pathlib import Path

from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from rpo_fast import trainer
from rpo_fast.config import load_config

build_accelerator = trainer.make_accelerator


def make_fsdp_accelerator(config):
    accelerator = build_accelerator(config)
    if accelerator.num_processes > 1:
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState().distributed_type = DistributedType.FSDP  # AcceleratorState re-reads it from here
    return accelerator


def main() -> None:
    overrides = json.loads(Path(sys.argv[1]).read_text())
    kill_at = int(sys.argv[2]) if len(sys.argv) > 2 else 0

    def on_step_end(step, record, policy):
        if step == kill_at:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.make_accelerator = make_fsdp_accelerator
    result = trainer.train(load_config(None, overrides), trainer.TrainHooks(on_step_end=on_step_end))
    print(f"distributed type {PartialState().distributed_type}, steps {result.state.step}", flush=True)


if __name__ == "__main__":
    main()
