"""Hostile weight files: every payload of the corpus through every command and API that reads
weights -- 0 executed, 0 crashes, one clear line each; and each barrier alone holds.

The corpus (tests/reliability/pickles.py) is live: a positive control checks that its payloads
do run under a plain ``torch.load(weights_only=False)`` in a child process.
"""

from __future__ import annotations

import io
import subprocess
import sys
import time

import pytest
import torch
from reliability.pickles import build_corpus, executed
from reliability.replay import entries, replay
from torch import nn

from lighten.cli.main import main
from lighten.errors import CheckpointError
from lighten.models import ModelSpec, build_model, load_weights, read_state_dict
from lighten.models.lenet import lenet5
from lighten.models.pickle_scan import UnsafePickle, scan_torch_file

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("hostile"))


def test_corpus_is_large_and_varied(corpus):
    assert len(corpus) >= 60
    kinds = {case.name.split("/", 1)[0] for case in corpus}
    assert {"bare", "zip", "legacy", "tar", "zip-torch.save", "legacy-torch.save"} <= kinds


def test_every_entry_point_refuses_every_case_in_one_line(corpus, tmp_path):
    bad = []
    for case in corpus:
        for outcome in replay(case.path, tmp_path / "work"):
            if outcome.kind != "refused" or outcome.seconds > 10:
                bad.append((case.name, outcome.entry, outcome.kind, outcome.message[:200]))
    time.sleep(0.5)  # an asynchronous payload (Popen, popen) would have created its file now
    assert executed(corpus) == []
    assert bad == []
    assert len(entries(tmp_path)) >= 11


def test_each_barrier_alone_stops_every_case(corpus):
    """The opcode scan refuses every file it is shown; torch's weights-only unpickler, on its
    own, runs none of them either (it is the second barrier, not the only one)."""
    passed_scan = []
    for case in corpus:
        try:
            scan_torch_file(case.path)
            passed_scan.append(case.name)
        except UnsafePickle:
            pass
        try:
            torch.load(case.path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - any refusal will do; running is what is checked
            pass
    time.sleep(0.5)
    assert executed(corpus) == []
    assert passed_scan == []


def test_corpus_payloads_are_live(corpus, tmp_path):
    """Positive control: unpickled without barriers (in a child process), payloads run."""
    sample = [c for c in corpus if c.name in (
        "bare/os.system", "zip/subprocess.call", "legacy/builtins.exec", "zip/functools.partial",
        "bare/getattr(__import__)", "zip-torch.save/optimizer-state/eval")]
    code = ("import sys, torch\nfor p in sys.argv[1:]:\n    try:\n"
            "        torch.load(p, weights_only=False)\n    except Exception:\n        pass\n")
    subprocess.run([sys.executable, "-c", code, *[str(c.path) for c in sample]], check=True,
                   capture_output=True, timeout=120)
    assert sorted(executed(sample)) == sorted(c.name for c in sample)
    for c in sample:
        c.canary.unlink()


def _checkpoints() -> dict[str, object]:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 1, 4, 4)).sum().backward()
    opt.step()
    dtypes = {f"t.{d}".replace("torch.", ""): torch.arange(6).to(d).reshape(2, 3)
              for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8,
                        torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
                        torch.complex64, torch.float8_e4m3fn)}
    return {"state_dict": model.state_dict(), "dtypes": dtypes,
            "training": {"model": model.state_dict(), "optimizer": opt.state_dict(),
                         "epoch": 3, "name": "run", "b": b"\x00\x01", "tags": {"a", "b"},
                         "view": torch.arange(10.0)[2:5], "t": torch.zeros(3, 4).t()},
            "parameters": {"w": nn.Parameter(torch.ones(2))}}


@pytest.mark.parametrize("legacy", [False, True])
def test_scan_accepts_what_torch_save_writes(tmp_path, legacy):
    """No false alarms: every tensor dtype, parameters, views and training checkpoints."""
    for name, obj in _checkpoints().items():
        path = tmp_path / f"{name}.pt"
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
        scan_torch_file(path)
        if name == "dtypes" and legacy:  # torch's own legacy reader fails on float8 storages
            obj = {k: v for k, v in obj.items() if "float8" not in k}
            torch.save(obj, path, _use_new_zipfile_serialization=False)
        if name in ("state_dict", "dtypes"):
            state = read_state_dict(path)
            assert all(torch.equal(state[k].reshape(-1).view(torch.uint8),
                                   v.reshape(-1).view(torch.uint8))
                       for k, v in obj.items() if isinstance(v, torch.Tensor))


def test_trust_is_the_one_opt_in(tmp_path):
    """A whole pickled model is refused, naming --trust; with trust it loads."""
    model = lenet5(num_classes=10, input_shape=(1, 28, 28))
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(CheckpointError, match="--trust") as err:
        load_weights(lenet5(num_classes=10, input_shape=(1, 28, 28)), path)
    assert "runs any code" in str(err.value) and "\n" not in str(err.value)
    other = load_weights(lenet5(num_classes=10, input_shape=(1, 28, 28)), path, trust=True)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(),
                                                 model.state_dict().values(), strict=True))
    err_out = io.StringIO()
    from contextlib import redirect_stderr, redirect_stdout

    with redirect_stderr(err_out), redirect_stdout(io.StringIO()):
        refused = main(["check", "lenet5", "--weights", str(path)])
        trusted = main(["check", "lenet5", "--weights", str(path), "--trust"])
    assert refused == 2 and trusted == 0
    assert "RUNS ANY CODE" in _help("check")
    spec = ModelSpec(zoo="lenet5", weights=str(path), trust_weights=True)  # recipe model: block
    built = build_model(spec, input_shape=(1, 28, 28), num_classes=10)
    assert torch.equal(built.state_dict()["features.0.weight"],
                       model.state_dict()["features.0.weight"])
    assert "trust_weights" not in ModelSpec(zoo="lenet5").model_dump(exclude_none=True)


def _help(command: str) -> str:
    out = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(out):
        main([command, "--help"])
    return " ".join(out.getvalue().split())
