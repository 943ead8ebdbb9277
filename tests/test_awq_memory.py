"""AWQ calibration memory (issue #15): the sample rows that the block-wise pass keeps for the
scale search own their memory (they used to be views that pinned every batch's whole layer
input), and the lean search picks exactly what the plain reference search picks: the same
scales, clipping ranges and codes on every layer of a tiny Llama."""

from __future__ import annotations

import copy

import pytest
import torch
from _llm_common import tiny_llama
from torch import nn

from lighten.llm.blockwise import LayerInputs, find_blocks
from lighten.llm.rtn import dequantize, fake_quantize, group_grid, grouped, quantize_with, rtn

pytest.importorskip("transformers")

ALPHAS = tuple(i / 20 for i in range(20))
CLIPS = tuple(1 - i / 20 for i in range(10))
GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


# ----------------------------------------------------------------------------- the reference
# AWQ's searches as first written: every candidate's whole output and weight copy at once.


def ref_search_scale(weights, x, absmean, **grid):
    w = torch.cat([t.float() for t in weights])
    ref = x @ w.T
    best, best_err = torch.ones_like(absmean), float("inf")
    for alpha in ALPHAS:
        s = absmean.clamp_min(1e-4).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = float(((x / s) @ fake_quantize(w * s, **grid).T - ref).pow(2).mean())
        if err < best_err:
            best, best_err = s, err
    return best


def ref_search_clip(weight, x, *, bits, group_size, symmetric, rows_at_once=256):
    out = weight.shape[0]
    xg = grouped(x, group_size)
    best_clip = torch.ones(out, xg.shape[1])
    for start in range(0, out, rows_at_once):
        w = weight[start:start + rows_at_once].float()
        ref = torch.einsum("ngk,rgk->nrg", xg, grouped(w, group_size))
        best_err = torch.full(best_clip[start:start + len(w)].shape, float("inf"))
        for c in CLIPS:
            scale, zero = group_grid(w, bits=bits, group_size=group_size, symmetric=symmetric,
                                     clip=torch.full_like(best_err, c))
            q = quantize_with(w, scale, zero, bits=bits, group_size=group_size)
            deq = grouped(dequantize(q, scale, zero, group_size=group_size), group_size)
            err = (torch.einsum("ngk,rgk->nrg", xg, deq) - ref).pow(2).mean(0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_clip[start:start + len(w)][better] = c
    return best_clip


def ref_stats(chunks: list[torch.Tensor], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmean, sample rows) of one layer's per-batch inputs, gathered as the calibration
    pass gathers them: every ``step``-th row of each batch, then evenly thinned to ``rows``."""
    total = torch.zeros(chunks[0].shape[1], dtype=torch.float64)
    kept = []
    for x in chunks:
        total += x.abs().sum(0).double()
        kept.append(x[::max(1, x.shape[0] // max(1, rows // 8))][:rows])
    sample = torch.cat(kept)
    if len(sample) > rows:
        sample = sample[torch.linspace(0, len(sample) - 1, rows).long()]
    return (total / sum(len(x) for x in chunks)).float(), sample


def block_inputs(model: nn.Module, blocks: nn.ModuleList, batches) -> list[list[tuple]]:
    """Each block's (args, kwargs) per batch, as ``model`` (the quantized one) feeds them."""
    seen: list[list[tuple]] = [[] for _ in blocks]
    hooks = [b.register_forward_pre_hook(
        lambda m, a, k, i=i: seen[i].append((a, k)), with_kwargs=True)
        for i, b in enumerate(blocks)]
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for h in hooks:
        h.remove()
    return seen


def layer_inputs(block: nn.Module, inputs: list[tuple]) -> dict[str, list[torch.Tensor]]:
    """Each Linear's input rows per batch when the float ``block`` runs on ``inputs``."""
    rows: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: rows.setdefault(n, []).append(
        a[0].reshape(-1, a[0].shape[-1]).float().clone()))
        for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for args, kwargs in inputs:
            block(*args, **kwargs)
    for h in hooks:
        h.remove()
    return rows


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("awqmem") / "model")


def causal_lm(folder):
    import transformers as tf

    from lighten.llm.sources import CausalLM

    hf = tf.LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager")
    return CausalLM(hf.eval())


# ----------------------------------------------------------------------------- tests


def test_sample_rows_own_their_memory():
    """The kept rows are copies in the statistics' own buffer, sized before the pass: no
    batch's full (tokens, in) input is held alive by them (on SmolLM2-135M those views pinned
    ~107 MiB per block: every calibration batch's input of every Linear). More forwards than
    announced grow the buffer; the rows are the same either way."""
    torch.manual_seed(0)
    layer = nn.Linear(48, 16)
    xs = [torch.randn(2, 50, 48) for _ in range(12)]  # 4 rows kept each: 48, thinned to 32
    _, want = ref_stats([x.reshape(-1, 48) for x in xs], 32)
    for calls in (12, 1):
        stats = LayerInputs(layer, rows=32, calls=calls)
        with torch.no_grad():
            for x in xs:
                layer(x)
        stats.remove()
        got = stats.sample
        assert got.untyped_storage().data_ptr() not in {
            x.untyped_storage().data_ptr() for x in xs}
        assert got.untyped_storage().nbytes() <= 12 * 32 * 48 * 4
        assert torch.equal(got, want)
    assert torch.allclose(stats.absmean, torch.cat(xs).reshape(-1, 48).abs().mean(0))


def test_run_block_frees_each_input_once_used():
    """The next block's inputs replace this block's batch by batch (the list is emptied)."""
    from lighten.llm.blockwise import BlockInput, run_block

    block = nn.Linear(8, 8)
    xs = [torch.randn(2, 5, 8) for _ in range(3)]
    inputs = [BlockInput((x,), {}) for x in xs]
    out = run_block(block, inputs)
    assert inputs == [] and len(out) == 3
    with torch.no_grad():
        for o, x in zip(out, xs, strict=True):
            assert torch.equal(o.args[0], block(x))


@pytest.mark.parametrize(("bits", "symmetric", "rows", "shape"),
                         [(4, False, 64, (16, 2, 32)), (3, True, 512, (4, 4, 32))])
def test_awq_matches_the_reference_search(folder, bits, symmetric, rows, shape):
    """Every block: the input scale, clip ranges and integer codes that llm.weight_only AWQ
    chose are exactly those of the reference search on the same calibration rows (the float
    block's layer inputs, fed by the already quantized blocks before it)."""
    from lighten.llm.steps import LLMWeightOnlyConfig, quantize_llm_

    model = causal_lm(folder)
    stack, float_blocks = find_blocks(copy.deepcopy(model))
    vocab = model.hf.config.vocab_size
    g = torch.Generator().manual_seed(bits)
    n, b, t = shape
    batches = [torch.randint(0, vocab, (b, t), generator=g) for _ in range(n)]
    cfg = LLMWeightOnlyConfig(method="awq", bits=bits, group_size=32, symmetric=symmetric,
                              awq_rows=rows, calib_samples=n * b, batch_size=b)
    result = quantize_llm_(model, cfg, batches)
    assert len(result.layers) == 14
    blocks = model.get_submodule(stack)
    scaled = 0
    for i, inputs in enumerate(block_inputs(model, blocks, batches)):
        seen = layer_inputs(float_blocks[i], inputs)
        for group in GROUPS:
            absmean, sample = ref_stats(seen[group[0]], rows)
            weights = [float_blocks[i].get_submodule(n).weight.detach() for n in group]
            grid = {"bits": bits, "group_size": min(32, weights[0].shape[1]),
                    "symmetric": symmetric}
            s = ref_search_scale(weights, sample, absmean, **grid)
            scaled += not torch.all(s == 1)
            for name, w in zip(group, weights, strict=True):
                layer = blocks[i].get_submodule(name)
                ws = w.float() * s[None, :]
                clip = ref_search_clip(ws, sample[:256] / s[None, :], **grid)
                q, scale, zero = rtn(ws, clip=clip, **grid)
                where = f"block {i} {name}"
                assert torch.equal(layer.input_scale, 1 / s), where
                assert torch.equal(layer.weight_scale, scale.half()), where
                assert torch.equal(layer.weight_zero_point, zero.to(torch.int8)), where
                codes = layer.weight_int.reshape(len(w), -1)[:, : w.shape[1]]
                assert torch.equal(codes, q.to(torch.int8)), where
    assert scaled >= 2  # the outlier channels get a scale (not the trivial α = 0 everywhere)
