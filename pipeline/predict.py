"""`predict` stage: class probabilities of every fold model under test-time augmentation (TTA).

    python -m pipeline predict --backbone resnet10t    # writes predictions/resnet10t/

A TTA policy is a list of views (`tta.policies` in params.yaml) merged per model, a view listed twice
weighing twice (airbench's policy: the plain and mirrored views 1/4 each, four shifts 1/8). Each view is
computed once per model and shared by every candidate policy; the same policy produces both files,
so they are comparable for ensembling:
  oof_probs.csv   each fold model on its own validation rows (mean over seeds when bagged)
  test_probs.csv  the mean over all fold x seed models on the test images
  tta.json        every candidate policy's OOF score, the chosen one, and the honest (cross-fitted) score of choosing
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
    test: np.ndarray | None  # (M, C): mean over all fold x seed models (None: not predicted, a refit replaces it)
    seeds: list[str]  # the bagging seeds, in the order of oof_per_seed
    holdout: np.ndarray | None = None  # (H, C): cv.holdout's rows as the test set is predicted


def predict_backbone(
    data: PreparedData,
    model_dir: str | Path,
    policies: dict[str, list[str]],
    merge: str,
    batch_size: int,
    device: torch.device,
    test_side: bool = True,
) -> dict[str, PolicyPredictions]:
    """OOF and test (and `cv.holdout`) probabilities of one backbone's fold (x seed) models under each
    TTA policy; OOF alone without `test_side` (refit.rule: replace, the refit models predict those). The
    OOF's rows are those the trained folds validate (all, or `data.validated(m)`'s with m of them trained).

    Every view any policy uses is computed once per model; each policy merges its own views per
    model, and models are then averaged (seeds per OOF row, folds x seeds for test and holdout).
    """
    models = list_models(model_dir, data.n_folds)
    n_seeds = len(models[0])
    views = list(dict.fromkeys(v for vs in policies.values() for v in vs))
    index = {v: i for i, v in enumerate(views)}
    task = data.task
    folds = data.folds
    rows = np.flatnonzero(folds < len(models))  # the OOF's rows: those the trained folds validate
    c = task.n_outputs
    oof = {p: np.zeros((n_seeds, len(rows), c)) for p in policies}
    others = {"test": data.test_images, **({} if data.holdout is None else {"holdout": data.holdout_images})}
    others = others if test_side else {}
    bag = {part: {p: np.zeros((len(images), c)) for p in policies} for part, images in others.items()}
    for k, paths in models.items():
        val_idx = np.flatnonzero(folds == k)
        for s, path in enumerate(paths):
            model, ckpt = load_fold_model(path, device)
            cfg = fold_input_config(ckpt, device)
            kwargs = dict(cfg=cfg, batch_size=batch_size, device=device, views=views, task=task.for_model(ckpt))
            val = predict_views(
                model, Rows(data.train_images, val_idx), desc=f"oof fold{k} {path.parent.parent.name}", **kwargs
            )
            for part, images in others.items():
                out = predict_views(model, images, desc=f"{part} fold{k} {path.parent.parent.name}", **kwargs)
                for p, vs in policies.items():
                    bag[part][p] += task.merge(out[[index[v] for v in vs]], merge)
            for p, vs in policies.items():
                oof[p][s, np.searchsorted(rows, val_idx)] = task.merge(val[[index[v] for v in vs]], merge)
    seeds, m = [path.parent.parent.name[4:] for path in models[0]], len(models) * n_seeds
    part = lambda name, p: bag[name][p] / m if name in bag else None  # noqa: E731
    return {p: PolicyPredictions(oof[p].mean(0), oof[p], part("test", p), seeds, part("holdout", p)) for p in policies}


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
    preds: dict[str, PolicyPredictions],
    tta,
    backbone: str,
    pool: list[str],
    y: np.ndarray,
    folds: np.ndarray,
    task: Task,
    holdout_y: np.ndarray | None = None,
) -> dict:
    """The predict stage's report: the policy chosen among `pool` on OOF `tta.metric`, its scores, the
    honest score of choosing that way, every computed policy's scores and each seed's; with `cv.holdout`
    (`holdout_y`), the scores on the held-out rows too, which choose nothing."""
    chosen, honest = select_policy({c: preds[c].oof for c in pool}, y, folds, tta.metric, task)
    scores = task.scores
    best = preds[chosen]
    held = (
        {}
        if holdout_y is None or best.holdout is None
        else {
            "holdout": scores(best.holdout, holdout_y),
            "holdout_policies": {c: scores(p.holdout, holdout_y) for c, p in preds.items()},
        }
    )
    return {
        "policy": chosen,
        "select": tta.backbones.get(backbone, tta.select),
        "metric": tta.metric,  # what chose it
        "pool": pool,  # what it was chosen among: policies/<policy>_oof.csv (the ensemble cross-fits the choice)
        "merge": tta.merge,
        "views": tta.policies[chosen],
        "oof": scores(best.oof, y),
        "oof_selection_crossfit": scores(honest, y),  # the honest score of choosing the policy on OOF
        "policies": {c: scores(p.oof, y) for c, p in preds.items()},
        "seeds": {seed: scores(o, y) for seed, o in zip(best.seeds, best.oof_per_seed)},
        **held,
    }


def write_predictions(folder: Path, data: PreparedData, preds: dict[str, PolicyPredictions], report: dict) -> None:
    """`folder` (predictions/<backbone>/): the chosen policy's OOF, test (and holdout) predictions as the
    task writes them, tta.json (the choice and every policy's scores), and the OOF predictions of every
    policy the choice was among (policies/<policy>_oof.csv: the ensemble stage cross-fits the choice)."""
    task, best = data.task, preds[report["policy"]]
    (folder / "policies").mkdir()
    for p in report["pool"]:
        task.frame(data.train["id"], preds[p].oof).to_csv(folder / "policies" / f"{p}_oof.csv", index=False)
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
                    {
                        **{f"oof_{k}": v for k, v in policy_scores.items()},
                        **{f"holdout_{k}": v for k, v in report.get("holdout_policies", {}).get(policy, {}).items()},
                    },
                )
                for policy, policy_scores in report["policies"].items()
            },
            report["policy"],
            tags=tags,
        )
