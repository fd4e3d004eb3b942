"""`ensemble` stage: ensembles of the backbones fitted on OOF probabilities, honest scores, submissions.

    python -m pipeline ensemble    # writes submissions/, reports/ensemble.json, reports/metrics.json

Every method is fitted on OOF probabilities only (never on test predictions or answers) and scored
by cross-fitting over the CV folds, so the score that picks the final method is not optimistic.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import ConfigError, Params
from pipeline.data import PreparedData
from pipeline.ensemblers import ENSEMBLES, Ensemble, create_ensemble, cross_fit, ensemble_state
from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, atomic_write_text, read_json, write_json
from pipeline.metrics import argbest, best_policy, is_better, proxy_of
from pipeline.paths import REFIT_RECORD
from pipeline.postprocess import Step, choose_step
from pipeline.submission import SubmissionFormat
from pipeline.tasks import Task, check_params


@dataclass
class MethodFit:
    """One method of the ensemble stage: fitted on all OOF rows (for test), cross-fitted (its honest OOF,
    which scores it and picks the submission), and followed by its fitted last step (pipeline/postprocess.py:
    chosen and fitted on the honest OOF; `honest_oof` and `test` are after it)."""

    model: Ensemble
    honest_oof: np.ndarray
    test: np.ndarray
    report: dict = field(default_factory=dict)  # oof (honest), oof_in_sample, weights per backbone, postprocess
    step: Step = field(default_factory=Step)


def fit_methods(
    names: list[str],
    metric: str,
    weights: list[float],
    backbones: list[str],
    oof: list[np.ndarray],
    test: list[np.ndarray],
    y: np.ndarray,
    folds: np.ndarray,
    task: Task,
) -> tuple[dict[str, MethodFit], dict[str, str]]:
    """Fit and cross-fit each method of `names` on the backbones' OOF predictions, then choose and fit its
    last step on its honest OOF (thresholds, temperature: by their cross-fitted `metric`), scored by the
    task's metrics. Returns the fitted methods and, for those that could not be fitted (e.g. stacking on a
    fold lacking a class), their reason."""
    fits, errors = {}, {}
    for name in names:

        def make(name=name):
            return create_ensemble(name, metric, weights, task.name, task.options)

        try:
            model = make().fit(oof, y)
            blended = cross_fit(make, oof, y, folds)
        except ValueError as exc:
            errors[name] = str(exc)
            continue
        step, step_scores, honest = choose_step(task, metric, blended, y, folds)
        report = {"oof": task.scores(honest, y), "oof_in_sample": task.scores(model.predict_proba(oof), y)}
        if step_scores:  # the task had candidates to choose among (identity alone: nothing to report)
            report["oof_before_postprocess"] = task.scores(blended, y)
            report["postprocess"] = {**step.state(), "candidates_oof": step_scores}
        if hasattr(model, "weights_"):
            report["weights"] = dict(zip(backbones, np.round(model.weights_, 6).tolist()))
        fits[name] = MethodFit(model, honest, step.transform(model.predict_proba(test)), report, step)
    return fits, errors


def chain_crossfit(
    names: list[str],
    method: str,
    metric: str,
    weights: list[float],
    members: list[dict[str, np.ndarray]],
    tta_metrics: list[str],
    y: np.ndarray,
    folds: np.ndarray,
    task: Task,
) -> np.ndarray:
    """The honest OOF of the whole fitted chain: for each fold k, everything chosen and fitted on the other
    folds' rows alone (each backbone's TTA policy among `members` (policy -> OOF) by its `tta_metrics`, every
    method cross-fitted on those rows with its last step, `method` or auto's choice among them), then fold
    k's rows predicted by that chain. Scoring it measures the chain, choices included, not its optimism."""
    out = np.zeros((len(y), task.n_outputs))
    for k in np.unique(folds):
        rows, held = folds != k, folds == k
        chosen = [pols[best_policy(pols, y, rows, m, task)] for pols, m in zip(members, tta_metrics)]
        train = [p[rows] for p in chosen]
        fits, _ = fit_methods(
            names, metric, weights, [""] * len(train), train, [p[held] for p in chosen], y[rows], folds[rows], task
        )
        if not fits:
            raise ValueError(f"no ensemble method could be fitted without fold {k}")
        pick = method if method in fits else choose_method(fits, "auto", metric)
        out[held] = fits[pick].test
    return out


def choose_method(fits: dict[str, MethodFit], method: str, metric: str) -> str:
    """`method` itself, or for "auto" the fitted method with the best honest OOF `metric` (the first of
    equals, in `ensemble.methods` order)."""
    if method != "auto":
        return method
    chosen = None
    for name, fit in fits.items():
        if chosen is None or is_better(metric, fit.report["oof"][metric], fits[chosen].report["oof"][metric]):
            chosen = name
    return chosen


# ---------------------------------------------------------------- the stage


def headline(metrics: dict, metric: str, chosen_by: str) -> dict:
    """The few numbers that tell runs apart, flat, for `dvc metrics show` and `dvc exp show` at 120
    columns: the submission's method and honest OOF score (the competition's `metric`, the one the
    method was `chosen_by`, and log loss) and its local leaderboard score if the competition has
    answers. Each backbone's scores, each method's, the TTA choices: reports/ensemble.json."""
    out = {
        "method": metrics["method"],
        **{m: round(metrics["oof"][m], 5) for m in dict.fromkeys([metric, chosen_by, proxy_of(metrics["oof"])])},
    }
    if "holdout" in metrics:
        out[f"holdout_{metric}"] = round(metrics["holdout"][metric], 5)
    if metric in metrics.get("local_leaderboard", {}):
        out[f"lb_{metric}"] = round(metrics["local_leaderboard"][metric], 5)
    return out


def single_report(backbone: str, oof: np.ndarray, y: np.ndarray, predictions: Path, task: Task) -> dict:
    """One backbone's OOF scores beside its predict stage's TTA choice (`predictions`/tta.json), for the report."""
    path = Path(predictions) / "tta.json"
    tta = read_json(path) if path.exists() else {}
    return {
        "oof": task.scores(oof, y),
        "tta": tta.get("policy"),
        "oof_no_tta": tta.get("policies", {}).get("none"),  # on the tta.select_rows the policy was chosen on:
        "oof_no_tta_rows": tta.get("select_rows"),
        "oof_tta_selection_crossfit": tta.get("oof_selection_crossfit"),
        "seeds": tta.get("seeds"),
    }


def refit_rules(backbones: list[str], refit: Path | None, cfg) -> dict[str, str | None]:
    """Per backbone, how its test (and holdout) predictions are made: `cfg.rule` (refit.rule) with
    `refit.enabled`, each backbone's refit (`refit`/<b>/refit.json) having run; None without (its fold bag)."""
    if not cfg.enabled or refit is None:
        return dict.fromkeys(backbones)
    for b in backbones:
        path = refit / b / REFIT_RECORD
        if not path.exists() or not read_json(path).get("enabled"):
            raise PipelineError(
                f"{path}: no refit of {b} yet (refit.enabled: true); run python -m pipeline refit --backbone {b}"
            )
    return dict.fromkeys(backbones, cfg.rule)


def member_predictions(
    part: str, ids, predictions: Path, refit: Path | None, rules: dict[str, str | None], task: Task
) -> list[np.ndarray]:
    """Each backbone's `part` (test, holdout) probabilities as the submission uses them: its fold bag's
    (`predictions`/<b>/<part>_probs.csv, under its chosen TTA) or, under a refit (`rules`), "replace": the refit
    models' (`refit`/<b>/<part>_probs.csv, the same TTA); "join": the mean of the two. A fixed rule, nothing
    fitted: every weight, method and threshold fitted on the fold models' OOF applies as it is, and no
    refit prediction reaches an OOF-fitted choice (a refit model has no OOF rows)."""
    out = []
    for b, rule in rules.items():
        bag = None if rule == "replace" else task.read_predictions(Path(predictions) / b / f"{part}_probs.csv", ids, b)
        if rule is None:
            out.append(bag)
            continue
        full = task.read_predictions(refit / b / f"{part}_probs.csv", ids, f"{b} refit")
        out.append(full if rule == "replace" else (bag + full) / 2)
    return out


def score_holdout(
    fitted: dict[str, MethodFit],
    singles: dict[str, dict],
    data: PreparedData,
    predictions: Path,
    refit: Path | None,
    rules: dict[str, str | None],
) -> None:
    """`cv.holdout`: every fitted method and backbone scored on the held-out rows, each backbone predicted as
    the test set is (`member_predictions`: the bag of fold models under its chosen TTA, or refit.rule's); a
    refit backbone's fold bag alone is scored beside it where predict wrote it (`holdout_fold_bag`; under
    refit.rule: replace it does not). The scores choose nothing."""
    ids, y, task = data.holdout["id"], data.holdout_targets, data.task
    held = member_predictions("holdout", ids, predictions, refit, rules, task)
    for fit in fitted.values():
        blended = fit.model.predict_proba(held)
        fit.report["holdout"] = task.scores(fit.step.transform(blended), y)
        if "postprocess" in fit.report:
            fit.report["holdout_before_postprocess"] = task.scores(blended, y)
    for b, probs in zip(singles, held):
        singles[b]["holdout"] = task.scores(probs, y)
        bag = Path(predictions) / b / "holdout_probs.csv"
        if rules[b] is not None and bag.exists():
            singles[b]["holdout_fold_bag"] = task.scores(task.read_predictions(bag, ids, b), y)


@dataclass
class EnsembleRun:
    """What the ensemble stage decided: every fitted method, the chosen one, and the report."""

    fitted: dict[str, MethodFit]
    chosen: str
    metrics: dict  # reports/ensemble.json


def _policy_oofs(folder: Path, ids, task: Task, where: str) -> tuple[dict[str, np.ndarray], str]:
    """A backbone's OOF predictions under every TTA policy its predict stage chose among (policy -> OOF),
    and the metric that chose: what the honest chain cross-fits the TTA choice from."""
    tta = read_json(folder / "tta.json") if (folder / "tta.json").exists() else {}
    pool = tta.get("pool", [])
    if not pool:  # predictions written before the pool was kept: the choice is taken as given
        return {"chosen": task.read_predictions(folder / "oof_probs.csv", ids, where)}, task.PROXY
    oofs = {p: task.read_predictions(folder / "policies" / f"{p}_oof.csv", ids, where) for p in pool}
    return oofs, tta["metric"]


def fit_stage(
    params: Params, data: PreparedData, predictions: Path, where: str, refit: Path | None = None
) -> EnsembleRun:
    """Fit and cross-fit every method of `ensemble.methods` on the backbones' OOF probabilities in
    `predictions`/<backbone>/ (predictions/), each with its fitted last step, choose one (`ensemble.method`),
    score the whole chain honestly (`chain_crossfit`), and report it beside the best single backbone. Test
    (and holdout) predictions per backbone: `member_predictions`, a refit's (in `refit`/, refit/) by refit.rule."""
    cfg, backbones, y, task = params.ensemble, list(params.train.backbones), data.targets, data.task
    bad = [m for m in cfg.methods if m not in ENSEMBLES]  # the registry's names; the rest was checked on reading
    if bad:
        raise ConfigError(f"{where}: ensemble.methods: unknown method '{bad[0]}' (known: {', '.join(ENSEMBLES)})")
    check_params(params, task, where)
    folder = {b: Path(predictions) / b for b in backbones}
    oof = [task.read_predictions(folder[b] / "oof_probs.csv", data.train["id"], b) for b in backbones]
    rules = refit_rules(backbones, refit, params.refit)
    test = member_predictions("test", data.test["id"].tolist(), predictions, refit, rules, task)
    weights = [cfg.weights.get(b, 1.0) for b in backbones]
    fitted, errors = fit_methods(cfg.methods, cfg.metric, weights, backbones, oof, test, y, data.folds, task)
    for name, reason in errors.items():
        print(f"ensemble method {name} skipped: {reason}")
    if not fitted:
        raise ConfigError(f"{where}: ensemble.methods: no method could be fitted")
    if cfg.method in errors:
        raise ConfigError(f"{where}: ensemble.method: {cfg.method} could not be fitted ({errors[cfg.method]})")
    chosen = choose_method(fitted, cfg.method, cfg.metric)
    policies = [_policy_oofs(folder[b], data.train["id"], task, b) for b in backbones]
    chain = chain_crossfit(
        list(fitted), cfg.method, cfg.metric, weights, [p for p, _ in policies], [m for _, m in policies], y,
        data.folds, task,
    )  # fmt: skip
    methods = {name: fitted[name].report if name in fitted else {"error": errors[name]} for name in cfg.methods}
    singles = {b: single_report(b, probs, y, folder[b], task) for b, probs in zip(backbones, oof)}
    if data.holdout is not None:
        score_holdout(fitted, singles, data, predictions, refit, rules)
    best_single = backbones[argbest(cfg.metric, [singles[b]["oof"][cfg.metric] for b in backbones])]
    final = task.scores(chain, y)
    fitted[chosen].honest_oof = chain  # what submissions/oof_probs.csv holds: the whole chain's honest OOF
    return EnsembleRun(
        fitted,
        chosen,
        {
            "method": chosen,
            "metric": cfg.metric,
            "oof": final,  # the whole chain cross-fitted: TTA choices, methods, auto's choice, the last step
            "oof_method_crossfit": methods[chosen]["oof"],  # the chosen method alone cross-fitted, choices given
            **({"holdout": methods[chosen]["holdout"]} if data.holdout is not None else {}),
            "best_single": {"backbone": best_single, **singles[best_single]["oof"]},
            "gain_over_best_single": {m: final[m] - singles[best_single]["oof"][m] for m in final},
            "methods": methods,
            "members": backbones,  # the order of the members' probabilities every method was fitted on
            "refit": rules,  # per backbone: how refit models make its test predictions (null: the fold bag)
            "backbones": singles,
        },
    )


@dataclass(frozen=True)
class SubmissionFiles:
    """What `write_submissions` wrote: each method's submission file, and its local leaderboard scores
    (where the competition ships answers)."""

    files: dict[str, str]
    local_leaderboard: dict[str, dict]


def write_submissions(run: EnsembleRun, data: PreparedData, prepared: Path, out: Path) -> SubmissionFiles:
    """`out`/methods/<method>-oof-<metric>-<score>.csv for every fitted method (each checked against the
    sample submission, each scored on the local leaderboard where the competition has answers: reported,
    never used to choose), then the chosen method's submission.csv and its OOF and test probabilities,
    and submissions/ensemble.json (every fitted method as numbers)."""
    metric, methods, task = run.metrics["metric"], run.metrics["methods"], data.task
    files, board = {}, {}
    test_ids = data.test["id"].tolist()
    sample = pd.read_csv(prepared / "sample_submission.csv", dtype=str, keep_default_na=False)
    fmt = SubmissionFormat(**read_json(prepared / "submission_format.json"))
    answers = prepared / "answers.csv"
    with atomic_dir(out / "methods") as folder:
        for name, fit in run.fitted.items():
            submission = task.submission(test_ids, fit.test, fmt)
            task.check_submission(submission, sample, fmt)
            file = f"{name}-oof-{metric}-{methods[name]['oof'][metric]:.4f}.csv"
            submission.to_csv(folder / file, index=False)
            files[name] = f"{out}/methods/{file}"
            if answers.exists():
                board[name] = task.leaderboard(
                    pd.read_csv(answers, dtype=str, keep_default_na=False), test_ids, fit.test
                )
    chosen = run.fitted[run.chosen]
    write_json(
        out / "ensemble.json",
        {
            "method": run.chosen,
            "members": run.metrics["members"],
            "refit": run.metrics["refit"],  # per member: refit.rule where its test predictions are a refit's
            "classes": data.classes,
            "task": task.name,
            "states": {name: ensemble_state(fit.model) for name, fit in run.fitted.items()},
            "postprocess": {name: fit.step.state() for name, fit in run.fitted.items()},
        },
    )
    atomic_write_text(out / "oof_probs.csv", task.frame(data.train["id"], chosen.honest_oof).to_csv(index=False))
    atomic_write_text(out / "test_probs.csv", task.frame(test_ids, chosen.test).to_csv(index=False))
    atomic_write_text(out / "submission.csv", task.submission(test_ids, chosen.test, fmt).to_csv(index=False))
    return SubmissionFiles(files, board)


def stage_report(run: EnsembleRun, written: SubmissionFiles) -> dict:
    """reports/ensemble.json: the fit's report with each method's submission file and local leaderboard
    scores, and the chosen method's leaderboard scores on top (a new dict: `run` is left as it was)."""
    report = copy.deepcopy(run.metrics)
    for name in run.fitted:
        report["methods"][name]["submission"] = written.files[name]
        if name in written.local_leaderboard:
            report["methods"][name]["local_leaderboard"] = written.local_leaderboard[name]
    if run.chosen in written.local_leaderboard:
        report["local_leaderboard"] = written.local_leaderboard[run.chosen]
    return report


def summary_lines(report: dict, metric: str) -> list[str]:
    """The stage's log: each method's honest OOF (and holdout) score, the best single backbone, the gain."""
    names = [m for m in report["oof"] if m != metric]
    other = next(m for m in ("log_loss", "accuracy", "rmse", *names) if m in names)
    lines = [
        f"{name:>13}: honest OOF {metric} {fit['oof'][metric]:.4f}, {other} {fit['oof'][other]:.4f}"
        + (f"; holdout {metric} {fit['holdout'][metric]:.4f}" if "holdout" in report else "")
        + (" <- submission.csv" if name == report["method"] else "")
        for name, fit in report["methods"].items()
        if "oof" in fit
    ]
    best = report["best_single"]
    lines.append(
        f"the whole chain ({report['method']}), every choice cross-fitted: "
        f"honest OOF {metric} {report['oof'][metric]:.4f}"
    )
    return lines + [
        f"best single backbone {best['backbone']}: OOF {metric} {best[metric]:.4f}; "
        f"gain of the ensemble ({report['method']}) {report['gain_over_best_single'][metric]:+.4f}"
    ]


def log_stage(run: EnsembleRun, metrics: dict, tracker, submissions: Path, report: str) -> None:
    """The ensemble's MLflow run: the chosen method's scores and files (`metrics`: the stage's report),
    a nested run per method."""
    methods = metrics["methods"]
    weights = lambda name: {f"weight_{b}": w for b, w in methods[name].get("weights", {}).items()}  # noqa: E731
    with tracker.run(
        "ensemble",
        params={"method": run.chosen, "metric": metrics["metric"], "methods": ",".join(methods), **weights(run.chosen)},
        tags={"stage": "ensemble"},
    ):
        tracker.log_metrics({f"oof_{m}": v for m, v in metrics["oof"].items()})
        tracker.log_metrics({f"gain_{m}": v for m, v in metrics["gain_over_best_single"].items()})
        tracker.log_metrics({f"holdout_{m}": v for m, v in metrics.get("holdout", {}).items()})
        if "local_leaderboard" in metrics:
            tracker.log_metrics({f"local_leaderboard_{m}": v for m, v in metrics["local_leaderboard"].items()})
        for path in (submissions / "submission.csv", submissions / "oof_probs.csv", report):
            tracker.log_artifact(str(path))
        tracker.log_candidates(
            {
                name: (
                    {"method": name, **weights(name)},
                    {
                        **{f"oof_{m}": v for m, v in methods[name]["oof"].items()},
                        **{f"holdout_{m}": v for m, v in methods[name].get("holdout", {}).items()},
                        **{f"local_leaderboard_{m}": v for m, v in methods[name].get("local_leaderboard", {}).items()},
                    },
                )
                for name in run.fitted
            },
            run.chosen,
            tags={"stage": "ensemble"},
            artifacts={name: methods[name]["submission"] for name in run.fitted},
        )
