"""Layer-wise FFN reconstruction and int8-aware distillation (lighten.llm.encoder_recover) on a
tiny random BERT (tests/_llm_helpers.py): real numerics, nothing downloaded."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lighten.errors import ModelError

pytest.importorskip("transformers")

from _llm_helpers import batches, cosine, encoder, encoder_world, sentences  # noqa: E402

world, _tab_env = encoder_world("recover", train=128, layers=3)


def test_reconstruction_recovers_ffn_pruning(world):
    from lighten.llm.encoder import prune_encoder_
    from lighten.llm.encoder_recover import reconstruct_ffn_

    d = sentences(world)
    calib, test = batches(d.train, 128), batches(d.test, 48)
    teacher = encoder(world)
    # an unpruned copy is reproduced: the least-squares fit finds the weights it has
    same = copy.deepcopy(teacher)
    errors = reconstruct_ffn_(same, teacher, calib, ridge=1e-8)
    assert max(errors) < 1e-6 and cosine(same, teacher, test) > 0.99999
    pruned = copy.deepcopy(teacher)
    prune_encoder_(pruned, calib, ffn=0.5, ffn_multiple=8)
    before = cosine(pruned, teacher, test)
    errors = reconstruct_ffn_(pruned, teacher, calib)
    after = cosine(pruned, teacher, test)  # held-out sentences
    assert len(errors) == 3 and all(0 < e < 1 for e in errors)
    assert 1 - after < (1 - before) / 2, (before, after)
    dropped = copy.deepcopy(teacher)
    prune_encoder_(dropped, [], keep_layers=[0, 2])
    with pytest.raises(ModelError, match="one to one"):
        reconstruct_ffn_(dropped, teacher, calib)


def test_fake_int8_is_quant_dynamic(world):
    from lighten.llm.encoder_recover import FakeInt8Linear, fake_int8
    from lighten.quant.dynamic import quantize_dynamic_

    d = sentences(world)
    test = batches(d.test, 48)
    model = encoder(world)
    int8 = quantize_dynamic_(copy.deepcopy(model), target=None)
    reduce = int8.hf.encoder.layer[0].output.dense.qmax == 63
    with fake_int8(model, reduce_range=reduce):
        assert isinstance(model.hf.encoder.layer[0].output.dense, FakeInt8Linear)
        with torch.no_grad():
            fake = torch.cat([model(*b) for b in test])
        model(*test[0]).sum().backward()  # straight-through: the float weights get gradients
    with torch.no_grad():
        real = torch.cat([int8(*b) for b in test])
    assert torch.allclose(fake, real, atol=1e-4), (fake - real).abs().max()
    dense = model.hf.encoder.layer[0].output.dense
    assert type(dense) is nn.Linear and dense.weight.grad is not None  # put back, trained
    assert dense.weight.grad.abs().sum() > 0


def test_int8_aware_distillation_through_the_step(world):
    import lighten
    from lighten.llm.encoder_recover import fake_int8

    d = sentences(world, limit_test=48)
    test = batches(d.test, 48)
    model = encoder(world)
    steps = {"llm.encoder_prune": {"ffn": 0.5, "ffn_multiple": 8, "samples": 64,
                                   "distill": {"epochs": 3, "samples": 128, "lr": 1e-3,
                                               "tokens": 1.0, "int8": True}}}
    out, report = lighten.compress(model, steps, data=d)
    assert any("refitted" in n for n in report.notes)
    assert any("distilled from the original" in n for n in report.notes)
    plain, _ = lighten.compress(model, {"llm.encoder_prune": {
        "ffn": 0.5, "ffn_multiple": 8, "samples": 64, "reconstruct": False}}, data=d)
    assert cosine(out, model, test) > cosine(plain, model, test)
    with fake_int8(out), fake_int8(plain):  # what quant.dynamic will deploy
        assert cosine(out, model, test) > cosine(plain, model, test)
