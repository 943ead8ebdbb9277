"""Layer-wise (TinyBERT map) and relation (MiniLMv2) distillation of a layer-dropped student
(lighten.llm.encoder_distill) on a tiny random BERT built from a transformers config: real
numerics, nothing downloaded."""

from __future__ import annotations

import copy

import pytest
import torch

from lighten.errors import RecipeError

pytest.importorskip("transformers")

from _llm_helpers import SEQ, batches, cosine, encoder, encoder_world, sentences  # noqa: E402

world, _tab_env = encoder_world("distill", train=128, layers=4)


def states(model, test) -> list[torch.Tensor]:
    """Every layer's output states, real tokens only: ``[(N, D)] * layers``."""
    out = []
    with torch.no_grad():
        for ids, mask in test:
            hidden = model.hf(input_ids=ids, attention_mask=mask,
                              output_hidden_states=True).hidden_states[1:]
            out.append([h[mask.bool()] for h in hidden])
    return [torch.cat(layer) for layer in zip(*out, strict=True)]


def test_layer_map_and_relations():
    from lighten.llm.encoder_distill import default_layer_map, relation_loss

    assert default_layer_map(6, 3) == [1, 3, 5] and default_layer_map(4, 2) == [1, 3]
    assert default_layer_map(3, 3) == [0, 1, 2] and default_layer_map(12, 4) == [2, 5, 8, 11]
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 5, dtype=torch.int64)
    mask[1, 3:] = 0
    teacher = {n: torch.randn(2, 5, 32, generator=g) for n in ("query", "key", "value")}
    same = relation_loss(teacher, teacher, mask, student_heads=4, teacher_heads=4)
    assert abs(float(same)) < 1e-6
    # a student with 2 heads of a narrower width: relations over gcd(2, 4) = 2 relation heads
    student = {n: torch.randn(2, 5, 16, generator=g) for n in teacher}
    loss = relation_loss(student, teacher, mask, student_heads=2, teacher_heads=4)
    assert float(loss) > 0.01
    changed = {n: t.clone() for n, t in student.items()}
    for t in changed.values():
        t[1, 3:] = 100.0  # padded tokens: neither keys nor queries count
    again = relation_loss(changed, teacher, mask, student_heads=2, teacher_heads=4)
    assert torch.allclose(loss, again)


def test_layer_wise_distillation_teaches_the_intermediate_layers(world):
    from lighten.llm.encoder import prune_encoder_
    from lighten.llm.encoder_distill import distill_embeddings_

    d = sentences(world, limit_test=48)
    train, test = batches(d.train, 128), batches(d.test, 48)
    teacher = encoder(world)
    start = copy.deepcopy(teacher)
    prune_encoder_(start, [], keep_layers=[0, 2])
    runs = {}
    for name, kw in {"embedding": {}, "layer-wise": {"layers": 1.0, "relations": 1.0}}.items():
        student = copy.deepcopy(start)
        history = distill_embeddings_(student, teacher, train, epochs=6, lr=1e-3, warmup=0.1,
                                      **kw)
        assert history[-1] < history[0]
        runs[name] = student
    t_states = states(teacher, test)

    def layer_cos(student) -> float:  # student layer 0 against teacher layer 1 (the map)
        return float(torch.nn.functional.cosine_similarity(
            states(student, test)[0], t_states[1], dim=-1).mean())

    # the embedding loss alone leaves the first student layer far from teacher layer 1; the
    # layer-wise loss teaches it, and the held-out embeddings stay as close as with embedding
    gap = {name: 1 - layer_cos(m) for name, m in (*runs.items(), ("start", start))}
    assert gap["layer-wise"] < gap["embedding"] / 2 and gap["layer-wise"] < gap["start"] / 2
    assert cosine(runs["layer-wise"], teacher, test) > cosine(start, teacher, test)
    assert cosine(runs["layer-wise"], teacher, test) > 0.9


def test_layer_wise_options_through_the_step(world):
    import lighten

    d = sentences(world, limit_test=40)
    model = encoder(world)
    distill = {"epochs": 2, "samples": 64, "lr": 1e-3, "layers": 1.0, "relations": 0.5,
               "layer_map": [1, 3], "warmup": 0.2}
    out, report = lighten.compress(model, {"llm.encoder_prune": {
        "keep_layers": [0, 2], "distill": distill}}, data=d)
    assert len(out.hf.encoder.layer) == 2
    assert any("distilled from the original" in n for n in report.notes)
    with pytest.raises(RecipeError, match="layer_map"):  # one teacher layer per student layer
        lighten.compress(model, {"llm.encoder_prune": {
            "keep_layers": [0, 2], "distill": {**distill, "layer_map": [1, 2, 3]}}}, data=d)
    with pytest.raises(RecipeError, match="layer_map only applies"):
        lighten.compress(model, {"llm.encoder_prune": {
            "keep_layers": [0, 2], "distill": {"layer_map": [1, 3]}}}, data=d)
    assert SEQ == d.task.seq_len


def test_student_recipe_parses():
    from pathlib import Path

    from lighten.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" /
                         "minilm_r8_student.yaml")
    prune = [s for s in recipe.steps if s.name == "llm.encoder_prune"][0].config
    assert prune.keep_layers == [0, 4, 5] and prune.distill.layers == prune.distill.relations == 1


def test_hidden_state_losses_need_a_bert_layout():
    from lighten.errors import ModelError
    from lighten.llm.encoder_distill import distill_embeddings_

    class Bag(torch.nn.Module):  # a bag-of-words encoder: no '*.encoder.layer' to tap
        def __init__(self):
            super().__init__()
            self.table = torch.nn.EmbeddingBag(50, 8, mode="sum")

        def forward(self, ids, mask):
            return self.table(ids, per_sample_weights=mask.float())

    torch.manual_seed(0)
    ids, mask = torch.randint(0, 50, (8, 6)), torch.ones(8, 6, dtype=torch.int64)
    student, teacher = Bag(), Bag()
    history = distill_embeddings_(student, teacher, [(ids, mask)], epochs=20, lr=1e-2)
    assert history[-1] < history[0]  # the embedding loss alone works for any encoder
    with pytest.raises(ModelError, match="tokens, layers, relations"):
        distill_embeddings_(student, teacher, [(ids, mask)], tokens=1.0)
    with pytest.raises(RecipeError, match="warmup"):
        distill_embeddings_(student, teacher, [(ids, mask)], warmup=1.5)
