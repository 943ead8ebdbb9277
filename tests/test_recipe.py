import textwrap

import pytest

from lighten.errors import RecipeError
from lighten.recipe import load_recipe, parse_recipe

GOOD = {
    "name": "t",
    "model": {"zoo": "lenet5"},
    "data": {"name": "synthetic"},
    "steps": [{"prune.magnitude": {"sparsity": 0.5}}, {"quant.ptq": {"bits": 8}}],
}


def with_changes(**changes):
    return {**GOOD, **changes}


def test_good_recipe_parses_with_defaults():
    recipe = parse_recipe(GOOD)
    assert [s.name for s in recipe.steps] == ["prune.magnitude", "quant.ptq"]
    assert recipe.steps[0].config.sparsity == 0.5
    assert recipe.deploy.backend == "onnxruntime"
    assert recipe.output == "runs/t"
    assert recipe.to_dict()["steps"][0] == {"prune.magnitude": {"sparsity": 0.5}}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (with_changes(steps=[{"prune.magic": {}}]), "unknown step 'prune.magic'; known steps:"),
        (with_changes(steps=[{"prune.magnitude": {"sparsty": 0.5}}]),
         "unknown key 'sparsty'; did you mean 'sparsity'? allowed keys: finetune, sparsity"),
        (with_changes(steps=[{"prune.magnitude": {"sparsity": 2}}]),
         "steps[0] prune.magnitude: sparsity: Input should be less than 1 (got 2)"),
        (with_changes(steps=[{"prune.magnitude": {"sparsity": 0.5, "scope": "all"}}]),
         "scope: Input should be 'global' or 'layer'"),
        (with_changes(deploy={"backend": "tpu"}), "deploy.backend: Input should be"),
        # a union no member accepts: every alternative in one line, not one member's tag
        (with_changes(steps=[{"distill": {"method": "mutual", "gate": "maybe"}}]),
         "steps[0] distill: gate: should be a valid boolean or 'auto' (got 'maybe')"),
        (with_changes(colour="red"), "unknown key 'colour'; allowed keys: name, model"),
        ({k: v for k, v in GOOD.items() if k != "model"}, "missing required key 'model'"),
        (with_changes(steps=[{"a": {}, "b": {}}]), "each step is one mapping"),
        (with_changes(train={"epochs": 1, "lr": -1}), "train.lr"),
        (["not", "a", "mapping"], "must be a mapping"),
    ],
)
def test_bad_recipes_give_one_precise_line(raw, message):
    with pytest.raises(RecipeError) as info:
        parse_recipe(raw, source="r.yaml")
    text = str(info.value)
    assert message in text, text
    assert text.startswith("r.yaml") and "\n" not in text


def test_load_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML at line"):
        load_recipe(bad)


def test_duplicate_keys_are_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: a\nmodel: {zoo: lenet5}\ndata: {name: digits}\nname: b\n")
    with pytest.raises(RecipeError, match=r"key 'name' appears twice \(line 4\); keep one"):
        load_recipe(path)
    nested = tmp_path / "nested.yaml"
    nested.write_text("name: a\nmodel: {zoo: lenet5}\ndata: {name: digits}\nsteps:\n"
                      "  - prune.magnitude: {sparsity: 0.5, sparsity: 0.9}\n")
    with pytest.raises(RecipeError, match="key 'sparsity' appears twice"):
        load_recipe(nested)


def test_python_paths_are_relative_to_recipe(tmp_path):
    (tmp_path / "net.py").write_text("def build():\n    pass\n")
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent("""
        name: t
        model: {python: net.py:build, input_shape: [1, 8, 8]}
        data: {name: digits}
    """))
    recipe = load_recipe(path)
    assert recipe.model.python == f"{tmp_path / 'net.py'}:build"


def test_packaged_demo_recipe_is_valid():
    from importlib.resources import files

    recipe = load_recipe(files("lighten") / "recipes" / "demo.yaml")
    assert [s.name for s in recipe.steps] == ["prune.magnitude", "quant.ptq"]
