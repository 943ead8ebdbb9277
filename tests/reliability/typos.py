"""Single-character typos of every documented recipe key, and how each is answered.

Every key of every registered step config (nested blocks such as ``finetune`` too) and of the
recipe's own blocks, misspelt by a deletion, a substitution and a transposition (``per_kind`` of
each, sampled with a fixed seed): :func:`step_misses` / :func:`recipe_misses` list the typos
that were accepted, or refused without the key's path or a "did you mean" one slip away.
"""

from __future__ import annotations

import random
import re
import types
import typing

from pydantic import BaseModel

from lighten.errors import RecipeError, _one_slip

LETTERS = "abcdefghijklmnopqrstuvwxyz_"
BASE = {"name": "t", "model": {"zoo": "lenet5"}, "data": {"name": "digits"}, "steps": []}


def _models(annotation) -> list[tuple[type[BaseModel], bool]]:
    """Pydantic models inside an annotation (X, X | None, list[X]); True when in a list."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, False)]
    origin = typing.get_origin(annotation)
    found = []
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found += _models(arg)
    elif origin is list:
        found += [(m, True) for m, _ in _models(typing.get_args(annotation)[0])]
    return found


def key_paths(model: type[BaseModel], prefix=()) -> list[tuple[tuple, type[BaseModel]]]:
    """(path, model owning the last key) for every field, nested models included."""
    found = []
    for name, field in model.model_fields.items():
        found.append(((*prefix, name), model))
        for inner, in_list in _models(field.annotation):
            if inner is not model:
                found += key_paths(inner, (*prefix, name, 0) if in_list else (*prefix, name))
    return found


def typos(key: str, rng: random.Random, per_kind: int = 2) -> list[str]:
    kinds = {
        "deletion": [key[:i] + key[i + 1:] for i in range(len(key))],
        "substitution": [key[:i] + c + key[i + 1:] for i in range(len(key)) for c in LETTERS
                         if c != key[i]],
        "transposition": [key[:i] + key[i + 1] + key[i] + key[i + 2:]
                          for i in range(len(key) - 1) if key[i] != key[i + 1]],
    }
    out = []
    for options in kinds.values():
        out += rng.sample(options, min(per_kind, len(options)))
    return [t for t in out if t]


def nest(path: tuple, value) -> dict:
    node = value
    for part in reversed(path):
        node = [node] if isinstance(part, int) else {part: node}
    return node


def _valid(owner: type[BaseModel]) -> set[str]:
    return set(owner.model_fields) | {f.alias for f in owner.model_fields.values() if f.alias}


def step_cases(per_kind: int = 2) -> list[tuple[str, tuple, str]]:
    from lighten.registry import load_builtin_steps

    rng = random.Random(16)
    cases = []
    for step, spec in sorted(load_builtin_steps().items()):
        for path, owner in key_paths(spec.config_type):
            cases += [(step, path, t) for t in typos(path[-1], rng, per_kind)
                      if t not in _valid(owner)]
    return cases


def recipe_cases(per_kind: int = 2) -> list[tuple[tuple, str]]:
    from lighten.recipe import _recipe_schema

    rng = random.Random(17)
    return [(path, t) for path, owner in key_paths(_recipe_schema()) if path[0] != "steps"
            for t in typos(path[-1], rng, per_kind) if t not in _valid(owner)]


def _judge(run, path: tuple, typo: str) -> str | None:
    """None when the typo is refused naming its path with a fitting suggestion."""
    shown = ".".join(str(p) for p in (*path[:-1], typo) if not isinstance(p, int))
    try:
        run()
    except RecipeError as err:
        text = str(err)
        hint = re.search(r"did you mean '([^']+)'\?", text)
        # the key itself, or another key one slip away (teachere: teacher or teachers)
        if shown in text.replace("[0]", "") and hint and (hint[1] == path[-1]
                                                           or _one_slip(typo, hint[1])):
            return None
        return f"{shown}: {text[:200]}"
    return f"{shown}: accepted"


def step_misses(cases) -> list[str]:
    from lighten.recipe import parse_step

    return [f"{step} {miss}" for step, path, typo in cases if (miss := _judge(
        lambda s=step, p=path, t=typo: parse_step({s: nest((*p[:-1], t), 1)},
                                                  where="recipe: steps[0]"), path, typo))]


def recipe_misses(cases) -> list[str]:
    from lighten.recipe import parse_recipe

    def raw(path, typo):
        if len(path) == 1:
            return {**BASE, typo: 1}
        return {**BASE, path[0]: {**BASE.get(path[0], {}), **nest((*path[1:-1], typo), 1)}}

    return [miss for path, typo in cases if (miss := _judge(
        lambda p=path, t=typo: parse_recipe(raw(p, t), source="r.yaml"), path, typo))]
