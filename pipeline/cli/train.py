"""python -m pipeline train --backbone NAME  ->  models/NAME/, reports/train/NAME.json

A killed run started again with the same command resumes: finished folds and the last completed
epoch of the unfinished fold wait in models/.resume/NAME-<hash of the resolved settings>/.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline import distributed
from pipeline.backbone import planned, resolve_backbone, resume_dir, run_record
from pipeline.cli import load_with_backbone, parse_args
from pipeline.data import load_prepared
from pipeline.io import write_json
from pipeline.models import pick_device
from pipeline.paths import RunPaths
from pipeline.tasks import check_params
from pipeline.train import train_stage


def main(argv=None) -> None:
    args = parse_args(argv, __doc__, backbone=True)
    params, name = load_with_backbone(args)
    paths = RunPaths(Path("."))
    data = load_prepared(paths.prepared)
    backbone = resolve_backbone(params, name, data.train_images.shape[1], args.params, paths.tuning(name))
    backbone = planned(backbone, paths.plan_dir, budget=params.budget.minutes is not None)  # epochs; precision: auto
    check_params(params, data.task, args.params, backbone.settings.monitor)  # before any work
    device = distributed.init_from_env() or pick_device()
    record = run_record(backbone, data, device)
    resume = resume_dir(record, data, paths.resume_root)
    s, is_main = backbone.settings, distributed.is_main()
    if is_main:
        print(
            f"train {name} ({backbone.model_name}, {s.finetune}) on {device.type}"
            f"{f' x {distributed.world_size()} processes' if distributed.is_distributed() else ''}: "
            f"{backbone.folds or data.n_folds} of {data.n_folds} folds x {s.epochs} epochs"
        )
    metrics = train_stage(params, backbone, data, device, record, resume, paths.models(name))
    distributed.shutdown()
    if not is_main:
        return
    write_json(paths.report("train", name), metrics)
    shutil.rmtree(resume, ignore_errors=True)
    shown = [m for m in dict.fromkeys([s.monitor, "accuracy", "log_loss"]) if m in metrics["oof"]]
    print(f"{name}: OOF " + ", ".join(f"{m} {metrics['oof'][m]:.4f}" for m in shown))
