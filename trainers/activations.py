"""The activation side of the GPU memory estimate (trainers/memory.py): the bytes autograd saves
for one training forward, and the largest output of a no-grad forward, measured by running the
real diffusers modules on PyTorch's ``meta`` device (no weights, no memory) as a GPU step runs:
attention as a fused kernel keeps it (q, k, v, output and log-sum-exp; never the L x L matrix) and,
below fp32, CUDA autocast's casting rules (linear, convolution and attention in the compute dtype,
group and layer norm in fp32). With gradient checkpointing each checkpointed block keeps its
inputs and the backward recomputes one block at a time.

``BACKWARD_TRANSIENT`` and ``CHECKPOINT_KEPT_TWICE`` turn saved bytes into a training step's peak;
both were measured against a real backward's resident memory on the CPU
(``bench/bench_memory_estimate.py``, docs/BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

BACKWARD_TRANSIENT = 1.25  # training peak / saved activations (trainers/memory.py's docstring)
CHECKPOINT_KEPT_TWICE = 2.0  # with gradient checkpointing: kept block inputs and their gradients


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel saves for its backward: q, k, v, output, log-sum-exp."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def _as_on_gpu(compute: torch.dtype) -> Iterator[None]:
    """Run meta-device forwards as a GPU step does: attention as a fused kernel and, with
    ``compute`` below fp32, CUDA autocast's casting rules for the ops an SD UNet uses (linear,
    convolution and attention in ``compute``, casting fp32 weights to a saved copy; group and
    layer norm in fp32, so the activations around them are fp32, as autocast makes them)."""
    names = ("scaled_dot_product_attention", "linear", "conv2d", "group_norm", "layer_norm")
    original = {n: getattr(F, n) for n in names}
    low = compute != torch.float32

    def cast(*ts: Any, dtype: torch.dtype = compute) -> list[Any]:
        return [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in ts]

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _FusedAttention.apply(*(cast(q, k, v) if low else (q, k, v)))

    def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return original["linear"](*cast(x, w, b))

    def conv2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *args: Any) -> torch.Tensor:
        return original["conv2d"](*cast(x, w, b), *args)

    def group_norm(x: torch.Tensor, groups: int, w: Any = None, b: Any = None, eps: float = 1e-5) -> torch.Tensor:
        return original["group_norm"](*cast(x, dtype=torch.float32), groups, *cast(w, b, dtype=torch.float32), eps)

    def layer_norm(x: torch.Tensor, shape: Any, w: Any = None, b: Any = None, eps: float = 1e-5) -> torch.Tensor:
        return original["layer_norm"](*cast(x, dtype=torch.float32), shape, *cast(w, b, dtype=torch.float32), eps)

    patched = {"scaled_dot_product_attention": sdpa}
    if low:
        patched.update(linear=linear, conv2d=conv2d, group_norm=group_norm, layer_norm=layer_norm)
    for n, fn in patched.items():
        setattr(F, n, fn)
    try:
        yield
    finally:
        for n, fn in original.items():
            setattr(F, n, fn)


class _SavedBytes:
    """Bytes autograd saves for backward, each storage once, parameters excluded."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in self.exclude and key not in self.seen:
            self.seen[key] = t.untyped_storage().nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())

    def hooks(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def training_activation_bytes(module: torch.nn.Module, call: Callable[[], Any], checkpointing: bool = False,
                              compute: torch.dtype = torch.float32) -> float:
    """The activation memory of one training step's peak: without gradient checkpointing, the
    saved bytes x ``BACKWARD_TRANSIENT``; with it, the kept block inputs twice (their gradients,
    the UNet's skip connections among them, build up beside them during the backward) plus the
    largest block's recompute x ``BACKWARD_TRANSIENT``. Both rules measured against a real
    backward's resident memory on the CPU (``bench/bench_memory_estimate.py``)."""
    kept, block = saved_activation_bytes(module, call, checkpointing, compute)
    if not checkpointing:
        return (kept + block) * BACKWARD_TRANSIENT
    return CHECKPOINT_KEPT_TWICE * kept + BACKWARD_TRANSIENT * block


def saved_activation_bytes(module: torch.nn.Module, call: Callable[[], Any], checkpointing: bool = False,
                           compute: torch.dtype = torch.float32) -> tuple[int, int]:
    """Bytes autograd keeps between ``call()``'s forward and its backward (``module`` on the meta
    device, its trainable parameters already marked), with gradient checkpointing if asked:
    then each checkpointed block keeps its inputs and the largest block's own saved bytes count
    once (the backward recomputes one block at a time). Returns (bytes kept through the forward,
    the largest checkpointed block's own saved bytes: 0 without checkpointing). ``compute``: the
    autocast dtype (:func:`_as_on_gpu`)."""
    params = {p.untyped_storage()._cdata for p in module.parameters()}
    outer = _SavedBytes(params)
    largest_block = [0]

    def checkpoint(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        inner = _SavedBytes(params)
        with inner.hooks():
            out = fn(*args, **kwargs)
        largest_block[0] = max(largest_block[0], inner.total)
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                outer.pack(a)
        return out

    if checkpointing:
        module.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)  # type: ignore[operator]
    with _as_on_gpu(compute), outer.hooks():
        call()
    return outer.total, largest_block[0]


def largest_output_bytes(module: torch.nn.Module, call: Callable[[], Any], compute: torch.dtype = torch.float32) -> int:
    """The largest tensor any submodule of ``module`` outputs during ``call()`` (no gradients)."""
    largest = [0]

    def hook(_: Any, __: Any, out: Any) -> None:
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                largest[0] = max(largest[0], t.numel() * t.element_size())

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        with torch.no_grad(), _as_on_gpu(compute):
            call()
    finally:
        for h in handles:
            h.remove()
    return largest[0]
