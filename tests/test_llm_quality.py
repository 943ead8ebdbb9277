"""The accuracy knobs of the LLM quantizers on real numerics: the searched group ranges
(``mse_range``) never raise a group's weighted error over min-max and lower GPTQ's layer
output error on a tiny Llama; per-token SmoothQuant activations are exact integer math
and beat one scale per tensor when one token is an outlier."""

from __future__ import annotations

import torch
from torch import nn


def test_search_range_never_worse_than_min_max():
    from lighten.llm.rtn import dequantize, grouped, quantize_with, rtn, search_range

    torch.manual_seed(0)
    w = torch.randn(32, 200) * torch.linspace(0.2, 3, 200)
    w[3, 7] = 12.0  # one outlier weight stretches its group's min-max grid
    imp = torch.rand(200) + 0.1
    grid = {"bits": 4, "group_size": 64, "symmetric": False}
    clip = search_range(w, imp, **grid)
    assert clip.shape == (32, 4) and (clip <= 1).all() and (clip < 1).any()

    def err(c):
        q, s, z = rtn(w, clip=c, **grid)
        return ((grouped(w - dequantize(q, s, z, group_size=64), 64) ** 2)
                * grouped(imp[None], 64)[0]).sum(-1)

    assert (err(clip) <= err(None) + 1e-6).all()
    assert err(clip).sum() < 0.95 * err(None).sum()
    assert quantize_with(w, *rtn(w, clip=clip, **grid)[1:], bits=4, group_size=64).shape == \
        w.shape


def test_mse_range_lowers_gptq_layer_error(tmp_path):
    from _llm_common import tiny_llama

    from lighten.llm.sources import CausalLM, load_hf_model
    from lighten.llm.steps import LLMWeightOnlyConfig, quantize_llm_

    folder = tiny_llama(tmp_path / "m")
    torch.manual_seed(0)
    ids = torch.randint(0, 150, (8, 24))
    totals = {}
    for method in ("gptq",):  # rtn has no data, so no per-layer score
        for mse in (False, True):
            model = CausalLM(load_hf_model(str(folder)))
            rows: list[dict] = []
            quantize_llm_(model, LLMWeightOnlyConfig(method=method, group_size=64,
                                                     mse_range=mse),
                          [ids[:4], ids[4:]], rows=rows)
            totals[method, mse] = sum(r.get("score", 0.0) for r in rows)
    assert 0 < totals["gptq", True] < totals["gptq", False]


def test_per_token_int8_linear_is_integer_exact():
    from lighten.llm.smoothquant import SmoothQuantLinear, per_token_int8

    torch.manual_seed(0)
    lin = nn.Linear(32, 8)
    x = torch.randn(2, 5, 32)
    x[0, 2] *= 50  # an outlier token
    stats = x.reshape(-1, 32).abs().amax(0)
    token = SmoothQuantLinear.smoothed(lin, stats, alpha=0.5, activations="token")
    tensor = SmoothQuantLinear.smoothed(lin, stats, alpha=0.5, activations="tensor")
    xs = x * token.input_scale
    q, s = per_token_int8(xs)
    assert (q == q.round()).all() and q.abs().max() <= 127 and s.shape == (2, 5, 1)
    want = (q @ token.weight_int.float().T) * s * token.weight_scale + lin.bias
    with torch.no_grad():
        got = token(x)
        ref = lin(x)
        assert torch.allclose(got, want, atol=1e-5)
        normal = [i for i in range(10) if i != 2]
        e_tok = (got - ref).reshape(10, 8)[normal].pow(2).mean()
        e_ten = (tensor(x) - ref).reshape(10, 8)[normal].pow(2).mean()
    assert e_tok < e_ten  # the other tokens keep their own fine grid
