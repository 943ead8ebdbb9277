"""The ``text-classification`` task (lighten.llm.textclass) on a tiny random BERT and made-up
Reuters-like ``.tab`` files (helpers of test_llm_embedding): a probe-initialised head, a short
fine-tune, then int8 and structured pruning through ``lighten.compress``."""

from __future__ import annotations

import copy

import pytest
import torch

from lighten.errors import DataError, ModelError

pytest.importorskip("transformers")
pytest.importorskip("sklearn")

from test_llm_embedding import SEQ, tiny_encoder, write_tab  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("textclass")
    tab = tmp / "tab"
    tab.mkdir()
    write_tab(tab, "train", 96, 1)
    write_tab(tab, "test", 48, 2)
    return {"tab": tab, "model": tiny_encoder(tmp / "bert", layers=2, init=0.02), "tmp": tmp}


@pytest.fixture(autouse=True)
def _tab_env(world, monkeypatch):
    monkeypatch.setenv("LIGHTEN_ORANGE_TEXT", str(world["tab"]))
    monkeypatch.setenv("LIGHTEN_CACHE", str(world["tmp"] / "cache"))


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
