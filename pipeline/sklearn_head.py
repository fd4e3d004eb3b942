"""The `features+sklearn` head: a scikit-learn classifier on frozen backbone features, fitted per fold,
stored beside the fold's model.pt in skops' format (no pickle) and run at inference on top of the backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.errors import PipelineError

CLASSIFIER_FILE = "classifier.skops"  # features+sklearn: the fitted head, beside the fold's model.pt


def save_classifier(classifier, path: str | Path) -> None:
    """The features+sklearn head in skops' format: no pickle, so loading it runs no code."""
    import skops.io

    skops.io.dump(classifier, path)


def load_classifier(path: str | Path):
    """A features+sklearn head saved by `save_classifier`. Only skops' trusted types (scikit-learn's
    estimators, numpy arrays) are built: a file naming any other type is refused, never run."""
    import skops.io

    untrusted = skops.io.get_untrusted_types(file=path)
    if untrusted:
        raise PipelineError(f"{path}: refusing to load a classifier holding untrusted types {untrusted}")
    return skops.io.load(path)


def fit_classifier(train_x: np.ndarray, train_y: np.ndarray, kind: str):
    """A standardised `kind` ("logistic_regression" or "svm") fitted on features `train_x`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    head = LogisticRegression(max_iter=2000) if kind == "logistic_regression" else SVC(probability=True)
    return make_pipeline(StandardScaler(), head).fit(train_x, train_y)


class FeaturesClassifier(torch.nn.Module):
    """features+sklearn at inference: frozen backbone features -> scikit-learn `predict_proba`.

    Returns log-probabilities, so the softmax in `predict_proba` gives the classifier's probabilities
    back and TTA averages them like any other model's.
    """

    def __init__(self, backbone: torch.nn.Module, classifier):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x).float().cpu().numpy()
        probs = torch.from_numpy(self.classifier.predict_proba(features)).to(x.device)
        return probs.clamp_min(1e-12).log()
