"""Recipes: YAML that says which model, which data, and which steps, validated by pydantic.

Every problem becomes one :class:`RecipeError` line that names the file, the key and what is
allowed, e.g. ``demo.yaml: steps[1] quant.ptq: bits: Input should be less than or equal to 8``.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, Field, ValidationError

from lighten.backends import DEFAULT_BACKEND, BackendName
from lighten.errors import RecipeError, did_you_mean
from lighten.registry import get_step
from lighten.step import StrictModel
from lighten.target import CPU_CHOICES, check_cpu


class DeployConfig(StrictModel):
    """Where the model will run (``lighten.target.Target.from_deploy``); every stage is measured
    on this same backend, and steps read the CPU facts (channel block, int8 weight range) from
    ``cpu`` (``auto`` = the machine running lighten)."""

    backend: BackendName = DEFAULT_BACKEND
    cpu: Annotated[str, BeforeValidator(check_cpu)] = Field(
        "auto", description=f"target CPU: {' | '.join(CPU_CHOICES)}")
    threads: int | None = Field(None, ge=1)
    latency_runs: int = Field(50, ge=3, description=(
        "timed runs per stage and batch size in total, spread over 3-10 interleaved rounds "
        "(50: 10 rounds of 5); all stages are timed together at the end of a run"))


class MeasureConfig(StrictModel):
    robustness: bool = True
    eval_limit: int | None = Field(None, ge=1, description="evaluate on the first N test samples")


def _recipe_schema():
    """Built lazily: the data/model/train specs live in modules that import torch."""
    from lighten.data import DataSpec
    from lighten.models import ModelSpec
    from lighten.training import TrainConfig

    class RecipeSchema(StrictModel):
        name: str = Field(min_length=1)
        model: ModelSpec
        data: DataSpec
        train: TrainConfig = TrainConfig()
        deploy: DeployConfig = DeployConfig()
        measure: MeasureConfig = MeasureConfig()
        steps: list[dict[str, dict[str, Any] | None]] = Field(default_factory=list)
        output: str | None = None
        seed: int = 0

    return RecipeSchema


@dataclass(frozen=True)
class ParsedStep:
    name: str
    config: BaseModel

    def to_dict(self) -> dict:
        return {self.name: self.config.model_dump(exclude_defaults=True)}


@dataclass(frozen=True)
class Recipe:
    name: str
    model: Any  # lighten.models.ModelSpec
    data: Any  # lighten.data.DataSpec
    train: Any  # lighten.training.TrainConfig
    deploy: DeployConfig
    measure: MeasureConfig
    steps: tuple[ParsedStep, ...]
    output: str
    seed: int
    source: str = "<dict>"
    base_dir: Path = Path(".")
    written: dict | None = None  # the mapping as the user wrote it (YAML), nothing filled in

    def to_dict(self) -> dict:
        """The recipe as plain data, hashed for resume (steps without their defaults). What a
        run records is :meth:`as_written` and :meth:`settings`."""
        return {
            "name": self.name,
            "model": self.model.model_dump(exclude_none=True),
            "data": self.data.model_dump(exclude_none=True),
            "train": self.train.model_dump(),
            "deploy": self.deploy.model_dump(),
            "measure": self.measure.model_dump(),
            "steps": [s.to_dict() for s in self.steps],
            "output": self.output,
            "seed": self.seed,
        }

    def as_written(self) -> dict:
        """The recipe exactly as the user wrote it (run.json ``recipe``, the report's recipe
        file); a Recipe built without one falls back to :meth:`to_dict`."""
        return self.written if self.written is not None else self.to_dict()

    def settings(self) -> dict:
        """Every setting the run used, defaults filled in (run.json ``settings``): each step's
        full config, and only the ``data:`` keys that apply to its source."""
        from lighten.data import data_settings

        return {
            "name": self.name,
            "model": self.model.model_dump(mode="json", exclude_none=True),
            "data": data_settings(self.data),
            "train": self.train.model_dump(mode="json"),
            "deploy": self.deploy.model_dump(mode="json"),
            "measure": self.measure.model_dump(mode="json"),
            "steps": [{s.name: s.config.model_dump(mode="json")} for s in self.steps],
            "output": self.output,
            "seed": self.seed,
        }

    def code_outside(self) -> list[str]:
        """The ``python:`` files the recipe runs that lie outside its own folder (allowed: a
        shared models file is common; run.json states them, since running a recipe runs
        them)."""
        folder = Path(self.base_dir).resolve()
        found: list[str] = []

        def visit(value) -> None:
            if isinstance(value, dict):
                for key, item in value.items():
                    if key == "python" and isinstance(item, str) and ":" in item:
                        path = (folder / item.rpartition(":")[0]).resolve()
                        if not path.is_relative_to(folder) and str(path) not in found:
                            found.append(str(path))
                    else:
                        visit(item)
            elif isinstance(value, list | tuple):
                for item in value:
                    visit(item)

        visit(self.settings())
        return found


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path} (check the path; examples in recipes/)")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except _DuplicateKeyError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", exc)
        raise RecipeError(f"{path}: not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file; a recipe is YAML") from None
    return parse_recipe(raw, source=str(path), base_dir=path.parent)


class _DuplicateKeyError(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise _DuplicateKeyError(f"key {key!r} appears twice (line {line}); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_recipe(raw: Any, *, source: str = "<dict>", base_dir: Path = Path(".")) -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping with keys name, model, data, steps"
                          )
    schema = _recipe_schema()
    try:
        top = schema.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(f"{source}: {describe_validation_error(err, schema)}") from None
    steps = tuple(_parse_step(i, entry, source, base_dir) for i, entry in enumerate(top.steps))
    check_step_order([s.name for s in steps], where=source)
    from lighten.distill.models import check_stage_refs  # {stage: NAME} refs, up front

    check_stage_refs(steps, where=source)
    model = _resolve_paths(top.model, base_dir, ("python", "weights"))
    data = _resolve_paths(top.data, base_dir, ("python", "root", "path"))
    if getattr(data.task, "python", None):  # data.task: {python: tasks.py:make}
        data = data.model_copy(update={"task": _resolve_paths(data.task, base_dir, ("python",))})
    return Recipe(
        name=top.name,
        model=model,
        data=data,
        train=top.train,
        deploy=top.deploy,
        measure=top.measure,
        steps=steps,
        output=top.output or f"runs/{top.name}",
        seed=top.seed,
        source=source,
        base_dir=base_dir,
        written=_plain(raw),
    )


def _plain(raw: dict) -> dict:
    """A JSON-safe deep copy of the user's mapping (YAML dates and the like become text)."""
    import json

    return json.loads(json.dumps(raw, default=str))


def check_step_order(names: list[str], *, where: str) -> None:
    """Refuse, before any work, a step that cannot follow an earlier one: every step works on
    a float model, so a quantizing step must come last (prune, then quantize). A storage-only
    step (``StepSpec.storage_only``: ``encode.entropy``) changes how the artifact stores
    tensors, not the model: it must be the very last step, and may follow a quantizing one."""
    for i, name in enumerate(names[:-1]):
        if get_step(name).storage_only:
            raise RecipeError(f"{where}: steps[{i}] {name} must be the last step (it only "
                              f"changes how the artifact stores tensors); move "
                              f"{names[i + 1]} before it")
        if get_step(name).quantizes and not get_step(names[i + 1]).storage_only:
            later = names[i + 1]
            raise RecipeError(f"{where}: steps[{i + 1}] {later} cannot follow steps[{i}] {name}: "
                              f"{name} quantizes the model and {later} works on float weights; "
                              f"put {later} before {name} (quantization is the last step)")


def _parse_step(index: int, entry: dict, source: str, base_dir: Path | None = None
                ) -> ParsedStep:
    return parse_step(entry, where=f"{source}: steps[{index}]", base_dir=base_dir)


def parse_step(entry: dict, *, where: str, base_dir: Path | None = None) -> ParsedStep:
    """One ``{name: options}`` step validated by its config type, problems as one line that
    starts with ``where`` (recipes, and ``lighten.compress`` given a mapping)."""
    if len(entry) != 1:
        keys = ", ".join(map(str, entry)) or "nothing"
        raise RecipeError(f"{where}: each step is one mapping 'name: {{options}}', got keys {keys}")
    (name, options), = entry.items()
    try:
        spec = get_step(name)
    except RecipeError as err:
        raise RecipeError(f"{where}: {err}") from None
    try:
        # base_dir: model files a step names (a distill teacher) are relative to the recipe
        config = spec.config_type.model_validate(options or {}, context={"base_dir": base_dir})
    except ValidationError as err:
        message = describe_validation_error(err, spec.config_type)
        raise RecipeError(f"{where} {name}: {message}") from None
    return ParsedStep(name, config)


def _resolve_paths(spec: BaseModel, base_dir: Path, fields: tuple[str, ...]) -> BaseModel:
    """Relative file paths in a recipe are relative to the recipe file, not the shell."""
    update = {}
    for name in fields:
        value = getattr(spec, name, None)
        if not value:
            continue
        file_part, sep, rest = value.partition(":") if name == "python" else (value, "", "")
        candidate = base_dir / file_part
        if not Path(file_part).is_absolute() and candidate.exists():
            # absolute, so artifacts that record the spec load from any working directory
            update[name] = f"{candidate.resolve()}{sep}{rest}"
    return spec.model_copy(update=update) if update else spec


def describe_validation_error(err: ValidationError, schema: type[BaseModel]) -> str:
    """One line for the first problem: where, what, and what is allowed."""
    # a typo shows up as "unknown key" and "missing key"; the unknown key is the useful one
    errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    union = _union_alternatives(errors)
    if union is not None:
        return union
    # pydantic puts validator and union-member tags in the path ('function-after[...]',
    # 'HFTokenizerSpec', "literal['char']"); never last: the last part is the user's own key
    *inner, last = first["loc"] or [""]
    loc = [p for p in inner if not _is_member_tag(p)] + [last]
    where = _format_loc(loc)
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(schema, loc[:-1])
        hint = did_you_mean(loc[-1], allowed)
        if allowed:
            hint += f"{' ' if hint else '; '}allowed keys: {', '.join(allowed)}"
        return f"unknown key {where!r}{hint}"
    if first["type"] == "missing":
        return f"missing required key {where!r}"
    if first["type"] == "model_type":  # pydantic names the internal class; say what to write
        allowed = _allowed_keys(schema, loc)
        keys = f" with keys {', '.join(allowed)}" if allowed else ""
        value = first.get("input")
        return f"{where}: should be a mapping{keys} (got {value!r})"
    value = first.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict | list) else ""
    message = first["msg"].removeprefix("Value error, ")
    return f"{where}: {message}{shown}" if where else f"{message}{shown}"


_TYPE_TAGS = {"bool", "int", "float", "str", "list", "dict", "none", "tuple", "set"}


def _is_member_tag(part) -> bool:
    """A tag pydantic adds to a location for one member of a union (``bool``,
    ``literal['auto']``, ``function-after[...]``, a model's class name), not a user's key."""
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part
                                      or part.startswith("function-") or part[:1].isupper())


def _union_alternatives(errors: list[dict]) -> str | None:
    """A value no member of a union accepted (``gate: maybe`` for ``bool | 'auto'``): one
    line naming every alternative, instead of the first member's complaint under its tag."""
    loc = tuple(errors[0]["loc"])
    if len(loc) < 2 or not _is_member_tag(loc[-1]):
        return None
    same = [e for e in errors if tuple(e["loc"][:-1]) == loc[:-1] and _is_member_tag(e["loc"][-1])]
    if len(same) < 2:
        return None
    wanted = list(dict.fromkeys(e["msg"].removeprefix("Value error, ").removeprefix(
        "Input should be ").split(",")[0] for e in same))
    where = _format_loc([p for p in loc[:-1] if not _is_member_tag(p)])
    value = errors[0].get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict | list) else ""
    return f"{where}: should be {' or '.join(wanted)}{shown}"


def _format_loc(loc: list) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _allowed_keys(schema: type[BaseModel], loc: list) -> list[str]:
    current: Any = schema
    for part in loc:
        if isinstance(part, int):
            continue
        model = _as_model(current)
        if model is None or part not in model.model_fields:
            return []
        current = model.model_fields[part].annotation
    model = _as_model(current)
    return list(model.model_fields) if model else []


def _as_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            found = _as_model(arg)
            if found is not None:
                return found
    return None
