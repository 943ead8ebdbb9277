"""Dynamic int8 LSTM: int8 weights, uint8 activations quantized at run time, integer GEMMs.

A :class:`DynamicQuantLSTM` exports each layer as ONNX Runtime's contrib op
``com.microsoft.DynamicQuantizeLSTM`` (what ORT's own ``quantize_dynamic`` makes of an ONNX LSTM),
so ORT runs the gate GEMMs on u8 x s8 kernels. The PyTorch forward computes the same math::

    q, s, z = DynamicQuantizeLinear(X)             # once, over every step and batch row
    Gx      = (q - z) @ Wq * (s * w_scale)         # input projection of all steps at once
    per step t:
      qh, sh, zh = DynamicQuantizeLinear(h)        # the whole (batch, hidden) state
      g = Gx[t] + (qh - zh) @ Rq * (sh * r_scale) + (Wb + Rb)
      i, o, f, c~ = split(g)                       # ONNX gate order iofc
      c = c * sigmoid(f) + sigmoid(i) * tanh(c~);  h = tanh(c) * sigmoid(o)

Weights are stored in the op's layout, ``(directions, in, 4*hidden)`` with symmetric scales per
gate row, so export needs no reshuffling. Projections (``proj_size``) have no ORT kernel and are
refused. The backward pass is straight-through (float LSTM on dequantized weights), so biases
and the layers around can be fine-tuned.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lighten.errors import UnsupportedError
from lighten.modules import register_module_type
from lighten.quant.dynamic import dynamic_quantize_u8, symmetric_codes

_TORCH_TO_ONNX_GATES = (0, 3, 1, 2)  # PyTorch chunks i, f, g, o -> ONNX i, o, f, c


def _int_gemm(x: torch.Tensor, w_int: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``x (M, K)`` quantized per tensor to uint8 times ``w_int (K, N)``, back to float."""
    q, s, z = dynamic_quantize_u8(x)
    acc = (q.double() - z.double()) @ w_int.double()  # exact int32 sums held in float64
    return acc.float() * (s * w_scale)


def _float_gemm(x: torch.Tensor, w_int: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    return x @ (w_int.float() * w_scale)


def _run_direction(x, w, r, w_scale, r_scale, bias, h, c, *, reverse: bool, quantized: bool):
    """One direction of one layer. ``x (T, B, I)``; ``w (I, 4H)``; ``r (H, 4H)`` -> ys, h, c."""
    gemm = _int_gemm if quantized else _float_gemm
    steps, batch = x.shape[0], x.shape[1]
    gx = gemm(x.reshape(steps * batch, -1), w, w_scale).reshape(steps, batch, -1)
    fused_bias = None if bias is None else bias[: gx.shape[-1]] + bias[gx.shape[-1]:]
    ys = [None] * steps
    for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
        g = gx[t] + gemm(h, r, r_scale)
        if fused_bias is not None:
            g = g + fused_bias
        i, o, f, cand = g.chunk(4, dim=-1)
        c = c * torch.sigmoid(f) + torch.sigmoid(i) * torch.tanh(cand)
        h = torch.tanh(c) * torch.sigmoid(o)
        ys[t] = h
    return torch.stack(ys), h, c


def _run_layer(x, w, r, w_scale, r_scale, bias, h0, c0, *, quantized: bool):
    """All directions of one layer: ``y (T, D, B, H)``, ``h_n (D, B, H)``, ``c_n (D, B, H)``."""
    dirs, batch, hidden = w.shape[0], x.shape[1], r.shape[1]
    zeros = x.new_zeros(dirs, batch, hidden)
    h0 = zeros if h0 is None else h0
    c0 = zeros if c0 is None else c0
    ys, hs, cs = [], [], []
    for d in range(dirs):
        y, h, c = _run_direction(x, w[d], r[d], w_scale[d], r_scale[d],
                                 None if bias is None else bias[d], h0[d], c0[d],
                                 reverse=d == 1, quantized=quantized)
        ys.append(y)
        hs.append(h)
        cs.append(c)
    return torch.stack(ys, dim=1), torch.stack(hs), torch.stack(cs)


def _no_input(g):
    """An omitted optional ONNX input (exported as the empty name)."""
    node = g.op("prim::Constant")
    node.setType(torch._C.OptionalType.ofTensor())
    return node


class _DynamicLSTMLayer(torch.autograd.Function):
    """Integer-exact layer forward; straight-through backward through the float LSTM."""

    @staticmethod
    def forward(ctx, x, w, r, w_scale, r_scale, bias, h0, c0, hidden_size, direction):
        ctx.save_for_backward(x, w, r, w_scale, r_scale, bias, h0, c0)
        return _run_layer(x, w, r, w_scale, r_scale, bias, h0, c0, quantized=True)

    @staticmethod
    def backward(ctx, grad_y, grad_h, grad_c):
        x, w, r, w_scale, r_scale, bias, h0, c0 = ctx.saved_tensors
        leaves = [None if t is None else t.detach().requires_grad_() for t in (x, bias, h0, c0)]
        x_, bias_, h0_, c0_ = leaves
        given = [t for t in leaves if t is not None]
        with torch.enable_grad():
            outs = _run_layer(x_, w, r, w_scale, r_scale, bias_, h0_, c0_, quantized=False)
            grads = list(torch.autograd.grad(outs, given, (grad_y, grad_h, grad_c),
                                             allow_unused=True))
        gx, gb, gh, gc = (None if t is None else grads.pop(0) for t in leaves)
        return gx, None, None, None, None, gb, gh, gc, None, None

    @staticmethod
    def symbolic(g, x, w, r, w_scale, r_scale, bias, h0, c0, hidden_size, direction):
        def given(v):
            return v is not None and not (hasattr(v, "node") and v.node().mustBeNone())

        zero_shape = w_scale.type().sizes()
        zero = g.op("Constant", value_t=torch.zeros(zero_shape, dtype=torch.int8))
        inputs = [x, w, r, bias if given(bias) else _no_input(g), _no_input(g),
                  h0 if given(h0) else _no_input(g), c0 if given(c0) else _no_input(g),
                  _no_input(g), w_scale, zero, r_scale, zero]
        outs = g.op("com.microsoft::DynamicQuantizeLSTM", *inputs, hidden_size_i=hidden_size,
                    direction_s=direction, outputs=3)
        dirs = 2 if direction == "bidirectional" else 1
        state = [dirs, None, hidden_size]
        for value, sizes in zip(outs, ([None, *state], state, state), strict=True):
            value.setType(x.type().with_sizes(sizes))  # the exporter cannot infer contrib ops
        return outs


@register_module_type
class DynamicQuantLSTM(nn.Module):
    """``nn.LSTM`` with int8 weights whose inputs and states are quantized per step at run time.

    Call it like ``nn.LSTM``: ``output, (h_n, c_n) = lstm(x, hx)``.
    """

    def __init__(self, input_size: int, hidden_size: int, *, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, bits: int = 8, per_channel: bool = True,
                 reduce_range: bool = False):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.batch_first, self.dropout, self.bidirectional = batch_first, dropout, bidirectional
        self.bits, self.per_channel, self.reduce_range = bits, per_channel, reduce_range
        self.has_bias = bias
        dirs, gates = self.num_directions, 4 * hidden_size
        for layer in range(num_layers):
            in_size = input_size if layer == 0 else hidden_size * dirs
            for kind, rows in (("ih", in_size), ("hh", hidden_size)):
                self.register_buffer(f"weight_{kind}_int_l{layer}",
                                     torch.zeros(dirs, rows, gates, dtype=torch.int8))
                self.register_buffer(f"weight_{kind}_scale_l{layer}",
                                     torch.ones(dirs, gates) if per_channel else torch.ones(dirs))
            if bias:  # (dirs, 8H): [input bias, recurrent bias], ONNX gate order
                self.register_parameter(f"bias_l{layer}",
                                        nn.Parameter(torch.zeros(dirs, 2 * gates)))

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def qmax(self) -> int:
        bits = self.bits - 1 if self.reduce_range and self.bits == 8 else self.bits
        return 2 ** (bits - 1) - 1

    def quant_facts(self):
        """Bits and weight scales of every gate matrix, for the report's per-layer table."""
        from lighten.quant.layer_report import QuantFacts

        scales = [b.flatten() for n, b in self.named_buffers() if "_scale_" in n]
        return QuantFacts(weight_bits=self.bits, activation_bits="dynamic",
                          granularity="per-channel" if self.per_channel else "per-tensor",
                          weight_scale=torch.cat(scales),
                          weight_range_bits=int(math.log2(self.qmax + 1)) + 1)

    @classmethod
    def from_float(cls, lstm: nn.LSTM, **options) -> DynamicQuantLSTM:
        """Quantize a trained ``nn.LSTM``; UnsupportedError for projections."""
        if lstm.proj_size:
            raise UnsupportedError(
                f"LSTM with proj_size={lstm.proj_size} has no integer kernel in ONNX Runtime "
                "(DynamicQuantizeLSTM); add its name to ignore to keep it float")
        q = cls(lstm.input_size, lstm.hidden_size, num_layers=lstm.num_layers,
                bias=lstm.bias, batch_first=lstm.batch_first, dropout=lstm.dropout,
                bidirectional=lstm.bidirectional, **options)
        q.set_weights(lstm)
        return q

    @torch.no_grad()
    def set_weights(self, lstm: nn.LSTM) -> None:
        """Copy ``lstm``'s weights, reordered to ONNX gates and quantized per gate row."""
        suffixes = [""] + (["_reverse"] if self.bidirectional else [])
        for layer in range(self.num_layers):
            for kind in ("ih", "hh"):
                ws = [_onnx_gates(getattr(lstm, f"weight_{kind}_l{layer}{s}")) for s in suffixes]
                q, scale = zip(*(self._quantize(w) for w in ws), strict=True)
                getattr(self, f"weight_{kind}_int_l{layer}").copy_(torch.stack(q))
                getattr(self, f"weight_{kind}_scale_l{layer}").copy_(torch.stack(scale))
            if self.has_bias:
                b = [torch.cat([_onnx_gates(getattr(lstm, f"bias_{k}_l{layer}{s}"))
                                for k in ("ih", "hh")]) for s in suffixes]
                getattr(self, f"bias_l{layer}").copy_(torch.stack(b))

    def _quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``weight (4H, in)`` -> int8 ``(in, 4H)`` and scales ``(4H,)`` (or ``()``)."""
        codes, scale = symmetric_codes(weight.float(), self.qmax, per_channel=self.per_channel)
        return codes.to(torch.int8).T.contiguous(), scale

    def dequantized_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Float ``W (D, in, 4H)`` and ``R (D, H, 4H)`` as the integer kernels see them."""
        out = []
        for kind in ("ih", "hh"):
            scale = getattr(self, f"weight_{kind}_scale_l{layer}")
            scale = scale[:, None, :] if self.per_channel else scale[:, None, None]
            out.append(getattr(self, f"weight_{kind}_int_l{layer}").float() * scale)
        return out[0], out[1]

    def forward(self, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None):
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)
            hx = None if hx is None else (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        elif self.batch_first:
            x = x.transpose(0, 1)  # (T, B, I), the op's layout
        dirs = self.num_directions
        direction = "bidirectional" if self.bidirectional else "forward"
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            h0, c0 = (None, None) if hx is None else (
                hx[0][layer * dirs:(layer + 1) * dirs], hx[1][layer * dirs:(layer + 1) * dirs])
            y, h, c = _DynamicLSTMLayer.apply(
                x, getattr(self, f"weight_ih_int_l{layer}"),
                getattr(self, f"weight_hh_int_l{layer}"),
                getattr(self, f"weight_ih_scale_l{layer}"),
                getattr(self, f"weight_hh_scale_l{layer}"),
                getattr(self, f"bias_l{layer}", None), h0, c0, self.hidden_size, direction)
            x = y.permute(0, 2, 1, 3).flatten(2)  # (T, D, B, H) -> (T, B, D*H)
            if self.training and self.dropout and layer < self.num_layers - 1:
                x = nn.functional.dropout(x, self.dropout, training=True)
            h_n.append(h)
            c_n.append(c)
        h_n, c_n = torch.cat(h_n), torch.cat(c_n)
        if unbatched:
            return x.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        return (x.transpose(0, 1) if self.batch_first else x), (h_n, c_n)

    def artifact_config(self) -> dict:
        return {"input_size": self.input_size, "hidden_size": self.hidden_size,
                "num_layers": self.num_layers, "bias": self.has_bias,
                "batch_first": self.batch_first, "dropout": self.dropout,
                "bidirectional": self.bidirectional, "bits": self.bits,
                "per_channel": self.per_channel, "reduce_range": self.reduce_range}

    @classmethod
    def from_artifact(cls, config: dict) -> DynamicQuantLSTM:
        return cls(**config)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"bidirectional={self.bidirectional}, w{self.bits}"
                f"{' (7-bit range)' if self.qmax == 63 else ''}, dynamic uint8 activations")


def _onnx_gates(t: torch.Tensor) -> torch.Tensor:
    """Reorder the 4H gate rows of a PyTorch LSTM tensor from ifgo to ONNX iofc."""
    chunks = t.detach().float().chunk(4, dim=0)
    return torch.cat([chunks[k] for k in _TORCH_TO_ONNX_GATES])
