"""Structured pruning of a pretrained transformer encoder (BERT layout), recovered by distillation.

``llm.encoder_prune`` removes, in every layer of ``*.encoder.layer`` (BERT, RoBERTa, MiniLM...):

* attention heads (``heads``: the fraction removed): rows of ``query``/``key``/``value`` and the
  matching input columns of ``attention.output.dense``. The transformers forward derives the head
  count from the projection width, so the layer keeps its class; ``num_attention_heads`` and
  ``all_head_size`` are updated to match;
* FFN neurons (``ffn``): rows of ``intermediate.dense`` and input columns of ``output.dense``,
  kept in multiples of ``ffn_multiple`` (whole SIMD tiles for the int8 kernels);
* whole layers (``keep_layers``): a 3-layer student of a 6-layer model keeps e.g. ``[0, 2, 4]``.

lighten's generic ``prune.heads`` looks for a q/k/v + out projection inside one module and
``prune.neurons`` for a traceable graph; a transformers encoder has its out projection in a
sibling module and does not trace, hence this explicit rule for the one layout.

Importance is measured on calibration sentences (padding excluded), as FLAP (An et al. 2024)
does: an input feature ``j`` of an out projection (a neuron's activation, a head's context
dimension) scores ``var(x_j) * ||W[:, j]||^2``, the output error of replacing it by its mean; a
head sums its dimensions. The removed features' mean contribution ``W[:, gone] @ mean[gone]``
moves into the out projection's bias, so pruning costs only their fluctuation.

Layer-wise reconstruction (``reconstruct``, on by default; ``llm/encoder_recover.py``): after
FFN pruning each layer's FFN out projection is refitted in closed form so the pruned layer's
output matches the original's on the calibration sentences.

Recovery (``distill:``; ``llm/encoder_distill.py``): the pruned encoder learns to reproduce the
original's embeddings (``1 - cosine``) on unlabeled sentences of the training split; a
layer-dropped student also learns the original's intermediate states (``layers``, TinyBERT's
layer map) and self-attention relations (``relations``, MiniLMv2), which an embedding loss alone
does not reach.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from lighten.errors import ModelError, RecipeError
from lighten.llm.encoder_distill import distill_embeddings_
from lighten.llm.slicing import find_layer_stack, keep_count, linear_cols_compensated, linear_rows
from lighten.registry import register_step
from lighten.step import PruneStepConfig, StepContext, StrictModel

__all__ = ["EncoderDistill", "EncoderPruneConfig", "distill_embeddings_", "encoder_layers",
           "prune_encoder_"]


class EncoderDistill(StrictModel):
    """Recovery by distillation from the original encoder's embeddings."""

    epochs: float = Field(1.0, gt=0, description="passes over the distillation sentences")
    samples: int = Field(2000, ge=1, description="unlabeled training sentences used")
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(16, ge=1)
    tokens: float = Field(0.0, ge=0, description="weight of the per-token hidden-state loss")
    int8: bool = Field(False, description="distill through quant.dynamic's int8 grid (fake "
                       "quantization, straight-through): recovers the int8 error of a "
                       "following quant.dynamic as well")
    layers: float = Field(0.0, ge=0, description="weight of the layer-wise loss: each student "
                          "layer's states against its teacher layer (layer_map)")
    relations: float = Field(0.0, ge=0, description="weight of MiniLMv2's Q-Q/K-K/V-V "
                             "self-attention relation loss on the mapped layers")
    layer_map: list[int] | None = Field(None, description="teacher layer learned by each "
                                        "student layer (default: uniform, last to last)")
    warmup: float = Field(0.0, ge=0, lt=1, description="fraction of the steps with a linear "
                          "learning-rate warm-up (then linear decay to 0)")

    @model_validator(mode="after")
    def _map_needs_a_layer_loss(self):
        if self.layer_map is not None and not (self.layers or self.relations):
            raise ValueError("distill layer_map only applies with layers > 0 or relations > 0; "
                             "set one (e.g. layers: 1) or remove layer_map")
        return self


class EncoderPruneConfig(PruneStepConfig):
    """Heads, FFN neurons and layers of a transformer encoder (``*.encoder.layer``)."""

    heads: float = Field(0.0, ge=0, lt=1, description="fraction of heads removed per layer")
    ffn: float = Field(0.0, ge=0, lt=1, description="fraction of FFN neurons removed per layer")
    ffn_multiple: int = Field(16, ge=1, description="kept FFN width rounded to this multiple")
    keep_layers: list[int] | None = Field(None, description="indices of the layers kept")
    samples: int = Field(128, ge=1, description="calibration sentences for the importance")
    reconstruct: bool = Field(True, description="refit each layer's FFN out projection by "
                              "least squares to the original's layer output (after FFN "
                              "pruning, when no layer is dropped)")
    distill: EncoderDistill | None = Field(None, description="recover from the original")


# ----------------------------------------------------------------------------- the layout


def encoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, ModuleList)`` of the encoder's layers; ModelError when the layout is not BERT's."""
    return find_layer_stack(
        model, "encoder.layer", _bert_layer,
        "no BERT-layout encoder found (a ModuleList '*.encoder.layer' whose layers have "
        "attention.self.query/key/value, attention.output.dense, intermediate.dense and "
        "output.dense); llm.encoder_prune supports BERT-family encoders (BERT, RoBERTa, MiniLM)")


def _bert_layer(layer: nn.Module) -> bool:
    try:
        mods = [layer.get_submodule(p) for p in ("attention.self.query", "attention.self.key",
                                                 "attention.self.value",
                                                 "attention.output.dense",
                                                 "intermediate.dense", "output.dense")]
    except AttributeError:
        return False
    return all(isinstance(m, nn.Linear) for m in mods) and hasattr(
        layer.attention.self, "attention_head_size")


# ----------------------------------------------------------------------------- importance


@dataclass
class _Stats:
    """Per layer, for the two out projections' inputs over real tokens: the mean ``(width,)``
    and the score ``var(x_j) * ||W[:, j]||^2`` per input feature (FLAP's fluctuation: the
    output error of replacing feature ``j`` by its mean)."""

    attn_mean: list[Tensor]
    attn_score: list[Tensor]
    ffn_mean: list[Tensor]
    ffn_score: list[Tensor]


def _importance(model: nn.Module, layers: nn.ModuleList, batches) -> _Stats:
    """Mean and fluctuation score of every input feature of each layer's out projections."""
    sums: dict[tuple[int, str], list] = {}
    state: dict[str, Tensor] = {}

    def tap(i: int, kind: str):
        def hook(module, args):
            x = args[0].detach().double()  # (B, T, width)
            keep = state["mask"].reshape(-1).bool()
            x = x.reshape(-1, x.shape[-1])[keep]  # real tokens only
            acc = sums.setdefault((i, kind), [0, 0.0, 0.0])
            acc[0] += len(x)
            acc[1] = acc[1] + x.sum(0)
            acc[2] = acc[2] + x.pow(2).sum(0)
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.attention.output.dense.register_forward_pre_hook(tap(i, "attn")))
        handles.append(layer.output.dense.register_forward_pre_hook(tap(i, "ffn")))
    try:
        with torch.no_grad():
            for ids, mask in batches:
                state["mask"] = mask
                model(ids, mask)
    finally:
        for h in handles:
            h.remove()
    stats = _Stats([], [], [], [])
    for i, layer in enumerate(layers):
        for kind, dense in (("attn", layer.attention.output.dense), ("ffn", layer.output.dense)):
            n, total, squares = sums.get((i, kind), (0, 0.0, 0.0))
            if not n:
                raise ModelError("calibration saw no real token; give sentences with a mask")
            mean = total / n
            var = (squares / n - mean.pow(2)).clamp_min(0)
            score = var * dense.weight.detach().double().pow(2).sum(0)
            getattr(stats, f"{kind}_mean").append(mean.float())
            getattr(stats, f"{kind}_score").append(score)
    return stats


# ----------------------------------------------------------------------------- surgery


def prune_encoder_(model: nn.Module, batches: list[tuple[Tensor, Tensor]], *, heads: float = 0.0,
                   ffn: float = 0.0, ffn_multiple: int = 16,
                   keep_layers: list[int] | None = None) -> dict:
    """Prune ``model`` in place; ``batches``: ``(ids, mask)`` calibration batches. Returns
    ``{"heads": [kept per layer], "ffn": [...], "layers": [kept indices]}``."""
    path, layers = encoder_layers(model)
    if keep_layers is not None:
        bad = [i for i in keep_layers if not 0 <= i < len(layers)]
        if bad or not keep_layers or len(set(keep_layers)) != len(keep_layers):
            raise RecipeError(f"keep_layers {keep_layers} must be distinct indices of the "
                              f"{len(layers)} layers of {path} (0..{len(layers) - 1})")
        kept = nn.ModuleList([layers[i] for i in sorted(keep_layers)])
        model.set_submodule(path, kept)
        layers = kept
        config = getattr(_hf_root(model), "config", None)
        if config is not None and hasattr(config, "num_hidden_layers"):
            config.num_hidden_layers = len(kept)
    scores = _importance(model, layers, batches) if heads or ffn else None
    facts = {"heads": [], "ffn": [], "layers": sorted(keep_layers) if keep_layers else
             list(range(len(layers)))}
    for i, layer in enumerate(layers):
        attn, inter, out = layer.attention.self, layer.intermediate, layer.output
        d = attn.attention_head_size
        h = attn.query.out_features // d
        if heads and scores is not None:
            n = keep_count(h, heads)
            per_head = scores.attn_score[i].reshape(h, d).sum(1)
            top = per_head.topk(n).indices.sort().values
            idx = (top[:, None] * d + torch.arange(d)).reshape(-1)
            for name in ("query", "key", "value"):
                setattr(attn, name, linear_rows(getattr(attn, name), idx))
            layer.attention.output.dense = linear_cols_compensated(
                layer.attention.output.dense, idx, scores.attn_mean[i])
            attn.num_attention_heads, attn.all_head_size, h = n, n * d, n
        facts["heads"].append(h)
        width = inter.dense.out_features
        if ffn and scores is not None:
            n = keep_count(width, ffn, ffn_multiple)
            idx = scores.ffn_score[i].topk(n).indices.sort().values
            inter.dense = linear_rows(inter.dense, idx)
            out.dense = linear_cols_compensated(out.dense, idx, scores.ffn_mean[i])
            width = n
        facts["ffn"].append(width)
    return facts


def _hf_root(model: nn.Module) -> nn.Module:
    return getattr(model, "hf", model)


# ----------------------------------------------------------------------------- the step


def _sentence_batches(ctx: StepContext, samples: int, batch_size: int):
    out = []
    for batch in ctx.calibration_batches(samples, batch_size):
        args = tuple(batch)
        if len(args) != 2:
            raise ModelError("llm.encoder_prune needs (ids, mask) inputs: use the embedding task "
                             "(data: {name: sentences, ...})")
        out.append(args)
    return out


def _needs(config: EncoderPruneConfig) -> str | None:
    return "calibration sentences" if (config.heads or config.ffn or config.distill) else None


@register_step("llm.encoder_prune", EncoderPruneConfig, needs_data=_needs)
def encoder_prune(model: nn.Module, config: EncoderPruneConfig, ctx: StepContext) -> nn.Module:
    """Prune heads / FFN neurons / layers of a BERT-family encoder; optionally distill."""
    if not (config.heads or config.ffn or config.keep_layers):
        raise RecipeError("llm.encoder_prune removes nothing; set heads, ffn (fractions) or "
                          "keep_layers")
    if config.finetune is not None and getattr(ctx.task, "kind", None) == "embedding":
        raise RecipeError("llm.encoder_prune: an embedding has no label loss to fine-tune on; "
                          "replace finetune: with distill: {epochs: 1} (recovery from the "
                          "original's embeddings)")
    teacher = None
    refit = config.reconstruct and bool(config.ffn) and not config.keep_layers
    if config.distill is not None or refit:  # the original: the baseline, else the model given
        teacher = ctx.baseline if ctx.baseline is not None else copy.deepcopy(model)
    calib = _sentence_batches(ctx, config.samples, 16) if (config.heads or config.ffn) else []
    before = sum(p.numel() for p in model.parameters())
    facts = prune_encoder_(model, calib, heads=config.heads, ffn=config.ffn,
                           ffn_multiple=config.ffn_multiple, keep_layers=config.keep_layers)
    after = sum(p.numel() for p in model.parameters())
    ctx.note(f"encoder: layers {facts['layers']}, heads per layer {facts['heads']}, FFN widths "
             f"{facts['ffn']}; parameters {before:,} -> {after:,}")
    ctx.summary.update({"encoder_" + k: v for k, v in facts.items()})
    if refit and teacher is not None:
        from lighten.llm.encoder_recover import reconstruct_ffn_

        errors = reconstruct_ffn_(model, teacher.eval(), calib)
        ctx.note("FFN out projections refitted to the original's layer outputs (relative "
                 f"residual per layer {', '.join(f'{e:.3f}' for e in errors)})")
    if config.distill is not None and teacher is not None:
        from lighten.llm.encoder_recover import fake_int8

        d = config.distill
        batches = _sentence_batches(ctx, d.samples, d.batch_size)
        with fake_int8(model, reduce_range=ctx.target.reduce_range) if d.int8 else \
                contextlib.nullcontext():
            history = distill_embeddings_(model, teacher.eval(), batches, epochs=d.epochs,
                                          lr=d.lr, tokens=d.tokens, layers=d.layers,
                                          relations=d.relations, layer_map=d.layer_map,
                                          warmup=d.warmup, seed=ctx.seed)
        ctx.note(f"distilled from the original: 1 - cosine per epoch "
                 f"{', '.join(f'{h:.4f}' for h in history)}")
        ctx.summary["distill_loss"] = history
    return ctx.finetune(model, config.finetune)
