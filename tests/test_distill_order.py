"""Distillation between other steps, on a ``python:`` CNN outside the zoo: consistent teaching
(``distill: {augment: ...}``) and the logit losses beyond Hinton KD, after structured pruning,
before int8 quantization. Every
stage's artifact reloads and computes what the in-memory model computed, and the last one
exports to ONNX with its self-check passing."""

from __future__ import annotations

import pytest
import torch
from _models import CNN, RESIDUAL_BLOCK, model_source

import lighten
from lighten.artifact import load_artifact, save_artifact
from lighten.data import DataSpec, load_data
from lighten.export import export_onnx
from lighten.models import ModelSpec, build_model

AUGMENT = {"crop": 1, "flip": True, "mixup": 0.2, "views": 2}


@pytest.mark.parametrize("options", [{"augment": AUGMENT}, {"method": "dkd_ls"},
                                     {"method": "dist"}], ids=["augment", "dkd_ls", "dist"])
def test_distill_after_pruning_and_before_int8(options, tmp_path):
    (tmp_path / "models.py").write_text(model_source(RESIDUAL_BLOCK, CNN))
    spec = {"python": f"{tmp_path / 'models.py'}:cnn", "input_shape": [1, 8, 8]}
    data = load_data(DataSpec(name="synthetic", samples=96, input_shape=[1, 8, 8],
                              num_classes=10))
    torch.manual_seed(0)
    base = build_model(ModelSpec(**spec), input_shape=(1, 8, 8), num_classes=10).eval()
    x = torch.stack([data.test[i][0] for i in range(8)])

    pruned, _ = lighten.compress(base, {"prune.channels": {"ratio": 0.25}}, data=data, seed=1)
    student, report = lighten.compress(
        pruned, {"distill": {**options, "finetune": {"epochs": 0.5}}}, data=data, seed=2)
    quantized, _ = lighten.compress(student, {"quant.ptq": {"calib_samples": 32}}, data=data,
                                    seed=3)
    assert student.blocks[0].conv1.out_channels == pruned.blocks[0].conv1.out_channels < 16
    assert not torch.equal(student.blocks[0].conv1.weight, pruned.blocks[0].conv1.weight)

    for name, model in (("pruned", pruned), ("student", student), ("int8", quantized)):
        path = tmp_path / f"{name}.safetensors"
        save_artifact(model, path, model_spec=spec, input_shape=(1, 8, 8), num_classes=10)
        again, _ = load_artifact(path, trust=True)
        with torch.no_grad():
            torch.testing.assert_close(again.eval()(x), model.eval()(x), atol=1e-5, rtol=1e-5)
    check = export_onnx(quantized, tmp_path / "int8.onnx", input_shape=(1, 8, 8), verify=True)
    assert check.agreement >= 0.75
