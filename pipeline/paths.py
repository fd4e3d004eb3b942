"""Where a run's files live, in one place. Every stage reads and writes under one root, the repository
(DVC runs each stage there): the doors make `RunPaths(Path("."))`, library functions take the folders
they need as arguments and never read a path relative to the working directory.

    data/prepared/                                   prepare: tables, image caches, stats
    tuning/<backbone>/best_params.yaml               tune
    plan/<backbone>.json                             plan: the epochs (and precision) train runs
    models/<backbone>/seed<s>/fold<k>/model.pt       train (models/.resume/<backbone>-<hash>/ while it runs)
    predictions/<backbone>/{oof,test,holdout}_probs.csv, tta.json   predict
    refit/<backbone>/seed<s>/model.pt, {test,holdout}_probs.csv, refit.json   refit
    submissions/                                     ensemble: submission.csv, methods/, ensemble.json
    reports/<stage>/<backbone>.json, reports/<stage>.json, reports/oof/   each stage's report
    reports/timing/<stage>.json                      each stage's clock (its DVC stage's output)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError

REFIT_RECORD = "refit.json"  # refit/<backbone>/refit.json: what the refit did, or {"enabled": false}


@dataclass(frozen=True)
class RunPaths:
    """The folders and files of one run under `root`."""

    root: Path = Path(".")

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    def tuning(self, backbone: str) -> Path:
        return self.root / "tuning" / backbone

    @property
    def plan_dir(self) -> Path:
        return self.root / "plan"

    def models(self, backbone: str) -> Path:
        return self.root / "models" / backbone

    @property
    def resume_root(self) -> Path:
        """Where a killed train stage keeps its finished folds and last epoch."""
        return self.root / "models" / ".resume"

    @property
    def predictions_root(self) -> Path:
        return self.root / "predictions"

    def predictions(self, backbone: str) -> Path:
        return self.predictions_root / backbone

    @property
    def refit_root(self) -> Path:
        return self.root / "refit"

    def refit(self, backbone: str) -> Path:
        return self.refit_root / backbone

    @property
    def submissions(self) -> Path:
        return self.root / "submissions"

    def report(self, stage: str, backbone: str | None = None) -> Path:
        """reports/<stage>/<backbone>.json for a stage run per backbone, else reports/<stage>.json."""
        reports = self.root / "reports"
        return reports / stage / f"{backbone}.json" if backbone else reports / f"{stage}.json"

    @property
    def oof_report(self) -> Path:
        """The analyze stage's folder: index.html, figures/, tables/."""
        return self.root / "reports" / "oof"

    @property
    def timing_dir(self) -> Path:
        return self.root / "reports" / "timing"

    def timing(self, stage: str) -> Path:
        """reports/timing/<stage>.json: when `stage` (its DVC name, train@<backbone>) started and ended."""
        return self.timing_dir / f"{stage}.json"


def list_models(models: str | Path, n_folds: int) -> dict[int, list[Path]]:
    """fold -> its checkpoints, one per bagging seed: `models/seed<s>/fold<k>/model.pt`, seeds in numeric order,
    for the folds trained: 0..m-1, m <= `n_folds` (`cv.train_folds`), the same in every seed."""
    models = Path(models)
    seeds = sorted(models.glob("seed*"), key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else -1)
    if not seeds:
        raise PipelineError(f"{models}: no seed<s>/ folders of fold models (run the train stage first)")
    m = sum((seeds[0] / f"fold{k}").is_dir() for k in range(n_folds))
    if m == 0:
        raise PipelineError(f"{seeds[0]}: no fold0/ (run the train stage first)")
    for d in seeds:
        trained = sorted(p.name for p in d.glob("fold*") if p.is_dir())
        if trained != sorted(f"fold{k}" for k in range(m)):
            raise PipelineError(f"{d}: fold folders {trained} are not fold0..fold{m - 1} (rerun the train stage)")
    return {k: [d / f"fold{k}" / "model.pt" for d in seeds] for k in range(m)}
