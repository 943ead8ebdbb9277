"""The command line through main([...]): exit codes, one-line errors, real subcommands."""

import json
import textwrap

import pytest
import torch

from lighten.cli import main as cli_main
from lighten.cli.main import COMMANDS, main

TINY_MODEL = """
import torch
from torch import nn

class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:          # data-dependent: fx cannot trace this
            return x * 2
        return x

def build():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), Gate(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 4))

def plain():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 4))
"""


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(TINY_MODEL)
    return path


def test_help_exits_zero_and_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    assert main([command, "--help"]) == 0
    assert f"lighten {command}" in capsys.readouterr().out


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_run_missing_recipe_is_one_error_line(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert main(["run", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: ") and str(missing) in err[0]


def test_env_prints_versions_and_machine(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out and "logical_cores" in out
    assert main(["env", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["versions"]["torch"] == torch.__version__


def test_a_reader_that_stops_early_is_no_error():
    """`lighten env | head`: the closed pipe ends the command quietly, not as a lighten bug."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "lighten.cli", "env"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "error" not in err


def test_a_broken_pipe_of_the_commands_own_is_an_internal_error(monkeypatch, capsys):
    import lighten.cli.env as env

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")  # e.g. a worker's pipe, not stdout's

    monkeypatch.setattr(env, "run", broken)
    assert main(["env"]) == 1
    assert "internal error: BrokenPipeError" in capsys.readouterr().err


def test_check_python_model_shows_the_untraceable_module(model_file, capsys):
    assert main(["check", f"{model_file}:build", "--input-shape", "1,8,8"]) == 0
    out = capsys.readouterr().out
    gate = next(line for line in out.splitlines() if line.startswith("2 "))
    assert "Gate" in gate and "TraceError" in gate
    conv = next(line for line in out.splitlines() if line.startswith("0 "))
    assert "Conv2d" in conv and "because of `2`" in conv
    assert "traceable 0/5" in out and "4 classes" in out


def test_check_python_model_needs_input_shape(model_file, capsys):
    assert main(["check", f"{model_file}:build"]) == 2
    err = capsys.readouterr().err
    assert "--input-shape" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, needle", [
    (["check", "nosuchmodel"], "unknown model 'nosuchmodel'"),
    (["check", "lenet5", "--input-shape", "1,x,8"], "not a shape"),
    (["check", "missing.py:build", "--input-shape", "1,8,8"], "does not exist"),
    (["check", "gone.safetensors"], "does not exist"),
    (["report", "no/such/dir"], "no metrics"),
    (["export", "lenet300", "--input-shape", "1,8,8", "--onnx", "x.onnx", "--accuracy-level",
      "4"], "--accuracy-level applies to the --kv-cache decoder graph only"),
    (["analyze", "lenet300", "--input-shape", "1,8,8", "--sensitivity", "--max-drop", "0.1"],
     "add --target-sparsity S"),
])
def test_bad_input_exits_2_with_a_clear_message(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_an_onnx_file_given_for_an_artifact_is_named_as_such(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    assert main(["export", "lenet300", "--input-shape", "1,8,8", "--onnx", str(path)]) == 0
    capsys.readouterr()
    assert main(["verify", str(path)]) == 2
    assert "is an ONNX model, not a lighten artifact" in capsys.readouterr().err


def test_sensitivity_of_a_quantized_artifact_points_to_the_float_model(tmp_path, capsys):
    from lighten import compress
    from lighten.artifact import save_artifact
    from lighten.data import DataSpec, load_data
    from lighten.models import ZOO

    data = load_data(DataSpec(name="digits", limit_train=256, limit_test=64))
    model, _ = compress(ZOO["lenet300"](input_shape=(1, 8, 8)), {"quant.ptq": {
        "calib_samples": 64}}, data=data)
    path = tmp_path / "q.safetensors"
    save_artifact(model, path, model_spec={"zoo": "lenet300"}, input_shape=[1, 8, 8],
                  num_classes=10)
    assert main(["analyze", str(path), "--sensitivity", "--data", "digits"]) == 2
    assert "is quantized: sensitivity prunes float weights" in capsys.readouterr().err


def test_check_wrong_input_shape_names_the_shape(model_file, capsys):
    assert main(["check", f"{model_file}:plain", "--input-shape", "1,4,4"]) == 2
    assert "[1, 4, 4]" in capsys.readouterr().err


def test_export_writes_a_verified_onnx_file(model_file, tmp_path, capsys):
    onnx_path = tmp_path / "tiny.onnx"
    argv = ["export", f"{model_file}:plain", "--input-shape", "1,8,8", "--onnx", str(onnx_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert onnx_path.stat().st_size > 500
    assert "top-1 agreement 100.0%" in out


def test_measure_python_model_on_synthetic_data(model_file, capsys):
    argv = ["measure", f"{model_file}:plain", "--input-shape", "1,8,8", "--data", "synthetic",
            "--limit", "64", "--latency-runs", "3", "--no-robustness", "--json"]
    assert main(argv) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["params"] == 4 * 9 + 4 + 144 * 4 + 4
    assert row["macs"] == 4 * 6 * 6 * 9 + 144 * 4
    assert 0.0 <= row["accuracy"] <= 1.0 and row["latency_ms_b64"] > 0 and row["bytes"] > 0


def test_report_command_writes_files(tmp_path, capsys):
    row = {"stage": "baseline", "accuracy": 0.9, "bytes": 1000, "latency_ms_b64": 2.0}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    assert main(["report", str(tmp_path)]) == 0
    assert "baseline" in capsys.readouterr().out
    assert (tmp_path / "report.md").is_file() and (tmp_path / "report.html").is_file()


def test_unexpected_exception_is_an_internal_error(monkeypatch, capsys):
    from lighten.cli import env

    def boom(args):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(env, "run", boom)
    assert main(["env"]) == 1
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: kaboom" in err and "--debug" in err
    assert "Traceback" not in err
    assert main(["--debug", "env"]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert main(["env", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_interrupted_run_exits_130_and_mentions_resume(monkeypatch, capsys):
    from lighten.cli import run

    def interrupted(path, args):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "run_and_print", interrupted)
    assert main(["run", "recipe.yaml"]) == 130
    assert "--resume" in capsys.readouterr().err


def test_package_exports_main():
    assert cli_main is main


def test_run_tiny_recipe_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LIGHTEN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tiny.py").write_text(TINY_MODEL)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: cli-e2e
        model: {{python: tiny.py:plain, input_shape: [1, 8, 8]}}
        data: {{name: synthetic, samples: 256, input_shape: [1, 8, 8], num_classes: 4}}
        train: {{epochs: 2, lr: 0.01, batch_size: 32}}
        measure: {{robustness: false, eval_limit: 64}}
        deploy: {{backend: onnxruntime, latency_runs: 3}}
        output: {tmp_path / "out"}
        steps:
          - prune.magnitude: {{sparsity: 0.5}}
    """))
    assert main(["run", str(recipe), "--quiet"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[2].startswith("baseline") and lines[3].startswith("prune.magnitude")
    assert "report:" not in out and "note:" not in out  # --quiet: the table only
    assert (tmp_path / "out" / "report.html").is_file()
    # a second run into the same folder must be explicit
    assert main(["run", str(recipe), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["run", str(recipe), "--quiet", "--resume"]) == 0


def test_demo_recipe_is_packaged_and_valid():
    from lighten.cli.demo import demo_recipe_path
    from lighten.cli.main import build_parser
    from lighten.recipe import load_recipe

    recipe = load_recipe(demo_recipe_path())
    assert recipe.steps and recipe.name == "demo"
    assert build_parser().parse_args(["demo"]).output == "runs/demo"


def test_check_zoo_model_warns_when_random(capsys):
    from lighten.models import shipped_checkpoint

    assert main(["check", "lenet300", "--input-shape", "1,8,8"]) == 0
    captured = capsys.readouterr()
    assert "input [1, 8, 8], 10 classes" in captured.out
    assert "traceable 6/6" in captured.out and "quantizable 3/3" in captured.out
    assert "19.20k" in captured.out  # MACs of the first Linear: 64 inputs x 300 outputs
    if shipped_checkpoint("lenet300", "digits") is None:
        assert "warning: no shipped checkpoint for lenet300 on digits" in captured.err


def test_check_and_export_an_artifact(model_file, tmp_path, capsys):
    from lighten.artifact import save_artifact
    from lighten.cli.model_ref import resolve_model

    resolved = resolve_model(f"{model_file}:plain", input_shape=(1, 8, 8))
    path = tmp_path / "tiny.safetensors"
    save_artifact(resolved.model, path, model_spec=resolved.spec, input_shape=[1, 8, 8],
                  num_classes=4, meta={})
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "input [1, 8, 8], 4 classes" in out and "Conv2d" in out
    assert main(["check", str(path), "--weights", str(path)]) == 2
    assert "drop --weights" in capsys.readouterr().err


def test_a_token_model_given_a_float_shape_is_told_to_pass_its_text(tmp_path, capsys):
    (tmp_path / "lm.py").write_text(
        "from torch import nn\n\n\ndef build(vocab_size=32, seq_len=8):\n"
        "    return nn.Sequential(nn.Embedding(vocab_size, 16), nn.Linear(16, vocab_size))\n")
    assert main(["check", f"{tmp_path / 'lm.py'}:build", "--input-shape", "8"]) == 2
    assert "it takes token ids: pass --data corpus.txt" in capsys.readouterr().err
