"""``model: {hf: ...}`` and ``tokenizer: {hf: ...}``: local transformers models (tiny, random,
built here from configs: nothing is downloaded), the text data they read and the perplexity
bookkeeping of the language-model task."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _llm_common import TEXT, tiny_bert, tiny_llama, write_text

from lighten.data import DataSpec, load_data
from lighten.errors import DataError, ModelError
from lighten.models import ModelSpec, build_model

pytest.importorskip("transformers")

SEQ = 16


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama") / "model")


def lm_data(folder: Path, text_path: Path, seq_len: int = SEQ):
    return load_data(DataSpec(name="text", path=str(text_path), tokenizer={"hf": str(folder)},
                              seq_len=seq_len))


def test_hf_folder_builds_a_causal_lm_with_its_tokenizer(llama, tmp_path):
    from lighten.data.text import Tokenizer
    from lighten.llm.sources import CausalLM

    data = lm_data(llama, write_text(tmp_path / "t.txt"))
    task = data.task
    assert task.tokenizer == {"kind": "hf", "source": str(llama)}
    tok = Tokenizer.from_description(task.tokenizer)  # the recorded tokenizer decodes again
    ids = tok.encode(TEXT)
    assert tok.decode(ids[:40]) == TEXT[: len(tok.decode(ids[:40]))]
    # windows: 90% / 10% of the tokens, non-overlapping seq_len + 1 windows, next-token targets
    cut = int(len(ids) * 0.9)
    assert len(data.train) == (cut - 1) // SEQ and len(data.test) == (len(ids) - cut - 1) // SEQ
    x, y = data.train[1]
    assert torch.equal(x, ids[SEQ:2 * SEQ]) and torch.equal(y, ids[SEQ + 1:2 * SEQ + 1])
    model = build_model(ModelSpec(hf=str(llama)), input_shape=data.input_shape,
                        num_classes=data.num_classes, task=task)
    assert isinstance(model, CausalLM) and not model.training
    with torch.no_grad():
        logits = model(x[None])
    assert logits.shape == (1, SEQ, task.vocab_size)


def test_perplexity_is_exp_of_the_mean_token_nll(llama, tmp_path):
    data = lm_data(llama, write_text(tmp_path / "t.txt"))
    model = build_model(ModelSpec(hf=str(llama)), input_shape=data.input_shape,
                        num_classes=data.num_classes, task=data.task)
    x = torch.stack([data.test[i][0] for i in range(len(data.test))])
    y = torch.stack([data.test[i][1] for i in range(len(data.test))])
    with torch.no_grad():
        out = model(x)
    nll = F.cross_entropy(out.reshape(-1, out.shape[-1]).double(), y.reshape(-1))
    metrics = data.task.metrics(out, y)
    assert metrics["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-9)
    # uniform logits: perplexity is exactly the vocabulary size
    uniform = data.task.metrics(torch.zeros_like(out), y)["perplexity"]
    assert uniform == pytest.approx(data.task.vocab_size, rel=1e-9)


def test_sources_resolve_folders_packages_and_gguf(tmp_path):
    from lighten.llm.sources import SentenceEncoder, build_hf, resolve

    pkg = tmp_path / "fake_model_pkg"  # a package that ships a sentence-transformers folder
    bert = tiny_bert(pkg / "model")
    (pkg / "__init__.py").write_text("")
    (bert / "modules.json").write_text('[{"type": "sentence_transformers.models.Normalize"}]')
    assert resolve(pkg).folder == bert  # the one nested folder with config.json + weights
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        assert resolve("fake-model-pkg").folder == bert  # an installed package, by its name
    finally:
        sys.path.remove(str(tmp_path))
    gguf_dir = tmp_path / "g"
    gguf_dir.mkdir()
    (gguf_dir / "m.Q4_1.gguf").write_bytes(b"GGUF")
    assert resolve(gguf_dir).gguf == "m.Q4_1.gguf"
    assert resolve(gguf_dir / "m.Q4_1.gguf").folder == gguf_dir.resolve()
    with pytest.raises(ModelError, match="neither a folder"):
        resolve("no-such-model-anywhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve(tmp_path / "empty")
    encoder = build_hf(str(pkg))  # not a language model: a sentence encoder
    assert isinstance(encoder, SentenceEncoder) and encoder.normalize
    ids = torch.randint(0, 120, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    with torch.no_grad():
        emb = encoder(ids, mask)
        alone = encoder(ids[:1, :5], mask[:1, :5])
    assert emb.shape == (3, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(3))
    assert torch.allclose(emb[:1], alone, atol=1e-5)  # padding is pooled out
    with pytest.raises(ModelError, match="kwargs"):
        build_hf(str(pkg), options={"weights_url": "x"})
    # two int64 inputs export to ONNX and run on ONNX Runtime like PyTorch
    from lighten.export import export_onnx
    from lighten.task import InputSpec

    specs = (InputSpec("ids", (10,), torch.int64, high=120),
             InputSpec("mask", (10,), torch.int64, high=2))
    check = export_onnx(encoder, tmp_path / "enc.onnx", inputs=specs, sample_inputs=(ids, mask))
    assert check.max_abs_diff < 1e-4


def test_bad_hf_specs_are_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="exactly one of"):
        ModelSpec(hf="x", zoo="lenet5")
    with pytest.raises(DataError, match="tokenizer"):
        load_data(DataSpec(name="text", path=str(write_text(tmp_path / "t.txt")),
                           tokenizer={"hf": str(tmp_path / "missing")}))
    with pytest.raises(ValueError, match="not both"):
        DataSpec(name="text", path="a.txt", corpus="austen")
    with pytest.raises(DataError, match="unknown corpus"):
        load_data(DataSpec(name="text", corpus="dickens", tokenizer="bytes"))


def test_austen_corpus_when_installed():
    pytest.importorskip("rdata")
    from lighten.llm.text import AUSTEN_DIR

    if not (AUSTEN_DIR / "Rdata.rdx").is_file():
        pytest.skip("r-cran-janeaustenr is not installed")
    data = load_data(DataSpec(name="text", corpus="austen/persuasion", tokenizer="bytes",
                              seq_len=256, limit_test=4))
    assert len(data.test) == 4 and data.task.vocab_size == 256
    assert bytes(data.train[0][0][:10].tolist()) == b"Persuasion"
    assert len(data.train) > 1500  # the whole novel: ~470k characters
