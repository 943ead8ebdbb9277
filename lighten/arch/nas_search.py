"""``arch.nas`` search loop: an Optuna study over the space, proxy-trained candidates, and what
it leaves in the search folder (``study.db``, ``candidates.csv``, ``pareto.png``).

The study lives in SQLite (``study.db``), so a search that is interrupted and started again
(``lighten run --resume``) loads it and runs only the trials still missing: finished trials
keep their scores and the sampler (TPE or NSGA-II, seeded) continues from them. A trial left
running by the interruption is marked failed and run again as a new trial.

Optuna is an optional dependency (the ``nas`` extra), imported only here, on first use.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lighten.errors import LightenError, UnsupportedError

__all__ = ["Candidate", "pareto_front", "run_study", "trial_rows", "write_csv", "write_plot"]

MAX_SAMPLES_PER_TRIAL = 20  # rejected (over-budget) samples allowed per wanted trial


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise UnsupportedError("arch.nas needs Optuna, which is not installed; run "
                               "`pip install lighten[nas]` (or `pip install optuna`)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


@dataclass
class Candidate:
    """What a trial's objective evaluated (stored in the trial's user attributes)."""

    arch: dict
    scale: float
    cost: float                 # in the budget's unit (MACs, params, bytes, ms)
    facts: dict                 # macs, params, bytes, predicted_ms, widths, describe
    accuracy: float | None = None
    seconds: float = 0.0


def _sampler(optuna, kind: str, seed: int):
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=8)


def run_study(*, storage: Path, name: str, sampler: str, seed: int, trials: int,
              time_budget_s: float | None, sample: Callable, propose: Callable,
              score: Callable, reference: dict | None, progress: Callable[[str], None]):
    """Run the study until ``trials`` trials are complete (over-budget samples do not count)
    or ``time_budget_s`` has passed; returns it. ``propose(arch, trial) -> Candidate | None``
    (None: no model of this shape fits the budget), ``score(candidate, trial) -> accuracy``."""
    optuna = import_optuna()
    directions = ["maximize", "minimize"] if sampler == "nsga2" else ["maximize"]
    study = optuna.create_study(storage=f"sqlite:///{storage}", study_name=name,
                                load_if_exists=True, directions=directions,
                                sampler=_sampler(optuna, sampler, seed))
    state = optuna.trial.TrialState
    for t in study.get_trials(deepcopy=False, states=(state.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, state.FAIL)  # interrupted
    done = len(study.get_trials(deepcopy=False, states=(state.COMPLETE,)))
    if done:
        progress(f"arch.nas: resuming the search: {done} trial(s) already done")
    elif reference is not None and not study.trials:
        # the model's own shape, fitted to the budget first (a finalist of the rerank)
        study.enqueue_trial(reference, user_attrs={"enqueued": "reference"})
    start = time.perf_counter()

    def objective(trial):
        arch = sample(trial)
        cand = propose(arch, trial)
        if cand is None:
            trial.set_user_attr("rejected", "over budget even at the smallest widths")
            raise optuna.TrialPruned()
        t0 = time.perf_counter()
        acc = score(cand, trial)
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
        return (acc, cand.cost) if sampler == "nsga2" else acc

    samples = 0
    while done < trials and samples < MAX_SAMPLES_PER_TRIAL * trials:
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            progress(f"arch.nas: time budget reached after {done} trial(s)")
            break
        try:
            study.optimize(objective, n_trials=1, catch=())
        except LightenError:
            raise
        samples += 1
        done = len(study.get_trials(deepcopy=False, states=(state.COMPLETE,)))
    return study


def trial_rows(study) -> list[dict]:
    """One dict per trial: number, state, choices, costs, proxy accuracy."""
    rows = []
    for t in study.trials:
        acc = t.values[0] if t.values else None
        rows.append({"trial": t.number, "state": t.state.name.lower(),
                     **{f"choice.{k}": v for k, v in t.params.items()},
                     **t.user_attrs, "proxy_accuracy": acc})
    return rows


def pareto_front(rows: list[dict], cost_key: str) -> list[dict]:
    """Completed trials no other trial beats on both proxy accuracy and cost."""
    done = [r for r in rows if r["state"] == "complete" and r.get(cost_key) is not None]
    front = []
    for r in sorted(done, key=lambda r: (r[cost_key], -r["proxy_accuracy"])):
        if not front or r["proxy_accuracy"] > front[-1]["proxy_accuracy"]:
            front.append(r)
    return front


def write_csv(rows: list[dict], path: Path) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def write_plot(rows: list[dict], front: list[dict], cost_key: str, label: str, budget: float,
               chosen: int | None, path: Path) -> bool:
    """Proxy accuracy vs cost of every candidate, the front and the budget; False without
    matplotlib (the table and CSV hold the same numbers)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    done = [r for r in rows if r["state"] == "complete" and r.get(cost_key) is not None]
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter([r[cost_key] for r in done], [r["proxy_accuracy"] for r in done], s=14,
               color="tab:gray", label="candidates")
    ax.plot([r[cost_key] for r in front], [r["proxy_accuracy"] for r in front], "-o",
            color="tab:blue", label="Pareto front")
    best = [r for r in done if r["trial"] == chosen]
    if best:
        ax.scatter([best[0][cost_key]], [best[0]["proxy_accuracy"]], s=80, marker="*",
                   color="tab:red", label="chosen", zorder=3)
    ax.axvline(budget, color="tab:red", linestyle="--", linewidth=1, label="budget")
    ax.set_xlabel(label)
    ax.set_ylabel("proxy accuracy (held-out training data)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path))
    return True
