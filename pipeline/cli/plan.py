"""python -m pipeline plan  ->  models/plan/<backbone>.json (its epochs), reports/plan/planned.json

With `budget.minutes` set: measures every backbone's training and prediction speed here, then
chooses its epochs so that the whole `dvc repro` ends inside the budget (pipeline/plan.py). With
`budget.minutes: null`: the epochs of params.yaml, nothing measured.
"""
from __future__ import annotations

import time

from pipeline.cli import experiment_name, parse_args
from pipeline.cli.train import backbone_settings
from pipeline.config import load_params
from pipeline.data import load_prepared
from pipeline.io import atomic_dir, stage_started, write_json
from pipeline.models import pick_device
from pipeline.plan import PLAN, backbone_work, make_plan, measure_speed
from pipeline.predict import resolve_tta
from pipeline.timing import PLANNED, recorded
from pipeline.tracking import Tracker


def main(argv=None) -> None:
    args = parse_args(argv, __doc__)
    params = load_params(args.params)
    data = load_prepared()
    cache_size = data.train_images.shape[1]
    resolved = {b: backbone_settings(params, b, cache_size, args.params) for b in params.train.backbones}
    budget = params.budget.minutes
    if budget is None:
        schedule = {b: {"epochs": s.epochs, "val_every": s.val_every} for b, (_, s, _, _) in resolved.items()}
        _write_schedule(schedule)
        write_json(PLANNED, {"budget_minutes": None, "backbones": schedule})
        print("plan: no budget (budget.minutes: null): " + ", ".join(f"{b} {e['epochs']} epochs"
                                                                     for b, e in schedule.items()))
        return

    device = pick_device()
    work, speeds, precisions = {}, {}, {}
    for b, (model_name, s, image_size, _) in resolved.items():
        _, computed = resolve_tta(params.tta, b, f"{args.params}: tta")
        views = len({v for policy in computed for v in params.tta.policies[policy]})
        work[b] = backbone_work(data, s, views)
        speeds[b], precisions[b] = measure_speed(data, model_name, s, image_size, device,
                                                 params.train.backbones[b].pretrained, params.predict.batch_size,
                                                 params.budget.probe_batches, b)
    seconds = lambda stage: (recorded(stage) or {"seconds": 0.0})["seconds"]  # noqa: E731  (0: never recorded)
    done = {"prepare": seconds("prepare")}
    if params.tune.enabled:
        done.update({f"tune@{b}": seconds(f"tune@{b}") for b in resolved})
    done["plan"] = time.time() - stage_started()
    plan = make_plan(budget, len(data.train), work, speeds, done)
    for b in resolved:
        plan["backbones"][b]["precision"] = precisions[b]
    _write_schedule({b: {k: e[k] for k in ("epochs", "val_every")} for b, e in plan["backbones"].items()})
    write_json(PLANNED, plan)

    tracker = Tracker(params.tracking.enabled, experiment_name(params))
    with tracker.run("plan", params={"budget_minutes": budget, **{f"{b}.{k}": v for b, e in plan["backbones"].items()
                                                                  for k, v in e.items()}}, tags={"stage": "plan"}):
        tracker.log_metrics({f"planned_s.{stage.replace('@', '/')}": s for stage, s in plan["planned_seconds"].items()})
        tracker.log_artifact(PLANNED)
    for b, e in plan["backbones"].items():
        print(f"plan {b}: {e['epochs']} epochs (params: {e['params_epochs']}), {e['precision']}, "
              f"{e['train_images_per_s']:.0f} training and {e['infer_images_per_s']:.0f} inference images/s")
    print(f"plan: {plan['planned_total_seconds'] / 60:.1f} of {budget:g} minutes planned")



def _write_schedule(schedule: dict[str, dict]) -> None:
    """One file per backbone, so that a change to one backbone's plan reruns only its train stage."""
    with atomic_dir(PLAN) as out:
        for backbone, entry in schedule.items():
            write_json(out / f"{backbone}.json", entry)
