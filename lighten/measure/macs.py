"""Multiply-accumulates per inference, counted by tracing the real forward at batch 1.

``torch.utils.flop_counter`` sees every aten matmul/conv the model executes, so custom
modules, functional calls and pruned shapes are all counted without per-layer formulas.
One MAC = two FLOPs (the counter counts multiply and add separately).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from lighten.errors import ModelError


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode with PyTorch's fused attention fast path off: its single fused kernel
    (``_native_multi_head_attention``) is invisible to the flop counter, which would make
    nn.MultiheadAttention look free."""
    was_training = model.training
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield model
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """PyTorch's counter knows the CUDA attention kernels but not the CPU one."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _mkldnn_lstm_flops(input_shape, w_ih_shape, w_hh_shape, *args, out_shape=None,
                       **kwargs) -> int:
    """One direction of one nn.LSTM layer on CPU (a fused kernel the counter does not know):
    every step multiplies its input by ``W_ih (4H, I)`` and its state by ``W_hh (4H, H)``."""
    rows = math.prod(input_shape[:-1])  # steps x batch
    return 2 * rows * (math.prod(w_ih_shape) + math.prod(w_hh_shape))


_CUSTOM_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
                 torch.ops.aten.mkldnn_rnn_layer: _mkldnn_lstm_flops}


def example_batch(inputs) -> tuple[torch.Tensor, ...]:
    """``model(*args)`` at batch 1 from what callers have: a per-sample shape (float zeros), an
    example tensor or tuple of tensors (first row of each), or a ``lighten.task.Task``."""
    if hasattr(inputs, "example_inputs"):
        return tuple(inputs.example_inputs(1))
    if isinstance(inputs, torch.Tensor):
        return (inputs[:1],)
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(t, torch.Tensor)
                                                           for t in inputs):
        return tuple(t[:1] for t in inputs)
    return (torch.zeros(1, *tuple(inputs)),)


def _trace(model: nn.Module, inputs) -> FlopCounterMode:
    args = example_batch(inputs)
    counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS)
    try:
        with _eval_mode(model), torch.no_grad(), counter:
            model(*args)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        shapes = ", ".join(str(tuple(a.shape)) for a in args)
        raise ModelError(f"cannot run {type(model).__name__} on input shape "
                         f"{shapes} to count MACs: {type(exc).__name__}: {first}; "
                         "check input_shape") from exc
    return counter


def count_macs(model: nn.Module, input_shape) -> int:
    """MACs of one forward pass at batch 1; ``input_shape`` may also be example inputs (a tensor
    or tuple: int64 token ids, several inputs) or a task (see :func:`example_batch`)."""
    return _trace(model, input_shape).get_total_flops() // 2


def count_macs_by_module(model: nn.Module, input_shape) -> dict[str, int]:
    """Module name (as in ``named_modules``, root = "") -> MACs inside it, children included."""
    counts = _trace(model, input_shape).get_flop_counts()
    root = type(model).__name__
    out = {}
    for key, per_op in counts.items():
        if key == "Global":
            continue
        name = "" if key == root else key.removeprefix(root + ".")
        out[name] = sum(per_op.values()) // 2
    return out
