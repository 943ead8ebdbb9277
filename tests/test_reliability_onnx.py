"""Hostile ONNX and paths: external data that escapes the model's folder is never read, and
`lighten export` writes the one file it was pointed at and nothing else."""

from __future__ import annotations

import contextlib
import io

import pytest
from reliability.onnx_paths import build_corpus

from lighten.backends import get_backend
from lighten.cli.main import main
from lighten.errors import BackendError


def test_external_data_outside_the_folder_is_refused(tmp_path):
    """lighten opens user ONNX files only through compile_file (Python API)."""
    cases = build_corpus(tmp_path)
    assert len(cases) == 4
    backend = get_backend("onnxruntime", threads=1)
    for name, path in cases:
        with pytest.raises(BackendError) as err:
            backend.compile_file(path, input_shape=(4,))
        text = str(err.value).lower()
        assert "\n" not in text and ("escapes" in text or "absolute path" in text), (name, text)


def test_export_writes_only_where_it_is_pointed(tmp_path):
    target = tmp_path / "out" / "sub" / "m.onnx"
    (tmp_path / "elsewhere").mkdir()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(["export", "lenet5", "--onnx", str(target), "--no-verify"])
    assert code == 0
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
                     if p.is_file())
    assert written == ["out/sub/m.onnx"]
