"""The ``text-classification`` task (lighten.llm.textclass) on a tiny random BERT and made-up
Reuters-like ``.tab`` files (tests/_llm_helpers.py): a probe-initialised head, a short
fine-tune, then int8 and structured pruning through ``lighten.compress`` and through ``lighten
run`` (the baseline stage trains the head; the shipped MiniLM recipes parse)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

from lighten.errors import DataError, ModelError

pytest.importorskip("transformers")
pytest.importorskip("sklearn")

from _llm_helpers import SEQ, encoder_world  # noqa: E402

world, _tab_env = encoder_world("textclass", train=96, layers=2, init=0.02)


def bundle(world):
    from lighten.llm.textclass import labeled_sentences_bundle

    return labeled_sentences_bundle("r8", tokenizer={"hf": str(world["model"])}, seq_len=SEQ)


def logits(model, data):
    with torch.no_grad():
        return model(data.ids, data.mask)


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """A classifier fitted once per module: probe head + 3 epochs end to end."""
    from lighten.llm.sources import build_hf
    from lighten.llm.textclass import SentenceClassifier, fit_classifier_

    mp = pytest.MonkeyPatch()
    mp.setenv("LIGHTEN_ORANGE_TEXT", str(world["tab"]))
    try:
        data = bundle(world)
        model = SentenceClassifier.from_encoder(build_hf(str(world["model"])), data.num_classes)
        fit_classifier_(model, data.train, epochs=0)  # the probe head alone
        probe_acc = data.task.score(logits(model, data.test), data.test.labels)
        history = fit_classifier_(model, data.train, epochs=3, lr=1e-3)
    finally:
        mp.undo()
    return {"model": model.eval(), "data": data, "probe_acc": probe_acc, "history": history}


def test_task_data_and_fine_tune(trained):
    model, data = trained["model"], trained["data"]
    task = data.task
    assert task.kind == "text-classification" and task.num_classes == 3
    assert task.describe()["class_names"] == ["acq", "crude", "earn"]
    task.check_item(data.train[0], "train item 0")
    out = logits(model, data.test)
    task.check_outputs(out, len(data.test))
    metrics = task.metrics(out, data.test.labels)
    # three topics with 60% topic words: the probe head already separates them; training
    # keeps or improves it and lowers the loss
    assert trained["probe_acc"] > 0.6
    assert metrics["accuracy"] >= trained["probe_acc"] - 0.05 and metrics["macro_f1"] > 0.6
    assert trained["history"][-1] < trained["history"][0]
    assert task.agreement(out, out) == 1.0
    from lighten.task import task_from_dict

    again = task_from_dict(task.describe())  # artifacts and run.json rebuild it
    assert isinstance(again, type(task)) and again.describe() == task.describe()


def test_int8_and_pruning_through_compress(trained):
    import lighten

    model, data = trained["model"], trained["data"]
    base = data.task.score(logits(model, data.test), data.test.labels)
    int8, _ = lighten.compress(model, {"quant.dynamic": {}}, data=data)
    q = logits(int8, data.test)
    assert data.task.agreement(q, logits(model, data.test)) > 0.9
    assert data.task.score(q, data.test.labels) >= base - 0.1
    pruned, report = lighten.compress(model, {"llm.encoder_prune": {
        "heads": 0.25, "ffn": 0.5, "ffn_multiple": 8, "samples": 32,
        "finetune": {"epochs": 2, "lr": 1e-3, "batch_size": 16}}}, data=data)
    layer = pruned.hf.encoder.layer[0]
    assert layer.intermediate.dense.out_features == 32
    assert layer.attention.self.query.out_features == 24  # 3 of 4 heads of 8
    assert data.task.score(logits(pruned, data.test), data.test.labels) >= base - 0.15
    assert isinstance(pruned.head, torch.nn.Linear)


def test_errors(world, trained):
    from lighten.llm.textclass import SentenceClassifier, TextClassificationTask

    task = TextClassificationTask(50, SEQ, 3)
    with pytest.raises(ModelError, match="needs logits"):
        task.check_outputs(torch.zeros(4, 2), 4)
    with pytest.raises(DataError, match="classes >= 2"):
        TextClassificationTask(50, SEQ, 1)
    with pytest.raises(DataError, match="class indices"):
        task.check_item(((torch.zeros(SEQ, dtype=torch.long),) * 2, torch.tensor(0.5)), "x")
    with pytest.raises(ModelError, match=">= 2 classes"):
        SentenceClassifier(copy.deepcopy(trained["model"].hf), 1)
    from lighten.llm.textclass import labeled_sentences_bundle

    with pytest.raises(DataError, match="own tokenizer"):
        labeled_sentences_bundle("r8", tokenizer="char", seq_len=SEQ)


def classify_recipe(world, **train) -> dict:
    """``lighten run``'s recipe: the tiny BERT + a head, trained as the baseline stage, then
    int8 and FFN pruning with layer-wise reconstruction (recipes/minilm_r8_classify.yaml)."""
    src = str(world["model"])
    return {"name": "tiny-classify", "model": {"hf": src},
            "data": {"name": "sentences", "corpus": "r8", "task": "text-classification",
                     "tokenizer": {"hf": src}, "seq_len": SEQ},
            "train": {"epochs": 2, "lr": 1e-3, "batch_size": 16, **train},
            "deploy": {"latency_runs": 3},
            "steps": [{"llm.encoder_prune": {"ffn": 0.25, "ffn_multiple": 8, "samples": 32}},
                      {"quant.dynamic": {}}]}


def test_lighten_run_trains_the_head_as_baseline_then_compresses(world, tmp_path):
    from lighten.cli.main import main

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(classify_recipe(world)))
    out = tmp_path / "run"
    assert main(["run", str(tmp_path / "r.yaml"), "--output", str(out), "--quiet"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["baseline", "llm.encoder_prune", "quant.dynamic"]
    base, pruned, int8 = rows
    notes = json.loads((out / "run.json").read_text())["notes"]
    assert any(n.startswith("baseline: trained here (2") for n in notes)  # not "pretrained"
    # the trained head separates the three topics; compression keeps the classifier's answers
    assert base["accuracy"] > 0.6 and base["agreement"] == 1.0
    assert pruned["params"] < base["params"] and pruned["agreement"] > 0.85
    assert int8["agreement"] > 0.85 and int8["accuracy"] >= base["accuracy"] - 0.15
    assert int8["bytes"] < pruned["bytes"] and int8.get("integer_ops")
    from lighten.artifact import load_artifact

    model, manifest = load_artifact(out / "stages" / "01-llm.encoder_prune.safetensors")
    assert manifest["task"]["kind"] == "text-classification"
    assert model.head.out_features == 3 and model.hf.encoder.layer[0].intermediate.dense \
        .out_features == 48


def test_recipe_baseline_is_the_probe_head_with_zero_epochs(world, tmp_path):
    """``train.epochs: 0``: the baseline is the frozen encoder with its probe head -- the same
    head fit_classifier_ gives from Python -- so the recipe and Python paths agree."""
    from lighten.baseline import prepare
    from lighten.llm.sources import build_hf
    from lighten.llm.textclass import SentenceClassifier, fit_classifier_
    from lighten.recipe import load_recipe

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(classify_recipe(world, epochs=0)))
    recipe = load_recipe(tmp_path / "r.yaml")
    prepared = prepare(recipe)
    assert prepared.baseline_source is None  # trained in the run, not "pretrained weights"
    data, model = prepared.data, prepared.model
    assert data.task.kind == "text-classification" and isinstance(model, SentenceClassifier)
    assert data.task.fit_baseline(model, data.train, recipe.train) == []
    ref = SentenceClassifier.from_encoder(build_hf(str(world["model"])), data.num_classes)
    fit_classifier_(ref, data.train, epochs=0)
    torch.testing.assert_close(model.head.weight, ref.head.weight)
    assert data.task.score(logits(model, data.test), data.test.labels) > 0.6


def test_recipe_errors_and_shipped_recipes(world):
    from lighten.data import DataSpec
    from lighten.errors import RecipeError
    from lighten.recipe import load_recipe

    with pytest.raises(ValueError, match="task: text-classification"):
        DataSpec(name="sentences", corpus="r8", task="language-model")
    from lighten.llm.sources import build_hf

    data = bundle(world)
    with pytest.raises(ModelError, match="linear head"):  # a bare encoder: nothing to classify
        data.task.fit_baseline(build_hf(str(world["model"])), data.train, None)
    from pathlib import Path

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    for name in ("minilm_r8.yaml", "minilm_r8_classify.yaml"):  # the shipped ones parse
        try:
            recipe = load_recipe(recipes / name)
        except RecipeError as err:
            pytest.fail(f"{name}: {err}")
        prune = [s for s in recipe.steps if s.name == "llm.encoder_prune"][0].config
        assert prune.ffn == 0.125 and prune.reconstruct and prune.distill is None
    assert load_recipe(recipes / "minilm_r8_classify.yaml").data.task.name == \
        "text-classification"
