import json

import numpy as np
import pandas as pd
import pytest

from pipeline import __main__ as cli
from pipeline.config import CompetitionConfig
from pipeline.ensemblers import (
    ENSEMBLES,
    HardVotingEnsemble,
    RankAveragingEnsemble,
    SoftVotingEnsemble,
    create_ensemble,
    cross_fit,
    ensemble_from_state,
    ensemble_state,
)
from pipeline.errors import PipelineError
from pipeline.estimator_state import from_state, sklearn_types, to_state
from pipeline.prepare import prepare
from pipeline.probs import prediction_frame as probs_frame
from pipeline.sklearn_head import fit_classifier
from pipeline.tasks.single_label import SingleLabel, log_loss
from tests.conftest import write_competition

A = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
B = np.array([[0.1, 0.2, 0.7], [0.3, 0.3, 0.4]])
CLASSES = ["cat", "dog", "frog"]


def test_weighted_soft_vote_matches_hand_computation():
    ens = SoftVotingEnsemble(weights=[1, 3]).fit([A, B], np.array([0, 1]))
    assert ens.weights_.tolist() == [0.25, 0.75]
    expected = np.array(
        [
            [0.25 * 0.6 + 0.75 * 0.1, 0.25 * 0.3 + 0.75 * 0.2, 0.25 * 0.1 + 0.75 * 0.7],
            [0.25 * 0.2 + 0.75 * 0.3, 0.25 * 0.5 + 0.75 * 0.3, 0.25 * 0.3 + 0.75 * 0.4],
        ]
    )
    np.testing.assert_allclose(ens.predict_proba([A, B]), expected)
    assert ens.predict_proba([A, B]).argmax(1).tolist() == [2, 2]


def test_equal_weights_by_default():
    ens = SoftVotingEnsemble().fit([A, B], np.array([0, 1]))
    np.testing.assert_allclose(ens.predict_proba([A, B]), (A + B) / 2)


def test_estimator_contract():
    ens = SoftVotingEnsemble(weights=[2, 1])
    assert vars(ens) == {"weights": [2, 1]}  # __init__ only stores
    with pytest.raises(RuntimeError, match="not fitted"):
        ens.predict_proba([A, B])
    assert ens.fit([A, B], np.array([0, 1])) is ens
    with pytest.raises(ValueError, match="non-negative"):
        SoftVotingEnsemble(weights=[1, -1]).fit([A, B], np.array([0, 1]))
    with pytest.raises(ValueError, match="differ in shape"):
        SoftVotingEnsemble().fit([A, B[:1]], np.array([0, 1]))


def _sample(kind):
    if kind == "label":
        return pd.DataFrame({"image": ["x2", "x1"], "breed": ["cat", "cat"]})
    return pd.DataFrame({"image": ["x2", "x1"], "frog": 0.0, "cat": 0.0, "dog": 0.0})


def test_label_submission_maps_back_to_original_labels():
    sample = _sample("label")
    fmt = SingleLabel(CLASSES).submission_format(sample, "sample_submission.csv")
    sub = SingleLabel(CLASSES).submission(["x2", "x1"], A, fmt)
    assert sub.to_dict("list") == {"image": ["x2", "x1"], "breed": ["cat", "dog"]}
    SingleLabel(CLASSES).check_submission(sub, sample, fmt)


def test_probability_submission_follows_the_sample_columns():
    sample = _sample("probabilities")
    fmt = SingleLabel(CLASSES).submission_format(sample, "sample_submission.csv")
    sub = SingleLabel(CLASSES).submission(["x2", "x1"], A, fmt)
    assert list(sub.columns) == ["image", "frog", "cat", "dog"]
    assert sub["frog"].tolist() == [0.1, 0.3] and sub["cat"].tolist() == [0.6, 0.2]
    SingleLabel(CLASSES).check_submission(sub, sample, fmt)


BINARY = np.array([[0.8, 0.2], [0.3, 0.7]])


@pytest.mark.parametrize(
    "classes, sample, kwargs, positive",
    [
        (["0", "1"], {"id": ["a", "b"], "is_dog": ["0.5", "0.5"]}, {}, "1"),  # fractions: a probability of 1
        (["False", "True"], {"id": ["a", "b"], "target": ["0.5", "0.5"]}, {}, "True"),
        (["cat", "dog"], {"id": ["a", "b"], "dog": ["0", "0"]}, {}, "dog"),  # named after a class
        (["cat", "dog"], {"id": ["a", "b"], "target": ["0", "0"]}, {"positive_class": "cat"}, "cat"),
        (["0", "1"], {"id": ["a", "b"], "target": ["0", "0"]}, {"metric": "roc_auc"}, "1"),  # AUC scores probabilities
    ],
)
def test_binary_single_column_gets_the_positive_class_probability(classes, sample, kwargs, positive):
    sample = pd.DataFrame(sample)
    fmt = SingleLabel(classes).submission_format(sample, "sample_submission.csv", **kwargs)
    assert (fmt.kind, fmt.positive) == ("probability", positive)
    sub = SingleLabel(classes).submission(["a", "b"], BINARY, fmt)
    assert sub.iloc[:, 1].tolist() == BINARY[:, classes.index(positive)].tolist()
    SingleLabel(classes).check_submission(sub, sample, fmt)


def test_binary_label_column_stays_a_label_and_an_unclear_positive_is_asked_for():
    sample = pd.DataFrame({"id": ["a", "b"], "target": ["cat", "cat"]})
    fmt = SingleLabel(["cat", "dog"]).submission_format(sample, "sample_submission.csv", metric="accuracy")
    assert fmt.kind == "label"
    assert SingleLabel(["cat", "dog"]).submission(["a", "b"], BINARY, fmt)["target"].tolist() == ["cat", "dog"]
    with pytest.raises(
        PipelineError,
        match="column 'target' holds one class's probability: set "
        r"competition.positive_class to one of \['cat', 'dog'\]",
    ):
        SingleLabel(["cat", "dog"]).submission_format(sample, "sample_submission.csv", metric="roc_auc")
    with pytest.raises(PipelineError, match="positive_class 'wolf' is not a class"):
        SingleLabel(["cat", "dog"]).submission_format(sample, "sample_submission.csv", positive_class="wolf")


def test_binary_competition_submits_probabilities_through_the_stages(tmp_path, monkeypatch):
    comp = write_competition(tmp_path / "raw" / "comp", n_per_class=6, n_test=4, labels=("0", "1"))
    sample = pd.read_csv(comp / "sample_submission.csv", dtype=str)
    sample.rename(columns={"label": "is_dog"}).assign(is_dog="0.5").to_csv(comp / "sample_submission.csv", index=False)
    prepare(
        CompetitionConfig(source=str(comp), metric="roc_auc", answers=None),
        image_size=8,
        n_folds=2,
        seed=0,
        out_dir=tmp_path / "data/prepared",
        workers=1,
    )
    train = pd.read_csv(tmp_path / "data/prepared/train.csv", dtype={"id": str, "label": str})
    test = pd.read_csv(tmp_path / "data/prepared/test.csv", dtype={"id": str})
    rng = np.random.default_rng(0)
    test_probs = rng.dirichlet(np.ones(2), len(test))
    (tmp_path / "predictions/b").mkdir(parents=True)
    probs_frame(train["id"], rng.dirichlet(np.ones(2), len(train)), ["0", "1"]).to_csv(
        tmp_path / "predictions/b/oof_probs.csv", index=False
    )
    probs_frame(test["id"], test_probs, ["0", "1"]).to_csv(tmp_path / "predictions/b/test_probs.csv", index=False)
    (tmp_path / "params.yaml").write_text(
        "competition: {metric: roc_auc}\ntrain:\n  backbones: {b: {}}\n"
        "ensemble: {methods: [soft_voting]}\ntracking: {enabled: false}\n"
    )
    monkeypatch.chdir(tmp_path)
    assert cli.main(["ensemble"]) == 0
    submission = pd.read_csv(tmp_path / "submissions/submission.csv")
    assert list(submission.columns) == ["id", "is_dog"]
    assert submission["is_dog"].to_numpy() == pytest.approx(test_probs[:, 1])  # not hard 0/1 labels
    report = json.loads((tmp_path / "reports/ensemble.json").read_text())
    assert report["metric"] == "roc_auc" and 0 <= report["oof"]["roc_auc"] <= 1


def test_validation_rejects_wrong_order_missing_rows_and_unknown_labels():
    sample = _sample("label")
    fmt = SingleLabel(CLASSES).submission_format(sample, "sample_submission.csv")
    good = SingleLabel(CLASSES).submission(["x2", "x1"], A, fmt)
    with pytest.raises(PipelineError, match="row 2: ids differ"):
        SingleLabel(CLASSES).check_submission(good.iloc[::-1], sample, fmt)
    with pytest.raises(PipelineError, match="ids differ"):
        SingleLabel(CLASSES).check_submission(good.iloc[:1], sample, fmt)
    with pytest.raises(PipelineError, match="row 3: label is not a class"):
        SingleLabel(CLASSES).check_submission(good.assign(breed=["cat", "wolf"]), sample, fmt)
    with pytest.raises(PipelineError, match="columns"):
        SingleLabel(CLASSES).check_submission(good.rename(columns={"breed": "label"}), sample, fmt)


def test_sample_with_unknown_columns_is_rejected():
    with pytest.raises(PipelineError, match="sample_submission.csv: columns \\['wolf'\\]"):
        sample = pd.DataFrame({"id": [1], "cat": [0], "wolf": [0]})
        SingleLabel(CLASSES).submission_format(sample, "sample_submission.csv")


def test_local_leaderboard_accuracy():
    answers = pd.DataFrame({"id": ["x1", "x2", "x3"], "label": ["dog", "cat", "frog"]})
    probs = np.array([[0.9, 0.1, 0.0], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])  # cat, dog, frog
    assert SingleLabel(CLASSES).leaderboard(answers, ["x2", "x1", "x3"], probs)["accuracy"] == pytest.approx(1.0)
    assert SingleLabel(CLASSES).leaderboard(answers, ["x1", "x2", "x3"], probs)["accuracy"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------- ensembles fitted on OOF


def _informative_and_noisy(n=600, c=4, seed=0):
    """y, one informative, calibrated member (says 0.8 for its class and is right 80% of the time)
    and three pure-noise members."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    right = rng.random(n) < 0.8
    good = np.full((n, c), 0.2 / (c - 1))
    good[np.arange(n), np.where(right, y, (y + 1 + rng.integers(0, c - 1, n)) % c)] = 0.8
    noisy = [rng.dirichlet(np.ones(c), n) for _ in range(3)]
    return y, good, noisy


@pytest.mark.parametrize("method", ["caruana", "optimized"])
def test_fitted_weights_go_to_the_informative_member(method):
    y, good, noisy = _informative_and_noisy()
    ens = create_ensemble(method, metric="log_loss").fit([noisy[0], good, noisy[1], noisy[2]], y)
    assert ens.weights_[1] > 0.9 and ens.weights_.sum() == pytest.approx(1)
    assert (ens.weights_ >= 0).all()
    assert log_loss(ens.predict_proba([noisy[0], good, noisy[1], noisy[2]]), y) <= log_loss(good, y) + 1e-9


@pytest.mark.parametrize("method", ["caruana", "optimized"])
def test_a_copy_of_a_member_adds_nothing(method):
    y, good, noisy = _informative_and_noisy(seed=1)
    other = 0.5 * good + 0.5 * noisy[0]  # a weaker, correlated member
    without = create_ensemble(method, "log_loss").fit([good, other], y)
    with_copy = create_ensemble(method, "log_loss").fit([good, other, good.copy()], y)
    assert log_loss(with_copy.predict_proba([good, other, good.copy()]), y) == pytest.approx(
        log_loss(without.predict_proba([good, other]), y), abs=1e-6
    )
    # the copy's weight is taken from its original, not added on top
    assert with_copy.weights_[0] + with_copy.weights_[2] == pytest.approx(without.weights_[0], abs=0.02)


@pytest.mark.parametrize("method", ["caruana", "optimized", "stacking"])
def test_cross_fitted_score_is_not_better_than_in_sample(method):
    rng = np.random.default_rng(2)
    n, c = 400, 3
    y = rng.integers(0, c, n)  # labels the members know nothing about: any fit is overfitting
    members = [rng.dirichlet(np.ones(c), n) for _ in range(6)]
    folds = np.arange(n) % 5
    in_sample = create_ensemble(method, "log_loss").fit(members, y)
    honest = cross_fit(lambda: create_ensemble(method, "log_loss"), members, y, folds)
    assert log_loss(honest, y) >= log_loss(in_sample.predict_proba(members), y)
    if method == "stacking":  # 18 free features on noise: the in-sample fit is clearly optimistic
        assert log_loss(honest, y) > log_loss(in_sample.predict_proba(members), y) + 0.01


def test_cross_fit_never_scores_a_row_with_a_model_fitted_on_it():
    y, good, noisy = _informative_and_noisy(n=100)
    folds = np.arange(100) % 4
    seen = []

    class Recorder(SoftVotingEnsemble):
        def _fit(self, probs, y_fit):
            seen.append(len(y_fit))
            super()._fit(probs, y_fit)

    out = cross_fit(lambda: Recorder(), [good, noisy[0]], y, folds)
    assert seen == [75] * 4 and out.shape == good.shape
    np.testing.assert_allclose(out, (good + noisy[0]) / 2)  # fixed weights: cross-fitting changes nothing


def test_hard_voting_majority_and_tie_break():
    a = np.array([[0.6, 0.4, 0.0], [0.5, 0.0, 0.5]])
    b = np.array([[0.7, 0.3, 0.0], [0.0, 0.9, 0.1]])
    c = np.array([[0.1, 0.9, 0.0], [0.2, 0.1, 0.7]])
    ens = HardVotingEnsemble().fit([a, b, c], np.array([0, 1]))
    # row 0: votes 0, 0, 1 -> 0 although the mean probability of class 1 (0.53) beats class 0 (0.47)
    # row 1: votes 0, 1, 2 -> a tie; the mean probabilities 0.23, 0.33, 0.43 break it for class 2
    assert ens.predict_proba([a, b, c]).argmax(1).tolist() == [0, 2]
    np.testing.assert_allclose(ens.predict_proba([a, b, c]).sum(1), 1)


def test_rank_averaging_by_hand():
    a = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    b = np.array([[0.5, 0.5], [0.45, 0.55], [0.4, 0.6]])  # badly calibrated, same order
    ens = RankAveragingEnsemble().fit([a, b], np.array([0, 0, 1]))
    # ranks over rows / 3: class 0 -> 1, 2/3, 1/3 in both; class 1 -> 1/3, 2/3, 1
    np.testing.assert_allclose(ens.predict_proba([a, b]), [[0.75, 0.25], [0.5, 0.5], [0.25, 0.75]])


@pytest.mark.parametrize("method", sorted(ENSEMBLES))
def test_every_method_keeps_the_estimator_contract(method):
    y, good, noisy = _informative_and_noisy(n=60)
    ens = create_ensemble(method, "accuracy")
    assert not [k for k in vars(ens) if k.endswith("_")]  # __init__ learns nothing
    with pytest.raises(RuntimeError, match="not fitted"):
        ens.predict_proba([good, noisy[0]])
    assert ens.fit([good, noisy[0]], y) is ens
    probs = ens.predict_proba([good, noisy[0]])
    np.testing.assert_allclose(probs.sum(1), 1)
    assert [k for k in vars(ens) if k.endswith("_")]  # fit's state ends in _
    with pytest.raises(ValueError, match="members"):
        ens.predict_proba([good])


# ---------------------------------------------------------------- the stage through its CLI


@pytest.fixture
def oof_run(tmp_path, monkeypatch):
    """Prepared data plus OOF and test probabilities of a good and a noisy backbone."""
    comp = write_competition(tmp_path / "raw" / "comp", n_per_class=10, n_test=6)
    prepare(
        CompetitionConfig(source=str(comp)),
        image_size=8,
        n_folds=3,
        seed=0,
        out_dir=tmp_path / "data/prepared",
        workers=1,
    )
    train = pd.read_csv(tmp_path / "data/prepared/train.csv", dtype={"id": str, "label": str})
    test = pd.read_csv(tmp_path / "data/prepared/test.csv", dtype={"id": str})
    rng = np.random.default_rng(0)
    y = train["target"].to_numpy()
    good = np.full((len(y), 3), 0.15)
    good[np.arange(len(y)), y] = 0.7
    for name, oof in (("good", good), ("noisy", rng.dirichlet(np.ones(3), len(y)))):
        (tmp_path / "predictions" / name).mkdir(parents=True)
        probs_frame(train["id"], oof, CLASSES).to_csv(tmp_path / f"predictions/{name}/oof_probs.csv", index=False)
        probs_frame(test["id"], rng.dirichlet(np.ones(3), len(test)), CLASSES).to_csv(
            tmp_path / f"predictions/{name}/test_probs.csv", index=False
        )
    (tmp_path / "params.yaml").write_text(
        "train:\n  backbones: {good: {}, noisy: {}}\ntracking: {enabled: false}\nensemble: {metric: log_loss}\n"
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_stage_scores_every_method_honestly_and_submits_the_best(oof_run):
    assert cli.main(["ensemble"]) == 0
    report = json.loads((oof_run / "reports/ensemble.json").read_text())
    methods = report["methods"]
    assert set(methods) == set(ENSEMBLES)
    best = report["method"]  # the lowest honest log loss; compared by value, since methods can tie
    assert methods[best]["oof"]["log_loss"] == min(m["oof"]["log_loss"] for m in methods.values())
    assert report["oof"] == methods[best]["oof"]
    for name, m in methods.items():
        sub = pd.read_csv(oof_run / m["submission"], dtype=str)
        assert m["submission"] == f"submissions/methods/{name}-oof-log_loss-{m['oof']['log_loss']:.4f}.csv"
        assert len(sub) == 6 and set(sub["label"]) <= set(CLASSES)
    assert methods["caruana"]["weights"]["good"] > 0.9
    assert report["best_single"]["backbone"] == "good"
    gain = report["gain_over_best_single"]["log_loss"]
    assert gain == pytest.approx(report["oof"]["log_loss"] - report["best_single"]["log_loss"])
    # the ensemble's OOF file is the honest (cross-fitted) one, the submission its test probabilities
    train = pd.read_csv(oof_run / "data/prepared/train.csv", dtype={"id": str})
    honest = pd.read_csv(oof_run / "submissions/oof_probs.csv").iloc[:, 1:].to_numpy()
    assert log_loss(honest, train["target"].to_numpy()) == pytest.approx(report["oof"]["log_loss"])
    chosen = pd.read_csv(oof_run / methods[best]["submission"], dtype=str)
    assert pd.read_csv(oof_run / "submissions/submission.csv", dtype=str).equals(chosen)


@pytest.mark.parametrize(
    "line, message",
    [
        ("ensemble: {methods: [soft_voting, blend9]}", "ensemble.methods: unknown method 'blend9'"),
        ("ensemble: {method: caruana, methods: [soft_voting]}", "ensemble.method: 'caruana' is not auto or one of"),
        (
            "ensemble: {metric: auc}",
            "'ensemble.metric' must be one of ['accuracy', 'log_loss', 'macro_f1', 'roc_auc', ",
        ),
        ("ensemble: {weights: {nope: 1}}", "ensemble.weights.nope is not a key of train.backbones"),
    ],
)
def test_bad_ensemble_params_fail_with_one_line(oof_run, capsys, line, message):
    with open(oof_run / "params.yaml", "a") as f:
        f.write(line + "\n")
    assert cli.main(["ensemble"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (oof_run / "submissions").exists()


def test_fit_stage_is_a_library_call_that_chooses_and_reports_without_the_cli(oof_run, tmp_path_factory, monkeypatch):
    """The ensemble stage's decisions, called directly from another directory: methods fitted, the best
    honest one chosen, the best single backbone named; nothing is written until `write_submissions`."""
    from pipeline.config import load_params
    from pipeline.data import load_prepared
    from pipeline.ensemble import fit_stage, headline, stage_report, write_submissions

    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # no predictions/ or data/ here
    params = load_params(oof_run / "params.yaml")
    data = load_prepared(oof_run / "data/prepared", images=False)
    run = fit_stage(params, data, oof_run / "predictions", "params.yaml")
    assert set(run.fitted) == set(ENSEMBLES) and not (oof_run / "submissions").exists()
    assert run.metrics["best_single"]["backbone"] == "good"
    honest = {name: fit.report["oof"]["log_loss"] for name, fit in run.fitted.items()}
    assert honest[run.chosen] == min(honest.values())
    before = json.dumps(run.metrics, sort_keys=True)
    written = write_submissions(run, data, oof_run / "data/prepared", oof_run / "submissions")
    assert json.dumps(run.metrics, sort_keys=True) == before  # what was written comes back, the run is left as it was
    submitted = pd.read_csv(oof_run / "submissions/submission.csv", dtype=str)
    chosen = run.fitted[run.chosen].test
    assert submitted["label"].tolist() == [CLASSES[i] for i in chosen.argmax(1)]
    report = stage_report(run, written)
    assert (oof_run / "submissions/methods" / report["methods"][run.chosen]["submission"].split("/")[-1]).is_file()
    assert set(headline(report, "accuracy", "log_loss")) == {"method", "accuracy", "log_loss", "lb_accuracy"}


@pytest.mark.parametrize("method", list(ENSEMBLES))
def test_a_fitted_method_stored_as_numbers_predicts_exactly_the_same(method):
    y, good, noisy = _informative_and_noisy(n=200)
    members = [noisy[0], good, noisy[1]]
    model = create_ensemble(method, metric="log_loss").fit(members, y)
    state = json.loads(json.dumps(ensemble_state(model)))  # through JSON text, as the bundle stores it
    assert "pickle" not in json.dumps(state)
    back = ensemble_from_state(state, "bundle.json: ensemble.state")
    assert type(back) is type(model)
    assert np.array_equal(back.predict_proba(members), model.predict_proba(members))


def test_a_member_of_weight_zero_is_left_out_with_the_same_predictions():
    y, good, noisy = _informative_and_noisy(n=200)
    model = SoftVotingEnsemble(weights=[1.0, 0.0, 2.0]).fit([good, noisy[0], noisy[1]], y)
    assert model.used_members().tolist() == [0, 2]
    smaller = model.without_unused()
    full = model.predict_proba([good, noisy[0], noisy[1]])
    assert np.abs(smaller.predict_proba([good, noisy[1]]) - full).max() < 1e-12
    stacking = create_ensemble("stacking", "log_loss").fit([good, noisy[0]], y)
    assert stacking.used_members().tolist() == [0, 1] and stacking.without_unused() is stacking


@pytest.mark.parametrize("kind", ["logistic_regression", "svm"])
def test_a_features_sklearn_head_stored_as_numbers_predicts_exactly_the_same(kind):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(90, 6)), np.arange(90) % 3
    x[np.arange(90), y] += 2
    head = fit_classifier(x, y, kind)
    arrays = {}

    def put(array):
        arrays[str(len(arrays))] = array.copy()
        return str(len(arrays) - 1)

    state = json.loads(json.dumps(to_state(head, sklearn_types(), put, "head")))
    back = from_state(state, sklearn_types(), arrays.__getitem__, "head")
    assert np.array_equal(back.predict_proba(x), head.predict_proba(x))
    state["params"]["steps"][0]["tuple"][1]["estimator"] = "FunctionTransformer"
    with pytest.raises(PipelineError, match="head.steps: unknown estimator type 'FunctionTransformer'"):
        from_state(state, sklearn_types(), arrays.__getitem__, "head")
