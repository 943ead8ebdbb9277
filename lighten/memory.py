"""A memory budget for the work that grows with the batch: training, fine-tuning, calibration,
sensitivity analysis and evaluation (``lighten run --max-memory 2GB``).

Why estimate, not watch: a process cannot be stopped politely when it crosses a limit, and an
out-of-memory kill loses the stage. So before the work starts, its footprint is computed from
the model itself -- the bytes autograd saves for backward (counted exactly with
``saved_tensors_hooks`` at two small batch sizes, so the per-sample and fixed parts separate),
gradients and optimizer state, and the largest transient activation -- and the batch is split
into micro-batches that fit (gradients are accumulated, so the optimizer still sees the
recipe's batch). When even one sample does not fit, the work is refused before it starts, with
the amount it needs. The budget is for the whole process: what is resident already (Python,
torch, the data) counts. :class:`PeakMemory` measures what really happened; the runner records
it per stage.

Under a budget, glibc is told to return every freed block over 128 KiB to the system at once
(``mallopt(M_MMAP_THRESHOLD)``); otherwise freed activations stay in the heap and the resident
size drifts up to twice what is alive. That costs some speed (fresh pages for each large
tensor), paid only when a budget is asked for.
"""

from __future__ import annotations

import contextvars
import functools
import math
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lighten.errors import LightenError

MiB = 2**20
# slack for what the estimate does not see (allocator fragmentation, kernels' scratch space);
# the measured peak is checked against budget + 10% in tests/test_memory_budget.py
_MARGIN = 0.05
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
          "tib": 2**40}


class MemoryBudgetError(LightenError):
    """The work cannot fit the memory budget even one sample at a time."""


def parse_size(text: str | int | float) -> int:
    """Bytes from ``2GB``, ``1.5GiB``, ``512M``, ``800MB`` or a plain number of bytes."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
        unit = ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise LightenError(f"memory size {text!r} is not understood; write e.g. 2GB, "
                               "1.5GiB or 800MB")
        value, unit = float(match.group(1)), match.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise LightenError(f"memory size {text!r} must be positive, e.g. 2GB")
    return size


def rss_bytes() -> int | None:
    """This process's resident memory now (Linux /proc); None where that is not available."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Context manager: the highest resident memory seen while it is open, sampled every
    ``interval`` seconds by a thread (``ru_maxrss`` cannot be reset, so it cannot give the
    peak of one phase). ``start_mb``/``peak_mb`` are MiB, None where RSS cannot be read."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start_mb: float | None = None
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> float | None:
        now = rss_bytes()
        return None if now is None else now / MiB

    def _sample(self) -> None:
        while not self._stop.is_set():
            now = self._read()
            if now is not None:
                self.peak_mb = max(self.peak_mb or 0.0, now)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self.start_mb = self.peak_mb = self._read()
        if self.start_mb is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        now = self._read()
        if now is not None:
            self.peak_mb = max(self.peak_mb or 0.0, now)


@dataclass(frozen=True)
class Footprint:
    """Bytes some work needs on top of what is resident: ``fixed + per_sample * batch``."""

    fixed: int
    per_sample: int

    def at(self, batch: int) -> int:
        return self.fixed + self.per_sample * batch


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _param_storages(model: nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


def _saved_and_peak(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[int, int]:
    """(bytes autograd saves for backward, largest single activation) of one forward."""
    params = _param_storages(model)
    seen: set[int] = set()
    saved = 0

    def pack(t: torch.Tensor):
        nonlocal saved
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:  # weights are resident already
            seen.add(ptr)
            saved += t.untyped_storage().nbytes()
        return t

    largest = 0

    def hook(_module, _inputs, output):
        nonlocal largest
        for t in output if isinstance(output, tuple | list) else (output,):
            if isinstance(t, torch.Tensor):
                largest = max(largest, _tensor_bytes(t))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:  # a probe: BatchNorm statistics and the random stream stay as they were
        with torch.random.fork_rng(devices=[]):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = model(*inputs)
            del out
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers and b.shape == buffers[name].shape:
                    b.copy_(buffers[name])
    return saved, largest


def _two_point(measure, b1: int = 2, b2: int = 4) -> tuple[int, int]:
    """(fixed, per_sample) of a quantity measured at two batch sizes."""
    m1, m2 = measure(b1), measure(b2)
    per_sample = max(0, math.ceil((m2 - m1) / (b2 - b1)))
    return max(0, m1 - per_sample * b1), per_sample


def training_footprint(model: nn.Module, example_inputs, *, optimizer: str | None = "adam",
                       ) -> Footprint:
    """What one training step of ``model`` needs beyond the resident weights: saved
    activations, the activation gradients of backward (about twice the largest activation),
    parameter gradients and the optimizer's state (Adam: two moments; SGD: momentum).
    ``example_inputs(batch)`` returns the model's positional inputs for a batch."""
    trainable = sum(_tensor_bytes(p) for p in model.parameters() if p.requires_grad)
    state = {"adam": 2, "sgd": 1, None: 0}.get(optimizer, 2) * trainable
    was = model.training
    model.train()
    largest: dict[int, int] = {}

    def saved_at(batch: int) -> int:
        with torch.enable_grad():
            saved, largest[batch] = _saved_and_peak(model, example_inputs(batch))
        return saved

    try:
        fixed, per_sample = _two_point(saved_at)
    finally:
        model.train(was)
    per_largest = max(1, math.ceil(largest[4] / 4))
    return Footprint(fixed=fixed + trainable + state, per_sample=per_sample + 4 * per_largest)


def inference_footprint(model: nn.Module, example_inputs) -> Footprint:
    """What a forward pass without gradients needs: at most a few activations are alive at
    once, bounded here by five times the largest one (a residual block holds its input, two
    convolution outputs and their normalized forms; measured 1.7x the largest on ResNet-20)."""
    largest: dict[int, int] = {}
    was = model.training
    model.eval()

    def peak_at(batch: int) -> int:
        with torch.no_grad():
            largest[batch] = _saved_and_peak(model, example_inputs(batch))[1]
        return largest[batch]

    try:
        fixed, per_sample = _two_point(peak_at)
    finally:
        model.train(was)
    return Footprint(fixed=5 * fixed, per_sample=5 * per_sample)


@dataclass(frozen=True)
class MemoryBudget:
    """At most ``limit`` bytes resident for the whole process."""

    limit: int

    def fit(self, footprint: Footprint, batch_size: int, what: str) -> int:
        """The largest micro-batch (≤ ``batch_size``) whose work fits; raises
        :class:`MemoryBudgetError` with the amount needed when one sample does not fit."""
        resident = rss_bytes() or 0
        available = int(self.limit * (1 - _MARGIN)) - resident
        if footprint.at(1) > available:
            need = resident + footprint.at(1)
            raise MemoryBudgetError(
                f"{what} needs about {math.ceil(need / (1 - _MARGIN) / MiB)} MiB even one sample "
                f"at a time ({resident / MiB:.0f} MiB resident + {footprint.at(1) / MiB:.0f} MiB "
                f"for the work), over the memory budget of {self.limit / MiB:.0f} MiB; raise "
                f"--max-memory to at least that, or use a smaller model or input")
        if footprint.per_sample == 0:
            return batch_size
        return max(1, min(batch_size, (available - footprint.fixed) // footprint.per_sample))


@functools.cache
def _libc():
    """The C library, for glibc's allocator controls (None where it cannot be loaded)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def _return_freed_memory(threshold: int = 128 * 1024) -> None:
    """Fix glibc's mmap threshold so freed large blocks leave the process (no-op elsewhere)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, threshold)  # -3: M_MMAP_THRESHOLD


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``; a no-op
    elsewhere). Block-wise LLM calibration calls it between blocks: otherwise the freed
    temporaries of earlier blocks stay resident, scattered among the long-lived quantized
    weights, and the peak creeps up block after block (SmolLM2-135M AWQ: calibration peak
    +716 -> +228 MiB over the start)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


_CURRENT: contextvars.ContextVar[MemoryBudget | None] = contextvars.ContextVar(
    "lighten_memory_budget", default=None)


def current_budget() -> MemoryBudget | None:
    """The budget set by :func:`memory_budget` around this work, or None (no limit)."""
    return _CURRENT.get()


@contextmanager
def memory_budget(limit: str | int | None) -> Iterator[MemoryBudget | None]:
    """Within the block, training, calibration and evaluation fit ``limit`` (None: no
    limit), e.g. ``with memory_budget("2GB"): lighten.compress(...)``."""
    budget = None if limit is None else MemoryBudget(parse_size(limit))
    if budget is not None:
        _return_freed_memory()
    token = _CURRENT.set(budget)
    try:
        yield budget
    finally:
        _CURRENT.reset(token)


def fit_training_batch(model: nn.Module, example_inputs, batch_size: int, *,
                       optimizer: str | None = "adam", what: str = "training") -> int:
    """The micro-batch for training ``model`` under the current budget (``batch_size`` when
    there is none)."""
    budget = current_budget()
    if budget is None:
        return batch_size
    return budget.fit(_probe(training_footprint, model, example_inputs, optimizer=optimizer),
                      batch_size, what)


def fit_inference_batch(model: nn.Module, example_inputs, batch_size: int, *,
                        what: str = "evaluation") -> int:
    """The batch for running ``model`` without gradients under the current budget."""
    budget = current_budget()
    if budget is None:
        return batch_size
    return budget.fit(_probe(inference_footprint, model, example_inputs), batch_size, what)


def _probe(estimate, model: nn.Module, example_inputs, **options) -> Footprint:
    try:
        return estimate(model, example_inputs, **options)
    except LightenError:
        raise
    except Exception as err:  # noqa: BLE001 - the model's own forward failed on the probe
        raise MemoryBudgetError(
            f"cannot estimate the memory {type(model).__name__} needs under --max-memory: a "
            f"probe forward on example inputs failed ({type(err).__name__}: {err}); run "
            "without --max-memory") from err


def step_footprint(model: nn.Module, example_inputs) -> Footprint | None:
    """A gradient pass's footprint (no optimizer) under the current budget; None without one
    or when the model cannot be probed (it is then left to its step to fail or fit)."""
    if current_budget() is None:
        return None
    try:
        return training_footprint(model, example_inputs, optimizer=None)
    except Exception:  # noqa: BLE001 - a probe; the step itself reports real errors
        return None
