"""`predict` stage: class probabilities of every fold model under test-time augmentation (TTA).

    python -m pipeline predict --backbone resnet10t    # writes predictions/resnet10t/

A TTA policy is a list of views (`tta.policies` in params.yaml) merged per model, a view listed twice
weighing twice (airbench's policy: the plain and mirrored views 1/4 each, four shifts 1/8). The candidates
are compared on `tta.select_rows` of the OOF rows (each view computed once per model, shared by every
candidate); the chosen policy's views alone then predict the other OOF rows, test and holdout, so the
same policy produces every file and they are comparable for ensembling:
  oof_probs.csv   each fold model on its own validation rows (mean over seeds when bagged)
  test_probs.csv  the mean over all fold x seed models on the test images
  tta.json        every candidate policy's OOF score (on the rows chosen on), the chosen one, and the honest
                  (cross-fitted) score of choosing
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import ConfigError
from pipeline.data import PreparedData, Rows
from pipeline.inference import fold_input_config, load_fold_model
from pipeline.io import write_json
from pipeline.metrics import best_policy
from pipeline.paths import list_models
from pipeline.tasks import Task
from pipeline.tta import TTA_VIEWS, predict_views


@dataclass
class PolicyPredictions:
    oof: np.ndarray  # (N, C): each row by its own fold's models, mean over seeds
    oof_per_seed: np.ndarray  # (S, N, C)
    test: np.ndarray | None  # (M, C): mean over all fold x seed models (None: not predicted: not the chosen
    # policy, or a refit replaces it)
    seeds: list[str]  # the bagging seeds, in the order of oof_per_seed
    holdout: np.ndarray | None = None  # (H, C): cv.holdout's rows as the test set is predicted


@dataclass
class Predictions:
    """A backbone's predictions under its TTA policies and the choice among them. Every policy was computed
    on the OOF rows the choice was made on (`chosen_on`); elsewhere a policy's OOF is the chosen one's, which
    the choice never saw, so the policies differ on the chosen-on rows alone, and whatever cross-fits the
    choice over all rows (the ensemble's honest chain) tells them apart there only, as the choice did."""

    policies: dict[str, PolicyPredictions]
    chosen: str
    honest: np.ndarray  # (N, C): the OOF of choosing, cross-fitted on the chosen-on rows, the chosen's elsewhere
    chosen_on: np.ndarray  # (N,) bool: the OOF rows the choice was made on


def choice_rows(folds: np.ndarray, select_rows: int | None, seed: int = 0) -> np.ndarray:
    """A boolean mask over the OOF rows: those `tta.select_rows` keeps for the choice, the same share of each
    fold's (`folds`: the folds the choice cross-fits over), drawn at random with `seed`; all of them when
    select_rows is None or not below their count."""
    on = np.ones(len(folds), dtype=bool)
    if select_rows is None or select_rows >= len(folds):
        return on
    on[:] = False
    rng = np.random.default_rng(seed)
    for k in np.unique(folds):
        rows = np.flatnonzero(folds == k)
        on[rng.choice(rows, max(1, round(select_rows * len(rows) / len(folds))), replace=False)] = True
    return on


def predict_backbone(
    data: PreparedData,
    model_dir: str | Path,
    policies: dict[str, list[str]],
    merge: str,
    batch_size: int,
    device: torch.device,
    test_side: bool = True,
    pool: list[str] | None = None,
    metric: str | None = None,
    select_rows: int | None = None,
) -> Predictions:
    """OOF and test (and `cv.holdout`) probabilities of one backbone's fold (x seed) models under its TTA
    policy, chosen among `pool` (None: every policy) by OOF `metric` (None: the task's proxy). The OOF's rows
    are those the trained folds validate (all, or `data.validated(m)`'s with m of them trained).

    In two passes over the models: every view any policy uses, computed once, on the rows the choice is made
    on (`choice_rows`: all, or `select_rows` of them); then the chosen policy's views alone on the other OOF
    rows and, with `test_side`, on test and holdout (without: refit.rule replace, whose refit models predict
    those). Each policy merges its own views per model; models are then averaged (seeds per OOF row, folds x
    seeds for test and holdout).
    """
    models = list_models(model_dir, data.n_folds)
    view = data.validated(len(models))
    rows = np.flatnonzero(data.folds < len(models))  # the OOF's rows: those the trained folds validate
    on = choice_rows(view.folds, select_rows)
    first, _ = _predict_models(data, models, policies, merge, batch_size, device, rows[on], {})
    pool, y, folds = pool or list(policies), view.targets[on], view.folds[on]
    chosen, honest_on = select_policy(
        {p: first[p].mean(0) for p in pool}, y, folds, metric or data.task.PROXY, data.task
    )
    others = {"test": data.test_images, **({} if data.holdout is None else {"holdout": data.holdout_images})}
    second, bag = _predict_models(
        data, models, {chosen: policies[chosen]}, merge, batch_size, device, rows[~on], others if test_side else {}
    )
    seeds = [path.parent.parent.name[4:] for path in models[0]]
    per_seed = {}
    for p in policies:
        per_seed[p] = np.zeros((len(seeds), len(rows), data.task.n_outputs))
        per_seed[p][:, on], per_seed[p][:, ~on] = first[p], second[chosen]
    part = lambda name, p: bag[name][p] if p == chosen and name in bag else None  # noqa: E731
    preds = {
        p: PolicyPredictions(per_seed[p].mean(0), per_seed[p], part("test", p), seeds, part("holdout", p))
        for p in policies
    }
    honest = preds[chosen].oof.copy()
    honest[on] = honest_on
    return Predictions(preds, chosen, honest, on)


def _predict_models(
    data: PreparedData,
    models: dict[int, list[Path]],
    policies: dict[str, list[str]],
    merge: str,
    batch_size: int,
    device: torch.device,
    rows: np.ndarray,
    parts: dict[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """`policies`' merged outputs of every fold (x seed) model on its own validation rows among OOF `rows`
    (policy -> (S, len(rows), C), in the order of `rows`), and the mean of all models on each of `parts`
    (part -> policy -> (M, C)); a model with nothing to predict is not loaded."""
    n_seeds, task = len(models[0]), data.task
    views = list(dict.fromkeys(v for vs in policies.values() for v in vs))
    index = {v: i for i, v in enumerate(views)}
    c, m = task.n_outputs, len(models) * n_seeds
    oof = {p: np.zeros((n_seeds, len(rows), c)) for p in policies}
    bag = {part: {p: np.zeros((len(images), c)) for p in policies} for part, images in parts.items()}
    for k, paths in models.items():
        val_idx = rows[data.folds[rows] == k]
        if not len(val_idx) and not parts:
            continue
        for s, path in enumerate(paths):
            model, ckpt = load_fold_model(path, device)
            kwargs = dict(cfg=fold_input_config(ckpt, device), batch_size=batch_size, device=device, views=views)
            kwargs["task"], name = task.for_model(ckpt), path.parent.parent.name
            for part, images in parts.items():
                out = predict_views(model, images, desc=f"{part} fold{k} {name}", **kwargs)
                for p, vs in policies.items():
                    bag[part][p] += task.merge(out[[index[v] for v in vs]], merge) / m
            if len(val_idx):
                val = predict_views(model, Rows(data.train_images, val_idx), desc=f"oof fold{k} {name}", **kwargs)
                for p, vs in policies.items():
                    oof[p][s, np.searchsorted(rows, val_idx)] = task.merge(val[[index[v] for v in vs]], merge)
    return oof, bag


def resolve_tta(tta, backbone: str, where: str) -> tuple[list[str], list[str]]:
    """`tta.policies_for(backbone)` (the policies to choose from, and those computed), every view checked
    against the registered ones (the rest of the `tta` section was checked when params were read)."""
    for name, views in tta.policies.items():
        bad = [v for v in views if v not in TTA_VIEWS]
        if bad:
            raise ConfigError(f"{where}.policies.{name}: unknown view '{bad[0]}' (known: {', '.join(TTA_VIEWS)})")
    return tta.policies_for(backbone)


def select_policy(
    oof: dict[str, np.ndarray], y: np.ndarray, folds: np.ndarray, metric: str, task: Task
) -> tuple[str, np.ndarray]:
    """The policy with the best OOF `metric` (one of the task's), and the honest OOF of choosing that way:
    each fold's rows take the policy that scores best on the other folds' rows (cross-fitted selection)."""
    honest = np.zeros_like(next(iter(oof.values())))
    for k in np.unique(folds):
        held = folds == k
        honest[held] = oof[best_policy(oof, y, ~held, metric, task)][held]
    return best_policy(oof, y, np.ones(len(y), dtype=bool), metric, task), honest


def choose_policy(
    preds: Predictions,
    tta,
    backbone: str,
    pool: list[str],
    y: np.ndarray,
    task: Task,
    holdout_y: np.ndarray | None = None,
) -> dict:
    """The predict stage's report: the policy chosen among `pool` on OOF `tta.metric`, its scores, the
    honest score of choosing that way, every computed policy's scores on the rows the choice was made on and
    each seed's; with `cv.holdout` (`holdout_y`), the chosen policy's scores on the held-out rows too, which
    choose nothing."""
    scores, best, on = task.scores, preds.policies[preds.chosen], preds.chosen_on
    held = {} if holdout_y is None or best.holdout is None else {"holdout": scores(best.holdout, holdout_y)}
    return {
        "policy": preds.chosen,
        "select": tta.backbones.get(backbone, tta.select),
        "metric": tta.metric,  # what chose it
        "pool": pool,  # what it was chosen among: policies/<policy>_oof.csv (the ensemble cross-fits the choice)
        "merge": tta.merge,
        "views": tta.policies[preds.chosen],
        "select_rows": int(on.sum()),  # the OOF rows it was chosen on (tta.select_rows), of
        "oof_rows": len(on),
        "oof": scores(best.oof, y),
        "oof_selection_crossfit": scores(preds.honest, y),  # the honest score of choosing the policy on OOF
        "policies": {c: scores(p.oof[on], y[on]) for c, p in preds.policies.items()},  # on the select_rows
        "seeds": {seed: scores(o, y) for seed, o in zip(best.seeds, best.oof_per_seed)},
        **held,
    }


def write_predictions(folder: Path, data: PreparedData, preds: Predictions, report: dict) -> None:
    """`folder` (predictions/<backbone>/): the chosen policy's OOF, test (and holdout) predictions as the
    task writes them, tta.json (the choice and every policy's scores), and the OOF predictions of every
    policy the choice was among (policies/<policy>_oof.csv: the ensemble stage cross-fits the choice; off the
    rows it was made on, the chosen policy's, as `Predictions` says)."""
    task, best = data.task, preds.policies[report["policy"]]
    (folder / "policies").mkdir()
    for p in report["pool"]:
        task.frame(data.train["id"], preds.policies[p].oof).to_csv(folder / "policies" / f"{p}_oof.csv", index=False)
    task.frame(data.train["id"], best.oof).to_csv(folder / "oof_probs.csv", index=False)
    if best.test is not None:  # else: a refit's replace the fold bag's (refit.rule: replace)
        task.frame(data.test["id"], best.test).to_csv(folder / "test_probs.csv", index=False)
    if best.holdout is not None:
        task.frame(data.holdout["id"], best.holdout).to_csv(folder / "holdout_probs.csv", index=False)
    write_json(folder / "tta.json", report)


def log_stage(report: dict, tta, backbone: str, tracker, report_path: str) -> None:
    """The predict stage's MLflow run: the chosen policy's scores, a nested run per computed policy."""
    tags = {"stage": "predict", "backbone": backbone}
    with tracker.run(
        f"predict {backbone}",
        params={"backbone": backbone, "policy": report["policy"], "select": report["select"], "merge": tta.merge},
        tags=tags,
    ):
        tracker.log_metrics({f"oof_{k}": v for k, v in report["oof"].items()})
        tracker.log_metrics({f"oof_selection_crossfit_{k}": v for k, v in report["oof_selection_crossfit"].items()})
        tracker.log_metrics({f"holdout_{k}": v for k, v in report.get("holdout", {}).items()})
        tracker.log_artifact(report_path)
        tracker.log_candidates(
            {
                policy: (
                    {"backbone": backbone, "policy": policy, "views": ",".join(tta.policies[policy])},
                    {f"oof_{k}": v for k, v in policy_scores.items()},
                )
                for policy, policy_scores in report["policies"].items()
            },
            report["policy"],
            tags=tags,
        )
