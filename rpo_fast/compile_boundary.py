"""`opaque_to_compile`: functions that a caller's `torch.compile` calls instead of tracing.

`torch.compiler.disable` imports torch._dynamo, which imports triton: at `import rpo_fast` that would add ~1.4 s
to every start and import triton before a caller sets TRITON_INTERPRET (triton reads it once, at its own import,
for its standard library: interpreted kernels then fail). So the disabled function is made at the first call.
"""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def opaque_to_compile(fn: F) -> F:
    """`fn` that dynamo does not trace: inside a compiled caller, one graph break at the call, which runs eagerly
    (`torch.compiler.disable`, applied when first called)."""
    disabled: list[Callable] = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return call  # type: ignore[return-value]
