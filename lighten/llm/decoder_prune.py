"""Structured pruning of a decoder LLM (Llama layout), recovered by distillation from the original.

``llm.decoder_prune`` removes, in the block stack of a Llama-family causal LM (Llama, SmolLM,
Mistral, Qwen2: blocks with ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``):

* attention heads (``heads``: the fraction removed per layer), keeping grouped-query attention
  consistent: ``head_mode: group`` removes whole KV groups (a key/value head and the query heads
  that read it; the KV cache shrinks too), ``within`` removes the same number of query heads
  inside every group (key/value heads stay). q/k/v rows and the matching ``o_proj`` input columns
  go; the attention derives its head counts from the projection widths and
  ``num_key_value_groups``, which is updated (a plain attribute: the artifact's edit log records
  it, so the pruned model reloads);
* FFN neurons (``ffn``): rows of ``gate_proj`` / ``up_proj`` and input columns of ``down_proj``;
* whole layers (``drop_layers``): a count, chosen by ShortGPT's Block Influence (Men et al.
  2024: ``1 - cos(h_in, h_out)`` per token, the layers that change the hidden state least go),
  or a list of indices. Kept layers are renumbered (``layer_idx`` addresses the KV cache).

Importance of heads and neurons is FLAP's fluctuation, as in :mod:`lighten.llm.encoder` (whose
surgery helpers are reused): input feature ``j`` of an out projection scores
``var(x_j) * ||W[:, j]||^2`` on calibration text, a head sums its dimensions, a KV group its
query heads; the removed features' mean contribution moves into a bias (``compensate``).
Statistics for all three come from one pass over the calibration windows; the plan is then
applied. When every layer ends with the same counts, the transformers config says so too
(``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``,
``num_hidden_layers``).

Recovery (``distill:``): end-to-end logit KL to the model as this step received it (the
original, when it is the first step). Its final hidden states on the distillation windows are
kept *before* pruning, and the embeddings and LM head are frozen, so the teacher's logits are
``lm_head(hidden)``: D floats per token are stored instead of V logits, and the model is never
held twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from lighten.errors import ModelError, RecipeError
from lighten.llm.slicing import (
    find_layer_stack,
    keep_count,
    linear_cols,
    linear_cols_compensated,
    linear_rows,
)
from lighten.llm.train_loop import train_steps
from lighten.modules import require_modules
from lighten.registry import register_step
from lighten.step import PruneStepConfig, StepContext, StrictModel
from lighten.task import batch_inputs

__all__ = ["DecoderDistill", "DecoderPlan", "DecoderPruneConfig", "DecoderStats",
           "apply_plan_", "decoder_layers", "decoder_statistics", "distill_logits_",
           "plan_pruning", "prune_decoder_", "teacher_hidden"]

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


class DecoderDistill(StrictModel):
    """Recovery by logit distillation from the model before pruning."""

    epochs: float = Field(1.0, gt=0, description="passes over the distillation windows")
    samples: int = Field(64, ge=1, description="training windows distilled on")
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(4, ge=1, description="windows per step")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the KL")


class DecoderPruneConfig(PruneStepConfig):
    """Heads (GQA-consistent), FFN neurons and layers of a Llama-family decoder."""

    heads: float = Field(0.0, ge=0, lt=1, description="fraction of query heads removed per "
                                                      "layer")
    head_mode: Literal["group", "within"] = Field(
        "group", description="group: whole KV groups with their query heads (the KV cache "
        "shrinks too; on SmolLM2 also the better perplexity); within: the same number of "
        "query heads in every KV group")
    ffn: float = Field(0.0, ge=0, lt=1, description="fraction of FFN neurons removed per layer")
    ffn_multiple: int = Field(16, ge=1, description="kept FFN width rounded to this multiple")
    drop_layers: int | list[int] | None = Field(
        None, description="layers removed: a count (lowest Block Influence) or indices")
    compensate: bool = Field(True, description="removed features' calibration mean moves into "
                                               "the out projection's bias")
    samples: int = Field(32, ge=1, description="calibration windows for the importance")
    batch_size: int = Field(8, ge=1, description="windows per calibration forward")
    ignore: list[str] = Field(default_factory=list, description="layers (or their self_attn / "
                                                                "mlp) left unpruned")
    distill: DecoderDistill | None = Field(None, description="recover from the original")


# ----------------------------------------------------------------------------- the layout


def _causal_lm(model: nn.Module) -> nn.Module:
    return getattr(model, "hf", model)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, ModuleList)`` of the decoder blocks; ModelError when the layout is not Llama's."""
    return find_layer_stack(
        model, "layers", _llama_layer,
        "no Llama-layout decoder found (a ModuleList '*.layers' whose blocks have "
        "self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj Linears); llm.decoder_prune "
        "supports Llama-family causal LMs (Llama, SmolLM, Mistral, Qwen2); BERT-family "
        "encoders use llm.encoder_prune")


def _llama_layer(layer: nn.Module) -> bool:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None or not hasattr(attn, "head_dim"):
        return False
    if not hasattr(attn, "num_key_value_groups"):
        return False
    return all(isinstance(getattr(attn, n, None), nn.Linear) for n in _ATTN) and all(
        isinstance(getattr(mlp, n, None), nn.Linear) for n in _MLP)


def _heads(attn: nn.Module) -> tuple[int, int]:
    """(query heads, key/value heads) of one attention, from its projection widths."""
    d = attn.head_dim
    return attn.q_proj.out_features // d, attn.k_proj.out_features // d


# ----------------------------------------------------------------------------- statistics


@dataclass
class DecoderStats:
    """Per block (original index): the mean and FLAP score of every input feature of
    ``o_proj`` and ``down_proj``, and the Block Influence ``1 - mean cos(h_in, h_out)``."""

    attn_mean: list[Tensor] = field(default_factory=list)
    attn_score: list[Tensor] = field(default_factory=list)
    ffn_mean: list[Tensor] = field(default_factory=list)
    ffn_score: list[Tensor] = field(default_factory=list)
    influence: list[float] = field(default_factory=list)


def _first_tensor(output) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def decoder_statistics(model: nn.Module, batches) -> DecoderStats:
    """One pass over ``batches`` (token ids) with hooks on every block (module doc)."""
    _, layers = decoder_layers(model)
    sums: dict[tuple[int, str], list] = {}
    influence: dict[int, list[float]] = {}
    pending: dict[int, Tensor] = {}

    def feature_tap(i: int, kind: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # (N, width)
            acc = sums.setdefault((i, kind), [0, 0.0, 0.0])
            acc[0] += len(x)
            acc[1] = acc[1] + x.sum(0)
            acc[2] = acc[2] + x.pow(2).sum(0)
        return hook

    def block_in(i: int):
        def hook(module, args, kwargs):
            pending[i] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    def block_out(i: int):
        def hook(module, args, output):
            h_in, h_out = pending.pop(i), _first_tensor(output).detach()
            cos = F.cosine_similarity(h_in.double(), h_out.double(), dim=-1)  # (B, T)
            acc = influence.setdefault(i, [0.0, 0])
            acc[0] += float((1 - cos).sum())
            acc[1] += cos.numel()
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(feature_tap(i, "attn")))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(feature_tap(i, "ffn")))
        handles.append(layer.register_forward_pre_hook(block_in(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(block_out(i)))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(*batch_inputs(batch))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    stats = DecoderStats()
    for i, layer in enumerate(layers):
        for kind, out in (("attn", layer.self_attn.o_proj), ("ffn", layer.mlp.down_proj)):
            n, total, squares = sums.get((i, kind), (0, 0.0, 0.0))
            if not n:
                raise ModelError("decoder pruning saw no calibration token; give data with "
                                 "training text")
            mean = total / n
            var = (squares / n - mean.pow(2)).clamp_min(0)
            getattr(stats, f"{kind}_mean").append(mean.float())
            getattr(stats, f"{kind}_score").append(var * out.weight.detach().double().pow(2)
                                                   .sum(0))
        total, count = influence[i]
        stats.influence.append(total / max(count, 1))
    return stats


# ----------------------------------------------------------------------------- the plan


@dataclass
class LayerPlan:
    """What one block keeps (original indices); None: that part is left as it is."""

    q_heads: list[int] | None = None
    kv_heads: list[int] | None = None
    ffn: list[int] | None = None


@dataclass
class DecoderPlan:
    layers: list[int]  # the kept blocks, by original index
    blocks: dict[int, LayerPlan] = field(default_factory=dict)  # by original index


def _dropped(layers: nn.ModuleList, drop, stats: DecoderStats | None) -> list[int]:
    n = len(layers)
    if drop is None:
        return []
    if isinstance(drop, int):
        if not 0 <= drop < n:
            raise RecipeError(f"drop_layers {drop} must be a count below the {n} layers")
        if drop == 0:
            return []
        if stats is None:
            raise RecipeError("drop_layers as a count needs calibration statistics")
        order = sorted(range(n), key=lambda i: stats.influence[i])
        return sorted(order[:drop])
    bad = [i for i in drop if not 0 <= i < n]
    if bad or len(set(drop)) != len(drop) or len(drop) >= n:
        raise RecipeError(f"drop_layers {drop} must be distinct indices of the {n} layers "
                          f"(0..{n - 1}), leaving at least one")
    return sorted(drop)


def plan_pruning(model: nn.Module, stats: DecoderStats | None, *, heads: float = 0.0,
                 head_mode: str = "group", ffn: float = 0.0, ffn_multiple: int = 16,
                 drop_layers: int | list[int] | None = None,
                 ignore: list[str] | tuple = ()) -> DecoderPlan:
    """Which heads, neurons and layers stay, from the statistics (nothing changes yet)."""
    if head_mode not in ("within", "group"):
        raise RecipeError(f"head_mode {head_mode!r} is unknown; use within or group")
    if (heads or ffn) and stats is None:
        raise RecipeError("pruning heads or FFN neurons needs calibration statistics")
    path, layers = decoder_layers(model)
    gone = _dropped(layers, drop_layers, stats)
    plan = DecoderPlan([i for i in range(len(layers)) if i not in gone])
    skip = set(ignore)
    for i in plan.layers:
        layer, name = layers[i], f"{path}.{i}"
        block = LayerPlan()
        attn = layer.self_attn
        if heads and not {name, f"{name}.self_attn"} & skip:
            h, kv = _heads(attn)
            rep = h // kv
            per_head = stats.attn_score[i].reshape(h, attn.head_dim).sum(1)  # (h,)
            if head_mode == "group" or rep == 1:  # without GQA a group is one head
                per_group = per_head.reshape(kv, rep).sum(1)
                groups = per_group.topk(keep_count(kv, heads)).indices.sort().values.tolist()
                block.kv_heads = groups
                block.q_heads = [g * rep + r for g in groups for r in range(rep)]
            else:
                keep = keep_count(rep, heads)
                top = per_head.reshape(kv, rep).topk(keep, dim=1).indices.sort(dim=1).values
                block.kv_heads = list(range(kv))
                block.q_heads = (top + torch.arange(kv)[:, None] * rep).reshape(-1).tolist()
        if ffn and not {name, f"{name}.mlp"} & skip:
            width = layer.mlp.down_proj.in_features
            n = keep_count(width, ffn, ffn_multiple)
            block.ffn = stats.ffn_score[i].topk(n).indices.sort().values.tolist()
        plan.blocks[i] = block
    return plan


# ----------------------------------------------------------------------------- surgery


def _dims(heads: list[int], d: int) -> Tensor:
    return (torch.tensor(heads)[:, None] * d + torch.arange(d)).reshape(-1)


def apply_plan_(model: nn.Module, plan: DecoderPlan, stats: DecoderStats | None = None, *,
                compensate: bool = True) -> dict:
    """Cut ``model`` to ``plan`` in place. Returns ``{"layers": kept original indices,
    "heads": [(q, kv) per kept layer], "ffn": [width per kept layer]}``."""
    path, layers = decoder_layers(model)
    for i, block in plan.blocks.items():
        layer = layers[i]
        attn, mlp = layer.self_attn, layer.mlp
        if block.q_heads is not None:
            d = attn.head_dim
            q, kv = _dims(block.q_heads, d), _dims(block.kv_heads, d)
            attn.q_proj = linear_rows(attn.q_proj, q)
            attn.k_proj, attn.v_proj = linear_rows(attn.k_proj, kv), linear_rows(attn.v_proj, kv)
            attn.o_proj = (linear_cols_compensated(attn.o_proj, q, stats.attn_mean[i])
                           if compensate and stats is not None else linear_cols(attn.o_proj, q))
            attn.num_key_value_groups = len(block.q_heads) // len(block.kv_heads)
        if block.ffn is not None:
            idx = torch.tensor(block.ffn)
            mlp.gate_proj = linear_rows(mlp.gate_proj, idx)
            mlp.up_proj = linear_rows(mlp.up_proj, idx)
            mlp.down_proj = (linear_cols_compensated(mlp.down_proj, idx, stats.ffn_mean[i])
                             if compensate and stats is not None
                             else linear_cols(mlp.down_proj, idx))
    if len(plan.layers) != len(layers):
        kept = nn.ModuleList([layers[i] for i in plan.layers])
        model.set_submodule(path, kept)
        layers = kept
    for j, layer in enumerate(layers):
        if hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = j  # the KV cache is addressed by it
    facts = {"layers": list(plan.layers),
             "heads": [_heads(layer.self_attn) for layer in layers],
             "ffn": [layer.mlp.down_proj.in_features for layer in layers]}
    _sync_config(model, facts)
    return facts


def _sync_config(model: nn.Module, facts: dict) -> None:
    """The transformers config says what the blocks now are, where every block agrees."""
    config = getattr(_causal_lm(model), "config", None)
    if config is None:
        return
    config.num_hidden_layers = len(facts["layers"])
    if len(set(facts["heads"])) == 1:
        config.num_attention_heads, config.num_key_value_heads = facts["heads"][0]
    if len(set(facts["ffn"])) == 1:
        config.intermediate_size = facts["ffn"][0]


def prune_decoder_(model: nn.Module, batches, *, heads: float = 0.0, head_mode: str = "group",
                   ffn: float = 0.0, ffn_multiple: int = 16,
                   drop_layers: int | list[int] | None = None, compensate: bool = True,
                   ignore: list[str] | tuple = ()) -> dict:
    """Statistics, plan and surgery in one call (``batches``: token-id calibration batches,
    needed for heads, FFN and a layer count). Returns :func:`apply_plan_`'s facts."""
    needs = heads or ffn or (isinstance(drop_layers, int) and drop_layers > 0)
    stats = decoder_statistics(model, batches) if needs else None
    plan = plan_pruning(model, stats, heads=heads, head_mode=head_mode, ffn=ffn,
                        ffn_multiple=ffn_multiple, drop_layers=drop_layers, ignore=ignore)
    facts = apply_plan_(model, plan, stats, compensate=compensate)
    facts["influence"] = stats.influence if stats is not None else None
    return facts


# ----------------------------------------------------------------------------- distillation


def _final_norm(model: nn.Module) -> nn.Module:
    hf = _causal_lm(model)
    norm = getattr(getattr(hf, "model", None), "norm", None)
    if norm is None or not hasattr(hf, "lm_head"):
        raise ModelError("logit distillation needs a transformers causal LM with model.norm and "
                         "lm_head (model: {hf: ...} with a language-model task)")
    return norm


@torch.no_grad()
def teacher_hidden(model: nn.Module, batches: list[Tensor]) -> list[Tensor]:
    """The final (normed) hidden states ``(B, T, D)`` of ``model`` on each batch: the teacher's
    logits are ``lm_head`` of them, so D floats per token are kept instead of V."""
    norm, kept = _final_norm(model), []
    handle = norm.register_forward_hook(lambda m, a, out: kept.append(out.detach().clone()))
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            model(ids)
    finally:
        handle.remove()
        model.train(was_training)
    return kept


def distill_logits_(student: nn.Module, batches: list[Tensor], targets: list[Tensor], *,
                    epochs: float = 1.0, lr: float = 1e-4, temperature: float = 1.0,
                    seed: int = 0) -> list[float]:
    """Train ``student``'s blocks in place so its next-token distributions match the teacher's
    (``KL(teacher || student)`` per token, ``temperature``² scaled), the teacher's logits being
    ``lm_head(targets[j])``. Embeddings and the LM head are frozen (they are the teacher's
    too); dropout stays off. Returns the mean loss of each epoch (the last may be partial)."""
    hf = _causal_lm(student)
    _final_norm(student)
    head = hf.lm_head
    frozen = {id(p) for m in (head, hf.get_input_embeddings()) for p in m.parameters()}
    params = [p for p in student.parameters() if p.requires_grad and id(p) not in frozen]
    flags = {id(p): p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
    t = temperature

    def loss_of(j: int) -> Tensor:
        logits = student(batches[j])  # (B, T, V)
        with torch.no_grad():
            teacher = head(targets[j])
        v = logits.shape[-1]
        return F.kl_div(F.log_softmax(logits.reshape(-1, v) / t, dim=-1),
                        F.log_softmax(teacher.reshape(-1, v) / t, dim=-1),
                        log_target=True, reduction="batchmean") * t * t

    was_training = student.training
    student.eval()
    try:
        history = train_steps(params, loss_of, len(batches), epochs=epochs, lr=lr, seed=seed,
                              schedule=lambda s, steps: 1.0 - s / steps)
    finally:
        for p in student.parameters():
            p.requires_grad_(flags.get(id(p), True))
        student.train(was_training)
    return history


# ----------------------------------------------------------------------------- the step


def _counts_layers(config: DecoderPruneConfig) -> bool:
    """``drop_layers: N`` ranks the layers on calibration text; a list of indices needs none."""
    return isinstance(config.drop_layers, int) and config.drop_layers > 0


def _needs(config: DecoderPruneConfig) -> str | None:
    wanted = config.heads or config.ffn or _counts_layers(config) or config.distill
    return "calibration inputs" if wanted else None


def _id_batches(ctx: StepContext, samples: int, batch_size: int) -> list[Tensor]:
    out = list(ctx.calibration_batches(samples, batch_size))
    if not out or not all(isinstance(b, Tensor) and b.dtype == torch.long for b in out):
        raise ModelError("llm.decoder_prune needs token-id windows: use the language-model "
                         "task (data: {name: text, ...})")
    return out


def _record(ctx: StepContext, path: str, before: dict, facts: dict, dropped: list[int]) -> None:
    """A report row per pruned attention / MLP (new names) and per removed layer (old names)."""
    for j, i in enumerate(facts["layers"]):
        name = f"{path}.{j}"
        (h0, kv0), (h1, kv1) = before["heads"][i], facts["heads"][j]
        if (h0, kv0) != (h1, kv1):
            ctx.layer(f"{name}.self_attn", "prune heads", before=f"{h0} q / {kv0} kv heads",
                      after=f"{h1} q / {kv1} kv heads", heads_after=h1)
        f0, f1 = before["ffn"][i], facts["ffn"][j]
        if f0 != f1:
            ctx.layer(f"{name}.mlp", "prune neurons", before=f"{f0} neurons",
                      after=f"{f1} neurons", shape_before=[f0], shape_after=[f1])
    for i in dropped:
        row = {"before": "block", "after": "removed"}
        if facts.get("influence") is not None:
            row["score"] = facts["influence"][i]
        ctx.layer(f"{path}.{i}", "remove layer", **row)


@register_step("llm.decoder_prune", DecoderPruneConfig, needs_data=_needs)
def decoder_prune(model: nn.Module, config: DecoderPruneConfig, ctx: StepContext) -> nn.Module:
    """Prune heads (GQA-consistent) / FFN neurons / layers of a Llama decoder; optionally
    distill."""
    if not (config.heads or config.ffn or config.drop_layers):
        raise RecipeError("llm.decoder_prune removes nothing; set heads, ffn (fractions) or "
                          "drop_layers (a count or indices)")
    require_modules(model, config.ignore, key="ignore")
    path, layers = decoder_layers(model)
    before = {"heads": [_heads(layer.self_attn) for layer in layers],
              "ffn": [layer.mlp.down_proj.in_features for layer in layers]}
    params = sum(p.numel() for p in model.parameters())
    d = config.distill
    distill_batches = _id_batches(ctx, d.samples, d.batch_size) if d is not None else []
    targets = teacher_hidden(model, distill_batches) if d is not None else []
    calib = (_id_batches(ctx, config.samples, config.batch_size)
             if (config.heads or config.ffn or _counts_layers(config)) else [])
    facts = prune_decoder_(model, calib, heads=config.heads, head_mode=config.head_mode,
                           ffn=config.ffn, ffn_multiple=config.ffn_multiple,
                           drop_layers=config.drop_layers, compensate=config.compensate,
                           ignore=config.ignore)
    dropped = [i for i in range(len(before["ffn"])) if i not in facts["layers"]]
    _record(ctx, path, before, facts, dropped)
    after = sum(p.numel() for p in model.parameters())
    ctx.note(f"decoder: {len(facts['layers'])} of {len(before['ffn'])} layers kept "
             f"(removed {dropped}), heads (q, kv) {sorted(set(facts['heads']))}, FFN widths "
             f"{sorted(set(facts['ffn']))}; parameters {params:,} -> {after:,}")
    ctx.summary.update({"decoder_layers": facts["layers"], "decoder_heads": facts["heads"],
                        "decoder_ffn": facts["ffn"], "params_before": params,
                        "params_after": after})
    if d is not None:
        history = distill_logits_(model, distill_batches, targets, epochs=d.epochs, lr=d.lr,
                                  temperature=d.temperature, seed=ctx.seed)
        ctx.note("distilled from the model before pruning (logit KL): per epoch "
                 + ", ".join(f"{h:.4f}" for h in history))
        ctx.summary["distill_loss"] = history
    return ctx.finetune(model, config.finetune)
