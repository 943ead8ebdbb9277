"""llm.sparsegpt and llm.wanda: exact sparsity (50% and 2:4), SparseGPT's weight update beats
plain magnitude pruning on every layer's reconstruction error, and the sparse LLM saves,
reloads and exports like any model."""

from __future__ import annotations

import pytest
import torch
from _llm_common import tiny_llama, write_text
from torch import nn

from lighten.data import DataSpec, load_data
from lighten.models import ModelSpec, build_model

pytest.importorskip("transformers")

SEQ = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llms")
    folder = tiny_llama(tmp / "model")
    data = load_data(DataSpec(name="text", path=str(write_text(tmp / "t.txt")),
                              tokenizer={"hf": str(folder)}, seq_len=SEQ))
    return tmp, folder, data


def fresh(setup):
    _, folder, data = setup
    return build_model(ModelSpec(hf=str(folder)), input_shape=data.input_shape,
                       num_classes=data.num_classes, task=data.task)


def test_sparsegpt_and_wanda_beat_magnitude_with_exact_sparsity(setup):
    from lighten.llm.sparsegpt import sparsegpt_prune
    from lighten.llm.wanda import magnitude_mask, wanda_mask

    _, _, data = setup
    model = fresh(setup)
    rows: dict[str, torch.Tensor] = {}

    def keep(name):
        return lambda mod, args: rows.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]))

    hooks = [m.register_forward_pre_hook(keep(n)) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and ".layers." in n]
    with torch.no_grad():
        model(torch.stack([data.train[i][0] for i in range(24)]))
    for h in hooks:
        h.remove()
    totals = {"magnitude": 0.0, "wanda": 0.0, "sparsegpt": 0.0}
    for name, x in rows.items():
        w = model.get_submodule(name).weight.detach()
        h = (2 * x.double().T @ x.double() / len(x)).float()

        def err(approx, x=x, w=w):
            return float((x @ (w - approx).T).pow(2).sum())

        mag = w * magnitude_mask(w, sparsity=0.5)
        wan = w * wanda_mask(w, x.norm(dim=0), sparsity=0.5)
        sgpt = sparsegpt_prune(w, h, sparsity=0.5, block=32)
        for pruned in (mag, wan, sgpt):  # exactly half of every layer
            assert int((pruned == 0).sum()) == w.numel() // 2, name
        assert (wan == 0).sum(1).eq(w.shape[1] // 2).all()  # wanda: per output row
        assert err(sgpt) < err(mag), name
        for k, v in zip(totals, (err(mag), err(wan), err(sgpt)), strict=True):
            totals[k] += v
        for pattern in (sparsegpt_prune(w, h, n=2, m=4, block=32),
                        w * wanda_mask(w, x.norm(dim=0), n=2, m=4)):
            groups = (pattern != 0).reshape(w.shape[0], -1, 4).sum(-1)
            assert groups.le(2).all() and int((pattern == 0).sum()) >= w.numel() // 2
    assert totals["wanda"] < totals["magnitude"]
    assert totals["sparsegpt"] < 0.7 * totals["magnitude"]


@pytest.mark.parametrize("step", [{"llm.sparsegpt": {"sparsity": 0.5}},
                                  {"llm.wanda": {"n": 2, "m": 4}}])
def test_sparse_steps_save_reload_and_export(setup, step):
    import lighten
    from lighten.artifact import load_artifact, save_artifact
    from lighten.export import export_onnx

    tmp, folder, data = setup
    model = fresh(setup)
    (name, options), = step.items()
    out, report = lighten.compress(model, {name: {**options, "calib_samples": 8}}, data=data)
    assert len(report.layers) == 14
    for row in report.layers:
        assert row["sparsity"] == pytest.approx(0.5, abs=1e-9) and row["score"] < 1
    lin = out.hf.model.layers[0].mlp.down_proj
    assert isinstance(lin, nn.Linear) and float((lin.weight == 0).double().mean()) == 0.5
    path = tmp / f"{name}.safetensors"
    save_artifact(out, path, model_spec={"hf": str(folder)}, task=data.task,
                  input_shape=data.input_shape, num_classes=data.num_classes)
    again, manifest = load_artifact(path)
    x = torch.stack([data.test[i][0] for i in range(3)])
    with torch.no_grad():
        assert torch.equal(again(x), out(x))
    assert manifest["tensors"]["hf.model.layers.0.mlp.down_proj.weight"]["encoding"] != "dense"
    check = export_onnx(out, tmp / f"{name}.onnx", inputs=data.task.inputs, sample_inputs=(x,))
    assert check.max_abs_diff < 1e-3


def test_bad_sparse_configs_are_one_line():
    from lighten.llm.steps import LLMSparseGPTConfig, LLMWandaConfig

    with pytest.raises(ValueError, match="both n and m"):
        LLMWandaConfig(n=2)
    with pytest.raises(ValueError, match="below m"):
        LLMSparseGPTConfig(n=4, m=4)
    with pytest.raises(ValueError, match="either sparsity or n and m"):
        LLMWandaConfig(sparsity=0.5, n=2, m=4)
