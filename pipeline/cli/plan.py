"""python -m pipeline plan  ->  plan/<backbone>.json (its epochs), reports/plan.json

With `budget.minutes` set: measures every backbone's training and prediction speed here, then
chooses its epochs so that the whole `dvc repro` ends inside the budget (pipeline/plan.py). With
`budget.minutes: null`: the epochs of params.yaml, nothing measured. Either way `finetune: auto` and
`image_size: auto` are chosen
and `precision: auto` resolved here, and recorded in plan/<backbone>.json, which the train stage reads.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.backbone import resolve_backbone
from pipeline.cli import parse_args
from pipeline.config import load_params
from pipeline.data import load_prepared
from pipeline.models import pick_device
from pipeline.paths import RunPaths
from pipeline.plan import fixed_folds, log_plan, no_budget, plan_run, write_plan
from pipeline.tracking import Tracker, experiment_name


def main(argv=None) -> None:
    args = parse_args(argv, __doc__)
    params = load_params(args.params)
    paths = RunPaths(Path("."))
    data = load_prepared(paths.prepared)
    cache_size = data.train_images.shape[1]
    backbones = {
        b: resolve_backbone(params, b, cache_size, args.params, paths.tuning(b)) for b in params.train.backbones
    }
    budget = params.budget.minutes
    if budget is None:
        folds = fixed_folds(params.cv.train_folds, data.n_folds)
        plan = no_budget(data, backbones, pick_device(), folds, params.refit.enabled)
        write_plan(plan, paths.plan_dir, paths.report("plan"))
        epochs = ", ".join(f"{b} {bb.settings.epochs} epochs" for b, bb in backbones.items())
        print(f"plan: no budget (budget.minutes: null): {epochs}")
        return print_choices(plan)
    plan = plan_run(params, data, backbones, pick_device(), paths.timing_dir)
    write_plan(plan, paths.plan_dir, paths.report("plan"))
    log_plan(plan, Tracker(params.tracking.enabled, experiment_name(params)), paths.report("plan"))
    for b, e in plan["backbones"].items():
        print(
            f"plan {b}: {e['epochs']} epochs (params: {e['params_epochs']}), {e['precision']}, "
            f"{e['train_images_per_s']:.0f} training and {e['infer_images_per_s']:.0f} inference images/s"
        )
    scheme = plan["scheme"]
    print(f"plan: {scheme['folds']} of {scheme['of']} folds trained ({scheme['rule']}: {scheme['reason']})")
    if "refit" in scheme:
        print(f"plan: refit {'on' if scheme['refit'] else 'off'} (refit.enabled: auto: {scheme['refit_reason']})")
    print(f"plan: {plan['planned_total_seconds'] / 60:.1f} of {budget:g} minutes planned")
    print_choices(plan)


def print_choices(plan: dict) -> None:
    for b, e in plan["backbones"].items():
        if "image_size" in e:
            print(f"plan {b}: image_size {e['image_size']} (auto: {e['image_size_reason']})")
        if "finetune" in e:
            print(f"plan {b}: finetune {e['finetune']} (auto: {e['finetune_reason']})")
        if "tta" in e:
            print(f"plan {b}: tta.select {e['tta']} ({e['tta_reason']})")
