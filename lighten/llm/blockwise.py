"""Block-by-block calibration of a stack of transformer blocks, in bounded memory.

The peers that calibrate a whole model at once hold every layer's activations (or a second copy
of the model); here only one block's inputs exist at a time:

1. the calibration batches run through the model until the first block, where a pre-hook keeps
   that block's positional and keyword inputs (hidden states, attention mask, rotary position
   embeddings) and stops the forward;
2. for block ``i``: hooks on its Linear layers gather what the method needs
   (:class:`LayerInputs`: the Hessian ``2 XᵀX / n``, per-channel ``mean |x|`` / ``max |x|``, a
   sample of input rows); then ``compress(name, linear, stats)`` returns each layer's
   replacement, which is put in place;
3. the compressed block runs on its inputs, and its outputs are block ``i + 1``'s inputs, so
   every block is calibrated on what the compressed blocks before it really produce.

The model is changed in place and never copied. :class:`PeakMemory` samples the process's
resident memory while this runs, so the report can say how much calibration cost; between
blocks the heap's free pages go back to the system (:func:`release_free_memory`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from lighten.errors import UnsupportedError
from lighten.memory import PeakMemory, release_free_memory
from lighten.task import batch_inputs


class _Captured(Exception):  # noqa: N818 - control flow, not an error
    """Raised by the capture hook to stop the forward at the first block."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of repeated blocks: the longest ``nn.ModuleList`` whose entries share
    one type and hold Linear layers (``hf.model.layers`` of a Llama, ``encoder.layer`` of a
    BERT)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        types = {type(m) for m in module}
        if len(types) != 1 or not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise UnsupportedError("block-wise calibration found no stack of repeated blocks (an "
                               "nn.ModuleList of one block type holding nn.Linear layers); the "
                               "llm.* steps need a transformer-like model")
    return best


@dataclass
class BlockInput:
    """One calibration batch's inputs to the current block."""

    args: tuple
    kwargs: dict


@torch.no_grad()
def capture_first_inputs(model: nn.Module, first: nn.Module, batches: Iterable
                         ) -> list[BlockInput]:
    """Run each batch until ``first`` and keep what it is called with."""
    kept: list[BlockInput] = []

    def hook(module, args, kwargs):
        kept.append(BlockInput(tuple(args), dict(kwargs)))
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(*batch_inputs(batch))
            except _Captured:
                pass
    finally:
        handle.remove()
    return kept


def _hidden(output):
    """A block's hidden-state output (transformers blocks return a tensor or a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[BlockInput]) -> list[BlockInput]:
    """The next block's inputs: this block's outputs, with the same keyword inputs. Empties
    ``inputs`` as it goes, so each batch's input is freed once its output exists."""
    out = []
    while inputs:
        x = inputs.pop(0)
        out.append(BlockInput((_hidden(block(*x.args, **x.kwargs)), *x.args[1:]), x.kwargs))
    return out


class LayerInputs:
    """What a Linear layer's inputs look like, gathered by a forward pre-hook.

    ``hessian``: ``2 XᵀX / n`` (float64 sums); ``absmean`` / ``absmax`` per input channel;
    ``sample``: up to ``rows`` input rows, spread over the batches (AWQ evaluates candidate
    scales on them). ``calls``: how many forwards will run (the sample buffer's capacity).
    """

    def __init__(self, layer: nn.Linear, *, hessian: bool = False, rows: int = 0,
                 calls: int = 1):
        cols = layer.in_features
        self.xtx = torch.zeros(cols, cols, dtype=torch.float64) if hessian else None
        self.abs_total = torch.zeros(cols, dtype=torch.float64)
        self.absmax = torch.zeros(cols)
        self.count = 0
        # the kept rows are copied into one buffer made now, before the pass: a view would pin
        # each batch's whole input (~107 MiB a block on SmolLM2-135M), and small copies made
        # between the forward's large temporaries fragment the heap (+100 MiB resident on a
        # SmolLM2-shaped model); capacity never written costs no resident memory
        self.rows, self._kept = rows, 0
        self._rows = torch.empty(rows * max(calls, 1), cols) if rows else torch.empty(0, cols)
        self._handle = layer.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (N, in)
        self.count += x.shape[0]
        self.abs_total += x.abs().sum(0).double()
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        if self.xtx is not None:
            xd = x.double()
            self.xtx += xd.T @ xd
        if self.rows:
            step = max(1, x.shape[0] // max(1, self.rows // 8))
            part = x[::step][: self.rows]
            end = self._kept + len(part)
            if end > len(self._rows):  # more forwards than announced
                grown = torch.empty(2 * end, x.shape[1])
                grown[: self._kept] = self._rows[: self._kept]
                self._rows = grown
            self._rows[self._kept:end] = part
            self._kept = end

    def remove(self) -> None:
        self._handle.remove()

    @property
    def hessian(self) -> torch.Tensor:
        return (2 * self.xtx / max(self.count, 1)).float()

    @property
    def absmean(self) -> torch.Tensor:
        return (self.abs_total / max(self.count, 1)).float()

    @property
    def sample(self) -> torch.Tensor:
        rows = self._rows[: self._kept]
        if len(rows) > self.rows:
            rows = rows[torch.linspace(0, len(rows) - 1, self.rows).long()]
        return rows


@dataclass
class BlockwiseResult:
    blocks: int = 0
    layers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float | None = None
    start_rss_mb: float | None = None

    @property
    def extra_mb(self) -> float | None:
        if self.peak_rss_mb is None or self.start_rss_mb is None:
            return None
        return self.peak_rss_mb - self.start_rss_mb


def calibrate_blockwise(model: nn.Module, batches: Iterable,
                        compress: Callable[[str, nn.Linear, LayerInputs], nn.Module | None], *,
                        hessian: bool = False, rows: int = 0, ignore: Iterable[str] = (),
                        prepare: Callable[[str, nn.Module, dict], None] | None = None,
                        progress: bool = False) -> BlockwiseResult:
    """Calibrate every Linear inside the model's blocks, one block at a time (module doc).

    ``compress(name, linear, stats)`` returns the replacement module (or None to keep the
    layer); ``prepare(block_name, block, stats_by_name)`` may act on a whole block first (AWQ
    searches scales per group of layers that share an input). Linears outside the blocks (the
    LM head, embeddings) are left alone. Returns what was done and the peak memory.
    """
    start = time.perf_counter()
    ignore = set(ignore)
    stack_name, blocks = find_blocks(model)
    was_training = model.training
    model.eval()
    result = BlockwiseResult(blocks=len(blocks))
    with PeakMemory() as peak:
        inputs = capture_first_inputs(model, blocks[0], batches)
        if not inputs:
            raise UnsupportedError("block-wise calibration got no calibration batch; give "
                                   "calibration data")
        bar = _bar(len(blocks), progress)
        for i, block in enumerate(blocks):
            release_free_memory()  # the freed temporaries of the blocks before
            prefix = f"{stack_name}.{i}"
            names = [n for n, m in block.named_modules()
                     if isinstance(m, nn.Linear) and f"{prefix}.{n}" not in ignore]
            stats = {n: LayerInputs(block.get_submodule(n), hessian=hessian, rows=rows,
                                    calls=len(inputs))
                     for n in names}
            try:
                with torch.no_grad():
                    for x in inputs:
                        block(*x.args, **x.kwargs)
            finally:
                for s in stats.values():
                    s.remove()
            if prepare is not None:
                prepare(prefix, block, stats)
            for n in names:
                new = compress(f"{prefix}.{n}", block.get_submodule(n), stats[n])
                if new is not None:
                    block.set_submodule(n, new)
                    result.layers.append(f"{prefix}.{n}")
            del stats
            inputs = run_block(block, inputs)  # the compressed block feeds the next one
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    model.train(was_training)
    result.seconds = time.perf_counter() - start
    result.peak_rss_mb, result.start_rss_mb = peak.peak_mb, peak.start_mb
    return result


def _bar(total: int, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="blocks", leave=False)


