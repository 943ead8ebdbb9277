"""Tiny random transformers models saved as local folders (no download) for the llm tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife. However little known the feelings or views of "
        "such a man may be on his first entering a neighbourhood, this truth is so well fixed "
        "in the minds of the surrounding families, that he is considered the rightful "
        "property of some one or other of their daughters. ") * 12


def transformers():
    return pytest.importorskip("transformers")


def save_tokenizer(folder: Path, text: str = TEXT, vocab: int = 200) -> None:
    """A small byte-level BPE tokenizer trained on ``text``, saved as a fast tokenizer."""
    tf = transformers()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>"], show_progress=False))
    tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(folder)


def tiny_llama(folder: Path, *, layers: int = 2, hidden: int = 64, seed: int = 0,
               outliers: bool = True) -> Path:
    """A random 2-layer Llama (hidden 64, GQA 4 heads / 2 kv heads) with its tokenizer.

    ``outliers``: a few hidden channels get 20x norm weights, like the activation outliers of
    real LLMs (what AWQ and SmoothQuant are for)."""
    tf = transformers()
    folder.mkdir(parents=True, exist_ok=True)
    save_tokenizer(folder)
    vocab = len(tf.AutoTokenizer.from_pretrained(folder, local_files_only=True))
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 64,
                            num_hidden_layers=layers, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=256,
                            tie_word_embeddings=True)
    model = tf.LlamaForCausalLM(config)
    if outliers:
        with torch.no_grad():
            for layer in model.model.layers:
                for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                    norm.weight[:3] *= 20
    model.save_pretrained(folder)
    return folder


def tiny_bert(folder: Path, *, seed: int = 0) -> Path:
    tf = transformers()
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = tf.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=64)
    tf.BertModel(config).save_pretrained(folder)
    return folder


def write_text(path: Path, text: str = TEXT) -> Path:
    path.write_text(text)
    return path
