"""The fused head under `torch.autocast` (mixed precision in a user's trainer).

A `Linear` under autocast multiplies in autocast's dtype, so the head's operands (hidden states, weight, bias) are
cast to it, as the model's own head would be: a bf16 backbone's hidden states and an fp32 weight then meet in bf16.
The head itself then runs with autocast off. Its products already take half-precision operands with fp32 results,
and it keeps fp32 buffers (logits, logsumexps, the weight gradient's accumulator) that autocast would recast to
bf16 inside it, losing the precision those buffers exist for.
"""
from __future__ import annotations

import functools
import inspect

import torch


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """autocast's dtype when it is on for `device`'s type, else None (also for types autocast does not know)."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except RuntimeError:  # e.g. "meta": not an autocast device type
        return None
    return torch.get_autocast_dtype(device.type) if enabled else None


def cast_floats(dtype: torch.dtype, *tensors):
    """Each floating-point tensor of `tensors` in `dtype` (differentiable); anything else as it is."""
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def outside_autocast(*names: str):
    """Decorator for a head function whose first parameter is the hidden states: under autocast (for their
    device's type), the floating-point arguments `names` are cast to autocast's dtype and the function runs with
    autocast off. Without autocast, the call is passed through untouched."""

    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def call(*args, **kwargs):
            hidden = args[0] if args else kwargs.get(names[0])
            dtype = autocast_dtype(hidden.device) if isinstance(hidden, torch.Tensor) else None
            if dtype is None:
                return function(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            for name in names:
                if name in bound.arguments:
                    bound.arguments[name], = cast_floats(dtype, bound.arguments[name])
            with torch.autocast(hidden.device.type, enabled=False):
                return function(*bound.args, **bound.kwargs)

        return call

    return decorate
