"""Trains RPOTrainerMixin (on transformers.Trainer) under DDP on CPU processes (launched by torchrun, gloo): the
tiny Llama and pairs of test_integrations_hf, token-mean NLL, plain SGD. Rank 0 writes the logged steps and the
final weights to OUT_DIR/result.pt.

    python -m torch.distributed.run --nproc_per_node 2 tests/hf_ddp_driver.py OUT_DIR
"""
import sys
from pathlib import Path

import torch

from test_integrations_hf import hf_ddp_run


def main() -> None:
    out = Path(sys.argv[1])
    logs, model, is_main = hf_ddp_run(out, gradient_accumulation_steps=1)
    if is_main:
        torch.save({"logs": logs, "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}},
                   out / "result.pt")


if __name__ == "__main__":
    main()
