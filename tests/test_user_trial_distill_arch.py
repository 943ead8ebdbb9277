"""Defects found by trying distill and arch.* as a new user would (session 24), on models the
zoo does not have: an MLP with LayerNorm/GELU and a CNN with grouped convs, a residual add, a
concat and a hidden Linear, on the 8x8 digits."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from lighten import compress, load_data
from lighten.data import DataSpec
from lighten.distill.models import derive_student
from lighten.errors import LightenError, UnsupportedError
from lighten.training import TrainConfig


class MLPNet(nn.Module):
    def __init__(self, hidden=64):
        super().__init__()
        self.inp = nn.Linear(64, hidden)
        self.block = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden * 2), nn.GELU(),
                                   nn.Linear(hidden * 2, hidden))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):  # (B, 1, 8, 8)
        x = self.inp(x.flatten(1))
        x = x + self.block(x)
        return self.head(self.norm(x))


class GroupNet(nn.Module):
    def __init__(self, w=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU())
        self.g1 = nn.Conv2d(w, w, 3, padding=1, groups=4)
        self.bn1 = nn.BatchNorm2d(w)
        self.g2 = nn.Conv2d(w, w, 3, padding=1, groups=2)
        self.side = nn.Sequential(nn.Conv2d(w, w, 1), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1),
                                 nn.BatchNorm2d(2 * w), nn.ReLU(), nn.Dropout(0.1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(2 * w, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):  # (B, 1, 8, 8)
        x = self.stem(x)
        r = self.g2(torch.relu(self.bn1(self.g1(x)))) + x  # residual add
        x = self.mix(torch.cat([r, self.side(x)], dim=1))  # concat, (B, 2w, 4, 4)
        return self.fc2(self.fc1(self.pool(x).flatten(1)))


@pytest.fixture(scope="module")
def digits():
    return load_data(DataSpec(name="digits"))


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_width_student_of_an_mlp_narrows_its_neurons():
    """`student: {width: 0.5}` of an MLP teacher failed with 'no prunable channels found
    (... grouped convs)': width only looked at conv channels. Every group narrows now."""
    torch.manual_seed(0)
    teacher = MLPNet().eval()
    x = torch.randn(2, 1, 8, 8)
    student, parts = derive_student(teacher, x, width=0.5, seed=0)
    assert student.block[1].out_features == 64 and student.inp.out_features == 32
    assert student.norm.normalized_shape == (32,) and student.head.out_features == 10
    assert parts == ["width 0.5 (96/192 neurons)"]
    assert student(x).shape == (2, 10)
    # a CNN's hidden Linear narrows with its channels (it stayed at full width before)
    cnn, parts = derive_student(GroupNet().eval(), x, width=0.5, seed=0)
    assert cnn.fc1.out_features == 16 and "neurons" in parts[0] and "channels" in parts[0]
    # nothing to narrow: one error that says what to do instead
    with pytest.raises(UnsupportedError, match="name a smaller student model"):
        derive_student(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), x, width=0.5)
    # depth of a model without residual blocks: the error names the student key and the fix
    with pytest.raises(UnsupportedError, match="^student depth: no removable residual block.*"
                                               "use width or name a smaller student model"):
        flat = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        derive_student(flat, x, depth=0.5)


def test_mutual_width_student_of_an_mlp_trains_through_compress(digits):
    """The recipe form that failed: mutual learning of two half-width MLP peers."""
    torch.manual_seed(0)
    model, report = compress(MLPNet(), {"distill": {
        "method": "mutual", "student": {"python": f"{__file__}:MLPNet", "width": 0.5},
        "finetune": {"epochs": 0.5}}}, data=digits, train=TrainConfig(batch_size=64, lr=3e-3))
    assert model.inp.out_features == 32
    assert any("96/192 neurons" in n for n in report.notes)


@pytest.mark.parametrize("student, expected", [
    ({"width": 1.5}, "width: Input should be less than or equal to 1 (got 1.5)"),
    ({"widht": 0.5}, "unknown key 'widht'; did you mean 'width'?"),
])
def test_bad_student_says_which_key_and_why(digits, student, expected):
    """A bad student mapping said only '1 validation error for StudentRef'."""
    with pytest.raises(LightenError) as err:
        compress(MLPNet(), {"distill": {"student": student}}, data=digits)
    assert expected in str(err.value) and "validation error" not in str(err.value)


def test_nas_rebuilds_each_candidate_at_the_width_it_was_costed(digits, tmp_path):
    """arch.nas stored each candidate's scale rounded to 4 decimals and rebuilt the winner at
    it; on GroupNet that crossed a width's rounding boundary (a user's run: 6,710 parameters
    against a 6,477 budget; here every stage at 0.875 is costed at 7,130 and rebuilt at 7,918,
    over 7,772). Rebuilds use the exact scale."""
    pytest.importorskip("optuna")
    from lighten.arch.nas import NASSpaceConfig
    from lighten.arch.nas_build import COSTS, CandidateBuilder
    from lighten.arch.nas_space import derive_space

    torch.manual_seed(0)
    base = GroupNet().eval()
    model, report = compress(base, {"arch.nas": {
        "target_params": 0.6, "trials": 2, "space": {"widths": [0.875]},
        "proxy": {"epochs": 0.25}, "rerank": {"top": 1, "epochs": 0.25},
        "finetune": {"epochs": 0.1}}},
        data=digits, workdir=tmp_path, train=TrainConfig(batch_size=64, lr=1e-2))
    s = report.summary
    assert s["budget_met"] and s["params_after"] <= s["budget"]
    # 1,437 digits: both rungs take all of them; the report says the rerank adds epochs only
    assert any("no more than the first" in n for n in report.notes)
    example = (torch.zeros(1, 1, 8, 8),)
    space = derive_space(base, example, NASSpaceConfig(widths=[0.875]))
    builder = CandidateBuilder(base, space, example, inherit=True)
    with open(next(tmp_path.glob("stages/nas-*/candidates.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r["state"] == "complete"]
    assert len(rows) == 2
    for r in rows:
        arch = {k.removeprefix("choice."): float(v) for k, v in r.items()
                if k.startswith("choice.")}
        rebuilt = builder(arch, scale=float(r["scale"]), seed=0, meta=True)
        assert COSTS["params"](rebuilt, example) == float(r["params"]), r
    assert _params(model) == s["params_after"]


def test_overwrite_starts_a_fresh_nas_search(tmp_path):
    """`lighten run --overwrite` resumed the previous run's NAS study (stages/nas-*/study.db)
    instead of searching again; a fresh run removes it (`--resume` keeps it)."""
    from lighten.run_folder import prepare_output

    study = tmp_path / "stages" / "nas-abc" / "study.db"
    study.parent.mkdir(parents=True)
    study.write_bytes(b"old")
    prepare_output(tmp_path, fresh=False)
    assert study.exists()
    prepare_output(tmp_path, fresh=True)
    assert not study.exists() and (tmp_path / "stages").is_dir()


def test_nas_factory_space_is_relative_to_the_recipe(tmp_path, monkeypatch):
    """`space: {python: nets.py:build}` was looked up in the working directory, unlike the
    recipe's `model: {python: ...}` and a distill teacher's, so `lighten run dir/r.yaml` from
    elsewhere failed after the earlier stages had trained."""
    from lighten import load_recipe

    (tmp_path / "nets.py").write_text("from torch import nn\n\n\ndef build(width=8):\n"
                                      "    return nn.Sequential(nn.Flatten(), "
                                      "nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))\n")
    (tmp_path / "r.yaml").write_text(
        "name: r\nmodel: {python: nets.py:build, input_shape: [1, 8, 8]}\n"
        "data: {name: digits}\nsteps:\n"
        "  - arch.nas: {target_params: 0.5, space: {python: nets.py:build, "
        "params: {width: [2, 4]}}}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(tmp_path / "r.yaml")
    assert recipe.steps[0].config.space.python == f"{(tmp_path / 'nets.py').resolve()}:build"


def test_channel_target_note_names_what_it_is_a_fraction_of(digits):
    """After another step, `prune.channels {target_params: 0.5}` keeps half of *its input's*
    parameters, but the note said '49.7% of baseline' (the baseline was 3.5x larger)."""
    torch.manual_seed(0)
    first, _ = compress(GroupNet(24), {"prune.channels": {"ratio": 0.5}}, data=digits)
    second, report = compress(first, {"prune.channels": {"target_params": 0.5}}, data=digits)
    kept = _params(second) / _params(first)
    assert 0.4 < kept <= 0.5
    note = next(n for n in report.notes if "params target 50%" in n)
    assert note.endswith(f"reached {kept:.1%} of the step's input model"), note


@pytest.mark.parametrize("config, need", [
    ({"distill": {}}, "distill needs labelled training data; pass data="),
    ({"arch.nas": {"target_params": 0.5}}, "arch.nas needs labelled training data (each "
                                           "candidate is proxy-trained); pass data="),
])
def test_missing_data_names_training_data_once(config, need):
    """`compress(model, {"distill": {}})` said 'distill needs labelled training data and
    labelled training data for finetune:'."""
    from lighten.errors import DataError

    with pytest.raises(DataError) as err:
        compress(GroupNet(), config)
    assert str(err.value).startswith(need)


def test_fold_atol_below_float_rounding_says_raise_atol(digits):
    """`arch.fold: {atol: 1e-12}` undid every pass and told the user to report a bug; a
    float32-sized difference asks for a larger atol instead."""
    torch.manual_seed(0)
    model = GroupNet().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-2, 2)
            m.running_var.uniform_(0.01, 4)
    folded, report = compress(model, {"arch.fold": {"atol": 1e-12}}, data=digits)
    undone = [n for n in report.notes if "undone" in n]
    assert undone and all("raise atol" in n and "report" not in n for n in undone)
    assert _params(folded) == _params(model)  # the batchnorm pass was undone
    folded, report = compress(model, "arch.fold", data=digits)
    assert _params(folded) < _params(model) and not any("undone" in n for n in report.notes)


def test_distill_without_training_is_refused(digits):
    """`distill: {student: {width: 0.5}, finetune: {epochs: 0}}` returned the re-initialized
    (untrained) student as the stage, with a note that read as if it had been taught."""
    with pytest.raises(LightenError, match="finetune.epochs: Input should be greater than 0"):
        compress(GroupNet(), {"distill": {"student": {"width": 0.5},
                                          "finetune": {"epochs": 0}}}, data=digits)


def test_stage_refs_name_earlier_stages_up_front():
    """A distill teacher `{stage: prune.chanels}` (a typo) failed only after the steps before
    it had run; the recipe is refused when it is read, with the stages it could name."""
    from lighten.errors import RecipeError
    from lighten.recipe import parse_recipe

    def recipe(*steps):
        return {"name": "r", "model": {"zoo": "lenet5"}, "data": {"name": "digits"},
                "steps": list(steps)}

    fold = {"arch.fold": {}}
    prune = {"prune.channels": {"ratio": 0.25}}
    with pytest.raises(RecipeError, match=r"steps\[1\] distill: stage 'prune.chanels' is not "
                       r"an earlier stage of this recipe; did you mean 'prune.channels'\?"):
        parse_recipe(recipe(prune, {"distill": {"teacher": {"stage": "prune.chanels"}}}))
    with pytest.raises(RecipeError, match="earlier stages: baseline, arch.fold$"):
        parse_recipe(recipe(fold, {"distill": {"teachers": ["baseline", {"stage": "distill"}],
                                               "method": "ensemble"}}))
    with pytest.raises(RecipeError, match=r"steps\[0\] prune.channels: stage 'arch.fold'"):
        parse_recipe(recipe({"prune.channels": {"ratio": 0.25, "finetune": {
            "epochs": 1, "teacher": {"stage": "arch.fold"}}}}, fold))
    ok = parse_recipe(recipe(prune, {"distill": {"teacher": {"stage": "prune.channels"}}},
                             {"distill": {"teacher": {"stage": "distill"},
                                          "student": {"stage": "baseline"}}},
                             {"arch.fold": {"finetune": {"epochs": 1,
                                                         "teacher": {"stage": "distill#2"}}}}))
    assert [s.name for s in ok.steps] == ["prune.channels", "distill", "distill", "arch.fold"]
