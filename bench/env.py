"""Run metadata: device name, git commit, package versions, timestamp, output folder."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import subprocess

import torch

PACKAGES = ("torch", "triton", "transformers", "liger-kernel", "cut-cross-entropy", "trl", "rpo-fast")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"CPU {model} ({threads} thread{'s' if threads > 1 else ''} of {os.cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    """Short folder-safe name: 'cpu' or e.g. 'nvidia-h100-80gb-hbm3'."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


COMMIT_VARIABLE = "RPO_BENCH_COMMIT"  # the commit, given by whoever copies a checkout without its .git


def git_sha() -> str:
    """Short commit of the checkout; '+dirty' when tracked files differ from it.

    A copied working tree without .git (as on a lent GPU machine) has no commit of its own: there
    $RPO_BENCH_COMMIT gives it (recorded as given), else 'unknown (no .git)'. Never the commit of a
    repository the tree merely sits inside. 'unknown' when git itself fails.
    """
    given = os.environ.get(COMMIT_VARIABLE, "").strip()
    if given:
        return given
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, ".git")):  # a directory, or a file in a git worktree
        return "unknown (no .git)"
    try:
        def git(*args):
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True,
                                  timeout=10).stdout.strip()

        if os.path.realpath(git("rev-parse", "--show-toplevel")) != os.path.realpath(root):
            return "unknown (no .git)"
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> str:
    """'python=3.11.2;torch=2.13.0;...' for the packages that are installed."""
    found = [f"python={platform.python_version()}"]
    for name in PACKAGES:
        try:
            found.append(f"{name}={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        found.append(f"cuda={torch.version.cuda}")
    return ";".join(found)


def timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def default_out_dir(device: torch.device) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    sha = re.sub(r"[^A-Za-z0-9._]+", "-", git_sha()).strip("-")  # 'abc1234+dirty' -> 'abc1234-dirty'
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{device_slug(device)}-{date}-{sha}")


def ensure_kernels_importable() -> str:
    """Makes `rpo_fast.kernels` importable from a plain checkout (no `pip install -e .`), as on a lent GPU
    machine: setup.py maps the top-level folder `kernels/` to `rpo_fast.kernels`, which a bare source tree
    lacks. Returns where it came from."""
    import importlib
    import importlib.util
    import sys

    try:
        return importlib.import_module("rpo_fast.kernels").__file__
    except ModuleNotFoundError as exc:
        if exc.name not in ("rpo_fast.kernels",):
            raise
    import rpo_fast

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(rpo_fast.__file__))), "kernels")
    spec = importlib.util.spec_from_file_location("rpo_fast.kernels", os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules["rpo_fast.kernels"] = module
    spec.loader.exec_module(module)
    rpo_fast.kernels = module
    return module.__file__
