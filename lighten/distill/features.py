"""Intermediate features for distillation: forward hooks, layer matching, adapters.

Features are read with forward hooks (never by rewriting the model), so any ``nn.Module``
works, ours or a user's, and removing the hooks leaves the model exactly as it was. Layers are
matched by name (``layers: {student.module: teacher.module}``) or automatically: each network's
*stage ends* (the last module producing each spatial resolution) are paired where the two
networks share the resolution. Where widths differ a learned adapter (1x1 conv + BN, FitNets'
regressor; a Linear for flat features) maps the student's channels to the teacher's; adapters
live beside the student during training only and are never part of the saved student.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from lighten.errors import ModelError, RecipeError, did_you_mean
from lighten.hooks import forward_with_hooks


class FeatureTap:
    """Forward hooks that keep the outputs of named modules (``tap.features[name]``), or with
    ``inputs=True`` their first input (the penultimate embedding of a classifier)."""

    def __init__(self, model: nn.Module, names: Iterable[str], *, inputs: Iterable[str] = ()):
        modules = dict(model.named_modules())
        self.features: dict[str, Tensor] = {}
        self._handles = []
        for name in dict.fromkeys([*names, *inputs]):
            if name not in modules:
                raise RecipeError(f"layer {name!r} not found in {type(model).__name__}"
                                  f"{did_you_mean(name, [n for n in modules if n])}")
        for name in dict.fromkeys(names):
            self._handles.append(modules[name].register_forward_hook(self._keep(name)))
        for name in dict.fromkeys(inputs):
            self._handles.append(modules[name].register_forward_pre_hook(self._keep_input(name)))

    def _keep(self, name: str):
        def hook(module, args, output):
            self.features[name] = output
        return hook

    def _keep_input(self, name: str):
        def hook(module, args):
            self.features[f"{name}:input"] = args[0]
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.features.clear()


@dataclass(frozen=True)
class Produced:
    name: str
    shape: tuple[int, ...]  # without batch


def produced(model: nn.Module, example: tuple[Tensor, ...]) -> list[Produced]:
    """Every submodule's tensor output on ``example``, in the order the outputs are produced.

    A container whose output is its last child's tensor is skipped (the child names it)."""
    records: list[Produced] = []
    last: list[int] = [0]

    def hook(name):
        def keep(module, args, output):
            if isinstance(output, Tensor) and output.dim() >= 2:
                if id(output) != last[0]:
                    records.append(Produced(name, tuple(output.shape[1:])))
                last[0] = id(output)
        return keep

    forward_with_hooks(model, example, [(module, hook(name))
                                        for name, module in model.named_modules() if name])
    return records


def stage_ends(model: nn.Module, example: tuple[Tensor, ...]) -> list[Produced]:
    """The last module producing each spatial resolution (>= 2x2) of (B, C, H, W) outputs, in
    order: the natural places to read a CNN's features (the end of each stage)."""
    ends: dict[tuple[int, int], Produced] = {}
    for p in produced(model, example):
        if len(p.shape) == 3 and min(p.shape[1:]) >= 2:
            ends.pop(p.shape[1:], None)  # re-insert: ordered by the last producer
            ends[p.shape[1:]] = p
    return list(ends.values())


def match_layers(student: nn.Module, teacher: nn.Module, example: tuple[Tensor, ...],
                 layers: str | list[str] | Mapping[str, str] = "auto"
                 ) -> list[tuple[Produced, Produced]]:
    """(student feature, teacher feature) pairs: ``auto`` pairs the stage ends of equal
    resolution; a list names modules both networks have; a mapping names student -> teacher."""
    s_all = {p.name: p for p in produced(student, example)}
    t_all = {p.name: p for p in produced(teacher, example)}
    if layers == "auto":
        s_ends = {p.shape[1:]: p for p in stage_ends(student, example)}
        t_ends = {p.shape[1:]: p for p in stage_ends(teacher, example)}
        pairs = [(s, t_ends[res]) for res, s in s_ends.items() if res in t_ends]
        if not pairs:
            raise ModelError(
                "layers: auto found no spatial resolution the student and teacher share "
                f"(student {sorted(s_ends)}, teacher {sorted(t_ends)}); name the layers: "
                "layers: {student_module: teacher_module}")
        return pairs
    mapping = dict(layers) if isinstance(layers, Mapping) else {n: n for n in layers}
    out = []
    for s_name, t_name in mapping.items():
        for name, table, who in ((s_name, s_all, "student"), (t_name, t_all, "teacher")):
            if name not in table:
                raise RecipeError(f"layers: {who} has no module {name!r} producing a tensor"
                                  f"{did_you_mean(name, table)}")
        out.append((s_all[s_name], t_all[t_name]))
    return out


def make_adapter(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    """Map a student feature to the teacher's width: 1x1 conv + BN for maps, Linear for flat
    features, ``nn.Identity`` when the widths already agree."""
    cs, ct = student_shape[0], teacher_shape[0]
    if cs == ct and len(student_shape) == len(teacher_shape):
        return nn.Identity()
    if len(student_shape) == 3 and len(teacher_shape) == 3:
        return nn.Sequential(nn.Conv2d(cs, ct, 1, bias=False), nn.BatchNorm2d(ct))
    if len(student_shape) == 1 and len(teacher_shape) == 1:
        return nn.Linear(cs, ct)
    raise ModelError(f"cannot adapt a student feature of shape {student_shape} to the "
                     f"teacher's {teacher_shape}; match layers of the same kind")


def classifier_input(model: nn.Module, example: tuple[Tensor, ...]) -> str:
    """The name of the last ``nn.Linear`` the forward calls (its input is the embedding RKD
    compares), so any classifier with a final Linear works."""
    order: list[str] = []
    forward_with_hooks(model, example, [(m, lambda mod, a, o, n=name: order.append(n))
                                        for name, m in model.named_modules()
                                        if isinstance(m, nn.Linear)])
    if not order:
        raise ModelError(f"{type(model).__name__} calls no nn.Linear; relational distillation "
                         "reads the input of the final Linear classifier")
    return order[-1]
