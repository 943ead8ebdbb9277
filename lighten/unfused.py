"""PyTorch's transformer blocks rebuilt from plain modules, so every Linear in them can be changed.

``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``, their ``nn.TransformerEncoder`` /
``nn.TransformerDecoder`` stacks and ``nn.MultiheadAttention`` take fused fast paths that read
their weights directly (a packed ``in_proj_weight``, ``torch._transformer_encoder_layer_fwd``,
nested tensors). A quantizer cannot swap their Linear layers (the packed q/k/v projection is not
a Linear at all) and torch.fx cannot trace them. :func:`unfuse_` replaces each, in place, by the
equivalent module here -- the same children under the same names (``linear1``, ``norm2``,
``out_proj``, ...), the packed projection split into ``q_proj`` / ``k_proj`` / ``v_proj``
Linears, the activation a module -- computing the same outputs in eval mode (within float
rounding). Quantizers then see ordinary Linears; prune.heads finds the attention by its
``num_heads`` and q/k/v/out Linears; structured pruning traces through (the feed-forward width
is prune.neurons', the embedding width prune.channels').

Handled: batched inputs, ``batch_first``, ``norm_first``, relu / gelu (and silu, tanh, sigmoid)
activations, additive or boolean ``attn_mask`` (2-D, or 3-D per head) and ``key_padding_mask``,
``is_causal`` (a causal mask when no ``attn_mask`` is given), ``kdim`` / ``vdim``, no bias, a final
``norm``, and a ``PrunedMultiheadAttention`` left by prune.heads (its removed heads stay removed).
What cannot be mapped stays as it was and :func:`unfuse_` says why: ``add_bias_kv`` /
``add_zero_attn``, an activation that is not a torch module, a subclass (its own forward), the
model itself being one of these blocks.

Not ``PrunedMultiheadAttention``: it keeps the packed ``in_proj_weight`` parameter (which its
saved artifacts, the channel analysis's ``attention`` kind and prune.heads' packed path read),
so its q/k/v projections are still not Linear layers a quantizer can swap.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from lighten.modules import register_module_type, registered_key, set_submodule
from lighten.prune.heads import PrunedMultiheadAttention, _additive, attend

__all__ = ["UnfusedMultiheadAttention", "UnfusedTransformerDecoder",
           "UnfusedTransformerDecoderLayer", "UnfusedTransformerEncoder",
           "UnfusedTransformerEncoderLayer", "unfuse_"]

# activation name (artifact config) -> module; a stock layer's function or module maps onto it
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.gelu: "gelu", F.silu: "silu",
              torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid"}


# ----------------------------------------------------------------------------- attention


@register_module_type
class UnfusedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with separate ``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj``
    Linears; same call signature and results. Inner width ``num_heads * head_dim`` (heads may
    be removed: ``kept`` are the original indices of the heads left, for 3-D masks)."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int | None = None, *,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = False,
                 dropout: float = 0.0, bias: bool = True, out_bias: bool = True,
                 out_dim: int | None = None, kept: list[int] | None = None,
                 heads_before: int | None = None):
        super().__init__()
        head_dim = head_dim or embed_dim // num_heads
        inner = num_heads * head_dim
        self.num_heads, self.head_dim = num_heads, head_dim
        self.batch_first, self.dropout = batch_first, dropout
        self.kept = list(range(num_heads)) if kept is None else list(kept)
        self.heads_before = heads_before or num_heads
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, out_dim or embed_dim, bias=out_bias)

    # widths read from the layers, so structured pruning may slice them and sizes stay true
    @property
    def embed_dim(self) -> int:
        return self.q_proj.in_features

    def artifact_config(self) -> dict:
        config = {"embed_dim": self.embed_dim, "num_heads": self.num_heads,
                  "head_dim": self.head_dim, "batch_first": self.batch_first,
                  "dropout": self.dropout, "bias": self.q_proj.bias is not None,
                  "out_bias": self.out_proj.bias is not None, "kept": self.kept,
                  "heads_before": self.heads_before}
        for key, width in (("kdim", self.k_proj.in_features), ("vdim", self.v_proj.in_features),
                           ("out_dim", self.out_proj.out_features)):
            if width != self.embed_dim:
                config[key] = width
        return config

    @classmethod
    def from_artifact(cls, config: dict) -> UnfusedMultiheadAttention:
        c = dict(config)
        return cls(c.pop("embed_dim"), c.pop("num_heads"), c.pop("head_dim"), **c)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        torch._assert(query.dim() == 3, "UnfusedMultiheadAttention needs batched 3-D inputs")
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, n_q, n_k = query.shape[0], query.shape[1], key.shape[1]  # (B, L, E), (B, S, E)
        h = self.num_heads
        # -1, not d: the channel analysis reads a literal width as one pruning would break
        q = self.q_proj(query).reshape(b, n_q, h, -1).transpose(1, 2)  # (B, H, L, d)
        k = self.k_proj(key).reshape(b, n_k, h, -1).transpose(1, 2)  # (B, H, S, d)
        v = self.v_proj(value).reshape(b, n_k, h, -1).transpose(1, 2)
        return attend(self, q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                      key_padding_mask=key_padding_mask, need_weights=need_weights,
                      average_attn_weights=average_attn_weights)

    def _per_head(self, mask: torch.Tensor, batch: int) -> torch.Tensor:
        if mask.dim() == 2:
            return mask  # (L, S), broadcast over batch and heads
        full = mask.reshape(batch, self.heads_before, *mask.shape[-2:])  # (B, H0, L, S)
        return full if len(self.kept) == self.heads_before else full[:, self.kept]

    @classmethod
    def from_attention(cls, mha: nn.Module) -> UnfusedMultiheadAttention:
        """The equivalent of an ``nn.MultiheadAttention`` or a ``PrunedMultiheadAttention``."""
        pruned = isinstance(mha, PrunedMultiheadAttention)
        inner = mha.num_heads * mha.head_dim
        if pruned or mha._qkv_same_embed_dim:
            w_q, w_k, w_v = mha.in_proj_weight.detach().split(inner)
        else:
            w_q, w_k, w_v = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(),
                             mha.v_proj_weight.detach())
        new = cls(w_q.shape[1], mha.num_heads, mha.head_dim, kdim=w_k.shape[1],
                  vdim=w_v.shape[1], batch_first=mha.batch_first, dropout=mha.dropout,
                  bias=mha.in_proj_bias is not None, out_bias=mha.out_proj.bias is not None,
                  out_dim=mha.out_proj.out_features,
                  kept=mha.kept if pruned else None,
                  heads_before=mha.heads_before if pruned else None)
        with torch.no_grad():
            for proj, w, i in ((new.q_proj, w_q, 0), (new.k_proj, w_k, 1), (new.v_proj, w_v, 2)):
                proj.weight.copy_(w)
                if mha.in_proj_bias is not None:
                    proj.bias.copy_(mha.in_proj_bias.detach()[i * inner:(i + 1) * inner])
            new.out_proj.weight.copy_(mha.out_proj.weight.detach())
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias.detach())
        return _like(new, mha)


# ----------------------------------------------------------------------------- layers


class _UnfusedLayer(nn.Module):
    """What the encoder and decoder layers share: attention(s), feed-forward, norms."""

    _attentions: tuple[str, ...] = ()
    _norms = 0

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, *,
                 head_dim: int | None = None, dropout: float = 0.0, activation: str = "relu",
                 layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True):
        super().__init__()
        for name in self._attentions:
            setattr(self, name, UnfusedMultiheadAttention(
                d_model, nhead, head_dim, batch_first=batch_first, dropout=dropout, bias=bias,
                out_bias=bias))
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias)
        self.norm_first = norm_first
        for i in range(1, self._norms + 1):  # the stock layers' child order
            setattr(self, f"norm{i}", nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias))
        for i in range(1, self._norms + 1):
            setattr(self, f"dropout{i}", nn.Dropout(dropout))
        self.activation = ACTIVATIONS[activation]()

    def artifact_config(self) -> dict:
        attn = self.self_attn
        return {"d_model": self.linear1.in_features, "nhead": attn.num_heads,
                "dim_feedforward": self.linear1.out_features, "head_dim": attn.head_dim,
                "dropout": self.dropout.p, "activation": _activation_name(self.activation),
                "layer_norm_eps": self.norm1.eps, "batch_first": attn.batch_first,
                "norm_first": self.norm_first, "bias": self.linear1.bias is not None}

    @classmethod
    def from_artifact(cls, config: dict) -> _UnfusedLayer:
        c = dict(config)
        return cls(c.pop("d_model"), c.pop("nhead"), c.pop("dim_feedforward"), **c)

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, f"dropout{self._norms}")(
            self.linear2(self.dropout(self.activation(self.linear1(x)))))

    @classmethod
    def from_layer(cls, layer: nn.Module) -> _UnfusedLayer:
        """The equivalent of a stock layer (its children copied, attention split)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name, child in layer.named_children():
            if name in cls._attentions:
                child = UnfusedMultiheadAttention.from_attention(child)
            else:
                child = copy.deepcopy(child)
            new.add_module(name, child)
        new.norm_first = layer.norm_first
        new.activation = _activation_module(layer.activation)
        return new.train(layer.training)


@register_module_type
class UnfusedTransformerEncoderLayer(_UnfusedLayer):
    """``nn.TransformerEncoderLayer`` from plain modules (``self_attn`` an
    :class:`UnfusedMultiheadAttention`); same call signature and results."""

    _attentions = ("self_attn",)
    _norms = 2

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal):
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                           need_weights=False, is_causal=is_causal)[0]
        return self.dropout1(x)


@register_module_type
class UnfusedTransformerDecoderLayer(_UnfusedLayer):
    """``nn.TransformerDecoderLayer`` from plain modules (``self_attn`` and ``multihead_attn``
    :class:`UnfusedMultiheadAttention`); same call signature and results."""

    _attentions = ("self_attn", "multihead_attn")
    _norms = 3

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False):
        x = tgt
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            x = x + self._mha_block(self.norm2(x), memory, memory_mask,
                                    memory_key_padding_mask, memory_is_causal)
            x = x + self._ff_block(self.norm3(x))
        else:
            x = self.norm1(x + self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
            x = self.norm2(x + self._mha_block(x, memory, memory_mask, memory_key_padding_mask,
                                               memory_is_causal))
            x = self.norm3(x + self._ff_block(x))
        return x

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal):
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                           need_weights=False, is_causal=is_causal)[0]
        return self.dropout1(x)

    def _mha_block(self, x, mem, attn_mask, key_padding_mask, is_causal):
        x = self.multihead_attn(x, mem, mem, attn_mask=attn_mask,
                                key_padding_mask=key_padding_mask, need_weights=False,
                                is_causal=is_causal)[0]
        return self.dropout2(x)


# ----------------------------------------------------------------------------- stacks


class _UnfusedStack(nn.Module):
    """A ModuleList of unfused layers and an optional final norm."""

    _layer: type[_UnfusedLayer]

    def __init__(self, layer_config: dict | None, num_layers: int, *, norm: bool = False,
                 norm_eps: float = 1e-5, use_nested_tensor: bool = False,
                 d_model: int | None = None):
        super().__init__()
        # no layer config: every layer was removed (prune.layers); the artifact's edits put
        # back what stands in their place
        self.layers = nn.ModuleList(
            self._layer.from_artifact(layer_config) if layer_config else nn.Identity()
            for _ in range(num_layers))
        self.num_layers = num_layers
        width = layer_config["d_model"] if layer_config else d_model
        self.norm = nn.LayerNorm(width, eps=norm_eps) if norm else None
        self.use_nested_tensor = use_nested_tensor

    def artifact_config(self) -> dict:
        """From the first layer still a transformer layer (prune.layers may have replaced
        others, the first included, by what is left of them)."""
        norm = self.norm
        layer = next((m for m in self.layers if isinstance(m, _UnfusedLayer)), None)
        config = {"layer_config": None if layer is None else layer.artifact_config(),
                  "num_layers": len(self.layers), "norm": norm is not None,
                  "norm_eps": norm.eps if isinstance(norm, nn.LayerNorm) else 1e-5,
                  "use_nested_tensor": self.use_nested_tensor}
        if layer is None and isinstance(norm, nn.LayerNorm):
            config["d_model"] = norm.normalized_shape[-1]
        return config

    @classmethod
    def from_artifact(cls, config: dict) -> _UnfusedStack:
        c = dict(config)
        return cls(c.pop("layer_config"), c.pop("num_layers"), **c)

    @classmethod
    def from_stack(cls, stack: nn.Module, layers: list[_UnfusedLayer]) -> _UnfusedStack:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.layers = nn.ModuleList(layers)
        new.num_layers = len(layers)
        new.norm = copy.deepcopy(stack.norm)
        new.use_nested_tensor = bool(getattr(stack, "use_nested_tensor", False))
        return new.train(stack.training)


@register_module_type
class UnfusedTransformerEncoder(_UnfusedStack):
    """``nn.TransformerEncoder`` over :class:`UnfusedTransformerEncoderLayer`; same results.

    ``use_nested_tensor`` (copied from the stock encoder): in eval mode with a
    ``src_key_padding_mask``, no ``mask`` and no gradients wanted, the padded positions come out
    as zeros before the final norm, as torch's nested-tensor path gives them (torch also checks
    that the padding is at the end of each sequence; here any padding is zeroed)."""

    _layer = UnfusedTransformerEncoderLayer

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                           is_causal=bool(is_causal))
        if (self.use_nested_tensor and not self.training and mask is None
                and src_key_padding_mask is not None and not self._grad_needed()):
            pad = _additive(src_key_padding_mask, output.dtype) != 0  # (B, S): True = padding
            output = output.masked_fill(pad[..., None], 0.0)
        if self.norm is not None:
            output = self.norm(output)
        return output

    def _grad_needed(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad
                                               for p in self.layers[0].parameters())


@register_module_type
class UnfusedTransformerDecoder(_UnfusedStack):
    """``nn.TransformerDecoder`` over :class:`UnfusedTransformerDecoderLayer`; same results."""

    _layer = UnfusedTransformerDecoderLayer

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False):
        output = tgt
        for layer in self.layers:
            output = layer(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                           tgt_key_padding_mask=tgt_key_padding_mask,
                           memory_key_padding_mask=memory_key_padding_mask,
                           tgt_is_causal=bool(tgt_is_causal), memory_is_causal=memory_is_causal)
        if self.norm is not None:
            output = self.norm(output)
        return output


# ----------------------------------------------------------------------------- the swap

_LAYERS: dict[type[nn.Module], type[_UnfusedLayer]] = {
    nn.TransformerEncoderLayer: UnfusedTransformerEncoderLayer,
    nn.TransformerDecoderLayer: UnfusedTransformerDecoderLayer,
}
_STACKS: dict[type[nn.Module], type[_UnfusedStack]] = {
    nn.TransformerEncoder: UnfusedTransformerEncoder,
    nn.TransformerDecoder: UnfusedTransformerDecoder,
}
_ATTENTION = (nn.MultiheadAttention, PrunedMultiheadAttention)
STOCK_TYPES = (*_LAYERS, *_STACKS, nn.MultiheadAttention)


def unfuse_(model: nn.Module, *, ignore=(), attention: bool = True,
            notes: list[str] | None = None) -> list[str]:
    """Replace PyTorch's transformer blocks in ``model`` (in place) by their unfused forms.

    Exact types only (a subclass has its own forward); modules in ``ignore`` (and below) stay.
    A ``PrunedMultiheadAttention`` (prune.heads' or prune.channels') is unfused with its stock
    layer, and on its own when ``attention`` (False: attention modules outside a stock layer
    stay, as the channel analysis reads them whole). Returns the paths replaced; why a block
    stays as it is goes to ``notes``.
    """
    notes = notes if notes is not None else []
    ignore = list(ignore)
    done: list[str] = []
    kept: list[str] = []  # blocks left as they are: their children stay too
    wanted = (*_LAYERS, *_STACKS, *(_ATTENTION if attention else ()))

    def under(path: str, prefixes: list[str]) -> bool:
        return any(not p or path == p or path.startswith(p + ".") for p in prefixes)

    for path, module in list(model.named_modules()):
        if under(path, done) or under(path, kept):
            continue
        if type(module) not in wanted:
            if isinstance(module, STOCK_TYPES):  # a subclass: its forward may read weights
                kept.append(path)
            continue
        if any(path == i or path.startswith(i + ".") for i in ignore):
            kept.append(path)
            continue
        new, why = _convert(module)
        if new is not None and not path:
            why = "the model itself is this block; wrap it in a module (nn.Sequential) first"
        if new is None or why:
            kept.append(path)
            notes.append(f"{path or 'the model'} ({type(module).__name__}) kept fused: {why}")
            continue
        set_submodule(model, path, new)
        done.append(path)
    return done


def _convert(module: nn.Module) -> tuple[nn.Module | None, str | None]:
    """(the unfused module, None) or (None, why it cannot be unfused)."""
    if isinstance(module, _ATTENTION):
        why = _attention_problem(module)
        return (None, why) if why else (UnfusedMultiheadAttention.from_attention(module), None)
    if type(module) in _LAYERS:
        return _convert_layer(module)
    layers = []
    for i, layer in enumerate(module.layers):
        new, why = _convert_layer(layer) if type(layer) in _LAYERS else (
            None, f"layer {i} is a {type(layer).__name__}, not a stock transformer layer")
        if new is None:
            return None, f"layers.{i}: {why}"
        layers.append(new)
    if module.norm is not None and _unstorable(module.norm):
        return None, f"its norm {type(module.norm).__name__} cannot be stored in an artifact"
    return _STACKS[type(module)].from_stack(module, layers), None


def _convert_layer(layer: nn.Module) -> tuple[nn.Module | None, str | None]:
    for name in _LAYERS[type(layer)]._attentions:
        attn = getattr(layer, name)
        if type(attn) not in (nn.MultiheadAttention, PrunedMultiheadAttention):
            return None, f"its {name} is a {type(attn).__name__}"
        why = _attention_problem(attn)
        if why:
            return None, f"{name}: {why}"
    if _activation_module(layer.activation) is None:
        return None, (f"activation {getattr(layer.activation, '__name__', layer.activation)!r} "
                      f"is not one of {sorted(ACTIVATIONS)} or a torch activation module")
    return _LAYERS[type(layer)].from_layer(layer), None


def _attention_problem(mha: nn.Module) -> str | None:
    if getattr(mha, "bias_k", None) is not None or getattr(mha, "add_zero_attn", False):
        return "add_bias_kv / add_zero_attn have no unfused form here"
    return None


def _activation_module(activation) -> nn.Module | None:
    """A stock layer's activation (function or module) as a module, or None."""
    if isinstance(activation, nn.Module):
        return None if _unstorable(activation) else copy.deepcopy(activation)
    name = _FUNCTIONS.get(activation)
    return None if name is None else ACTIVATIONS[name]()


def _activation_name(module: nn.Module) -> str:
    """The ACTIVATIONS key that builds ``module``'s type (the artifact's child diff records any
    other torch activation and constructor arguments such as GELU's ``approximate``)."""
    return next((k for k, cls in ACTIVATIONS.items() if type(module) is cls), "relu")


def _unstorable(module: nn.Module) -> bool:
    """A module an artifact's edit log cannot rebuild (a user's class, not registered)."""
    return registered_key(module) is None and not type(module).__module__.startswith("torch.nn")


def _like(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` on ``old``'s device and dtype, in its train/eval mode."""
    param = next(old.parameters(), None)
    if param is not None:
        new = new.to(device=param.device, dtype=param.dtype)
    return new.train(old.training)
