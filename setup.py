"""rpo-fast: fused-kernel Regularized Preference Optimization (DPO + SFT) for PyTorch.

The top-level folder `kernels/` is installed as `rpo_fast.kernels`: a top-level `kernels` module would
shadow the PyPI package `kernels`, which transformers imports.
"""
from setuptools import setup

setup(
    name="rpo-fast",
    version="0.1.0",
    description="Fused linear -> log-prob -> RPO loss kernels and a packed, padding-free RPO trainer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["rpo_fast", "rpo_fast.kernels", "rpo_fast.integrations"],
    package_dir={"rpo_fast": "rpo_fast", "rpo_fast.kernels": "kernels"},
    package_data={"rpo_fast": ["model_configs/*.json"]},
    # torch is deliberately a lower bound only: the CPU CI set pins it exactly in requirements.txt,
    # and an unpinned install would pull a multi-GB CUDA build on a CPU machine. The floors are what the code
    # needs: torch 2.7 for the custom op's schema (`list[bool]` arguments, string annotations), Triton 3.2 for
    # the kernels (3.0/3.1 cannot compile the fp32 ones for sm_90). Triton only where it has wheels (Linux):
    # the CPU path does not import it.
    install_requires=["torch>=2.7", "triton>=3.2; platform_system == 'Linux'", "numpy"],
    extras_require={
        # the trainer, CLI and demo
        "train": ["transformers>=5.0", "accelerate>=1.3", "peft>=0.15", "safetensors", "gguf", "pyyaml", "tqdm",
                  "matplotlib"],
        # data formats beyond JSON: .parquet files and datasets.Dataset.save_to_disk folders
        "data": ["pyarrow", "datasets"],
        "flash": ["flash-attn>=2.6"],
        "trl": ["trl==1.16.0"],
    },
    entry_points={"console_scripts": ["rpo-fast = rpo_fast.cli:main"]},
)
