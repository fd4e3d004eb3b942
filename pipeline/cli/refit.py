"""python -m pipeline refit --backbone NAME  ->  refit/NAME/ (seed<s>/model.pt, test_probs.csv, holdout_probs.csv,
refit.json), reports/refit/NAME.json

`refit.enabled: true` (or auto, where the plan chose it): one model per seed of `refit.seeds` trained on every
training row for the mean of the epochs the folds kept, predicting test (and cv.holdout) with the TTA policy
predict chose. Off: refit.json says so and the ensemble uses the fold models. A killed run started again
resumes (models/.resume/).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.cli import load_with_backbone, parse_args
from pipeline.io import atomic_dir, read_json, write_json
from pipeline.paths import REFIT_RECORD, RunPaths


def _refit(params, name: str, paths: RunPaths, params_path: str) -> tuple[dict, dict]:
    """The refit of backbone `name` into refit/<name>/; returns (its record, the predict stage's TTA choice).
    The heavy imports (torch, timm) happen here: refit off, the stage takes a second, not six."""
    import dataclasses

    from pipeline.backbone import planned, resolve_backbone, resume_dir, run_record
    from pipeline.data import load_prepared
    from pipeline.models import pick_device
    from pipeline.refit import cv_choices, predict_refit, refit_models, refit_record, refit_settings, write_refit
    from pipeline.tasks import check_params

    data = load_prepared(paths.prepared)
    backbone = resolve_backbone(params, name, data.train_images.shape[1], params_path, paths.tuning(name))
    backbone = planned(backbone, paths.plan_dir, budget=params.budget.minutes is not None)
    check_params(params, data.task, params_path, backbone.settings.monitor)
    choices = cv_choices(paths.models(name), data.n_folds)
    backbone = dataclasses.replace(backbone, settings=refit_settings(backbone.settings, choices))
    seeds, device = params.refit.seeds or [backbone.settings.seed], pick_device()
    record = {**run_record(backbone, data, device), "stage": "refit", "seeds": seeds}
    resume = resume_dir(record, data, paths.resume_root)
    tta = read_json(paths.predictions(name) / "tta.json")
    print(f"refit {name}: {len(seeds)} model(s) on all {len(data.train)} rows x {backbone.settings.epochs:.2f} epochs")
    with atomic_dir(paths.refit(name)) as out:
        models = refit_models(data, backbone, seeds, out, device, resume)
        probs = predict_refit(data, out, tta, params.predict.batch_size, device)
        record = refit_record(backbone, choices, seeds, tta, models)
        if data.holdout is not None:  # reported only: nothing is chosen on these rows
            record["holdout"] = data.task.scores(probs["holdout"], data.holdout_targets)
        write_refit(out, data, probs, record)
    shutil.rmtree(resume, ignore_errors=True)
    return record, tta


def main(argv=None) -> None:
    args = parse_args(argv, __doc__, backbone=True)
    params, name = load_with_backbone(args)
    paths = RunPaths(Path("."))
    if not params.refit.planned(paths.plan_dir, name).enabled:
        with atomic_dir(paths.refit(name)) as out:
            write_json(out / REFIT_RECORD, {"enabled": False})
        write_json(paths.report("refit", name), {"enabled": False})
        why = "the plan chose none" if params.refit.enabled == "auto" else "false"
        print(f"refit {name}: off (refit.enabled: {why}); the ensemble uses its fold models")
        return
    from pipeline.tracking import Tracker, experiment_name

    record, tta = _refit(params, name, paths, args.params)
    write_json(paths.report("refit", name), record)
    tracker = Tracker(params.tracking.enabled, experiment_name(params))
    logged = {"backbone": name, **{k: record[k] for k in ("epochs", "ema", "seeds", "policy", "finetune")}}
    with tracker.run(f"refit {name}", params=logged, tags={"stage": "refit", "backbone": name}):
        tracker.log_metrics({f"holdout_{k}": v for k, v in record.get("holdout", {}).items()})
    m = params.tta.metric
    bag = f" (fold bag {tta['holdout'][m]:.4f})" if "holdout" in tta else ""
    held = f"; holdout {m} {record['holdout'][m]:.4f}{bag}" if "holdout" in record else ""
    print(f"{name}: refit {record['epochs']:.2f} epochs x {len(record['seeds'])} model(s){held}")
