"""What a fold leaves behind, and how a killed run picks it up again.

`FoldState` is saved (atomically, rank 0 only) after every epoch with the live training state, so a
run started again with the same command continues from the last completed epoch; a finished fold is
kept whole (`save_finished`) until the stage's outputs are written. Everything is tensors and plain
values, loaded with weights_only=True; a features+sklearn head goes beside it in skops' format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline import distributed
from pipeline.io import atomic_save, load_checkpoint
from pipeline.metrics import is_better_scores
from pipeline.sklearn_head import CLASSIFIER_FILE, load_classifier, save_classifier


@dataclass
class FoldResult:
    state_dict: dict
    val_probs: np.ndarray
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    classifier: object | None = None  # features+sklearn: the fitted scikit-learn classifier

    @property
    def kept(self) -> dict:
        """The history row of the weights kept: its `epochs_done` is fractional after a fractional plan's
        last pass; {} without epochs (features+sklearn)."""
        return self.history[self.best_epoch] if self.history else {}


def save_torch(obj, path: Path) -> None:
    atomic_save(path, lambda tmp: torch.save(obj, tmp))


def save_finished(result: FoldResult, ckpt: dict, path: Path) -> None:
    """A finished fold, kept for a resumed run."""
    if result.classifier is not None:
        save_classifier(result.classifier, path.with_name(f"{path.name}.{CLASSIFIER_FILE}"))
    save_torch(
        {
            "state_dict": result.state_dict,
            "val_probs": torch.from_numpy(result.val_probs),
            "best_epoch": result.best_epoch,
            "history": result.history,
            "checkpoint": ckpt,
        },
        path,
    )


def load_finished(path: Path) -> tuple[FoldResult, dict]:
    done = load_checkpoint(path, "delete it and this fold trains again")
    head = path.with_name(f"{path.name}.{CLASSIFIER_FILE}")
    classifier = load_classifier(head) if done["checkpoint"].get("sklearn_head") else None
    return FoldResult(
        done["state_dict"], done["val_probs"].numpy(), done["best_epoch"], done["history"], classifier
    ), done["checkpoint"]


class FoldState:
    """What a fold carries from one epoch to the next: the best validation so far (its scores,
    weights, probabilities and epoch), the validations since it improved, the history. Saved
    atomically after every epoch with the live training state (rank 0 only), loaded to resume."""

    def __init__(self, path, model, optimizer, scheduler, scaler, ema, monitor: str):
        self.path = Path(path) if path else None
        self.model, self.optimizer, self.scheduler, self.scaler, self.ema = model, optimizer, scheduler, scaler, ema
        self.monitor = monitor
        self.start_epoch, self.best, self.result, self.history, self.stale = 0, None, None, [], 0

    def resume(self) -> bool:
        """Load the saved state if there is one; True if training continues from it."""
        if self.path is None or not self.path.exists():
            return False
        state = load_checkpoint(self.path, "delete it and this fold starts over")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.start_epoch, self.best, self.history, self.stale = (
            state["epoch"] + 1,
            state["best"],
            state["history"],
            state["stale"],
        )
        if self.best is not None:
            best_state = state["best_state"] or {k: v.clone() for k, v in state["model"].items()}
            self.result = FoldResult(best_state, state["best_probs"].numpy(), state["best_epoch"])
        return True

    def end_epoch(self, epoch: int, row: dict, validation: tuple | None) -> None:
        """Record `row`; with `validation` (module, scores, probs), keep its weights if they beat the
        best so far, else count a validation without improvement; then save the state."""
        self.history.append(row)
        chosen = None
        if validation is not None:
            chosen, val, probs = validation
            if is_better_scores(self.monitor, val, self.best):
                self.best, self.stale = val, 0
                self.result = FoldResult(
                    {k: v.detach().cpu().clone() for k, v in chosen.state_dict().items()}, probs, epoch
                )
            else:
                self.stale += 1
        self._save(
            epoch, live_is_best=self.result is not None and self.result.best_epoch == epoch and chosen is self.model
        )
        distributed.barrier()

    def _save(self, epoch: int, live_is_best: bool) -> None:
        if self.path is None or not distributed.is_main():
            return
        r = self.result
        save_torch(
            {
                "epoch": epoch,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "best": self.best,
                "stale": self.stale,
                "history": self.history,
                "best_probs": torch.from_numpy(r.val_probs) if r else None,
                # the best weights are the live ones most epochs: store them only when they differ
                "best_state": None if r is None or live_is_best else r.state_dict,
                "best_epoch": r.best_epoch if r else None,
            },
            self.path,
        )
