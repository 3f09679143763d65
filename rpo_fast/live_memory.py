"""Measuring memory on any device, CPU included: the bytes of live tensor storages and their peak.

`LiveTensorTracker` measures what the memory planner (`rpo_fast.memory_plan`) predicts, the quantity
`torch.cuda.max_memory_allocated` reports on CUDA; tests/test_memory_plan.py holds the planner to it on CPU.
`OutputRecorder`, the dispatch mode beneath it, hands every operator's outputs to a `record` method, for
recorders of other things (the tests' largest tensor, the tensors a backward creates).
"""
from __future__ import annotations

import functools
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class OutputRecorder(TorchDispatchMode):
    """A dispatch mode that hands every operator's outputs to `record(func, out)`, rpo_fast's own custom ops
    included: a mode sees a custom op as one call, so those run their Python implementation under the mode
    (`logprobs.python_implementation`) and the tensors they allocate inside are recorded like any other."""

    def record(self, func, out) -> None:
        raise NotImplementedError

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from .logprobs import python_implementation

        if (inside := python_implementation(func)) is not None:
            with self:
                return inside(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        self.record(func, out)
        return out


class LiveTensorTracker(OutputRecorder):
    """Counts the bytes of tensor storages alive (and their peak) while active.

    Every tensor an operator returns inside the context is registered by its storage (views and
    in-place results share one); a weak reference on the storage subtracts its bytes when it is freed.
    Tensors created before entering (parameters, optimizer state) are invisible to the dispatcher, so
    pass them to `track` first. What the dispatcher never sees (scratch memory inside one kernel) is
    not counted, exactly as the CUDA allocator does not count what a kernel keeps in registers.

    Usage:
        tracker = LiveTensorTracker()
        tracker.track(model, optimizer)
        with tracker:
            step()
        tracker.peak   # bytes
    """

    def __init__(self, device: str | torch.device = "cpu"):
        super().__init__()
        self.device = torch.device(device)
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}

    def track(self, *objects) -> LiveTensorTracker:
        """Registers tensors, modules (parameters, buffers, grads) and optimizers (state tensors)."""
        for obj in objects:
            if isinstance(obj, torch.nn.Module):
                for t in [*obj.parameters(), *obj.buffers()]:
                    self.register(t)
                    self.register(t.grad)
            elif isinstance(obj, torch.optim.Optimizer):
                inners = getattr(obj, "_inner", None)
                for opt in (inners.values() if inners else [obj]):
                    for st in opt.state.values():
                        for t in tree_flatten(st)[0]:
                            self.register(t)
            else:
                for t in tree_flatten(obj)[0]:
                    self.register(t)
        return self

    def _free(self, key: int, _ref) -> None:
        self.live -= self._sizes.pop(key, 0)
        self._refs.pop(key, None)

    def register(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.device.type != self.device.type:
            return
        if self.device.index is not None and t.device.index != self.device.index:
            return
        storage = t.untyped_storage()
        key, nbytes = id(storage), storage.nbytes()
        old = self._sizes.get(key)
        if old is None:
            self._refs[key] = weakref.ref(storage, functools.partial(self._free, key))
        self._sizes[key] = nbytes
        self.live += nbytes - (old or 0)
        self.peak = max(self.peak, self.live)

    def record(self, func, out) -> None:
        for t in tree_flatten(out)[0]:
            self.register(t)
