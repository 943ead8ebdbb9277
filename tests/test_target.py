"""The deployment target is an input: ``deploy: {cpu: ...}`` decides round_to: auto and the int8
weight range whatever machine runs the step; latency measured elsewhere says so."""

import json
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lighten.backends import BACKENDS, check_backend
from lighten.errors import RecipeError
from lighten.recipe import load_recipe, parse_recipe
from lighten.registry import get_step
from lighten.target import CPU_CHOICES, CPUS, Target, cpu_class, this_machine_cpu

BASE = {"name": "t", "model": {"zoo": "lenet5"}, "data": {"name": "synthetic"}}


def _deploy(**deploy):
    return parse_recipe({**BASE, "deploy": deploy}).deploy


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 48, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(48, 40, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(40, 4)).eval()


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 4)).eval()


def _context(target: Target):
    from lighten.data import bundle_from_datasets
    from lighten.step import StepContext
    from lighten.training import TrainConfig

    g = torch.Generator().manual_seed(1)
    ds = TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 4, (64,),
                                                                            generator=g))
    return StepContext(data=bundle_from_datasets(ds, ds, name="tiny"),
                       train_config=TrainConfig(lr=1e-2, batch_size=32), baseline=None,
                       workdir=None, progress=False, target=target)


def _widths(model):
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


# ------------------------------------------------------------------------------ the target


@pytest.mark.parametrize(("flags", "machine", "cpu"), [
    ({"avx2", "avx512f", "avx512_vnni", "amx_int8"}, "x86_64", "amx"),
    ({"avx2", "avx512f", "avx512_vnni", "avx_vnni"}, "x86_64", "avx512_vnni"),
    ({"avx2", "avx512f"}, "x86_64", "avx512"),
    ({"avx2", "avx_vnni"}, "x86_64", "avx2_vnni"),
    ({"avx2"}, "x86_64", "avx2"),
    ({"sse4_2"}, "x86_64", "avx2"),  # older x86: same 8-block, same u8 x s8 saturation
    (None, "AMD64", "avx2"),  # flags unreadable: the conservative x86 choice
    ({"neon", "asimd"}, "aarch64", "generic"),
])
def test_cpu_class_from_flags(flags, machine, cpu):
    assert cpu_class(flags, machine) == cpu


@pytest.mark.parametrize(("cpu", "block", "vnni", "reduce"), [
    ("generic", 8, False, False),
    ("avx2", 8, False, True),
    ("avx2_vnni", 8, True, False),
    ("avx512", 16, False, True),
    ("avx512_vnni", 16, True, False),
    ("amx", 16, True, False),  # amx implies avx512_vnni
])
def test_target_facts(cpu, block, vnni, reduce):
    target = Target(cpu=cpu)
    assert (target.simd_channel_block, target.has_vnni, target.reduce_range) == (block,
                                                                                 vnni, reduce)
    assert target.to_dict()["cpu"] == cpu
    assert set(CPUS) == set(CPU_CHOICES) - {"auto"}


def test_auto_resolves_to_this_machine_and_from_deploy_reads_the_recipe():
    assert Target(cpu="auto").cpu == this_machine_cpu() == Target.this_machine().cpu
    target = Target.from_deploy(_deploy(backend="torch", cpu="avx2", threads=2))
    assert target == Target(backend="torch", cpu="avx2", threads=2)
    assert Target.from_deploy(_deploy()).cpu == this_machine_cpu()
    with pytest.raises(RecipeError, match="deploy.cpu: Input should be one of: auto, generic"):
        Target(cpu="avx1024")


def test_latency_note_only_when_target_cpu_differs_from_the_measuring_machine():
    assert Target(cpu="avx2").latency_note(Target(cpu="avx2")) is None
    note = Target(cpu="avx2").latency_note(Target(cpu="avx512_vnni"))
    assert note.startswith("latency measured on avx512_vnni, target avx2")


# ------------------------------------------------------------------------------ the recipe


@pytest.mark.parametrize(("value", "hint"), [("avx3", "did you mean 'avx2'?"),
                                             ("avx512vnni", "did you mean 'avx512_vnni'?"),
                                             ("arm", "")])
def test_bad_cpu_is_one_line_naming_the_allowed_values(value, hint):
    with pytest.raises(RecipeError) as err:
        _deploy(cpu=value)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("<dict>: deploy.cpu: Input should be one of: "
                              + ", ".join(CPU_CHOICES))
    assert hint in message and repr(value) in message


def test_recipe_accepts_exactly_the_backends_table():
    from lighten.quant.ptq import PTQConfig

    for name in BACKENDS:
        assert _deploy(backend=name).backend == name
        assert PTQConfig(backend=name).backend == name
        assert check_backend(name) == name
    for wrong, hint in (("onnxrt", "did you mean 'onnxruntime'?"), ("tpu", "")):
        with pytest.raises(RecipeError, match="deploy.backend: Input should be one of: "
                           + ", ".join(BACKENDS)) as err:
            _deploy(backend=wrong)
        assert hint in str(err.value)
        with pytest.raises(RecipeError, match="quant.ptq: backend: Input should be one of"):
            parse_recipe({**BASE, "steps": [{"quant.ptq": {"backend": wrong}}]})


def test_cli_measure_offers_the_backends_table():
    import argparse

    from lighten.cli import measure

    parser = argparse.ArgumentParser()
    measure.add_arguments(parser)
    action = next(a for a in parser._actions if a.dest == "backend")
    assert tuple(action.choices) == tuple(BACKENDS)


# ------------------------------------------------------------------------------ the steps


@pytest.mark.parametrize(("cpu", "block"), [("avx2", 8), ("avx512", 16), ("avx512_vnni", 16)])
def test_round_to_auto_follows_the_target_whatever_this_machine_is(cpu, block):
    target = Target.from_deploy(_deploy(cpu=cpu))
    model = _cnn()
    config = get_step("prune.channels").config_type(ratio=0.4, round_to="auto")
    ctx = _context(target)
    get_step("prune.channels").apply(model, config, ctx)
    widths = _widths(model)
    assert all(w % block == 0 for w in widths) and widths != [48, 40], widths
    if block == 8:
        assert any(w % 16 for w in widths), widths  # the narrower block is really used
    assert any(f"multiples of {block} channels (target cpu {cpu})" in n for n in ctx.notes)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 4)


def _weight_codes(model) -> list[int]:
    """Largest |int8 weight code| of each quantized layer."""
    return [int(m.weight_int.abs().max()) for m in model.modules() if hasattr(m, "weight_int")]


@pytest.mark.parametrize(("cpu", "limit"), [("avx2", 63), ("avx512", 63), ("avx512_vnni", 127),
                                            ("amx", 127), ("generic", 127)])
@pytest.mark.parametrize("step", ["quant.ptq", "quant.dynamic"])
def test_reduce_range_follows_the_target(step, cpu, limit):
    model = _cnn() if step == "quant.ptq" else _mlp()
    config = get_step(step).config_type(**({"calib_samples": 32} if step == "quant.ptq" else {}))
    get_step(step).apply(model, config, _context(Target(cpu=cpu)))
    codes = _weight_codes(model)
    assert codes and max(codes) == limit, codes  # symmetric per channel: the extreme is used


def test_library_verbs_take_a_target():
    from lighten.quant.dynamic import quantize_dynamic_
    from lighten.quant.qat import QATConfig, prepare_qat

    narrow = quantize_dynamic_(_mlp(), target=Target(cpu="avx2"))
    wide = quantize_dynamic_(_mlp(), target=Target(cpu="avx512_vnni"))
    assert max(_weight_codes(narrow)) == 63 and max(_weight_codes(wide)) == 127
    batches = [torch.randn(16, 1, 8, 8)]
    cfg = QATConfig(weight_bits=8, finetune={"epochs": 1})
    qat = prepare_qat(_cnn(), batches, cfg, target=Target(cpu="avx2"))
    assert all(m.reduce_range for m in qat.modules() if hasattr(m, "weight_quant"))
    qat = prepare_qat(_cnn(), batches, cfg, target=Target(cpu="amx"))
    assert not any(m.reduce_range for m in qat.modules() if hasattr(m, "weight_quant"))


# ------------------------------------------------------------------------------ the runner

MODELS = """
from torch import nn


def cnn():
    return nn.Sequential(nn.Conv2d(1, 48, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(48, 40, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(40, 4))
"""


def test_recipe_target_reaches_steps_run_json_and_notes(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTEN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "models.py").write_text(MODELS)
    out = tmp_path / "run"
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(f"""
        name: target
        model: {{python: models.py:cnn, input_shape: [1, 8, 8]}}
        data: {{name: synthetic, samples: 128, input_shape: [1, 8, 8], num_classes: 4}}
        train: {{epochs: 1, lr: 0.01, batch_size: 32}}
        measure: {{robustness: false, eval_limit: 32}}
        deploy: {{backend: onnxruntime, cpu: avx2, latency_runs: 3}}
        output: {out}
        steps:
          - prune.channels: {{ratio: 0.4, round_to: auto}}
    """))
    from lighten.runner import run_recipe

    run_recipe(load_recipe(path), progress=False)
    run = json.loads((out / "run.json").read_text())
    assert run["recipe"]["deploy"]["cpu"] == "avx2"
    target = run["provenance"]["target"]
    assert (target["cpu"], target["simd_channel_block"], target["reduce_range"]) == ("avx2", 8,
                                                                                     True)
    assert run["provenance"]["machine"]["cpu_class"] == this_machine_cpu()
    notes = run["notes"]
    assert any("multiples of 8 channels (target cpu avx2)" in n for n in notes)
    differs = [n for n in notes if n.startswith("latency measured on")]
    assert len(differs) == (this_machine_cpu() != "avx2")
