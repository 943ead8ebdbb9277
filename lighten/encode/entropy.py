"""``encode.entropy``: the artifact's streams entropy-coded near their Shannon bound.

The step changes no weight and no module: it marks the model (``artifact.ENTROPY_FLAG``) so
:func:`lighten.artifact.save_artifact` codes every stored part that gets smaller — bit masks of
pruned weights, packed quantized integers and palette (cluster) indices, int8 weights, the byte
planes of float values — with an ANS coder and a per-stream categorical model kept in the
manifest (:mod:`lighten.encode.streams`, which says why constriction rather than zstd).
``load_artifact`` decodes transparently, bit for bit. The report has one row per coded part with
its coded bits against the empirical entropy of its symbols (the order-0 Shannon bound).

It is the last step (it describes storage, which a later step would change) but it does not
quantize, so it may follow a quantizing step: its registration (``storage_only=True``) tells
:func:`lighten.recipe.check_step_order` both.
"""

from __future__ import annotations

from pydantic import model_validator
from torch import nn

from lighten.artifact import ENTROPY_FLAG
from lighten.encode.streams import _MIN_BYTES
from lighten.registry import register_step
from lighten.step import StepConfig, StepContext

__all__ = ["EntropyConfig", "encode_entropy", "entropy_report"]


class EntropyConfig(StepConfig):
    """Entropy coding of the artifact: no options; it trains nothing and must be the last step."""

    @model_validator(mode="after")
    def _no_finetune(self):
        if self.finetune is not None:
            raise ValueError("encode.entropy only changes how the artifact stores tensors and "
                             "trains nothing; remove finetune (fine-tune in the step before)")
        return self


def entropy_report(model: nn.Module) -> tuple[dict, list]:
    """(totals, per-part StreamStats) of coding ``model``'s artifact tensors, without saving.

    Totals: ``bytes_before`` (stored parts as the artifact would hold them uncoded),
    ``bytes_after`` (coded parts plus the counts tables), ``entropy_bits`` / ``coded_bits`` of
    the coded streams."""
    from lighten.artifact import _encode_state
    from lighten.encode.streams import code_parts

    parts, entries = _encode_state(model.state_dict())
    coded, _, stats = code_parts(parts, entries)
    before = sum(p.numel() * p.element_size() for p in parts.values())
    after = sum(p.numel() * p.element_size() for p in coded.values())
    totals = {"bytes_before": before, "bytes_after": after + sum(s.model_bytes for s in stats),
              "model_bytes": sum(s.model_bytes for s in stats),
              "entropy_bits": round(sum(s.entropy_bits for s in stats), 1),
              "coded_bits": sum(s.coded_bits for s in stats), "streams": len(stats)}
    return totals, stats


# an ANS coder's fixed cost per stream: its 64-bit final state, flushed into the 32-bit words
# it writes, plus up to one word of padding (constriction's AnsCoder)
STREAM_FLUSH_BITS = 96


@register_step("encode.entropy", EntropyConfig, storage_only=True)
def encode_entropy(model: nn.Module, cfg: EntropyConfig, ctx: StepContext) -> nn.Module:
    """Entropy-code the artifact's masks, indices and integers (ANS); the loader decodes."""
    setattr(model, ENTROPY_FLAG, True)
    totals, stats = entropy_report(model)
    coded = set()
    for s in stats:
        module, _, tensor = s.tensor.rpartition(".")
        coded.add(s.tensor)
        per_symbol, bound = s.coded_bits / max(s.symbols, 1), s.entropy_bits / max(s.symbols, 1)
        ctx.layer(module, "encode", tensor=tensor, part=s.part or "values", kind=s.kind,
                  before=f"{tensor}#{s.part or 'values'}: {s.raw_bytes} B",
                  after=f"{s.coded_bytes + s.model_bytes} B ({per_symbol:.3f} bits/symbol, "
                        f"bound {bound:.3f})",
                  symbols=s.symbols, coded_bits=s.coded_bits,
                  entropy_bits=round(s.entropy_bits, 1), model_bytes=s.model_bytes,
                  bits_per_symbol=round(s.coded_bits / max(s.symbols, 1), 4),
                  entropy_per_symbol=round(s.entropy_bits / max(s.symbols, 1), 4),
                  over_bound=round(s.coded_bits / s.entropy_bits - 1, 4)
                  if s.entropy_bits else None)
    for name, module in model.named_modules():  # weights nothing could be gained on
        weight = module._parameters.get("weight")
        if weight is not None and weight.dim() >= 2 and f"{name}.weight".lstrip(".") not in coded:
            ctx.layer(name, "keep", tensor="weight", before="stored", after="stored",
                      reason="coding would not make it smaller")
    ctx.summary.update(totals)
    if totals["entropy_bits"]:
        over = totals["coded_bits"] / totals["entropy_bits"] - 1
        bound = f"; coded streams {over:+.2%} over their Shannon bound"
        extra = totals["coded_bits"] - totals["entropy_bits"]
        if over > 0.05 and extra <= STREAM_FLUSH_BITS * totals["streams"]:
            bound += (f" (streams this short: the coder's fixed {STREAM_FLUSH_BITS // 8} bytes "
                      "per stream dominate)")
    elif not totals["streams"]:
        bound = (f"; nothing coded: every weight stream is under {_MIN_BYTES} bytes or would "
                 "not get smaller")
    else:
        bound = ""
    ctx.note(f"encode.entropy: stored tensors {totals['bytes_before']} -> "
             f"{totals['bytes_after']} bytes ({totals['streams']} streams coded, counts tables "
             f"{totals['model_bytes']} bytes included){bound}")
    return model
