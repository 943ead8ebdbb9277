"""Strict recipes: every documented key of every registered step config (nested blocks such as
``finetune`` too) and of the recipe's own blocks, misspelt by one character -- a deletion, a
substitution, a transposition -- is refused with the key's path and a "did you mean" naming the
key. Generated (tests/reliability/typos.py), sampled with a fixed seed."""

from __future__ import annotations

import random

from reliability.typos import recipe_cases, recipe_misses, step_cases, step_misses, typos

from lighten.errors import did_you_mean
from lighten.registry import load_builtin_steps


def test_every_step_and_nested_key_is_covered():
    cases = step_cases()
    assert {step for step, _, _ in cases} == set(load_builtin_steps())
    assert any(path[0] == "finetune" and len(path) > 1 for _, path, _ in cases)
    assert len(cases) > 500


def test_step_key_typos_are_refused_with_path_and_suggestion():
    cases = step_cases()
    missed = step_misses(cases)
    assert missed == [], f"{len(missed)} of {len(cases)}:\n" + "\n".join(missed[:40])


def test_recipe_block_typos_are_refused_with_path_and_suggestion():
    cases = recipe_cases()
    missed = recipe_misses(cases)
    assert len(cases) > 150 and missed == [], "\n".join(missed[:30])


def test_short_names_get_a_suggestion():
    """One slip in a two-letter key is still a near miss (difflib alone misses 'ur' -> 'lr')."""
    assert did_you_mean("ur", ["epochs", "lr", "loss"]) == "; did you mean 'lr'?"
    assert did_you_mean("lo", ["epochs", "lr", "loss"]) == "; did you mean 'lr'?"
    assert did_you_mean("resnet2", ["resnet20", "resnet56"]) == "; did you mean 'resnet20'?"
    assert did_you_mean("xyz", ["lr"]) == ""
    assert all(typos(k, random.Random(0)) for k in ("n", "m", "lr", "bits"))
