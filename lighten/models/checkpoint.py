"""Load weights into a model safely: safetensors, or torch files with ``weights_only=True``.

We never unpickle arbitrary objects: a file that needs code to load is refused with a hint to
convert it to safetensors. Every failure is one CheckpointError line saying what to do.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from lighten.errors import CheckpointError

TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` mapping from ``path`` without executing anything."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise CheckpointError(f"weights {str(path)!r} is a folder; pass the weights file inside "
                              "it (.safetensors, .pt or .pth)")
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist; check the path")
    if path.suffix == ".safetensors":
        state = _read_safetensors(path)
    elif path.suffix in TORCH_SUFFIXES:
        state = _read_torch(path)
    else:
        raise CheckpointError(f"weights file {str(path)!r} has unknown extension "
                              f"{path.suffix!r}; use .safetensors, .pt or .pth")
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


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load ``path`` into ``model`` in place (strict), naming any key or shape mismatch."""
    state = read_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch {_few(mismatched)}")
    if problems:
        raise CheckpointError(f"{str(path)!r} does not fit {type(model).__name__}: "
                              + "; ".join(problems)
                              + "; check the model architecture, num_classes and input_shape")
    model.load_state_dict(state, strict=True)
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


def _read_torch(path: Path):
    with path.open("rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (PK..); the legacy format is a protocol-2 pickle (\x80\x02).
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise CheckpointError(f"{str(path)!r} is not a torch weights file (unknown header "
                              f"{head!r}); pass a .safetensors file or a torch.save(state_dict)")
    try:
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


def _last_line(exc: BaseException) -> str:
    """The unpickler's own reason, without torch's multi-paragraph advice around it."""
    for line in str(exc).splitlines():
        if "WeightsUnpickler error" in line:
            return line.split("WeightsUnpickler error:")[-1].strip()[:160]
    return type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]
