"""`lighten verify`: every single-bit flip of a small artifact's data section, truncation, and a
run folder's damaged, missing and extra files are caught; intact files pass."""

from __future__ import annotations

import contextlib
import io
import struct

import pytest
import torch
from torch import nn

from lighten import runner
from lighten.artifact import save_artifact
from lighten.cli.main import main
from lighten.errors import CheckpointError
from lighten.recipe import load_recipe
from lighten.verify import verify_artifact, verify_run
from tests.test_runner import write_recipe


def _small_artifact(path, *, streams: int) -> tuple[bytes, int]:
    """An artifact of 1 stream (the blob of small tensors) or 2 (plus a 1028-byte tensor);
    returns its bytes and where its data section starts."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    if streams == 2:
        model.register_buffer("big", torch.randn(257))
    save_artifact(model, path, model_spec=None)
    data = path.read_bytes()
    return data, 8 + struct.unpack("<Q", data[:8])[0]


def _caught(path, data: bytes, byte: int, bit: int) -> bool:
    flipped = bytearray(data)
    flipped[byte] ^= 1 << bit
    path.write_bytes(bytes(flipped))
    try:
        verify_artifact(path)
    except CheckpointError:
        return True
    return False


def test_every_bit_flip_of_the_data_section_is_caught(tmp_path):
    path = tmp_path / "a.safetensors"
    data, start = _small_artifact(path, streams=1)
    assert verify_artifact(path) == 1
    missed = [(b, i) for b in range(start, len(data)) for i in range(8)
              if not _caught(path, data, b, i)]
    assert len(data) - start >= 140 and missed == []


def test_a_flip_in_every_byte_of_two_streams_is_caught(tmp_path):
    path = tmp_path / "b.safetensors"
    data, start = _small_artifact(path, streams=2)
    assert verify_artifact(path) == 2
    missed = [b for b in range(start, len(data)) if not _caught(path, data, b, b % 8)]
    assert missed == []


def test_truncation_and_missing_digests(tmp_path):
    path = tmp_path / "c.safetensors"
    data, start = _small_artifact(path, streams=2)
    for cut in (len(data) - 1, start + 5, start, start - 1, 9, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError):
            verify_artifact(path)
    path.write_bytes(data + b"\x00")
    with pytest.raises(CheckpointError):
        verify_artifact(path)


def _verify_cli(target) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["verify", str(target)])
    return code, out.getvalue() + err.getvalue()


def test_run_folder_damage_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTEN_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(write_recipe(tmp_path, steps="\n  - prune.magnitude: {sparsity: 0.5}\n"))
    runner.run_recipe(recipe, progress=False)
    out = tmp_path / "out"
    code, text = _verify_cli(out)
    assert code == 0 and text.startswith("ok:"), text
    stage = out / "stages" / "01-prune.magnitude.safetensors"
    good = stage.read_bytes()
    damaged = bytearray(good)
    damaged[-3] ^= 0x10
    stage.write_bytes(bytes(damaged))
    checked, problems = verify_run(out)
    assert any("01-prune.magnitude.safetensors" in p and "sha256" in p for p in problems)
    stage.write_bytes(good)
    metrics = out / "metrics.jsonl"
    rows = metrics.read_bytes()
    metrics.write_bytes(rows[:-10])
    assert verify_run(out)[1] == ["metrics.jsonl differs from the sha256 recorded in "
                                  "checksums.json"]
    metrics.write_bytes(rows)
    stage.unlink()
    problems = verify_run(out)[1]
    assert any("stages/01-prune.magnitude.safetensors is missing" in p for p in problems)
    stage.write_bytes(good)
    (out / "stages" / "02-extra.safetensors").write_bytes(good)
    code, text = _verify_cli(out)
    assert code == 2 and "stages/02-extra.safetensors is an extra file" in text
    (out / "stages" / "02-extra.safetensors").unlink()
    assert verify_run(out)[1] == []
