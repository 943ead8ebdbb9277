"""Inputs `make fuzz` (scripts/fuzz.py) found to break a loader, kept as tests."""

import io

import pytest
import torch

from lighten.errors import CheckpointError
from lighten.models import read_state_dict


def _set_encrypted_flag(data: bytes) -> bytes:
    """Every zip entry marked encrypted (general-purpose flag bit 0), in the local headers
    and in the central directory; nothing else changes."""
    out = bytearray(data)
    for signature, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (i := out.find(signature, start)) >= 0:
            out[i + flag_at] |= 0x1
            start = i + 4
    return bytes(out)


def test_zip_members_marked_encrypted_are_one_clear_error(tmp_path):
    """Found by the `weights` target: zipfile raised a bare RuntimeError ("password required
    for extraction") out of the pickle scanner."""
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer)
    path = tmp_path / "encrypted.pt"
    path.write_bytes(_set_encrypted_flag(buffer.getvalue()))
    with pytest.raises(CheckpointError, match="encrypted"):
        read_state_dict(path)


def test_manifest_giving_a_trainable_parameter_an_integer_dtype_is_one_clear_error(tmp_path):
    """Found by the `manifest` target: a manifest whose blob entry says int32 for a float
    parameter made load_artifact raise torch's bare RuntimeError ("data set to a tensor that
    requires gradients must be floating point")."""
    import json

    from reliability.artifacts import _read_manifest, _with_manifest, tiny_model

    from lighten.artifact import load_artifact, save_artifact

    good = tmp_path / "good.safetensors"
    save_artifact(tiny_model(), good, model_spec=None)
    manifest = _read_manifest(good)
    edited = json.loads(json.dumps(manifest))
    edited["blob"][1][1] = "int32"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(_with_manifest(good.read_bytes(), edited))
    with pytest.raises(CheckpointError, match="must be floating point"):
        load_artifact(bad)


def test_blob_index_with_a_dimension_past_int64_is_one_clear_error(tmp_path):
    """Found by the `manifest` target: a blob entry of shape [0, 2**63] (zero bytes, so the
    length check passed) made torch's reshape raise a bare TypeError (int64 overflow)."""
    import json

    from reliability.artifacts import _read_manifest, _with_manifest, tiny_model

    from lighten.artifact import load_artifact, save_artifact

    good = tmp_path / "good.safetensors"
    save_artifact(tiny_model(), good, model_spec=None)
    edited = json.loads(json.dumps(_read_manifest(good)))
    for shape in ([0, 2**63], [2**32, 2**32, 0]):  # the second: a dim product past int64
        edited["blob"][2][2] = shape
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(_with_manifest(good.read_bytes(), edited))
        with pytest.raises(CheckpointError):
            load_artifact(bad)


@pytest.mark.parametrize("key", ["function-", "function-after[x]", "Model", "literal['a']"])
def test_unknown_step_key_shaped_like_a_pydantic_tag_is_one_clear_error(key):
    """Found by the `recipe` target: an unknown key 'function-' was dropped from the error's
    path as if it were one of pydantic's validator tags, and the message builder raised an
    IndexError. The user's own key is always the last part of the path."""
    from lighten.errors import RecipeError
    from lighten.recipe import parse_recipe

    raw = {"name": "t", "model": {"zoo": "lenet5"}, "data": {"name": "digits"},
           "steps": [{"arch.fold": {key: None}}]}
    with pytest.raises(RecipeError, match="unknown key"):
        parse_recipe(raw, source="fuzz.yaml", base_dir=".")
