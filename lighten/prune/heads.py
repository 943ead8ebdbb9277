"""Remove whole attention heads (``prune.heads``): q/k/v rows and out-projection columns go.

Where attention is found -- a small explicit rule, not the channel graph (whose tables refuse the
transposes attention needs):

* ``nn.MultiheadAttention`` (batch_first or not; packed ``in_proj_weight``), and
* a hand-written block: a module with an integer head count attribute (``num_heads``,
  ``n_heads``, ``n_head`` or ``heads``) whose direct ``nn.Linear`` children are named like
  q/k/v + out (``q``/``q_proj``/``query``..., ``out``/``out_proj``/``o_proj``/``proj``...) or a
  fused ``qkv``/``c_attn`` + out projection.

``head_dim`` stays; the inner width becomes ``num_heads * head_dim``. ``nn.MultiheadAttention``
cannot express an inner width below ``embed_dim``, so it is replaced by
:class:`PrunedMultiheadAttention` (same call signature and results, registered for artifacts).
A hand-written block keeps its class: its Linear layers are sliced and its head count attribute
updated (the artifact records the changed attribute).

Every removal is verified before it touches the model: a copy with the chosen heads' output
columns zeroed must give the same outputs as the pruned copy. A forward that ignores the head
count (e.g. derives ``head_dim`` from the input width) fails that check and is refused with the
module's name instead of yielding a silently wrong model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from lighten.errors import UnsupportedError
from lighten.layers import LayerSpec, register_layer_spec
from lighten.modules import register_module_type, require_modules, set_submodule
from lighten.prune.importance import accumulate_gradients, task_summed_loss
from lighten.prune.surgery import linear_in, linear_out
from lighten.registry import register_step
from lighten.step import PruneStepConfig, StepContext

__all__ = ["AttentionSite", "HeadPruneConfig", "HeadPruneReport", "PrunedMultiheadAttention",
           "find_attention", "prune_heads_", "untie_attention"]

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # labelled (x, y)

HEAD_COUNT_ATTRS = ("num_heads", "n_heads", "n_head", "heads")
Q_NAMES = ("q", "q_proj", "query", "wq", "to_q")
K_NAMES = ("k", "k_proj", "key", "wk", "to_k")
V_NAMES = ("v", "v_proj", "value", "wv", "to_v")
FUSED_NAMES = ("qkv", "qkv_proj", "to_qkv", "c_attn")
OUT_NAMES = ("out", "out_proj", "o", "o_proj", "proj", "wo", "to_out", "c_proj")
INNER_WIDTH_ATTRS = ("inner_dim", "all_head_size", "attn_dim")  # updated when they equal H*d


class HeadPruneConfig(PruneStepConfig):
    ratio: float = Field(gt=0, lt=1, description="fraction of heads removed in each attention")
    importance: Literal["l2", "taylor", "random"] = "l2"
    ignore: list[str] = Field(default_factory=list, description="attention modules left whole")
    calibration_samples: int = Field(256, ge=1, description="labelled samples for taylor")


# ----------------------------------------------------------------------------- pruned MHA


@register_module_type
class PrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with heads removed: inner width ``num_heads * head_dim``.

    ``embed_dim`` stays the model width (input of in_proj, output of out_proj). Supports what
    ``nn.TransformerEncoderLayer`` uses: batched inputs, ``attn_mask`` (2-D, or 3-D per original
    head: the kept heads' rows are used), ``key_padding_mask``, ``is_causal``, dropout and
    attention weights. ``_qkv_same_embed_dim`` is False so PyTorch's fused fast path, which
    assumes ``num_heads * head_dim == embed_dim``, is never taken.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, batch_first=False,
                 dropout: float = 0.0, bias: bool = True, out_bias: bool = True,
                 kept: list[int] | None = None, heads_before: int | None = None,
                 out_dim: int | None = None):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads, self.head_dim = num_heads, head_dim
        self.batch_first, self.dropout = batch_first, dropout
        self.kept = list(range(num_heads)) if kept is None else list(kept)
        self.heads_before = heads_before or num_heads
        self._qkv_same_embed_dim = False
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim if out_dim is None else out_dim, bias=out_bias)

    # Read from the tensors, so structured pruning may slice the embedding width (in_proj
    # columns, out_proj rows) like any parameter and the sizes stay true.
    @property
    def embed_dim(self) -> int:
        """Input width (query/key/value features): in_proj's columns."""
        return self.in_proj_weight.shape[1]

    @property
    def out_dim(self) -> int:
        """Output width: out_proj's rows (equal to ``embed_dim`` unless pruned apart)."""
        return self.out_proj.out_features

    def artifact_config(self) -> dict:
        config = {"embed_dim": self.embed_dim, "num_heads": self.num_heads,
                  "head_dim": self.head_dim, "batch_first": self.batch_first,
                  "dropout": self.dropout, "bias": self.in_proj_bias is not None,
                  "out_bias": self.out_proj.bias is not None, "kept": self.kept,
                  "heads_before": self.heads_before}
        if self.out_dim != self.embed_dim:
            config["out_dim"] = self.out_dim
        return config

    @classmethod
    def from_artifact(cls, config: dict) -> PrunedMultiheadAttention:
        c = dict(config)
        return cls(c.pop("embed_dim"), c.pop("num_heads"), c.pop("head_dim"), **c)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        torch._assert(query.dim() == 3, "PrunedMultiheadAttention needs batched 3-D inputs")
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, n_q, _ = query.shape  # (B, L, E)
        n_k = key.shape[1]
        h, d = self.num_heads, self.head_dim
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = (self.in_proj_bias.chunk(3) if self.in_proj_bias is not None
                         else (None, None, None))
        q = F.linear(query, w_q, b_q).view(b, n_q, h, d).transpose(1, 2)  # (B, H, L, d)
        k = F.linear(key, w_k, b_k).view(b, n_k, h, d).transpose(1, 2)  # (B, H, S, d)
        v = F.linear(value, w_v, b_v).view(b, n_k, h, d).transpose(1, 2)
        return attend(self, q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                      key_padding_mask=key_padding_mask, need_weights=need_weights,
                      average_attn_weights=average_attn_weights)

    def _per_head(self, mask: torch.Tensor, batch: int) -> torch.Tensor:
        if mask.dim() == 2:
            return mask  # (L, S), broadcast over batch and heads
        full = mask.view(batch, self.heads_before, *mask.shape[-2:])  # (B, H0, L, S)
        return full[:, self.kept]


# the channel analysis sees it as one call, like nn.MultiheadAttention (prune.channels slices
# its embedding width: in_proj columns, out_proj rows)
register_layer_spec(LayerSpec(PrunedMultiheadAttention, graph_kind="attention"))


def attend(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
           attn_mask, is_causal: bool, key_padding_mask, need_weights: bool,
           average_attn_weights: bool):
    """Scaled dot-product attention of per-head ``q`` (B, H, L, d) and ``k``/``v`` (B, H, S, d)
    with torch's mask rules, then ``module.out_proj``: what ``nn.MultiheadAttention.forward``
    returns, for the attention modules that replace it (pruned heads, unfused projections).
    ``module`` supplies ``head_dim``, ``dropout``, ``batch_first``, ``out_proj``, ``_per_head``."""
    b, n_q, n_k = q.shape[0], q.shape[2], k.shape[2]  # indexed, not unpacked: fx traces this
    scores = (q * module.head_dim ** -0.5) @ k.transpose(-2, -1)  # (B, H, L, S)
    if attn_mask is not None:  # is_causal is only a hint about attn_mask then (as in torch)
        scores = scores + module._per_head(_additive(attn_mask, scores.dtype), b)
    elif is_causal:
        causal = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores + _additive(causal, scores.dtype)
    if key_padding_mask is not None:
        scores = scores + _additive(key_padding_mask, scores.dtype)[:, None, None, :]
    attn = F.dropout(scores.softmax(-1), module.dropout, module.training)
    # -1, not H * d: the channel analysis reads a literal width as one pruning would break
    out = module.out_proj((attn @ v).transpose(1, 2).reshape(b, n_q, -1))  # (B, L, E)
    if not module.batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    return out, attn.mean(1) if average_attn_weights else attn


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean masks (True = not allowed) become 0 / -inf; float masks are already additive."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf"))
    return mask.to(dtype)


def _to_pruned_mha(mha: nn.Module, keep: torch.Tensor) -> PrunedMultiheadAttention:
    """A PrunedMultiheadAttention holding heads ``keep`` of ``mha`` (MHA or already pruned)."""
    h, d = mha.num_heads, mha.head_dim
    kept_before = mha.kept if isinstance(mha, PrunedMultiheadAttention) else list(range(h))
    new = PrunedMultiheadAttention(
        mha.embed_dim, len(keep), d, batch_first=mha.batch_first, dropout=mha.dropout,
        bias=mha.in_proj_bias is not None, out_bias=mha.out_proj.bias is not None,
        kept=[kept_before[i] for i in keep.tolist()],
        heads_before=getattr(mha, "heads_before", h), out_dim=mha.out_proj.out_features)
    rows = _head_index(keep, d, offsets=(0, h * d, 2 * h * d))
    with torch.no_grad():
        new.in_proj_weight.copy_(mha.in_proj_weight[rows])
        if mha.in_proj_bias is not None:
            new.in_proj_bias.copy_(mha.in_proj_bias[rows])
        new.out_proj.weight.copy_(mha.out_proj.weight[:, _head_index(keep, d)])
        if mha.out_proj.bias is not None:
            new.out_proj.bias.copy_(mha.out_proj.bias)
    return new.train(mha.training)


def untie_attention(mha: nn.MultiheadAttention) -> PrunedMultiheadAttention:
    """An equivalent :class:`PrunedMultiheadAttention` keeping every head, whose embedding width
    may be sliced apart from its inner width (``nn.MultiheadAttention`` ties the two)."""
    return _to_pruned_mha(mha, torch.arange(mha.num_heads))


def _head_index(heads: torch.Tensor, d: int, offsets=(0,)) -> torch.Tensor:
    """Row/column indices of ``heads`` (each ``d`` wide) in every block starting at ``offsets``."""
    per_head = heads.to(torch.long)[:, None] * d + torch.arange(d)  # (heads, d)
    return torch.cat([off + per_head.flatten() for off in offsets])


# ----------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class AttentionSite:
    """One attention module and where its heads live.

    ``rows``: (child Linear name, offset) whose output rows ``offset + h*d ...`` are head h's
    q/k/v; empty for MultiheadAttention (packed ``in_proj_weight``). ``out``: the projection
    whose input columns are the heads. ``heads_attr``: the head count attribute to update.
    """

    path: str
    num_heads: int
    head_dim: int
    rows: tuple[tuple[str, int], ...] = ()
    out: str = "out_proj"
    heads_attr: str | None = None

    @property
    def packed(self) -> bool:
        return not self.rows


def _child_linear(module: nn.Module, names: tuple[str, ...]) -> str | None:
    found = [n for n in names if isinstance(getattr(module, n, None), nn.Linear)]
    return found[0] if len(found) == 1 else None


def _site(path: str, module: nn.Module) -> AttentionSite | None:
    if isinstance(module, (nn.MultiheadAttention, PrunedMultiheadAttention)):
        if not module._qkv_same_embed_dim and isinstance(module, nn.MultiheadAttention):
            raise UnsupportedError(f"{path}: MultiheadAttention with kdim/vdim != embed_dim is "
                                   "not supported by prune.heads; add it to ignore:")
        if getattr(module, "bias_k", None) is not None or getattr(module, "add_zero_attn", False):
            raise UnsupportedError(f"{path}: MultiheadAttention with add_bias_kv/add_zero_attn "
                                   "is not supported by prune.heads; add it to ignore:")
        return AttentionSite(path, module.num_heads, module.head_dim)
    attr = next((a for a in HEAD_COUNT_ATTRS if type(getattr(module, a, None)) is int), None)
    out = _child_linear(module, OUT_NAMES)
    if attr is None or out is None:
        return None
    heads, inner = getattr(module, attr), getattr(module, out).in_features
    if heads < 1 or inner % heads:
        return None
    d = inner // heads
    q, k, v = (_child_linear(module, names) for names in (Q_NAMES, K_NAMES, V_NAMES))
    fused = _child_linear(module, FUSED_NAMES)
    if q and k and v and all(getattr(module, n).out_features == inner for n in (q, k, v)):
        rows = ((q, 0), (k, 0), (v, 0))
    elif fused and getattr(module, fused).out_features == 3 * inner:
        rows = ((fused, 0), (fused, inner), (fused, 2 * inner))
    else:
        return None
    return AttentionSite(path, heads, d, rows, out, attr)


def find_attention(model: nn.Module, *, ignore: Iterable[str] = ()) -> list[AttentionSite]:
    """Attention modules whose heads can be removed, outside ``ignore``."""
    ignore = list(ignore)
    require_modules(model, ignore, key="ignore")
    sites = []
    for path, module in model.named_modules():
        if any(path == i or path.startswith(i + ".") for i in ignore):
            continue
        site = _site(path, module)
        if site is not None:
            sites.append(site)
    return sites


# ----------------------------------------------------------------------------- importance


def _head_slices(module: nn.Module, site: AttentionSite) -> list[tuple[torch.Tensor, int, int]]:
    """(tensor, axis, offset) of every tensor whose ``d``-wide slices belong to the heads."""
    inner = site.num_heads * site.head_dim
    if site.packed:
        out = [(module.in_proj_weight, 0, off) for off in (0, inner, 2 * inner)]
        if module.in_proj_bias is not None:
            out += [(module.in_proj_bias, 0, off) for off in (0, inner, 2 * inner)]
        return out + [(module.out_proj.weight, 1, 0)]
    out = []
    for name, off in site.rows:
        linear = getattr(module, name)
        out.append((linear.weight, 0, off))
        if linear.bias is not None:
            out.append((linear.bias, 0, off))
    return out + [(getattr(module, site.out).weight, 1, 0)]


def _per_head(t: torch.Tensor, axis: int, offset: int, site: AttentionSite) -> torch.Tensor:
    """(num_heads, k): every element of ``t`` that belongs to each head."""
    span = t.narrow(axis, offset, site.num_heads * site.head_dim)
    if axis == 1:
        span = span.transpose(0, 1)
    return span.reshape(site.num_heads, -1)


def head_scores(model: nn.Module, sites: list[AttentionSite], importance: str, *,
                seed: int = 0) -> list[torch.Tensor]:
    """One score per head per site; low = remove first (taylor needs gradients accumulated)."""
    g = torch.Generator().manual_seed(seed)
    scores = []
    for site in sites:
        module = model.get_submodule(site.path)
        if importance == "random":
            scores.append(torch.rand(site.num_heads, generator=g))
            continue
        total = torch.zeros(site.num_heads, dtype=torch.float64)
        for t, axis, off in _head_slices(module, site):
            if importance == "l2":
                total += _per_head(t.detach(), axis, off, site).double().pow(2).sum(1)
            else:  # taylor: Molchanov et al. 2019, (sum of w * dL/dw over the head)^2
                if t.grad is None:
                    raise UnsupportedError("importance 'taylor' needs gradients; pass batches=")
                prod = (t.detach() * t.grad).double()
                total += _per_head(prod, axis, off, site).sum(1)
        scores.append(total.sqrt() if importance == "l2" else total.pow(2))
    return scores


# ----------------------------------------------------------------------------- surgery


def _remove_heads_(model: nn.Module, site: AttentionSite, keep: torch.Tensor) -> None:
    module = model.get_submodule(site.path)
    if site.packed:
        if not site.path:
            raise UnsupportedError("prune.heads cannot replace a MultiheadAttention that is the "
                                   "whole model; wrap it in a module")
        set_submodule(model, site.path, _to_pruned_mha(module, keep))
        return
    d, inner = site.head_dim, site.num_heads * site.head_dim
    for name in dict.fromkeys(n for n, _ in site.rows):
        offsets = tuple(off for n, off in site.rows if n == name)
        linear_out(getattr(module, name), _head_index(keep, d, offsets))
    linear_in(getattr(module, site.out), _head_index(keep, d))
    kept = getattr(module, "kept", None)  # original head indices (lighten.unfused: 3-D masks)
    if isinstance(kept, list) and len(kept) == site.num_heads:
        module.kept = [kept[i] for i in keep.tolist()]
    setattr(module, site.heads_attr, len(keep))
    for attr in INNER_WIDTH_ATTRS:
        if type(getattr(module, attr, None)) is int and getattr(module, attr) == inner:
            setattr(module, attr, len(keep) * d)


def _zero_heads_(model: nn.Module, site: AttentionSite, gone: torch.Tensor) -> None:
    """The reference: heads ``gone`` contribute nothing (their out-projection columns are 0)."""
    module = model.get_submodule(site.path)
    weight = module.out_proj.weight if site.packed else getattr(module, site.out).weight
    with torch.no_grad():
        weight[:, _head_index(gone, site.head_dim)] = 0


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def _verify(model: nn.Module, sites, keeps, x: torch.Tensor) -> float:
    """Max |difference| between the pruned copy and the zeroed-heads copy; inf when the pruned
    copy no longer runs (a forward that computes head_dim as width // heads fails to reshape)."""
    ref, trial = copy.deepcopy(model), copy.deepcopy(model)
    for site, keep in zip(sites, keeps, strict=True):
        gone = torch.tensor([h for h in range(site.num_heads) if h not in set(keep.tolist())])
        if len(gone):
            _zero_heads_(ref, site, gone)
            _remove_heads_(trial, site, keep)
    expected = _outputs(ref, x)
    try:
        got = _outputs(trial, x)
    except Exception:  # the user's forward: any error means it does not follow the head count
        return math.inf
    if got.shape != expected.shape:
        return math.inf
    return float((got - expected).abs().max()) / max(1.0, float(expected.abs().max()))


# ----------------------------------------------------------------------------- the library call


@dataclass
class HeadPruneReport:
    heads_before: dict[str, int]
    heads_after: dict[str, int]
    params_before: int
    params_after: int
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        per = ", ".join(f"{p} {self.heads_before[p]}->{self.heads_after[p]}"
                        for p in self.heads_before)
        return (f"prune.heads: heads {per}; params "
                f"{self.params_after / max(self.params_before, 1):.1%} of before")


def prune_heads_(model: nn.Module, config: HeadPruneConfig, example_input: torch.Tensor, *,
                 batches: Batches | None = None, seed: int = 0, loss: Callable | None = None,
                 check_input: torch.Tensor | None = None) -> HeadPruneReport:
    """Remove ``ratio`` of the heads of every attention module of ``model``, in place.

    ``loss(outputs, targets)`` (summed over the batch) scores taylor importance (default:
    cross-entropy over the last axis); ``check_input`` is the batch the removal is verified on
    (default: random normal of ``example_input``'s shape; pass token ids for a language model).
    """
    from lighten.measure import count_params

    sites = find_attention(model, ignore=config.ignore)
    if not sites:
        raise UnsupportedError("no attention found for prune.heads: it needs "
                               "nn.MultiheadAttention or a module with num_heads and q/k/v "
                               "(or qkv) + out nn.Linear children")
    if config.importance == "taylor":
        if batches is None:
            raise UnsupportedError("importance 'taylor' needs labelled data; pass batches= "
                                   "(the recipe step takes them from the training set)")
        accumulate_gradients(model, batches(), loss=loss)
    scores = head_scores(model, sites, config.importance, seed=seed)
    model.zero_grad(set_to_none=True)
    keeps = []
    for site, s in zip(sites, scores, strict=True):
        n_remove = min(round(config.ratio * site.num_heads), site.num_heads - 1)
        keeps.append(torch.sort(s, stable=True).indices[n_remove:].sort().values)
    if all(len(k) == s.num_heads for k, s in zip(keeps, sites, strict=True)):
        raise UnsupportedError(f"ratio: {config.ratio} removes no head (heads per module: "
                               f"{[s.num_heads for s in sites]}); raise ratio")
    g = torch.Generator().manual_seed(seed)
    x = check_input if check_input is not None else torch.randn(
        2, *example_input.shape[1:], generator=g, dtype=example_input.dtype)
    if _verify(model, sites, keeps, x) > 1e-4:
        bad = [s.path for s, k in zip(sites, keeps, strict=True)
               if _verify(model, [s], [k], x) > 1e-4]
        raise UnsupportedError(f"removing heads of {bad or [s.path for s in sites]} changes the "
                               "outputs: its forward does not follow the head count attribute "
                               "(e.g. derives head_dim from the width); add it to ignore:")
    params_before = count_params(model)[0]
    report = HeadPruneReport({s.path: s.num_heads for s in sites},
                             {s.path: len(k) for s, k in zip(sites, keeps, strict=True)},
                             params_before, 0)
    for site, keep in zip(sites, keeps, strict=True):
        if len(keep) < site.num_heads:
            _remove_heads_(model, site, keep)
    _no_nested_tensor_fast_path(model)
    report.params_after = count_params(model)[0]
    return report


def _no_nested_tensor_fast_path(model: nn.Module) -> None:
    """``nn.TransformerEncoder`` may turn padded batches into nested tensors for its fused
    kernels, which assume unpruned attention; switch that off where heads were removed."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
                isinstance(m, PrunedMultiheadAttention) for m in module.modules()):
            module.use_nested_tensor = False


@register_step("prune.heads", HeadPruneConfig,
               needs_data=lambda c: "example inputs and samples to score the heads")
def prune_heads(model: nn.Module, config: HeadPruneConfig, ctx: StepContext) -> nn.Module:
    """Remove the least important attention heads (q/k/v rows, out-projection columns)."""
    report = prune_heads_(model, config, ctx.example_input(), seed=ctx.seed,
                          batches=lambda: ctx.labelled_batches(config.calibration_samples),
                          loss=task_summed_loss(ctx.task),
                          check_input=ctx.task.random_inputs(2, seed=ctx.seed)[0])
    ctx.note(report.summary())
    for line in report.notes:
        ctx.note(f"prune.heads: {line}")
    for path, before in report.heads_before.items():
        after = report.heads_after[path]
        ctx.layer(path, "remove heads" if after < before else "keep", before=f"{before} heads",
                  after=f"{after} heads", heads_before=before, heads_after=after)
    ctx.finetune(model, config.finetune)
    return model
