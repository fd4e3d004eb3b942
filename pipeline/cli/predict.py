"""python -m pipeline predict --backbone NAME  ->  predictions/NAME/{oof,test}_probs.csv + tta.json,
reports/predict/NAME.json (with `cv.holdout`, also holdout_probs.csv: the held-out rows as test is predicted);
under refit.rule: replace, oof_probs.csv alone: the refit models predict test and holdout

TTA: `tta.select` (or `tta.backbones.NAME`) names a policy of `tta.policies`, or `auto`: every
candidate policy is computed (each view once per model) on `tta.select_rows` of the OOF rows and the one
with the best OOF `tta.metric` there is kept; its views alone predict the rest. Its honest score, from
choosing on the other folds only, is reported beside it.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cli import load_with_backbone, parse_args
from pipeline.data import load_prepared
from pipeline.io import atomic_dir, write_json
from pipeline.models import pick_device
from pipeline.paths import RunPaths, list_models
from pipeline.predict import choose_policy, log_stage, predict_backbone, resolve_tta, write_predictions
from pipeline.tracking import Tracker, experiment_name


def main(argv=None) -> None:
    args = parse_args(argv, __doc__, backbone=True)
    params, backbone = load_with_backbone(args)
    paths = RunPaths(Path("."))
    tta = params.tta.planned(paths.plan_dir, backbone)  # under a budget the plan may have dropped TTA
    pool, computed = resolve_tta(tta, backbone, f"{args.params}: tta")
    data = load_prepared(paths.prepared)
    preds = predict_backbone(
        data,
        paths.models(backbone),
        {c: tta.policies[c] for c in computed},
        tta.merge,
        params.predict.batch_size,
        pick_device(),
        test_side=not params.refit.planned(paths.plan_dir, backbone).replaces_fold_bags,
        pool=pool,
        metric=tta.metric,
        select_rows=tta.select_rows,
    )
    held = None if data.holdout is None else data.holdout_targets
    oof_rows = data.validated(len(list_models(paths.models(backbone), data.n_folds)))  # the trained folds' rows
    report = choose_policy(preds, tta, backbone, pool, oof_rows.targets, data.task, held)
    report_path = paths.report("predict", backbone)
    with atomic_dir(paths.predictions(backbone)) as out:
        write_predictions(out, oof_rows, preds, report)
    write_json(report_path, report)
    log_stage(report, tta, backbone, Tracker(params.tracking.enabled, experiment_name(params)), str(report_path))
    m = tta.metric
    line = ", ".join(f"{c} {s[m]:.4f}" for c, s in report["policies"].items())
    print(
        f"{backbone}: OOF {m} by TTA policy: {line}; chosen: {report['policy']} "
        f"(honest {report['oof_selection_crossfit'][m]:.4f})"
        + (f"; holdout {m} {report['holdout'][m]:.4f}" if "holdout" in report else "")
    )
