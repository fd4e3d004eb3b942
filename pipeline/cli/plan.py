"""python -m pipeline plan  ->  plan/<backbone>.json (its epochs), reports/plan.json

With `budget.minutes` set: measures every backbone's training and prediction speed here, then
chooses its epochs so that the whole `dvc repro` ends inside the budget (pipeline/plan.py). With
`budget.minutes: null`: the epochs of params.yaml, nothing measured.
"""

from __future__ import annotations

from functools import partial

from pipeline.backbone import resolve_backbone
from pipeline.cli import parse_args
from pipeline.config import load_params
from pipeline.data import load_prepared
from pipeline.models import pick_device
from pipeline.plan import no_budget, plan_run, write_plan
from pipeline.predict import tta_views
from pipeline.timing import PLANNED, seconds_so_far
from pipeline.tracking import Tracker, experiment_name


def main(argv=None) -> None:
    args = parse_args(argv, __doc__)
    params = load_params(args.params)
    data = load_prepared()
    backbones = {
        b: resolve_backbone(params, b, data.train_images.shape[1], args.params) for b in params.train.backbones
    }
    budget = params.budget.minutes
    if budget is None:
        write_plan(no_budget(backbones), PLANNED)
        return print(
            "plan: no budget (budget.minutes: null): "
            + ", ".join(f"{b} {bb.settings.epochs} epochs" for b, bb in backbones.items())
        )
    earlier = ["prepare"] + ([f"tune@{b}" for b in backbones] if params.tune.enabled else [])
    views = {b: tta_views(params.tta, b, f"{args.params}: tta") for b in backbones}
    plan = plan_run(
        budget,
        data,
        backbones,
        views,
        pick_device(),
        params.predict.batch_size,
        params.budget.probe_batches,
        partial(seconds_so_far, earlier, "plan"),
    )
    write_plan(plan, PLANNED)
    tracker = Tracker(params.tracking.enabled, experiment_name(params))
    with tracker.run(
        "plan",
        params={
            "budget_minutes": budget,
            **{f"{b}.{k}": v for b, e in plan["backbones"].items() for k, v in e.items()},
        },
        tags={"stage": "plan"},
    ):
        tracker.log_metrics({f"planned_s.{stage.replace('@', '/')}": s for stage, s in plan["planned_seconds"].items()})
        tracker.log_artifact(PLANNED)
    for b, e in plan["backbones"].items():
        print(
            f"plan {b}: {e['epochs']} epochs (params: {e['params_epochs']}), {e['precision']}, "
            f"{e['train_images_per_s']:.0f} training and {e['infer_images_per_s']:.0f} inference images/s"
        )
    print(f"plan: {plan['planned_total_seconds'] / 60:.1f} of {budget:g} minutes planned")
