"""The CLI through the task: a language-model artifact from a recipe run is measured on a text
file (perplexity equal to the run's), exported (int64 token ids in, the task and the tokenizer in
the ONNX metadata) and checked; a ``file.py:factory`` language model built for ``--data`` text;
a two-input ``python:`` task artifact exported with two named inputs and measured on
``file.py:function`` data; and the one-line errors when model and data do not fit."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from lighten.cli import main
from lighten.recipe import parse_recipe
from lighten.runner import run_recipe
from tests.test_task_lm import PAIR_PY, SEQ, TASKS_PY, TINY_LM, write_corpus


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A tiny LM trained from a recipe on a text file, then quantized (quant.dynamic)."""
    tmp = tmp_path_factory.mktemp("lmcli")
    corpus = write_corpus(tmp / "corpus.txt", lines=300)
    recipe = {
        "name": "lm-cli",
        "model": {"python": f"{TINY_LM}:build", "input_shape": [SEQ],
                  "kwargs": {"dim": 16, "num_heads": 2, "layers": 1, "hidden": 32}},
        "data": {"name": "text", "path": str(corpus), "tokenizer": "char", "seq_len": SEQ},
        "train": {"epochs": 2, "lr": 0.01, "batch_size": 32},
        "deploy": {"latency_runs": 3},
        "steps": [{"quant.dynamic": {}}],
    }
    out = tmp / "run"
    run_recipe(parse_recipe(recipe), output=out, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stages = sorted((out / "stages").glob("*.safetensors"))
    return {"dir": tmp, "corpus": corpus, "rows": rows, "baseline": stages[0],
            "quant": stages[1]}


def test_measure_a_language_model_artifact_on_text(lm_run, capsys):
    argv = ["measure", str(lm_run["quant"]), "--data", str(lm_run["corpus"]), "--json",
            "--latency-runs", "3"]
    assert main(argv) == 0
    row = json.loads(capsys.readouterr().out)
    ran = lm_run["rows"][1]  # the same stage measured by the recipe run
    assert row["perplexity"] == pytest.approx(ran["perplexity"], rel=1e-4)
    assert row["accuracy"] == pytest.approx(ran["accuracy"], abs=1e-6)
    assert row["macs"] == ran["macs"] and row["latency_ms_b1"] > 0
    assert "robust_noise_acc" not in row  # probes perturb images, not token ids
    assert main(argv[:-3]) == 0  # the table form names perplexity
    assert "ppl" in capsys.readouterr().out


def test_export_a_language_model_writes_the_task_into_onnx(lm_run, capsys):
    path = lm_run["dir"] / "lm.onnx"
    assert main(["export", str(lm_run["quant"]), "--onnx", str(path)]) == 0
    out = capsys.readouterr().out
    assert "language model: token ids [32] int64" in out and "tokenizer: char" in out
    assert "input input: int64 ['batch', 32]" in out
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["lighten.task.kind"] == "language-model"
    task = json.loads(meta["lighten.task"])
    vocab = json.loads(meta["lighten.tokenizer"])["vocab"]
    assert task["seq_len"] == SEQ and task["vocab_size"] == len(vocab)
    assert json.loads(meta["lighten.inputs"]) == [
        {"name": "input", "shape": ["batch", SEQ], "dtype": "int64", "high": len(vocab)}]
    import onnxruntime as ort

    text = lm_run["corpus"].read_text()[:SEQ]  # the file alone says how to feed it
    ids = np.array([[vocab.index(c) for c in text]], dtype=np.int64)
    logits = ort.InferenceSession(str(path)).run(None, {"input": ids})[0]
    assert logits.shape == (1, SEQ, len(vocab))


def test_check_a_language_model_artifact(lm_run, capsys):
    assert main(["check", str(lm_run["baseline"])]) == 0
    out = capsys.readouterr().out
    assert "language model: token ids [32] int64, vocabulary" in out
    assert "Linear" in out and "Embedding" in out


def test_analyze_a_language_model_on_text(lm_run, tmp_path, capsys):
    argv = ["analyze", str(lm_run["baseline"]), "--sensitivity", "--data",
            str(lm_run["corpus"]), "--ratios", "0.5", "--limit", "8", "--output",
            str(tmp_path / "a")]
    assert main(argv) == 0
    csv = (tmp_path / "a" / "sensitivity.csv").read_text()
    assert "head" in csv and "0.5" in csv


def test_python_factory_language_model_built_for_the_text(lm_run, tmp_path, capsys):
    argv = ["measure", f"{TINY_LM}:build", "--input-shape", str(SEQ), "--data",
            str(lm_run["corpus"]), "--json", "--latency-runs", "3", "--limit", "4"]
    assert main(argv) == 0
    row = json.loads(capsys.readouterr().out)
    vocab = len(set(lm_run["corpus"].read_text()))
    assert 1 < row["perplexity"] < 10 * vocab  # untrained: near a uniform guess
    path = tmp_path / "f.onnx"
    argv = ["export", f"{TINY_LM}:build", "--input-shape", str(SEQ), "--data",
            str(lm_run["corpus"]), "--onnx", str(path)]
    assert main(argv) == 0
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["lighten.task"])["vocab_size"] == vocab


@pytest.mark.parametrize("extra, needle", [
    ([], "pass --data a text file"),
    (["--data", "digits"], "built-in datasets are for classifiers"),
    (["--data", "nosuch.txt"], "not an existing text file"),
])
def test_language_model_with_the_wrong_data_is_one_line(lm_run, extra, needle, capsys):
    assert main(["measure", str(lm_run["quant"]), "--latency-runs", "3", *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_text_the_model_cannot_read_is_one_line(lm_run, tmp_path, capsys):
    (tmp_path / "other.txt").write_text("ZZZ QQQ " * 200)  # characters outside the vocabulary
    argv = ["measure", str(lm_run["quant"]), "--data", str(tmp_path / "other.txt")]
    assert main(argv) == 2
    assert "not in the char vocabulary" in capsys.readouterr().err
    argv = ["measure", "lenet300", "--input-shape", "1,8,8", "--data", str(lm_run["corpus"])]
    assert main(argv) == 2
    assert "is text, for a language model; lenet300 is a classifier" in capsys.readouterr().err


def test_two_input_artifact_exports_and_measures(tmp_path, capsys, monkeypatch):
    from lighten.artifact import save_artifact
    from lighten.data import load_data
    from lighten.models import ModelSpec, build_model

    (tmp_path / "tasks.py").write_text(TASKS_PY)
    (tmp_path / "pair.py").write_text(PAIR_PY)
    monkeypatch.chdir(tmp_path)  # file.py:function paths as a user types them
    recipe = parse_recipe({
        "name": "pair", "model": {"python": "pair.py:build", "input_shape": [4]},
        "data": {"python": "pair.py:load",
                 "task": {"python": "tasks.py:make", "kwargs": {"classes": 3}}},
    }, base_dir=tmp_path)
    data = load_data(recipe.data)
    torch.manual_seed(0)
    model = build_model(ModelSpec(python=f"{tmp_path / 'pair.py'}:build", input_shape=[4]),
                        input_shape=(4,), num_classes=3, task=data.task)
    path = tmp_path / "pair.safetensors"
    save_artifact(model, path, model_spec={"python": f"{tmp_path / 'pair.py'}:build",
                                           "input_shape": [4]},
                  input_shape=[4], num_classes=3, task=data.task, meta={})
    onnx_path = tmp_path / "pair.onnx"
    assert main(["export", str(path), "--onnx", str(onnx_path)]) == 0
    out = capsys.readouterr().out
    assert "task pair: inputs a [4] float32, b [3] float32" in out
    proto = onnx.load(str(onnx_path))
    assert [i.name for i in proto.graph.input] == ["a", "b"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["lighten.task.kind"] == "pair"
    assert [i["name"] for i in json.loads(meta["lighten.inputs"])] == ["a", "b"]
    argv = ["export", str(path), "--onnx", str(onnx_path), "--data", "pair.py:load"]
    assert main(argv) == 0  # the count is of samples, not of the model's two inputs
    assert f"checked on {min(64, len(data.test))} real test samples" in capsys.readouterr().out
    argv = ["measure", str(path), "--data", "pair.py:load", "--json", "--latency-runs", "3"]
    assert main(argv) == 0
    row = json.loads(capsys.readouterr().out)
    assert 0 <= row["accuracy"] <= 1 and row["macs"] == 4 * 16 + 3 * 16 + 16 * 3
    assert row["latency_ms_b64"] > 0 and row["backend"] == "onnxruntime"
    assert main(["check", str(path)]) == 2
    assert "takes 2 (a, b)" in capsys.readouterr().err


def test_classifier_export_records_its_task(tmp_path, capsys):
    path = tmp_path / "c.onnx"
    assert main(["export", "lenet300", "--input-shape", "1,8,8", "--onnx", str(path)]) == 0
    assert "input [1, 8, 8], 10 classes" in capsys.readouterr().out
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["lighten.task"]) == {"kind": "classification",
                                                "input_shape": [1, 8, 8], "num_classes": 10}
    assert json.loads(meta["lighten.inputs"])[0]["shape"] == ["batch", 1, 8, 8]
    assert "lighten.tokenizer" not in meta
