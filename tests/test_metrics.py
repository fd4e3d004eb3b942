"""Every competition metric against scikit-learn on hand-made numbers, with its direction."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, roc_auc_score
from sklearn.metrics import log_loss as sk_log_loss

from pipeline.metrics import argbest, direction, is_better
from pipeline.tasks.single_label import METRICS, SingleLabel

# five rows, three classes: rows 0, 1, 3 right by argmax; row 2 (true 2) predicted 1, row 4 (true 0) predicted 2
Y3 = np.array([0, 1, 2, 1, 0])
P3 = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.5, 0.3], [0.3, 0.6, 0.1], [0.3, 0.1, 0.6]])
Y2 = np.array([0, 0, 1, 1, 1, 0])
P2_POS = np.array([0.1, 0.6, 0.35, 0.8, 0.9, 0.2])  # one positive (0.35) ranked below one negative (0.6)
P2 = np.column_stack([1 - P2_POS, P2_POS])


@pytest.mark.parametrize(
    "name, expected",
    [
        ("accuracy", accuracy_score(Y3, P3.argmax(1))),
        ("log_loss", sk_log_loss(Y3, P3, labels=[0, 1, 2])),
        ("macro_f1", f1_score(Y3, P3.argmax(1), average="macro")),
        ("roc_auc", roc_auc_score(Y3, P3, multi_class="ovr", average="macro")),
        ("quadratic_weighted_kappa", cohen_kappa_score(Y3, P3.argmax(1), weights="quadratic")),
    ],
)
def test_multiclass_metric_matches_sklearn(name, expected):
    assert METRICS[name][0](P3, Y3) == pytest.approx(expected, abs=1e-12)


def test_hand_values():
    assert METRICS["accuracy"][0](P3, Y3) == pytest.approx(0.6)
    assert METRICS["roc_auc"][0](P2, Y2) == pytest.approx(8 / 9)  # 9 positive-negative pairs, one inverted
    assert METRICS["roc_auc"][0](P2, Y2) == pytest.approx(roc_auc_score(Y2, P2_POS))
    # a grade off by one costs less than one off by two: kappa sees the order, accuracy does not
    near = np.eye(5)[[0, 1, 2, 3, 3]]
    far = np.eye(5)[[0, 1, 2, 3, 0]]
    y = np.array([0, 1, 2, 3, 4])
    qwk = METRICS["quadratic_weighted_kappa"][0]
    assert METRICS["accuracy"][0](near, y) == METRICS["accuracy"][0](far, y)
    assert qwk(near, y) > qwk(far, y) + 0.3
    assert qwk(np.eye(3)[[1, 1]], np.array([1, 1])) == 1.0  # sklearn says nan: one grade, all right


def test_multiclass_auc_skips_a_class_absent_from_the_rows():
    y, p = Y3[[0, 1, 3, 4]], P3[[0, 1, 3, 4]]  # no row of class 2
    expected = np.mean([roc_auc_score(y == c, p[:, c]) for c in (0, 1)])
    assert METRICS["roc_auc"][0](p, y) == pytest.approx(expected)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_direction_and_comparator(name):
    better_first = METRICS[name][1]
    assert direction(name) == ("maximize" if better_first else "minimize")
    assert is_better(name, 0.9, 0.1) is better_first and not is_better(name, 0.5, 0.5)
    assert argbest(name, [0.2, 0.8, 0.5]) == (1 if better_first else 0)
    assert (direction(name) == "minimize") == (name == "log_loss")


def test_scores_reports_every_metric():
    assert set(SingleLabel(["0", "1", "2"]).scores(P3, Y3)) == set(METRICS)  # integer classes: kappa too
