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
    """A standardised `kind` ("logistic_regression" or "svm") fitted on features `train_x`; one per label
    (one-vs-rest) for multi-hot targets (N, C)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    head = LogisticRegression(max_iter=2000) if kind == "logistic_regression" else SVC(probability=True)
    if np.ndim(train_y) == 2:
        head = OneVsRestClassifier(head)
    return make_pipeline(StandardScaler(), head).fit(train_x, train_y)


def fit_regressor(train_x: np.ndarray, train_y: np.ndarray):
    """features+sklearn on a regression: a ridge on standardised features, fitted on the scaled target."""
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(train_x, np.ravel(train_y))


class LayerFeatures(torch.nn.Module):
    """A timm model's features from one of its `feature_info` stages, averaged over space: (B, C). `layer`
    is a stage index (negative from the end) or a module name, as timm's `feature_info` lists them; the
    wrapper only changes what forward returns, the weights stay the model's own."""

    def __init__(self, model: torch.nn.Module, layer: int | str, where: str = "train.feature_layer"):
        super().__init__()
        info = getattr(model, "feature_info", None)
        if info is None or not hasattr(model, "forward_intermediates"):
            raise PipelineError(f"{where}: {type(model).__name__} has no timm feature_info to take a layer from")
        names = [f["module"] for f in info]
        if isinstance(layer, str):
            if layer not in names:
                raise PipelineError(f"{where}: '{layer}' is not a stage of the model (its stages: {', '.join(names)})")
            layer = names.index(layer)
        if not -len(names) <= layer < len(names):
            raise PipelineError(f"{where}: {layer} is out of the model's {len(names)} stages ({', '.join(names)})")
        self.model, self.index = model, layer % len(names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (feature_map,) = self.model.forward_intermediates(x, indices=[self.index], intermediates_only=True)
        return feature_map.mean(dim=(2, 3))


def feature_extractor(model: torch.nn.Module, layer: int | str | None) -> torch.nn.Module:
    """What features+sklearn feeds its classifier: the model's pooled last features (`layer` None), or a stage's."""
    return model if layer is None else LayerFeatures(model, layer)


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
        if not hasattr(self.classifier, "predict_proba"):  # a regression's ridge: the scaled target, as a head's
            return torch.from_numpy(self.classifier.predict(features)).float().reshape(-1, 1).to(x.device)
        probs = torch.from_numpy(self.classifier.predict_proba(features)).to(x.device)
        if getattr(self.classifier[-1], "multilabel_", False):  # one-vs-rest: each label's logit
            return torch.logit(probs, eps=1e-7)
        return probs.clamp_min(1e-12).log()
