"""Channel sharing (``share.channels``): near-duplicate filters computed and stored once.

When two output channels of a layer are (nearly) the same function of the input -- equal filter
and bias, and equal BatchNorm scale/shift after it -- every later layer sees the same value
twice. Keeping one and adding the duplicate's input columns of every consumer into the kept
one's is exact for exact duplicates (``W[:, i] x + W[:, j] x = (W[:, i] + W[:, j]) x``) and
removes the channel from the producer, the norm and the consumers: fewer MACs and parameters.

The channel-dependency groups of :mod:`lighten.graph` say which tensors carry a channel; the
slicing is :func:`lighten.prune.structured.apply_keep_` (residual adds, concatenations,
flatten -> Linear blocks, depthwise convs handled as ``prune.channels`` handles them). A group
coupled by a residual add holds several producers: its channels merge only when they are
duplicates in *every* producer, depthwise conv and BatchNorm of the group (the distance is the
maximum over them). Groups that hold something whose value does not stay per channel -- a
LayerNorm / GroupNorm (statistics across channels), a parameter combined per channel, a
grouped conv -- are skipped with a note.

Similarity: the relative distance ``||v_i - v_j|| / max(||v_i||, ||v_j||)`` of the channels'
vectors per member (filter weights + bias; a BatchNorm as its folded scale and shift), the
maximum over the group's members. ``threshold`` merges every pair below it (complete linkage:
all members of a merged cluster are within the threshold of each other); ``count`` removes that
many channels in all, closest first. The channel kept is the cluster's first; a near duplicate
is replaced by it (``finetune:`` recovers the rest).
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from lighten.errors import UnsupportedError
from lighten.graph import Group, Member, channel_groups
from lighten.modules import require_modules
from lighten.prune.structured import apply_keep_
from lighten.registry import register_step
from lighten.step import StepConfig, StepContext

__all__ = ["ChannelShareConfig", "channel_distances", "share_channels_"]


class ChannelShareConfig(StepConfig):
    threshold: float | None = Field(None, ge=0, lt=1, description="merge channels whose "
                                    "relative distance is at most this (default 0.05)")
    count: int | None = Field(None, ge=1, description="remove this many channels in all, "
                              "closest duplicates first")
    ignore: list[str] = Field(default_factory=list,
                              description="modules whose output channels are kept")

    @model_validator(mode="after")
    def _one_rule(self):
        if self.threshold is not None and self.count is not None:
            raise ValueError("give threshold (relative distance) or count (channels removed), "
                             "not both")
        return self

    @property
    def max_distance(self) -> float:
        if self.count is not None:
            return float("inf")
        return 0.05 if self.threshold is None else self.threshold


_DEFINING = ("out", "depthwise", "norm")  # members whose tensors make the channel's value


def _why_skip(model: nn.Module, group: Group, ignore: list[str]) -> str | None:
    if group.pinned:
        return "pinned (" + "; ".join(group.pinned) + ")"
    if group.size < 2 or not group.producers():
        return "no producer to merge"
    for m in group.members:
        module = model.get_submodule(m.module)
        if m.module in ignore and m.kind in _DEFINING:
            return f"{m.module} is ignored"
        if m.kind not in (*_DEFINING, "in"):
            return f"{m.module} combines a parameter per channel ({m.kind})"
        if m.kind == "norm" and not isinstance(module, _BatchNorm):
            return f"{m.module} ({type(module).__name__}) normalizes across channels"
        if m.kind == "norm" and module.running_var is None:
            return f"{m.module} has no running statistics"
        if isinstance(module, _ConvNd) and module.groups > 1 and m.kind != "depthwise":
            return f"{m.module} is a grouped conv"
    return None


def _channel_vectors(model: nn.Module, member: Member, size: int) -> torch.Tensor:
    """(size, k): what channel c of ``member`` computes (filter + bias; a BatchNorm folded)."""
    module = model.get_submodule(member.module)
    if member.kind == "norm":
        scale = (module.weight.detach() if module.weight is not None
                 else torch.ones_like(module.running_var))
        scale = scale / torch.sqrt(module.running_var + module.eps)
        shift = -module.running_mean * scale
        if module.bias is not None:
            shift = shift + module.bias.detach()
        parts = [scale, shift]
    else:
        parts = [module.weight.detach()]
        if getattr(module, "bias", None) is not None:
            parts.append(module.bias.detach())
    rows = []
    for t in parts:
        sub = Member(member.module, member.kind if t.dim() > 1 else "out", member.offset,
                     member.block, member.transposed and t.dim() > 1)
        rows.append(sub.rows(t.float(), size))
    return torch.cat(rows, 1)


def channel_distances(model: nn.Module, group: Group) -> torch.Tensor:
    """(size, size) relative distances of the group's channels, the maximum over its members."""
    out = torch.zeros(group.size, group.size)
    for member in group.members:
        if member.kind not in _DEFINING:
            continue
        v = _channel_vectors(model, member, group.size).double()
        norms = v.norm(dim=1)
        scale = torch.maximum(norms[:, None], norms[None, :])
        diff = torch.cdist(v, v)
        rel = torch.where(scale > 0, diff / scale.clamp_min(1e-300), torch.zeros_like(diff))
        out = torch.maximum(out, rel.float())
    return out


def _clusters(distances: list[torch.Tensor], max_distance: float,
              count: int | None) -> list[list[list[int]]]:
    """Complete-linkage merging across groups, closest first, until the next merge is beyond
    ``max_distance`` or ``count`` channels are gone. Returns per group its clusters."""
    links = []
    members: list[dict[int, list[int]]] = []
    for d in distances:
        m = d.clone().double()
        m.fill_diagonal_(float("inf"))
        links.append(m)
        members.append({i: [i] for i in range(len(d))})
    removed = 0
    while count is None or removed < count:
        best = None
        for g, m in enumerate(links):
            if m.numel() == 0:
                continue
            flat = int(m.argmin())
            value = float(m.view(-1)[flat])
            if best is None or value < best[0]:
                best = (value, g, *divmod(flat, m.shape[1]))
        if best is None or best[0] > max_distance:
            break
        _, g, i, j = best
        i, j = min(i, j), max(i, j)
        m = links[g]
        merged = torch.maximum(m[i], m[j])  # complete linkage: the farthest pair decides
        m[i], m[:, i] = merged, merged
        m[i, i] = float("inf")
        m[j], m[:, j] = float("inf"), float("inf")
        members[g][i] += members[g].pop(j)
        removed += 1
    return [sorted(sorted(c) for c in groups.values()) for groups in members]


def _sum_inputs_(model: nn.Module, group: Group, clusters: list[list[int]]) -> None:
    """Add each duplicate's input columns of every consumer into the kept channel's."""
    for member in group.members:
        if member.kind != "in":
            continue
        weight = model.get_submodule(member.module).weight
        with torch.no_grad():
            for cluster in clusters:
                keep = member.indices(torch.tensor([cluster[0]]))
                for dup in cluster[1:]:
                    cols = weight.index_select(member.axis, member.indices(torch.tensor([dup])))
                    weight.index_add_(member.axis, keep, cols)


def share_channels_(model: nn.Module, config: ChannelShareConfig, example_input: torch.Tensor,
                    *, notes: list[str] | None = None) -> list[dict]:
    """Merge duplicate channels of ``model`` in place; one row per group that lost channels."""
    from lighten.unfused import unfuse_

    notes = notes if notes is not None else []
    require_modules(model, config.ignore, key="ignore")
    unfuse_(model, ignore=config.ignore, attention=False, notes=notes)
    groups, distances, skipped = [], [], 0
    for group in channel_groups(model, example_input):
        why = _why_skip(model, group, config.ignore)
        if why is not None:
            skipped += bool(group.producers()) and group.size > 1
            if not group.pinned and group.producers():
                notes.append(f"share.channels: group of {group.producers()[0].module} "
                             f"skipped: {why}")
            continue
        groups.append(group)
        distances.append(channel_distances(model, group))
    if not groups:
        raise UnsupportedError("share.channels found no channel group it can merge (all "
                               "pinned, ignored, or normalized across channels); "
                               + "; ".join(notes[:2]))
    clusters = _clusters(distances, config.max_distance, config.count)
    rows, keeps = [], []
    for group, d, found in zip(groups, distances, clusters, strict=True):
        _sum_inputs_(model, group, found)
        keeps.append(torch.tensor([c[0] for c in found], dtype=torch.long))
        merged = [c for c in found if len(c) > 1]
        if merged:
            worst = max(float(d[c[0], x]) for c in merged for x in c[1:])
            for producer in dict.fromkeys(m.module for m in group.producers()):
                rows.append({"module": producer, "action": "share",
                             "before": f"{group.size} channels",
                             "after": f"{len(found)} channels", "merged": merged,
                             "max_distance": round(worst, 6)})
    apply_keep_(model, groups, keeps)
    return rows


@register_step("share.channels", ChannelShareConfig,
               needs_data=lambda c: "example inputs to trace the model")
def share_channels(model: nn.Module, config: ChannelShareConfig, ctx: StepContext) -> nn.Module:
    """Merge near-duplicate output channels (filters) so each is stored and computed once."""
    from lighten.measure import count_macs, count_params
    from lighten.verb import layer_widths, record_widths

    x = ctx.example_input()
    macs, params = count_macs(model, x), count_params(model)[0]
    widths = layer_widths(model)
    rows = share_channels_(model, config, x, notes=ctx.notes)
    for row in rows:
        ctx.layer(**row)
    removed = sum(len(c) - 1 for r in {id(r["merged"]): r for r in rows}.values()
                  for c in r["merged"])
    macs_after, params_after = count_macs(model, x), count_params(model)[0]
    ctx.note(f"share.channels: {removed} duplicate channels merged; MACs "
             f"{macs_after / max(macs, 1):.1%} and params {params_after / max(params, 1):.1%} "
             "of before")
    record_widths(ctx, widths, model)
    ctx.summary.update(macs_before=macs, macs_after=macs_after, channels_merged=removed)
    ctx.finetune(model, config.finetune)
    return model
