"""Extra classifier heads: exit heads on intermediate features, and one head per task.

``exit_head`` builds the small classifier an intermediate feature gets (self-distillation
trains them from the final head; early exit reuses the same builder). They are trained beside
the model and left out of the saved student unless ``keep_heads`` attaches them as
:class:`ExitHeads`, a registered module the forward never calls (so the deployed model is
unchanged, and the artifact still carries the heads for a later step).

:class:`MultiHead` replaces a model's final Linear by one Linear per task over the same
features: the multi-task student. ``select`` says what it returns: one task's logits (an
index: what a stage is measured and exported as) or every task's as a tuple (None).
"""

from __future__ import annotations

from torch import Tensor, nn

from lighten.modules import register_module_type


def exit_head(feature_shape: tuple[int, ...], num_classes: int, *, hidden: int = 0
              ) -> nn.Module:
    """A classifier for a feature of ``feature_shape`` (without batch): global average pool
    then Linear for (C, H, W) maps, Linear for flat (F,) features; ``hidden`` > 0 puts a 1x1
    conv (maps) or a Linear + ReLU of that width in front."""
    width = feature_shape[0]
    layers: list[nn.Module] = []
    if len(feature_shape) == 3:
        if hidden:
            layers += [nn.Conv2d(width, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU()]
            width = hidden
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    elif len(feature_shape) != 1:
        raise ValueError(f"exit heads read (C, H, W) or (F,) features, got {feature_shape}")
    elif hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@register_module_type
class ExitHeads(nn.Module):
    """Exit heads kept with a saved model: ``heads[i]`` reads the output of module
    ``layers[i]``. Not called by the model's forward; a step that uses them hooks the layers."""

    def __init__(self, layers: list[str], shapes: list[list[int]], num_classes: int,
                 hidden: int = 0):
        super().__init__()
        self.layers, self.shapes = list(layers), [list(s) for s in shapes]
        self.num_classes, self.hidden = num_classes, hidden
        self.heads = nn.ModuleList(exit_head(tuple(s), num_classes, hidden=hidden)
                                   for s in shapes)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        return [head(f) for head, f in zip(self.heads, features, strict=True)]

    def artifact_config(self) -> dict:
        return {"layers": self.layers, "shapes": self.shapes, "num_classes": self.num_classes,
                "hidden": self.hidden}

    @classmethod
    def from_artifact(cls, config: dict) -> ExitHeads:
        return cls(config["layers"], config["shapes"], int(config["num_classes"]),
                   int(config.get("hidden", 0)))


def drop_stale_exit_heads(model: nn.Module, example: tuple) -> list[str]:
    """Drop the kept exit heads (``model.exit_heads``) whose layer no longer gives the shape
    they were built for: a later step resized or removed it (channel pruning narrows the
    layer, not the head, which the forward never calls). A head that cannot run is no head:
    the saved model keeps only heads that work, and the note says what to do. Returns notes."""
    import torch

    heads = getattr(model, "exit_heads", None)
    if not isinstance(heads, ExitHeads):
        return []
    modules, seen = dict(model.named_modules()), {}

    def hook(name):
        return lambda module, args, out: seen.__setitem__(name, list(out.shape[1:]))

    handles = [modules[n].register_forward_hook(hook(n)) for n in heads.layers if n in modules]
    try:
        with torch.no_grad():
            model.eval()(*example)
    finally:
        for h in handles:
            h.remove()
    keep = [i for i, (n, shape) in enumerate(zip(heads.layers, heads.shapes, strict=True))
            if seen.get(n) == shape]
    if len(keep) == len(heads.layers):
        return []
    stale = ", ".join(f"{n} ({heads.shapes[i]} -> {seen.get(n, 'gone')})"
                      for i, n in enumerate(heads.layers) if i not in keep)
    if keep:
        kept = ExitHeads([heads.layers[i] for i in keep], [heads.shapes[i] for i in keep],
                         heads.num_classes, heads.hidden)
        kept.heads = nn.ModuleList(heads.heads[i] for i in keep)
        model.exit_heads = kept
    else:
        del model.exit_heads
    return [f"exit heads dropped: the layers they read changed shape: {stale}; to keep heads, "
            "put the distill step with keep_heads after the steps that resize layers"]


@register_module_type
class MultiHead(nn.Module):
    """One Linear head per task over shared features; returns ``heads[select]``'s logits, or a
    tuple of every head's when ``select`` is None."""

    def __init__(self, in_features: int, classes: list[int], select: int | None = 0,
                 names: list[str] | None = None):
        super().__init__()
        self.in_features, self.classes = in_features, [int(c) for c in classes]
        self.names = list(names) if names else [f"task{i}" for i in range(len(classes))]
        self.select = select
        self.heads = nn.ModuleList(nn.Linear(in_features, c) for c in self.classes)

    def forward(self, x: Tensor):
        if self.select is None:
            return tuple(head(x) for head in self.heads)
        return self.heads[self.select](x)

    def artifact_config(self) -> dict:
        return {"in_features": self.in_features, "classes": self.classes,
                "select": self.select, "names": self.names}

    @classmethod
    def from_artifact(cls, config: dict) -> MultiHead:
        return cls(int(config["in_features"]), list(config["classes"]), config.get("select"),
                   config.get("names"))
