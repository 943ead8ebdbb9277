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
