"""python -m pipeline predict --backbone NAME  ->  predictions/NAME/{oof,test}_probs.csv + tta.json, reports/predict/NAME.json

TTA: `tta.select` (or `tta.backbones.NAME`) names a policy of `tta.policies`, or `auto`: every
candidate policy is computed (each view once per model) and the one with the best OOF `tta.metric`
is kept. Its honest score, from choosing on the other folds only, is reported beside it.
"""
from __future__ import annotations

from pipeline.cli import experiment_name, load_with_backbone, parse_args
from pipeline.data import load_prepared
from pipeline.io import atomic_dir, write_json
from pipeline.metrics import scores
from pipeline.models import pick_device
from pipeline.predict import predict_backbone, resolve_tta, select_policy
from pipeline.probs import probs_frame
from pipeline.tracking import Tracker


def main(argv=None) -> None:
    args = parse_args(argv, __doc__, backbone=True)
    params, backbone = load_with_backbone(args)
    tta = params.tta
    pool, computed = resolve_tta(tta, backbone, f"{args.params}: tta")

    data = load_prepared()
    y, folds = data.train["target"].to_numpy(), data.train["fold"].to_numpy()
    preds = predict_backbone(data, f"models/{backbone}", {c: tta.policies[c] for c in computed}, tta.merge,
                             params.predict.batch_size, pick_device())
    chosen, honest = select_policy({c: preds[c].oof for c in pool}, y, folds, tta.metric)
    best = preds[chosen]
    report = {
        "policy": chosen, "select": tta.backbones.get(backbone, tta.select), "merge": tta.merge, "views": tta.policies[chosen],
        "oof": scores(best.oof, y),
        "oof_selection_crossfit": scores(honest, y),  # the honest score of choosing the policy on OOF
        "policies": {c: scores(p.oof, y) for c, p in preds.items()},
        "seeds": {seed: scores(o, y) for seed, o in zip(best.seeds, best.oof_per_seed)},
    }
    with atomic_dir(f"predictions/{backbone}") as out:
        probs_frame(data.train["id"], best.oof, data.classes).to_csv(out / "oof_probs.csv", index=False)
        probs_frame(data.test["id"], best.test, data.classes).to_csv(out / "test_probs.csv", index=False)
        write_json(out / "tta.json", report)
    write_json(f"reports/predict/{backbone}.json", report)
    tracker = Tracker(params.tracking.enabled, experiment_name(params))
    with tracker.run(f"predict {backbone}", params={"backbone": backbone, "policy": chosen, "select": report["select"],
                                                    "merge": tta.merge}, tags={"stage": "predict", "backbone": backbone}):
        tracker.log_metrics({f"oof_{k}": v for k, v in report["oof"].items()})
        tracker.log_metrics({f"oof_selection_crossfit_{k}": v for k, v in report["oof_selection_crossfit"].items()})
        tracker.log_artifact(f"reports/predict/{backbone}.json")
        tracker.log_candidates({policy: ({"backbone": backbone, "policy": policy, "views": ",".join(tta.policies[policy])},
                                          {f"oof_{k}": v for k, v in policy_scores.items()})
                                for policy, policy_scores in report["policies"].items()},
                               chosen, tags={"stage": "predict", "backbone": backbone})
    m = tta.metric
    line = ", ".join(f"{c} {s[m]:.4f}" for c, s in report["policies"].items())
    print(f"{backbone}: OOF {m} by TTA policy: {line}; chosen: {chosen} "
          f"(honest {report['oof_selection_crossfit'][m]:.4f})")
