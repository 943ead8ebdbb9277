"""``arch.nas`` search space: per-stage knobs read off the user's own model.

A *stage* is every layer producing outputs at one resolution (ResNet-20 on 28x28: the stem and
blocks at 28x28, then 14x14, then 7x7; a Linear-only model has one stage). What the space holds
per stage, each only where the model has it:

* ``width``: a multiplier of every resizable channel group whose first producer is in the stage
  (lighten.graph's channel groups, so residual-coupled channels change together);
* ``expansion``: a further multiplier of the groups *inside* one block (ResNet's conv1 width,
  MobileNetV2's hidden width): groups whose members all sit in one module with its own forward;
* ``depth``: blocks in the stage; removable residual blocks (``prune.layers``' detection:
  ``act(x + f(x))``) are dropped from the end of the stage, the others always stay;
* ``kernel`` / ``block``: the k x k convs' kernel size, or depthwise-separable pairs.

Candidates are the model itself changed by surgery (:mod:`lighten.arch.nas_build`), so a
candidate is made of the model's own layers plus standard ones and saves, reloads and exports
like any stage. Depth cannot grow (a new block of the user's class could not be described in
an artifact); widths can. A model where none of this is found is refused with the way to give
the space instead: ``space: {python: file.py:build, params: {name: [choices]}}``, a factory
called with one choice per parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lighten.errors import UnsupportedError
from lighten.hooks import forward_with_hooks

__all__ = ["DerivedSpace", "FactorySpace", "Stage", "derive_space", "resizable_groups",
           "stage_of_groups"]

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# exact layer types whose widths the candidate builder changes (their surgery takes any index
# list); a group with any other member (attention, a stored parameter) keeps its width
RESIZABLE = {nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d,
             nn.BatchNorm3d, nn.LayerNorm}
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
HOW_TO_GIVE = ("give the space in the recipe instead: space: {python: 'file.py:build', params: "
               "{width: [8, 16, 32], depth: [1, 2]}} (the factory is called with one choice "
               "per parameter)")


@dataclass
class Stage:
    name: str                  # "s1", shown with its resolution in ``label``
    key: tuple                 # ("conv", H, W) or ("linear", *token axes)
    label: str
    groups: int = 0            # resizable channel groups whose producer is in the stage
    inner: int = 0             # of those, groups inside one block (expansion applies)
    width: int = 0             # its widest group's channels (the stage width shown)
    blocks: list[str] = field(default_factory=list)  # removable residual blocks, forward order
    fixed_blocks: int = 0      # other blocks (not removable) counted in its depth
    convs: list[str] = field(default_factory=list)   # k x k convs: kernel / block type
    separable: list[str] = field(default_factory=list)  # of those, groups=1 with >= 4 inputs


def _key(module: nn.Module, out) -> tuple | None:
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        return None
    if isinstance(module, CONVS) or (not isinstance(module, nn.Linear) and out.dim() >= 4):
        return ("conv", *out.shape[2:])
    return ("linear", *out.shape[1:-1])


def module_keys(model: nn.Module, example: tuple) -> tuple[dict[str, tuple], list[str]]:
    """Stage key of every weighted leaf (Conv / Linear) and the order they run in."""
    keys: dict[str, tuple] = {}
    order: list[str] = []

    def hook(name):
        def record(module, args, out) -> None:
            if name not in keys:
                key = _key(module, out)
                if key is not None:
                    keys[name] = key
                    order.append(name)
        return record

    forward_with_hooks(model, example, [(m, hook(n)) for n, m in model.named_modules()
                                        if isinstance(m, (*CONVS, nn.Linear))])
    return keys, order


def _block_owner(model: nn.Module, names: list[str]) -> str | None:
    """The innermost module with its own forward (no container) holding every name."""
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    while common:
        path = ".".join(common)
        module = model.get_submodule(path)
        if path not in names and not isinstance(module, CONTAINERS):
            return path
        common.pop()
    return None


def resizable_groups(model: nn.Module, example: tuple, ignore=()) -> tuple[list, list[str]]:
    """(groups whose width may change, notes on the ones kept)."""
    from lighten.graph import channel_groups

    groups, notes = [], []
    for g in channel_groups(model, example[0]):
        if not g.prunable:
            continue
        odd = [m for m in g.members
               if type(model.get_submodule(m.module)) not in RESIZABLE
               or m.kind not in ("out", "in", "depthwise", "norm")]
        if odd:
            notes.append(f"{odd[0].module}: {type(model.get_submodule(odd[0].module)).__name__}"
                         f" keeps its {g.size} channels (arch.nas resizes Conv / Linear / norm "
                         "layers only)")
        elif any(m.module == i or m.module.startswith(i + ".")
                 for m in g.producers() for i in ignore):
            notes.append(f"group of {g.producers()[0].module} kept whole (ignore)")
        else:
            groups.append(g)
    return groups, notes


def stage_of_groups(model: nn.Module, groups: list, keys: dict[str, tuple],
                    stage_keys: list[tuple]) -> list[tuple[int | None, bool]]:
    """(stage index or None, inside one block?) of each group."""
    out = []
    for g in groups:
        producer = next((m.module for m in g.producers() if m.module in keys), None)
        index = stage_keys.index(keys[producer]) if producer and keys[producer] in stage_keys \
            else None
        out.append((index, _block_owner(model, [m.module for m in g.members]) is not None))
    return out


@dataclass
class DerivedSpace:
    """Per-stage knobs of one model (see the module docstring); ``sample`` asks an Optuna
    trial for one architecture, ``reference`` is the model's own shape."""

    stages: list[Stage]
    residual: dict  # block path -> prune.layers ResidualBlock (what replaces it)
    widths: list[float]
    expansions: list[float]
    depths: list[int] | None
    kernels: list[int] | None
    blocks: list[str]
    round_to: int
    ignore: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def choices(self, stage: Stage) -> dict[str, list]:
        c: dict[str, list] = {}
        if stage.groups:
            c["width"] = list(self.widths)
        if stage.inner and len(self.expansions) > 1:
            c["expansion"] = list(self.expansions)
        if stage.blocks:
            lo, hi = stage.fixed_blocks, stage.fixed_blocks + len(stage.blocks)
            depths = [d for d in (self.depths or range(lo, hi + 1)) if lo <= d <= hi]
            if len(depths) > 1 or (depths and depths[0] != hi):
                c["depth"] = depths
        if stage.convs and self.kernels:
            c["kernel"] = list(self.kernels)
        if stage.separable and len(self.blocks) > 1:
            c["block"] = list(self.blocks)
        return {k: v for k, v in c.items() if v}

    def sample(self, trial) -> dict:
        arch = {}
        for s in self.stages:
            for knob, values in self.choices(s).items():
                arch[f"{s.name}.{knob}"] = trial.suggest_categorical(f"{s.name}.{knob}", values)
        return arch

    def reference(self) -> dict:
        """The model's own architecture: widths x1, every block, its kernels, plain convs."""
        arch = {}
        for s in self.stages:
            for knob, values in self.choices(s).items():
                own = {"width": 1.0, "expansion": 1.0, "block": "conv",
                       "depth": s.fixed_blocks + len(s.blocks)}.get(knob)
                if knob == "kernel":
                    continue  # the convs keep their own kernels when the key is absent
                if own not in values:
                    own = min(values, key=lambda v, o=own: abs(v - o))
                arch[f"{s.name}.{knob}"] = own
        return arch

    def shallowest(self) -> dict:
        """The model's own shape with every stage at its smallest depth choice."""
        arch = self.reference()
        for s in self.stages:
            depths = self.choices(s).get("depth")
            if depths:
                arch[f"{s.name}.depth"] = min(depths)
        return arch

    def describe(self, arch: dict) -> str:
        parts = []
        for s in self.stages:
            knobs = [f"{k.split('.', 1)[1][0]}{_short(v)}" for k, v in arch.items()
                     if k.split(".", 1)[0] == s.name]
            if knobs:
                parts.append(f"{s.name}:" + ",".join(knobs))
        return " ".join(parts) or "as given"

    def table(self) -> list[str]:
        return [f"{s.name} {s.label}: {s.groups} channel group(s) (widest {s.width}), "
                f"{s.fixed_blocks + len(s.blocks)} block(s) ({len(s.blocks)} removable), "
                f"{len(s.convs)} k x k conv(s); choices {self.choices(s)}" for s in self.stages]


def _short(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _kxk(conv: nn.Module) -> bool:
    if type(conv) is not nn.Conv2d:
        return False
    k = conv.kernel_size
    return (k[0] == k[1] and k[0] > 1 and k[0] % 2 == 1
            and conv.padding == (k[0] // 2, k[0] // 2) and conv.dilation == (1, 1)
            and conv.padding_mode == "zeros")


def derive_space(model: nn.Module, example: tuple, config) -> DerivedSpace:
    """The per-stage space of ``model`` (``config``: the step's ``space:`` block)."""
    from lighten.prune.layers import find_residual_blocks

    keys, order = module_keys(model, example)
    stage_keys: list[tuple] = []
    for name in order:
        if keys[name] not in stage_keys:
            stage_keys.append(keys[name])
    stages = [Stage(f"s{i + 1}", k, _label(k)) for i, k in enumerate(stage_keys)]
    groups, notes = resizable_groups(model, example, config.ignore)
    for g, (index, inner) in zip(groups, stage_of_groups(model, groups, keys, stage_keys),
                                 strict=True):
        if index is None:
            continue
        s = stages[index]
        s.groups += 1
        s.inner += inner
        s.width = max(s.width, g.size)
    residual = {}
    try:
        found, _ = find_residual_blocks(model, example[0], ignore=config.ignore)
    except Exception as err:  # blocks are optional: a model that does not trace has none
        found = []
        notes.append(f"depth not searched: residual blocks not found ({type(err).__name__})")
    owners = {}
    for b in found:
        inside = [n for n in order if n.startswith(b.path + ".")]
        if inside:
            owners[b.path] = keys[inside[-1]]
            residual[b.path] = b
    for s in stages:
        s.blocks = [p for p in owners if owners[p] == s.key]
        s.convs = [n for n in order if keys[n] == s.key and _kxk(model.get_submodule(n))]
        s.separable = [n for n in s.convs if model.get_submodule(n).groups == 1
                       and model.get_submodule(n).in_channels >= 4]
    _count_fixed_blocks(model, stages, keys, order, residual)
    space = DerivedSpace(stages, residual, list(config.widths), list(config.expansions),
                         None if config.depths == "auto" else list(config.depths),
                         list(config.kernels) if config.kernels else None, list(config.blocks),
                         config.round_to, list(config.ignore), notes)
    space.stages = [s for s in stages if space.choices(s)]
    if not space.stages:
        raise UnsupportedError(
            f"arch.nas cannot derive a search space from {type(model).__name__}: it found no "
            "channel group it can resize (Conv / Linear / BatchNorm widths) and no removable "
            f"residual block; {HOW_TO_GIVE}")
    return space


def _count_fixed_blocks(model, stages, keys, order, residual) -> None:
    """Blocks that are not removable (a projection shortcut, a stride) still count in a
    stage's depth: modules of the same class as its removable blocks, not removable."""
    classes = {type(model.get_submodule(p)) for p in residual}
    for path, module in model.named_modules():
        if path in residual or type(module) not in classes:
            continue
        inside = [n for n in order if n.startswith(path + ".")]
        for s in stages:
            if inside and keys[inside[-1]] == s.key:
                s.fixed_blocks += 1


def _label(key: tuple) -> str:
    dims = "x".join(str(d) for d in key[1:])
    return f"({dims})" if key[0] == "conv" else f"(linear{', ' + dims if dims else ''})"


@dataclass
class FactorySpace:
    """A space given in the recipe: ``python: file.py:build`` called with one choice of each
    of ``params`` (the candidate is that factory's model; its artifact rebuilds from it)."""

    python: str
    params: dict[str, list]
    input_shape: list[int]
    notes: list[str] = field(default_factory=list)

    def sample(self, trial) -> dict:
        return {k: trial.suggest_categorical(k, v) for k, v in self.params.items()}

    def reference(self) -> dict | None:
        return None

    def describe(self, arch: dict) -> str:
        return " ".join(f"{k}={_short(v)}" for k, v in arch.items())

    def spec(self, arch: dict) -> dict:
        return {"python": self.python, "input_shape": list(self.input_shape),
                "kwargs": dict(arch)}

    def table(self) -> list[str]:
        return [f"{self.python} with {k} in {v}" for k, v in self.params.items()]
