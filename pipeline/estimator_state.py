"""Fitted estimators as numbers: a scikit-learn head or an ensembler written as JSON plus arrays, and
rebuilt by calling its own class, so loading runs no code but that class's constructor (no pickle).

A state is {"estimator": type name, "params": constructor arguments, "attrs": fitted attributes}; values
nest as JSON scalars, lists, {"tuple": [...]}, {"dict": {...}}, {"array": ref} and estimators. Arrays go
through `put(array) -> ref` and come back through `get(ref) -> array`: inline lists for a small
ensembler, tensors of a safetensors file for a head. Only the types in `types` are ever built.
"""

from __future__ import annotations

import inspect
from typing import Callable

import numpy as np

from pipeline.errors import PipelineError


def sklearn_types() -> dict[str, type]:
    """The scikit-learn classes a features+sklearn head or the stacking meta-model is made of."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import LabelBinarizer, StandardScaler
    from sklearn.svm import SVC

    kinds = (Pipeline, StandardScaler, LogisticRegression, SVC, OneVsRestClassifier, LabelBinarizer, Ridge)
    return {cls.__name__: cls for cls in kinds}


def inline_put(array: np.ndarray) -> dict:
    return {"dtype": array.dtype.str, "shape": list(array.shape), "values": array.ravel().tolist()}


def inline_get(ref: dict) -> np.ndarray:
    return np.asarray(ref["values"], dtype=np.dtype(ref["dtype"])).reshape(ref["shape"])


def to_state(value, types: dict[str, type], put: Callable[[np.ndarray], object], where: str):
    """`value` as JSON-ready numbers; an estimator must be one of `types`."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise PipelineError(f"{where}: an array of Python objects cannot be stored as numbers")
        return {"array": put(value)}
    if isinstance(value, list):
        return [to_state(v, types, put, where) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [to_state(v, types, put, where) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: to_state(v, types, put, where) for k, v in value.items()}}
    name = type(value).__name__
    if types.get(name) is not type(value):
        raise PipelineError(f"{where}: a {type(value).__module__}.{name} cannot be stored as numbers")
    names = [p for p in inspect.signature(type(value).__init__).parameters if p != "self"]
    params = {p: getattr(value, p) for p in names}
    attrs = {k: v for k, v in vars(value).items() if k not in params}
    return {
        "estimator": name,
        "params": {k: to_state(v, types, put, f"{where}.{name}.{k}") for k, v in params.items()},
        "attrs": {k: to_state(v, types, put, f"{where}.{name}.{k}") for k, v in attrs.items()},
    }


def from_state(state, types: dict[str, type], get: Callable[[object], np.ndarray], where: str):
    """The value `to_state` wrote, estimators rebuilt from `types` only; a one-line error otherwise."""
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    if isinstance(state, list):
        return [from_state(v, types, get, where) for v in state]
    if not isinstance(state, dict) or len(state) not in (1, 3):
        raise PipelineError(f"{where}: not a stored value: {str(state)[:80]}")
    try:
        if "array" in state:
            return get(state["array"])
        if "tuple" in state:
            return tuple(from_state(v, types, get, where) for v in state["tuple"])
        if "dict" in state:
            return {k: from_state(v, types, get, f"{where}.{k}") for k, v in state["dict"].items()}
        cls = types.get(state["estimator"])
        if cls is None:
            raise PipelineError(f"{where}: unknown estimator type '{state['estimator']}' (known: {', '.join(types)})")
        obj = cls(**{k: from_state(v, types, get, f"{where}.{k}") for k, v in state["params"].items()})
        for k, v in state["attrs"].items():
            setattr(obj, k, from_state(v, types, get, f"{where}.{k}"))
        return obj
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PipelineError(f"{where}: not a stored value ({exc.__class__.__name__}: {exc})") from None
