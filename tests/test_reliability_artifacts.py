"""Malformed safetensors files and artifacts: 0 crashes (only LightenErrors), 0 hangs, memory
bounded by the file, NaN/Inf weights refused; and good files round-trip bit for bit."""

from __future__ import annotations

import pytest
import torch
from reliability.artifacts import build_corpus, skeleton, tiny_model
from reliability.replay import replay_artifact, reset_peak

from lighten.artifact import load_artifact, save_artifact
from lighten.models import load_weights

MIB = 1 << 20
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("malformed"))


def test_corpus_size(corpus):
    assert len(corpus) >= 200


def test_no_crash_no_hang_bounded_memory(corpus):
    measured = reset_peak()
    bad = []
    for name, path in corpus:
        size = path.stat().st_size
        for outcome, peak in replay_artifact(path):
            if outcome.kind == "crashed" or outcome.seconds > 10:
                bad.append((name, outcome.entry, outcome.kind, outcome.message[:160]))
            if measured and peak > size + 64 * MIB:
                bad.append((name, outcome.entry, f"peak {peak // MIB} MiB", size))
    assert bad == []


def test_nonfinite_weights_are_refused_by_every_model_loader(corpus):
    cases = [(name, path) for name, path in corpus if name.startswith("weights-")]
    assert len(cases) == 18
    for name, path in cases:
        for outcome, _ in replay_artifact(path):
            if outcome.entry.startswith("load_") and (
                    name.endswith("/artifact") or outcome.entry == "load_weights"):
                assert outcome.kind == "refused", (name, outcome)
                assert "NaN" in outcome.message and "infinite" in outcome.message


def test_good_files_round_trip_bit_for_bit(tmp_path):
    """Every stored encoding of the corpus' base model (sparse float, packed and sparse-packed
    ints, an alias, the blob, dense), through a file and back."""
    model = tiny_model()
    path = tmp_path / "good.safetensors"
    save_artifact(model, path, model_spec=None)
    for loaded in (load_artifact(path)[0], load_artifact(path, model=skeleton())[0],
                   load_weights(skeleton(), path)):
        for key, value in model.state_dict().items():
            got = loaded.state_dict()[key]
            assert got.dtype == value.dtype and got.shape == value.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8),
                               value.reshape(-1).view(torch.uint8)), key
        assert loaded[4].weight is loaded[2].weight  # the alias stays tied
