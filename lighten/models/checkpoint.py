"""Load weights into a model safely: safetensors, or torch files with ``weights_only=True``.

We never unpickle arbitrary objects: a torch file's pickle is first scanned opcode by opcode
(:mod:`lighten.models.pickle_scan`: only tensor-rebuilding names allowed) and then read with
``weights_only=True``, two barriers; a file that needs code to load is refused with a hint to
convert it to safetensors. ``trust=True`` (``--trust``, ``model.trust_weights``) is the one
opt-in to full unpickling, for files the user made: it runs any code inside the file.
Every failure is one CheckpointError line saying what to do.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from lighten.errors import CheckpointError

TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def read_state_dict(path: str | Path, *, trust: bool = False) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` mapping from ``path`` without executing anything; with
    ``trust`` a torch file is unpickled in full (it may run code: only for your own files)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise CheckpointError(f"weights {str(path)!r} is a folder; pass the weights file inside "
                              "it (.safetensors, .pt or .pth)")
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist; check the path")
    if path.suffix == ".safetensors":
        state = _read_safetensors(path)
    elif path.suffix in TORCH_SUFFIXES:
        state = _read_torch(path, trust=trust)
    else:
        raise CheckpointError(f"weights file {str(path)!r} has unknown extension "
                              f"{path.suffix!r}; use .safetensors, .pt or .pth")
    if trust and isinstance(state, nn.Module):  # torch.save(model): a trusted full pickle
        state = state.state_dict()
    if isinstance(state, dict):  # common training-checkpoint layouts: {"model": sd, "epoch": 3}
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{str(path)!r} is not a weights file (expected a state_dict of "
                              f"name -> tensor, got {type(state).__name__}); save "
                              "model.state_dict()")
    return state


def load_weights(model: nn.Module, path: str | Path, *, trust: bool = False) -> nn.Module:
    """Load ``path`` into ``model`` and return the model to use from now on.

    ``path`` is a plain state dict (safetensors, or torch.save read weights-only) or any lighten
    artifact (a run's ``stages/NN-<stage>.safetensors``). A state dict loads in place (strict);
    one whose standard layers (Conv, Linear, norms, Embedding) are narrower or wider than
    ``model``'s -- the state of a structurally pruned model -- resizes those layers first. An
    artifact is rebuilt on a copy of ``model`` (its edit log replayed: pruned widths, quantized
    layers) and loaded; when the result has ``model``'s structure the weights go into ``model``
    in place, otherwise the rebuilt model is returned. A file that fits neither is one
    CheckpointError line naming the mismatch. ``trust`` unpickles a torch file in full (see
    :func:`read_state_dict`).
    """
    if _is_artifact(path):
        return _load_artifact_into(model, Path(path).expanduser())
    state = read_state_dict(path, trust=trust)
    problems = _mismatch(model, state)
    if problems and not problems[0] and not problems[1]:  # only shapes differ: resize layers
        model = _resize_to(model, state)
        problems = _mismatch(model, state)
    missing, unexpected, mismatched = problems or ([], [], [])
    text = []
    if missing:
        text.append(f"missing keys {_few(missing)}")
    if unexpected:
        text.append(f"unexpected keys {_few(unexpected)}")
    if mismatched:
        text.append(f"shape mismatch {_few(mismatched)}")
    if text:
        raise CheckpointError(f"{str(path)!r} does not fit {type(model).__name__}: "
                              + "; ".join(text)
                              + "; check the model architecture, num_classes and input_shape")
    from lighten.artifact import check_finite

    check_finite(model, state, repr(str(path)))
    model.load_state_dict(state, strict=True)
    return model


def _mismatch(model: nn.Module, state: dict) -> tuple[list, list, list] | None:
    """(missing, unexpected, shape-mismatched) keys of ``state`` against ``model``; None: fits."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    return (missing, unexpected, mismatched) if missing or unexpected or mismatched else None


def _is_artifact(path: str | Path) -> bool:
    """A safetensors file carrying a lighten manifest (anything unreadable: not an artifact,
    so the plain reader gives its own error)."""
    path = Path(path).expanduser()
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        from safetensors import safe_open

        from lighten.artifact import METADATA_KEY

        with safe_open(str(path), framework="pt") as f:
            return METADATA_KEY in (f.metadata() or {})
    except Exception:  # a corrupt file: read_state_dict says what is wrong with it
        return False


def artifact_manifest(path: str | Path) -> dict | None:
    """The manifest of a lighten artifact (its ``meta``: stage, preprocessing, data settings),
    or None when ``path`` is not one; only the header is read."""
    if not _is_artifact(path):
        return None
    from lighten.artifact import _read_manifest  # the one manifest reader (checks, inflates)

    try:
        return _read_manifest(Path(path).expanduser())
    except CheckpointError:
        return None


def _load_artifact_into(model: nn.Module, path: Path) -> nn.Module:
    import copy

    from lighten.artifact import load_artifact

    try:
        loaded, _ = load_artifact(path, model=copy.deepcopy(model))
        reason = _foreign(model, loaded)
        if reason:
            raise CheckpointError(reason)
    except CheckpointError as err:
        reason = str(err).removeprefix(f"{path}: ").removeprefix(f"{path} ")
        raise CheckpointError(
            f"{str(path)!r} is a lighten artifact whose model does not fit "
            f"{type(model).__name__} ({reason}); use the artifact itself as the model "
            f"(`lighten measure {path}`, lighten.artifact.load_artifact in Python) or pass "
            f"weights saved from a {type(model).__name__}") from None
    if _structure(loaded) == _structure(model):
        model.load_state_dict(loaded.state_dict(), strict=True)
        return model
    return loaded.train(model.training)


def _foreign(model: nn.Module, loaded: nn.Module) -> str | None:
    """Why the artifact replayed onto ``model`` is another architecture, or None. Compression
    keeps every module path: it resizes layers of the same type, swaps in lighten's own modules
    (quantized, pruned attention) or Identity, and removes children. A module at a path the
    user's model lacks (under an unchanged parent), or one torch layer turned into another,
    means the edit log was written for a different model."""
    before = dict(model.named_modules())
    after = dict(loaded.named_modules())
    for path, module in after.items():
        old = before.get(path)
        if old is not None:
            if type(old) is not type(module) and _is_torch_layer(type(module)) \
                    and not isinstance(module, nn.Identity):
                return (f"{path or 'the root'} is a {type(old).__name__} here but a "
                        f"{type(module).__name__} in the artifact")
            continue
        parent = path
        while parent and parent not in before:
            parent = parent.rpartition(".")[0]
        if type(after[parent]) is type(before[parent]):
            return f"it has a module {path!r} that {type(model).__name__} lacks"
    return None


def _is_torch_layer(cls: type) -> bool:
    return cls.__module__.startswith("torch.nn.modules")


def _structure(model: nn.Module) -> tuple:
    """Module types by path and tensor shapes/dtypes by key: equal means same architecture."""
    return (tuple((name, type(m)) for name, m in model.named_modules()),
            tuple((k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()))


def _new_widths(module: nn.Module, prefix: str, state: dict) -> dict | None:
    """Constructor arguments that give ``module`` the tensor shapes in ``state`` (keys under
    ``prefix``), for the standard layers; None for any other layer."""
    def shape(name):
        t = state.get(prefix + name)
        return None if t is None else tuple(t.shape)

    w = shape("weight")
    if isinstance(module, nn.modules.conv._ConvNd) and w is not None:
        depthwise = module.groups > 1 and module.groups == module.in_channels \
            == module.out_channels
        inner, outer = (w[1], w[0]) if not module.transposed else (w[0], w[1])
        if depthwise:
            width = outer if not module.transposed else inner
            return {"in_channels": width, "out_channels": width, "groups": width}
        if module.transposed:
            return {"in_channels": inner, "out_channels": outer * module.groups}
        return {"in_channels": inner * module.groups, "out_channels": outer}
    if isinstance(module, nn.Linear) and w is not None:
        return {"in_features": w[1], "out_features": w[0]}
    if isinstance(module, nn.modules.batchnorm._NormBase):
        found = shape("running_mean") or w
        return None if found is None else {"num_features": found[0]}
    if isinstance(module, nn.LayerNorm) and w is not None:
        return {"normalized_shape": list(w)}
    if isinstance(module, nn.GroupNorm) and w is not None:
        return {"num_channels": w[0]}
    if isinstance(module, nn.Embedding) and w is not None:
        return {"num_embeddings": w[0], "embedding_dim": w[1]}
    return None


def _widths(module: nn.Module) -> tuple[int, int] | None:
    """(input width, output width) of a layer that consumes and produces channels."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return None


def _consumed(model: nn.Module, replacements: dict) -> bool:
    """Whether the new widths look like structured pruning: every layer whose output width
    changes a -> b has a consumer whose input width changes in proportion (c -> d, c*b == d*a:
    the next layer, or a Linear after a flatten), and no vocabulary changes. A head with another
    class count changes an output nothing consumes, so it stays a mismatch."""
    ins, outs = [], []
    for path, new in replacements.items():
        old = model.get_submodule(path)
        if isinstance(old, nn.Embedding):
            if old.num_embeddings != new.num_embeddings:
                return False
            outs.append((old.embedding_dim, new.embedding_dim))
        before, after = _widths(old), _widths(new)
        if before is None or after is None:
            continue
        if before[0] != after[0]:
            ins.append((before[0], after[0]))
        if before[1] != after[1]:
            outs.append((before[1], after[1]))
    return all(any(c * b == d * a for c, d in ins) for a, b in outs)


def _resize_to(model: nn.Module, state: dict) -> nn.Module:
    """``model`` with every standard layer whose own tensors differ in shape from ``state``
    rebuilt at the stored widths (e.g. the state dict of a channel-pruned model). Layers it
    cannot rebuild are left as they are; the caller then names the mismatch."""
    from lighten.edits import build_layer, constructor_attrs, layer_name

    expected = model.state_dict()
    changed = {k.rpartition(".")[0] for k, v in expected.items()
               if k in state and state[k].shape != v.shape}
    replacements = {}
    for path in changed:
        module = model.get_submodule(path)
        widths = _new_widths(module, f"{path}." if path else "", state)
        attrs = constructor_attrs(module)
        if widths is None or attrs is None or not set(widths) <= set(attrs):
            continue
        with torch.random.fork_rng(devices=[]):  # init values are overwritten by the load
            new = build_layer(layer_name(module), {**attrs, **widths})
        replacements[path] = new.train(module.training)
    if not _consumed(model, replacements):
        return model  # e.g. another class count: the caller names the mismatch
    for path, new in replacements.items():
        if not path:
            return new
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, new)
    return model


def _few(items: list[str], n: int = 3) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{str(path)!r} is a truncated or corrupt safetensors file "
                              f"({_first_line(exc)}); re-download or re-save it") from exc


def _read_torch(path: Path, *, trust: bool = False):
    if trust:
        return _read_trusted(path)
    with path.open("rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (PK..); the legacy format is a protocol-2 pickle (\x80\x02).
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise CheckpointError(f"{str(path)!r} is not a torch weights file (unknown header "
                              f"{head!r}); pass a .safetensors file or a torch.save(state_dict)")
    from lighten.models.pickle_scan import UnsafePickle, scan_torch_file

    try:  # the first barrier: nothing outside tensor rebuilding is named in the pickle
        scan_torch_file(path)
    except UnsafePickle as err:
        if err.corrupt:
            raise CheckpointError(f"{str(path)!r} is a truncated or corrupt torch file ({err}); "
                                  "re-download or re-save it") from None
        what = ("a pickle that needs code to load" if err.name else "a torch file lighten "
                "cannot check")
        raise CheckpointError(
            f"{str(path)!r} is {what} ({err}); lighten never unpickles untrusted files: "
            "convert it to safetensors (safetensors.torch.save_file(model.state_dict(), ...)) "
            "where the model's code lives, or pass --trust (recipe: model.trust_weights: true) "
            "if you made the file yourself: that runs any code inside it") from None
    try:  # the second barrier: torch's weights-only unpickler
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" in str(exc).lower():
            raise CheckpointError(
                f"{str(path)!r} is a pickle that needs code to load; lighten never unpickles "
                "untrusted files: convert it to safetensors (safetensors.torch.save_file("
                "model.state_dict(), ...)) where the model's code lives"
            ) from exc
        raise CheckpointError(f"{str(path)!r} is a corrupt torch file ({_last_line(exc)}); "
                              "re-save it with torch.save(model.state_dict())") from exc
    except Exception as exc:  # a damaged file can fail anywhere inside the unpickler
        raise CheckpointError(f"{str(path)!r} is a truncated or corrupt torch file "
                              f"({_first_line(exc)}); re-download or re-save it") from exc


def _read_trusted(path: Path):
    """torch.load in full, for a file the user vouched for (``trust=True``): any code in it runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a damaged file, or a class whose code is not importable here
        raise CheckpointError(f"{str(path)!r} does not unpickle even trusted "
                              f"({type(exc).__name__}: {_first_line(exc)}); re-save it with "
                              "torch.save(model.state_dict())") from None


def _last_line(exc: BaseException) -> str:
    """The unpickler's own reason, without torch's multi-paragraph advice around it."""
    for line in str(exc).splitlines():
        if "WeightsUnpickler error" in line:
            return line.split("WeightsUnpickler error:")[-1].strip()[:160]
    return type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]
