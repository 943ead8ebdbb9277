"""An artifact's manifest can name code to build its model (``model_spec: {python: ...}``):
a hostile file could name any function on disk with arguments of its choosing. Such code runs
only behind ``trust=True`` / ``--trust``; zoo specs and this run's own stages need none."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lighten.artifact import load_artifact, save_artifact
from lighten.errors import UntrustedCodeError

MODEL_FILE = """
from pathlib import Path
import torch.nn as nn

Path({canary!r}).write_text("imported")  # runs when the file is imported

def build(num_classes=3, input_shape=(4,)):
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, num_classes))
"""


@pytest.fixture
def python_artifact(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    canary = tmp_path / "imported.canary"
    (tmp_path / "net.py").write_text(MODEL_FILE.format(canary=str(canary)))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    path = tmp_path / "net.safetensors"
    save_artifact(model, path, model_spec={"python": "net.py:build", "input_shape": [4]},
                  input_shape=[4], num_classes=3)
    canary.unlink(missing_ok=True)  # saving builds the source to record the edit log
    return path, model, canary


def _hostile(tmp_path, spec: dict) -> Path:
    """An artifact whose manifest names ``spec``: a valid file with only the manifest changed."""
    from reliability.artifacts import _with_manifest

    from lighten.artifact import _read_manifest

    good = tmp_path / "good.safetensors"
    save_artifact(nn.Linear(4, 3), good, model_spec={"zoo": "lenet5"}, input_shape=[4],
                  num_classes=3)
    manifest = {**_read_manifest(good), "model_spec": spec}
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(_with_manifest(good.read_bytes(), manifest))
    return path


LOAD = """
import sys
from lighten.artifact import load_artifact
from lighten.errors import UntrustedCodeError
try:
    load_artifact(sys.argv[1], trust=sys.argv[2] == "trust")
except UntrustedCodeError as err:
    print("REFUSED", err)
else:
    print("LOADED")
"""


def _load_in_fresh_process(path, trust: bool) -> str:
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", LOAD, str(path), "trust" if trust else "no"],
                         capture_output=True, text=True, cwd=path.parent, timeout=300,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    return out.stdout + out.stderr


def test_python_model_runs_only_when_trusted(python_artifact):
    path, model, canary = python_artifact
    out = _load_in_fresh_process(path, trust=False)
    assert out.startswith("REFUSED") and "net.py:build" in out and "--trust" in out, out
    assert not canary.exists()  # the file was not even imported
    assert _load_in_fresh_process(path, trust=True).startswith("LOADED")
    assert canary.exists()


def test_a_file_this_process_imported_is_its_own(python_artifact):
    """Written and reloaded in one session (save_artifact imported net.py): no trust needed."""
    path, model, _ = python_artifact
    loaded, _ = load_artifact(path)
    x = torch.randn(5, 4)
    torch.testing.assert_close(loaded(x), model(x))


def test_a_given_skeleton_needs_no_trust(python_artifact):
    path, model, canary = python_artifact
    loaded, _ = load_artifact(path, model=nn.Sequential(nn.Linear(4, 8), nn.ReLU(),
                                                        nn.Linear(8, 3)))
    x = torch.randn(5, 4)
    torch.testing.assert_close(loaded(x), model(x))
    assert not canary.exists()


def test_manifest_naming_a_library_function_is_refused(tmp_path):
    """subprocess.run(args=..., shell=True) from a manifest would be code execution."""
    canary = tmp_path / "pwned.canary"
    spec = {"python": f"{subprocess.__file__}:run", "input_shape": [4],
            "kwargs": {"args": f"touch {canary}", "shell": True}}
    path = _hostile(tmp_path, spec)
    with pytest.raises(UntrustedCodeError):
        load_artifact(path)
    assert not canary.exists()


def test_cli_refuses_in_one_line_and_trust_opts_in(python_artifact):
    path, _, canary = python_artifact
    root = Path(__file__).resolve().parents[1]
    argv = [sys.executable, "-m", "lighten.cli", "measure", str(path), "--data", "synthetic",
            "--backend", "torch", "--no-robustness", "--limit", "16"]
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    refused = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=path.parent,
                             timeout=300)
    err = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(err) == 1 and "--trust" in err[0], refused.stderr
    assert not canary.exists()
    trusted = subprocess.run(argv + ["--trust"], capture_output=True, text=True, env=env,
                             cwd=path.parent, timeout=300)
    assert trusted.returncode == 0, trusted.stderr
    assert canary.exists()


def test_zoo_artifacts_load_without_trust(tmp_path):
    from lighten.models import ModelSpec, build_model

    model = build_model(ModelSpec(zoo="lenet5"), input_shape=(1, 28, 28), num_classes=10)
    path = tmp_path / "lenet.safetensors"
    save_artifact(model, path, model_spec={"zoo": "lenet5"}, input_shape=[1, 28, 28],
                  num_classes=10)
    loaded, _ = load_artifact(path)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model.eval()(x))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))


def test_a_wrapped_backbone_from_a_file_is_checked_too(tmp_path):
    """dynamic.* wrappers record their backbone's spec in the edit log: the same gate holds,
    even when a skeleton is given for the top-level model."""
    from lighten.dynamic.gating import GatedModel

    canary = tmp_path / "pwned.canary"
    config = {"backbone_spec": {"python": f"{subprocess.__file__}:run", "input_shape": [4],
                                "kwargs": {"args": f"touch {canary}", "shell": True}},
              "chain": [], "gated": [], "input_shape": [4], "num_classes": 3}
    with pytest.raises(UntrustedCodeError, match="subprocess"):
        GatedModel.from_artifact(config)
    assert not canary.exists()
