"""``llm.decoder_prune`` on tiny random Llamas (GQA: 4 query heads over 2 key/value heads):
shapes shrink, pruning nothing changes nothing, the pruned model equals the original with the
removed heads / neurons replaced by their calibration mean (which checks the GQA bookkeeping in
both head modes), the importance ranks what was made unimportant last, distillation recovers a
dropped layer, artifacts reload to identical outputs, both ONNX exports match PyTorch, and a
recipe runs through the runner."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _llm_common import tiny_llama, write_text
from torch import nn

from lighten.data import DataSpec, load_data
from lighten.errors import ModelError, RecipeError
from lighten.models import ModelSpec, build_model

pytest.importorskip("transformers")

SEQ = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llmdec")
    folder = tiny_llama(tmp / "model", layers=3)
    text = write_text(tmp / "t.txt")
    data = load_data(DataSpec(name="text", path=str(text), tokenizer={"hf": str(folder)},
                              seq_len=SEQ))
    return tmp, folder, data


def fresh(setup):
    _, folder, data = setup
    return build_model(ModelSpec(hf=str(folder)), input_shape=data.input_shape,
                       num_classes=data.num_classes, task=data.task)


def windows(data, n=8, split="train", start=0):
    ds = getattr(data, split)
    return torch.stack([ds[i][0] for i in range(start, start + n)])


def mean_replaced(model, plan, stats):
    """``model`` (a copy) with every removed head / neuron's input to o_proj / down_proj
    replaced by its calibration mean: zeroed columns plus a bias."""
    from lighten.llm.decoder_prune import decoder_layers

    ref = copy.deepcopy(model)
    _, layers = decoder_layers(ref)
    for i, block in plan.blocks.items():
        attn, mlp = layers[i].self_attn, layers[i].mlp
        d = attn.head_dim
        for out, kept, mean in ((attn.o_proj, block.q_heads, stats.attn_mean[i]),
                                (mlp.down_proj, block.ffn, stats.ffn_mean[i])):
            if kept is None:
                continue
            if out is attn.o_proj:
                kept = [h * d + j for h in kept for j in range(d)]
            gone = torch.ones(out.in_features, dtype=torch.bool)
            gone[kept] = False
            with torch.no_grad():
                out.bias = nn.Parameter(out.weight[:, gone] @ mean[gone])
                out.weight[:, gone] = 0
    return ref


def test_nothing_pruned_changes_nothing(setup):
    from lighten.llm.decoder_prune import prune_decoder_

    _, _, data = setup
    model = fresh(setup)
    x = windows(data)
    pruned = copy.deepcopy(model)
    facts = prune_decoder_(pruned, [x], heads=0.001, ffn=0.001, ffn_multiple=1)
    assert facts["heads"] == [(4, 2)] * 3 and facts["ffn"] == [192] * 3
    with torch.no_grad():
        assert torch.allclose(pruned(x), model(x), atol=1e-6)


@pytest.mark.parametrize(("mode", "heads"), [("within", (2, 2)), ("group", (2, 1))])
def test_gqa_heads_and_neurons_removed_exactly(setup, mode, heads):
    from lighten.llm.decoder_prune import apply_plan_, decoder_statistics, plan_pruning

    _, _, data = setup
    model = fresh(setup)
    x = windows(data)
    stats = decoder_statistics(model, [x])
    pruned = copy.deepcopy(model)
    plan = plan_pruning(pruned, stats, heads=0.5, head_mode=mode, ffn=0.25, ffn_multiple=16)
    facts = apply_plan_(pruned, plan, stats)
    assert facts["heads"] == [heads] * 3 and facts["ffn"] == [144] * 3
    attn = pruned.hf.model.layers[0].self_attn
    q, kv = heads
    assert attn.q_proj.out_features == 16 * q and attn.k_proj.out_features == 16 * kv
    assert attn.num_key_value_groups == q // kv and attn.o_proj.in_features == 16 * q
    assert pruned.hf.model.layers[0].mlp.gate_proj.out_features == 144
    config = pruned.hf.config
    assert (config.num_attention_heads, config.num_key_value_heads) == heads
    assert config.intermediate_size == 144
    if mode == "within":  # one query head kept in each group
        assert all(len({h // 2 for h in b.q_heads}) == 2 for b in plan.blocks.values())
    else:  # a whole group: its kv head and both its query heads
        assert all(b.q_heads == [2 * b.kv_heads[0], 2 * b.kv_heads[0] + 1]
                   for b in plan.blocks.values())
    y = windows(data, split="test", n=4)
    with torch.no_grad():
        got, want = pruned(y), mean_replaced(model, plan, stats)(y)
        assert torch.allclose(got, want, atol=1e-5)  # slicing == removed features at their mean
        assert not torch.allclose(got, model(y), atol=1e-3)  # and something was removed


def test_without_gqa_heads_go_one_by_one():
    """Multi-head attention (a KV head per query head): ``within`` falls back to whole groups
    of one head, else it could remove nothing."""
    import transformers as tf

    from lighten.llm.decoder_prune import prune_decoder_
    from lighten.llm.sources import CausalLM

    torch.manual_seed(0)
    model = CausalLM(tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4)).eval())
    x = torch.randint(0, 50, (2, 8))
    facts = prune_decoder_(model, [x], heads=0.5, head_mode="within")
    assert facts["heads"] == [(2, 2)] and model(x).shape == (2, 8, 50)


def test_importance_ranks_the_unimportant_last(setup):
    from lighten.llm.decoder_prune import decoder_statistics, plan_pruning

    _, _, data = setup
    model = fresh(setup)
    layers = model.hf.model.layers
    with torch.no_grad():
        layers[0].self_attn.o_proj.weight[:, 16:32] *= 1e-3  # query head 1 (group 0)
        layers[1].self_attn.o_proj.weight[:, 32:64] *= 1e-3  # group 1: query heads 2 and 3
        layers[0].mlp.down_proj.weight[:, :40] *= 1e-3  # neurons 0..39
        layers[1].self_attn.o_proj.weight.zero_()  # block 1 (all but its FFN) changes little
        layers[1].mlp.down_proj.weight.mul_(1e-3)
    stats = decoder_statistics(model, [windows(data)])
    assert min(range(3), key=lambda i: stats.influence[i]) == 1
    within = plan_pruning(model, stats, heads=0.5, head_mode="within", ffn=0.25,
                          ffn_multiple=16)
    assert 1 not in within.blocks[0].q_heads and 0 in within.blocks[0].q_heads
    assert not set(range(40)) & set(within.blocks[0].ffn)  # 48 go: the 40 weak ones first
    stats.attn_score[1] = stats.attn_score[1].clone()
    stats.attn_score[1][:32] += 1.0  # the zeroed block: make group 0 clearly the stronger
    group = plan_pruning(model, stats, heads=0.5)  # the default: whole KV groups
    assert group.blocks[1].kv_heads == [0] and group.blocks[1].q_heads == [0, 1]
    dropped = plan_pruning(model, stats, drop_layers=1)
    assert dropped.layers == [0, 2]


def test_layer_drop_recovered_by_logit_distillation(setup):
    from lighten.llm.decoder_prune import distill_logits_, prune_decoder_, teacher_hidden

    _, _, data = setup
    teacher = fresh(setup)
    train = [windows(data, n=4, start=j) for j in range(0, 32, 4)]
    targets = teacher_hidden(teacher, train)
    assert targets[0].shape == (4, SEQ, 64)  # D floats per token are kept, not V logits
    student = copy.deepcopy(teacher)
    facts = prune_decoder_(student, [], drop_layers=[1])
    assert facts["layers"] == [0, 2] and len(student.hf.model.layers) == 2
    assert [b.self_attn.layer_idx for b in student.hf.model.layers] == [0, 1]
    assert student.hf.config.num_hidden_layers == 2
    test = windows(data, split="test", n=8)

    def kl():
        with torch.no_grad():
            s, t = student(test), teacher(test)
        v = s.shape[-1]
        return float(torch.nn.functional.kl_div(s.reshape(-1, v).log_softmax(-1),
                                                t.reshape(-1, v).log_softmax(-1),
                                                log_target=True, reduction="batchmean"))

    embed = student.hf.get_input_embeddings().weight.detach().clone()
    before = kl()
    history = distill_logits_(student, train, targets, epochs=8, lr=3e-3)
    after = kl()  # held-out windows
    assert history[-1] < history[0] / 3 and after < before / 3
    assert torch.equal(student.hf.get_input_embeddings().weight, embed)  # the head is frozen
    assert all(p.requires_grad for p in student.parameters())  # flags restored


def test_artifact_reload_and_both_onnx_exports(setup):
    from lighten.artifact import load_artifact, save_artifact
    from lighten.export import export_onnx
    from lighten.llm.decoder_prune import prune_decoder_
    from lighten.llm.onnx_decoder import export_decoder

    tmp, folder, data = setup
    model = fresh(setup)
    prune_decoder_(model, [windows(data)], heads=0.5, head_mode="group", ffn=0.25,
                   drop_layers=1)
    path = tmp / "pruned.safetensors"
    save_artifact(model, path, model_spec={"hf": str(folder)}, task=data.task,
                  input_shape=data.input_shape, num_classes=data.num_classes)
    again, _ = load_artifact(path)
    x = windows(data, split="test", n=4)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    assert len(again.hf.model.layers) == 2
    assert again.hf.model.layers[1].self_attn.num_key_value_groups == 2
    check = export_onnx(again, tmp / "pruned.onnx", inputs=data.task.inputs, sample_inputs=(x,))
    assert check.agreement > 0.99
    result = export_decoder(again, tmp / "pruned-kv.onnx", sample_ids=x[:1, :9])
    assert result.layers == 2 and result.max_diff < 1e-3 and result.agreement == 1.0


def test_pruned_then_4bit_kv_cache_decoder(setup):
    """Pruning composes with llm.weight_only: the compensation biases ride along into
    MatMulNBits, and the cache has the pruned blocks' KV heads."""
    from lighten.llm.decoder_prune import prune_decoder_
    from lighten.llm.onnx_decoder import OnnxDecoder, export_decoder
    from lighten.llm.steps import LLMWeightOnlyConfig, quantize_llm_

    tmp, _, data = setup
    model = fresh(setup)
    prune_decoder_(model, [windows(data)], heads=0.5, head_mode="group", ffn=0.25)
    quantize_llm_(model, LLMWeightOnlyConfig(method="rtn", group_size=16))
    assert OnnxDecoder(model).empty_past()[0].shape == (1, 1, 0, 16)
    x = windows(data, split="test", n=1)
    result = export_decoder(model, tmp / "pruned-w4.onnx", sample_ids=x[:, :9])
    assert result.nbits_layers == 21 and result.max_diff < 1e-3


def test_decoder_prune_through_the_runner(setup):
    from lighten.recipe import parse_recipe
    from lighten.runner import run_recipe

    tmp, folder, _ = setup
    recipe = {
        "name": "tiny-llama-prune",
        "model": {"hf": str(folder)},
        "data": {"name": "text", "path": str(tmp / "t.txt"), "tokenizer": {"hf": str(folder)},
                 "seq_len": SEQ},
        "deploy": {"latency_runs": 3},
        "steps": [{"llm.decoder_prune": {"heads": 0.5, "ffn": 0.25, "drop_layers": 1,
                                         "samples": 8,
                                         "distill": {"samples": 16, "epochs": 2, "lr": 1e-3}}}],
    }
    out = tmp / "run"
    run_recipe(parse_recipe(recipe), output=out, overwrite=True, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["baseline", "llm.decoder_prune"]
    base, pruned = rows
    assert pruned["params"] < base["params"] and pruned["bytes"] < base["bytes"]
    assert 1 < pruned["perplexity"] < 3 * base["perplexity"]
    assert (out / "deploy" / "llm.decoder_prune" / "model.onnx").is_file()
    report = json.loads(next((out / "stages").glob("*llm.decoder_prune.report.json"))
                        .read_text())
    assert report["summary"]["decoder_heads"] == [[2, 1], [2, 1]]  # one KV group of two
    actions = {r["action"] for r in report["layers"]}
    assert actions == {"prune heads", "prune neurons", "remove layer"}


def test_bad_input_says_what_to_do(setup):
    import lighten

    _, _, data = setup
    model = fresh(setup)
    with pytest.raises(RecipeError, match="removes nothing"):
        lighten.compress(model, {"llm.decoder_prune": {}}, data=data)
    with pytest.raises(RecipeError, match="drop_layers"):
        lighten.compress(model, {"llm.decoder_prune": {"drop_layers": [0, 9]}}, data=data)
    with pytest.raises(Exception, match="ignore"):
        lighten.compress(model, {"llm.decoder_prune": {"ffn": 0.5, "ignore": ["nope"]}},
                         data=data)
    with pytest.raises(ModelError, match="Llama-layout"):
        lighten.compress(nn.Sequential(nn.Linear(4, 4)), {"llm.decoder_prune": {"ffn": 0.5}},
                         data=data)
    out, report = lighten.compress(model, {"llm.decoder_prune": {
        "ffn": 0.5, "ignore": ["hf.model.layers.1.mlp"], "samples": 8}}, data=data)
    assert [b.mlp.down_proj.in_features for b in out.hf.model.layers] == [96, 192, 96]
    assert out.hf.config.intermediate_size == 192  # not uniform: the config keeps the source's
