"""python -m pipeline analyze  ->  reports/oof/ (index.html, summary.json, analysis.json, figures/, tables/)

Reads every backbone's predictions/<backbone>/oof_probs.csv, the ensemble's submissions/oof_probs.csv
and the prepared images; never the test predictions.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.analyze import analyze_model, diversity, image_properties, never_predicted, per_class_accuracy, summary
from pipeline.cli import experiment_name, parse_args
from pipeline.config import ConfigError, flatten, load_params, resolve_train_settings, to_dict
from pipeline.data import default_augment, load_prepared
from pipeline.io import atomic_dir
from pipeline.probs import read_probs
from pipeline.report import write_report
from pipeline.tracking import Tracker

PREPARED = Path("data/prepared")
ENSEMBLE_OOF = Path("submissions/oof_probs.csv")
OUT = Path("reports/oof")


def main(argv=None) -> None:
    args = parse_args(argv, __doc__)
    params = load_params(args.params)
    cfg = params.analyze
    backbones = list(params.train.backbones)
    if "ensemble" in backbones or "models" in backbones:
        raise ConfigError(f"{args.params}: train.backbones: 'ensemble' and 'models' name report sections; rename that key")

    data = load_prepared(PREPARED)
    ids, y = data.train["id"].to_numpy(), data.train["target"].to_numpy()
    folds = data.train["fold"].to_numpy()
    oof = {b: read_probs(f"predictions/{b}/oof_probs.csv", ids, data.classes, b) for b in backbones}
    oof["ensemble"] = read_probs(ENSEMBLE_OOF, ids, data.classes, "ensemble")
    properties = image_properties(data.train_images, data.train.get("width"), data.train.get("height"))

    analyses = []
    for name, probs in oof.items():
        if name in backbones:
            augment = resolve_train_settings(params.train, name).augment or default_augment(data.train_images.shape[1])
            where = f"train.backbones.{name}.augment" if params.train.backbones[name].augment else "train.augment"
        else:  # the ensemble: its members may differ, so no "already on" check
            augment, where = None, "train.augment"
        analyses.append(analyze_model(
            name, probs, y, folds, data.classes, properties, augment, top_k=cfg.top_k, pairs=cfg.confused_pairs,
            calibration_bins=cfg.calibration_bins, slice_buckets=cfg.slice_buckets, alpha=cfg.significance,
            where=where, metric=params.competition.metric))
    div = diversity({b: oof[b] for b in backbones}, y)
    per_class = per_class_accuracy(oof, y, data.classes)
    headline = summary(analyses, div)

    title = f"Out-of-fold error analysis: {experiment_name(params)}"
    with atomic_dir(OUT) as tmp:
        write_report(tmp, analyses, div, per_class, headline, ids, y, folds, data.classes, data.train_images,
                     cfg.examples_per_pair, title)
    tracker = Tracker(params.tracking.enabled, experiment_name(params))
    with tracker.run("analyze", params={f"analyze.{k}": v for k, v in flatten(to_dict(cfg)).items()},
                     tags={"stage": "analyze"}):
        tracker.log_metrics({k.replace("~", "_vs_"): v for k, v in flatten(headline).items()
                             if isinstance(v, (int, float)) and v == v})
        tracker.log_artifacts(str(OUT), "oof")
    for a in analyses:
        missing = never_predicted(a.per_class)
        shown = dict.fromkeys([params.competition.metric, "accuracy"])
        print(f"{a.name}: OOF " + ", ".join(f"{m} {a.scores[m]:.4f}" for m in shown) + f", ECE {a.ece:.4f}, "
              f"{len(a.advice)} weak slice(s)" + (f"; {a.advice[0]['augmentation']}" if a.advice else "")
              + (f"; never predicts class {', '.join(missing[:5])} (try train.class_weight: balanced)" if missing else ""))
    print(f"report -> {OUT / 'index.html'}")
