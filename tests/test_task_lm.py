"""The task object: classification defaults, a language model from a text file through the
recipe runner (train, prune, quantize, perplexity everywhere, artifacts reload), a user task
from ``python:`` with a two-input model, and the errors a user meets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import TensorDataset

from lighten.data import DataBundle, DataSpec, bundle_from_datasets, load_data
from lighten.data.text import Tokenizer, load_text
from lighten.errors import DataError, LightenError, ModelError, RecipeError
from lighten.measure import count_macs
from lighten.models import ModelSpec, build_model
from lighten.recipe import parse_recipe
from lighten.runner import run_recipe
from lighten.step import StepContext
from lighten.task import ClassificationTask, LanguageModelTask, Task, make_task
from lighten.training import TrainConfig, evaluate

REPO = Path(__file__).resolve().parents[1]
TINY_LM = REPO / "recipes" / "tiny_lm.py"
SEQ = 32


def write_corpus(path: Path, lines: int = 600) -> Path:
    """A small made-up text with real structure: sentences over a 16-word vocabulary."""
    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog a cat sat on mat and ran far".split()
    text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))) + "."
                     for _ in range(lines))
    path.write_text(text)
    return path


def lm_recipe(tmp: Path, steps: list, *, name: str = "tiny-lm") -> dict:
    return {
        "name": name,
        "model": {"python": f"{TINY_LM}:build", "input_shape": [SEQ],
                  "kwargs": {"dim": 32, "num_heads": 4, "layers": 2, "hidden": 64}},
        "data": {"name": "text", "path": str(tmp / "corpus.txt"), "tokenizer": "char",
                 "seq_len": SEQ},
        "train": {"epochs": 4, "lr": 0.005, "batch_size": 32},
        "deploy": {"latency_runs": 3},
        "steps": steps,
    }


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    write_corpus(tmp / "corpus.txt")
    return tmp


@pytest.fixture(autouse=True)
def _cache(lm_dir, monkeypatch):
    monkeypatch.setenv("LIGHTEN_CACHE", str(lm_dir / "cache"))  # one baseline for all LM runs


# ----------------------------------------------------------------------------- classification


def test_classification_is_the_default_task():
    x, y = torch.randn(20, 1, 8, 8), torch.arange(20) % 4
    bundle = bundle_from_datasets(TensorDataset(x, y), TensorDataset(x, y))
    task = bundle.task
    assert isinstance(task, ClassificationTask)
    assert task.input_shape == (1, 8, 8) and task.num_classes == 4
    (ex,) = task.example_inputs(3)
    assert ex.shape == (3, 1, 8, 8) and ex.dtype == torch.float32
    logits = torch.randn(20, 4)
    assert torch.equal(task.loss(logits, y), F.cross_entropy(logits, y))
    metrics = task.metrics(logits, y)
    assert list(metrics)[0] == "accuracy" and "macro_f1" in metrics
    assert metrics["accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert task.agreement(logits, logits) == 1.0
    task.check_outputs(torch.zeros(2, 4), 2)
    with pytest.raises(ModelError, match=r"expected logits \(2, 4\)"):
        task.check_outputs(torch.zeros(2, 5), 2)
    # a bundle made by hand follows its own input_shape / num_classes
    hand = DataBundle("d", None, None, (1, 8, 8), 10)
    hand.num_classes = 3
    assert hand.task.num_classes == 3
    ctx = StepContext(data=bundle, train_config=TrainConfig(), baseline=None, workdir=Path("."))
    assert ctx.task is task
    assert ctx.example_input(2).shape == (2, 1, 8, 8)
    assert [t.shape for t in ctx.example_inputs(2)] == [(2, 1, 8, 8)]
    xb, yb = next(ctx.labelled_batches(8, batch_size=8))
    assert xb.shape == (8, 1, 8, 8) and yb.shape == (8,)


# ----------------------------------------------------------------------------- text data


def test_text_data_windows_and_tokenizers(lm_dir):
    bundle = load_data(DataSpec(name="text", path=str(lm_dir / "corpus.txt"), seq_len=SEQ))
    task = bundle.task
    assert isinstance(task, LanguageModelTask) and task.seq_len == SEQ
    vocab = task.tokenizer["vocab"]
    assert task.vocab_size == len(vocab) == bundle.num_classes and bundle.input_shape == (SEQ,)
    x, y = bundle.train[0]
    assert x.dtype == torch.int64 and x.shape == (SEQ,) and torch.equal(x[1:], y[:-1])
    text = (lm_dir / "corpus.txt").read_text()
    tok = Tokenizer("char", vocab)
    assert tok.decode(x) == text[:SEQ]  # the first window is the start of the text
    # the last 10% is test, deterministic
    again = load_data(DataSpec(name="text", path=str(lm_dir / "corpus.txt"), seq_len=SEQ))
    assert torch.equal(again.test[0][0], bundle.test[0][0])
    assert tok.decode(bundle.test[0][0]) == text[int(len(text) * 0.9):][:SEQ]
    train, test, btok = load_text(lm_dir / "corpus.txt", tokenizer="bytes", seq_len=16)
    assert btok.vocab_size == 256 and bytes(train[0][0].tolist()).decode() == text[:16]


def test_text_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(DataSpec(name="text", path=str(tmp_path / "nope.txt")))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="is empty"):
        load_data(DataSpec(name="text", path=str(tmp_path / "empty.txt")))
    (tmp_path / "short.txt").write_text("hello world")
    with pytest.raises(DataError, match="not more than seq_len 128"):
        load_data(DataSpec(name="text", path=str(tmp_path / "short.txt")))
    (tmp_path / "mid.txt").write_text("abcdefgh" * 30)  # 240 tokens: test part 24 < 129
    with pytest.raises(DataError, match="test part .* holds no window"):
        load_data(DataSpec(name="text", path=str(tmp_path / "mid.txt"), seq_len=128))
    with pytest.raises(Exception, match="needs path"):
        DataSpec(name="text")
    with pytest.raises(RecipeError, match="data.task is for python: data"):
        parse_recipe({"name": "x", "model": {"zoo": "lenet5"},
                      "data": {"name": "digits", "task": "language-model"}})


# ----------------------------------------------------------------------------- the LM recipe


def test_tiny_lm_trained_pruned_quantized_with_perplexity(lm_dir):
    from lighten.artifact import load_artifact

    out = lm_dir / "run-a"
    steps = [{"prune.magnitude": {"sparsity": 0.5, "finetune": {"epochs": 1}}},
             {"quant.dynamic": {}}]
    result = run_recipe(parse_recipe(lm_recipe(lm_dir, steps)), output=out, overwrite=True,
                        progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["baseline", "prune.magnitude", "quant.dynamic"]
    base = rows[0]
    vocab = json.loads((out / "run.json").read_text())["recipe"]["data"]  # recorded spec
    assert vocab["tokenizer"] == "char"
    for r in rows:  # every row: perplexity, next-token accuracy, and the usual keys
        assert r["perplexity"] > 1 and 0 < r["accuracy"] < 1
        assert r["macs"] > 0 and r["latency_ms_b1"] > 0 and "robust_noise_acc" not in r
    # it learned: a uniform guess over ~20 characters has perplexity ~20
    assert base["perplexity"] < 6 and base["accuracy"] > 0.35
    assert rows[1]["perplexity"] < 1.5 * base["perplexity"]
    assert rows[2]["perplexity"] < 1.5 * base["perplexity"]
    assert rows[2]["agreement"] > 0.7 and rows[2]["bytes"] < base["bytes"] / 2
    assert any("robustness probes skipped" in n for n in result.notes)
    report = (out / "report.md").read_text()
    assert "ppl" in report and f"{rows[1]['perplexity']:.3f}" in report
    assert (out / "plots" / "perplexity_vs_bytes.png").is_file()
    # artifacts reload (into the recipe's model) and compute what was measured
    data = load_data(DataSpec(name="text", path=str(lm_dir / "corpus.txt"), seq_len=SEQ))
    spec = ModelSpec(python=f"{TINY_LM}:build", input_shape=[SEQ],
                     kwargs={"dim": 32, "num_heads": 4, "layers": 2, "hidden": 64})
    ids = torch.stack([data.test[i][0] for i in range(4)])
    for path in sorted((out / "stages").glob("*.safetensors")):
        model, manifest = load_artifact(path, model=build_model(
            spec, input_shape=(SEQ,), num_classes=data.num_classes, task=data.task))
        assert manifest["meta"]["task"]["kind"] == "language-model"
        with torch.no_grad():
            assert model.eval()(ids).shape == (4, SEQ, data.task.vocab_size)
    assert (out / "deploy" / "quant.dynamic" / "model.onnx").is_file()


def test_tiny_lm_heads_and_static_int8(lm_dir):
    out = lm_dir / "run-b"
    steps = [{"prune.heads": {"ratio": 0.5, "importance": "taylor"}}, {"quant.ptq": {}}]
    run_recipe(parse_recipe(lm_recipe(lm_dir, steps)), output=out, overwrite=True,
               progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    base, heads, ptq = rows
    assert heads["macs"] < base["macs"] and heads["params"] < base["params"]
    for r in (heads, ptq):
        assert r["perplexity"] < 2 * base["perplexity"]
    assert ptq["perplexity"] < 1.1 * heads["perplexity"]
    assert ptq.get("integer_ops")  # ONNX Runtime runs integer kernels on the token model


def test_lm_model_factory_and_output_check(lm_dir, tmp_path):
    task = LanguageModelTask(vocab_size=20, seq_len=SEQ)
    spec = ModelSpec(python=f"{TINY_LM}:build", input_shape=[SEQ], kwargs={"dim": 16})
    model = build_model(spec, input_shape=(SEQ,), num_classes=20, task=task)
    assert model.head.out_features == 20 and model.pos.num_embeddings == SEQ
    (ids,) = task.example_inputs(2)
    assert ids.dtype == torch.int64 and count_macs(model, task) > 0
    assert count_macs(model, ids) == count_macs(model, task)
    (tmp_path / "bad.py").write_text(
        "import torch\n"
        "def build(vocab_size, seq_len):\n"
        "    return torch.nn.Sequential(torch.nn.Embedding(vocab_size, 8),\n"
        "                               torch.nn.Flatten(), torch.nn.LazyLinear(vocab_size))\n")
    with pytest.raises(ModelError, match=r"expected next-token logits \(2, 32, 20\)"):
        build_model(ModelSpec(python=f"{tmp_path / 'bad.py'}:build", input_shape=[SEQ]),
                    input_shape=(SEQ,), num_classes=20, task=task)
    # metrics: perplexity is exp(mean token NLL); a perfect model has perplexity 1
    targets = torch.randint(0, 20, (3, SEQ))
    perfect = F.one_hot(targets, 20).float() * 50
    metrics = task.metrics(perfect, targets)
    assert list(metrics) == ["perplexity", "accuracy"]
    assert metrics["perplexity"] == pytest.approx(1.0) and metrics["accuracy"] == 1.0
    uniform = task.metrics(torch.zeros(3, SEQ, 20), targets)["perplexity"]
    assert uniform == pytest.approx(20.0)
    assert task.agreement(perfect, task.reference(perfect)) == 1.0
    from lighten.recipe import load_recipe

    shipped = load_recipe(REPO / "recipes" / "tiny_lm.yaml")  # the example recipe parses
    assert shipped.data.name == "text" and shipped.model.input_shape == [shipped.data.seq_len]


# ----------------------------------------------------------------------------- python: task


TASKS_PY = '''
import torch
import torch.nn.functional as F
from lighten.task import InputSpec, Task


class PairTask(Task):
    """Two float inputs (a 4-vector and a 3-vector) -> one of 3 classes."""
    kind = "pair"

    def __init__(self, classes=3):
        self.classes = classes
        self.inputs = (InputSpec("a", (4,)), InputSpec("b", (3,)))

    @property
    def num_classes(self):
        return self.classes

    def loss(self, outputs, targets, *, label_smoothing=0.0):
        return F.cross_entropy(outputs, targets, label_smoothing=label_smoothing)

    def metrics(self, outputs, targets):
        return {"accuracy": float((outputs.argmax(-1) == targets).float().mean())}


def make(**kwargs):
    return PairTask(**kwargs)


def not_a_task():
    return 42
'''

PAIR_PY = '''
import torch
from torch import nn
from torch.utils.data import Dataset


class Pairs(Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.a, self.b = torch.randn(n, 4, generator=g), torch.randn(n, 3, generator=g)
        self.y = (self.a[:, 0] + self.b[:, 0] > 0).long() + (self.a[:, 1] > 1).long()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return (self.a[i], self.b[i]), self.y[i]


def load():
    return Pairs(256, 0), Pairs(64, 1)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fa, self.fb = nn.Linear(4, 16), nn.Linear(3, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, a, b):
        return self.head(torch.relu(self.fa(a) + self.fb(b)))


def build():
    return TwoInputs()
'''


def test_python_task_with_a_two_input_model(tmp_path):
    (tmp_path / "tasks.py").write_text(TASKS_PY)
    (tmp_path / "pair.py").write_text(PAIR_PY)
    recipe = {
        "name": "pair",
        "model": {"python": "pair.py:build", "input_shape": [4]},
        "data": {"python": "pair.py:load", "task": {"python": "tasks.py:make",
                                                     "kwargs": {"classes": 3}}},
        "train": {"epochs": 3, "lr": 0.01, "batch_size": 32},
        "deploy": {"latency_runs": 3},
        "steps": [{"prune.magnitude": {"sparsity": 0.3}}],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    from lighten.recipe import load_recipe

    result = run_recipe(load_recipe(tmp_path / "r.yaml"), output=tmp_path / "out",
                        progress=False)
    base, pruned = result.rows
    assert base["accuracy"] > 0.6 and pruned["accuracy"] > 0.5
    assert base["macs"] == 4 * 16 + 3 * 16 + 16 * 3 and base["latency_ms_b64"] > 0
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["recipe"]["data"]["task"]["python"].endswith("tasks.py:make")
    import onnx

    graph = onnx.load(str(tmp_path / "out" / "deploy" / "baseline" / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["a", "b"]
    # evaluate through the task on a dataset of pairs
    data = load_data(parse_recipe(recipe, base_dir=tmp_path).data)
    assert isinstance(data.task, Task) and data.task.describe()["kind"] == "python"
    model = build_model(ModelSpec(python=f"{tmp_path / 'pair.py'}:build", input_shape=[4]),
                        input_shape=(4,), num_classes=3, task=data.task)
    assert 0 <= evaluate(model, data.test, task=data.task) <= 1


def test_bad_tasks_are_one_clear_error(tmp_path):
    (tmp_path / "tasks.py").write_text(TASKS_PY)
    with pytest.raises(DataError, match="returned int; it must return a lighten.task.Task"):
        make_task(python=f"{tmp_path / 'tasks.py'}:not_a_task")
    with pytest.raises(DataError, match="has no function 'nope'"):
        make_task(python=f"{tmp_path / 'tasks.py'}:nope")
    with pytest.raises(DataError, match="rejected"):
        make_task(name="language-model", kwargs={"vocab": 3})
    with pytest.raises(RecipeError, match="task"):
        parse_recipe({"name": "x", "model": {"zoo": "lenet5"},
                      "data": {"python": "d.py:f", "task": "regression"}})
    with pytest.raises(RecipeError, match="exactly one of 'name'"):
        parse_recipe({"name": "x", "model": {"zoo": "lenet5"},
                      "data": {"python": "d.py:f", "task": {"kwargs": {}}}})
    # python data declared a language model but gives float inputs
    (tmp_path / "floats.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "def load():\n    d = TensorDataset(torch.randn(8, 5), torch.zeros(8, 5).long())\n"
        "    return d, d\n")
    spec = DataSpec(python=f"{tmp_path / 'floats.py'}:load", task="language-model")
    with pytest.raises(DataError, match="int64"):
        load_data(spec)
    assert issubclass(DataError, LightenError)


def test_python_lm_data_infers_vocab_and_seq_len(tmp_path):
    (tmp_path / "ids.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "def load():\n"
        "    ids = torch.arange(10 * 9).reshape(10, 9) % 7\n"
        "    d = TensorDataset(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())\n"
        "    return d, d\n")
    data = load_data(DataSpec(python=f"{tmp_path / 'ids.py'}:load", task="language-model"))
    assert isinstance(data.task, LanguageModelTask)
    assert (data.task.vocab_size, data.task.seq_len) == (7, 8)
    assert data.input_shape == (8,) and data.num_classes == 7
