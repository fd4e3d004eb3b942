import re

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, parse_params
from pipeline.data import InputConfig, load_prepared, to_input
from pipeline.inference import predict
from pipeline.metrics import best_policy
from pipeline.models import create_model
from pipeline.predict import predict_backbone, resolve_tta, select_policy
from pipeline.prepare import prepare
from pipeline.tasks.single_label import SingleLabel, log_loss
from pipeline.tta import TTA_VIEWS, predict_tta, predict_views

CPU = torch.device("cpu")
TASK4, TASK3 = SingleLabel(list("abcd")), SingleLabel(list("abc"))  # class probabilities, as the views merge them
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _images(n, size=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _normalised(images):
    return (
        torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)
    ) / torch.tensor(STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("test_resnet", num_classes=4).eval()


def test_hflip_tta_is_the_mean_over_the_image_and_its_mirror(model):
    images = _images(5)
    with torch.no_grad():
        x = _normalised(images)
        plain = torch.softmax(model(x), 1).numpy()
        mirrored = torch.softmax(model(x.flip(3)), 1).numpy()
    got = predict_tta(
        model, images, InputConfig(12, MEAN, STD), batch_size=2, device=CPU, views=("identity", "hflip"), task=TASK4
    )
    np.testing.assert_allclose(got, (plain + mirrored) / 2, atol=1e-5)
    np.testing.assert_allclose(predict(model, images, InputConfig(12, MEAN, STD), 2, CPU, TASK4), plain, atol=1e-5)
    assert not np.allclose(plain, mirrored)


def test_views_transform_the_pixels_as_named():
    images = _images(2, size=16)
    x = _normalised(images)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    raw = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    view = {name: fn(x.clone(), mean, std) for name, fn in TTA_VIEWS.items()}
    torch.testing.assert_close(view["vflip"], x.flip(2))
    torch.testing.assert_close(view["rot90"][0, 0], torch.rot90(x[0, 0], 1))
    torch.testing.assert_close(view["rot180"], x.flip(2).flip(3))
    torch.testing.assert_close(view["rot270"], torch.rot90(view["rot90"], 2, dims=(2, 3)))
    torch.testing.assert_close(view["brighter"], ((raw * 1.1).clamp(0, 1) - mean) / std, atol=1e-5, rtol=0)
    # crops keep 14 of 16 pixels per side, at the named corner (or the centre), resized back to 16x16

    def resize(t):
        return torch.nn.functional.interpolate(t, size=(16, 16), mode="bilinear", align_corners=False)

    torch.testing.assert_close(view["crop_bl"], resize(x[..., 2:, :14]))
    torch.testing.assert_close(view["crop_center"], resize(x[..., 1:15, 1:15]))
    # 1 px translations: content moves up-left / down-right, the uncovered edge reflected
    torch.testing.assert_close(view["shift_ul"][..., :15, :15], x[..., 1:, 1:])
    torch.testing.assert_close(view["shift_dr"][..., 1:, 1:], x[..., :15, :15])
    torch.testing.assert_close(view["shift_dr"][..., 0, 1:], x[..., 1, :15])
    torch.testing.assert_close(view["hflip_shift_ul"][..., :15, :15], x.flip(3)[..., 1:, 1:])
    assert {v.shape for v in view.values()} == {x.shape}
    names = list(view)
    assert not [(a, b) for i, a in enumerate(names) for b in names[i + 1 :] if torch.allclose(view[a], view[b])]


def test_every_view_is_computed_once_and_merged_as_configured(model):
    images = _images(6)
    logp = predict_views(model, images, InputConfig(12, MEAN, STD), 4, CPU, ["identity", "vflip", "crop_center"], TASK4)
    assert logp.shape == (3, 6, 4)
    p = np.exp(logp)
    np.testing.assert_allclose(TASK4.merge(logp, "mean"), p.mean(0), atol=1e-6)
    geo = np.prod(p, axis=0) ** (1 / 3)
    np.testing.assert_allclose(TASK4.merge(logp, "geometric"), geo / geo.sum(1, keepdims=True), atol=1e-6)
    with torch.no_grad():  # mean of logits: the raw model outputs, averaged, then softmax
        x = _normalised(images)
        logits = [model(v) for v in (x, x.flip(2), TTA_VIEWS["crop_center"](x, None, None))]
        expected = torch.softmax(torch.stack(logits).mean(0), 1).numpy()
    np.testing.assert_allclose(TASK4.merge(logp, "logits"), expected, atol=1e-5)


def _airbench_shifts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """airbench94's translations by hand: reflect-pad one pixel, take the top-left and bottom-right
    windows (content moved down-right and up-left), each also mirrored."""
    side = x.shape[-1]
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    down_right, up_left = padded[..., :side, :side], padded[..., 2 : side + 2, 2 : side + 2]
    shifts = {"shift_dr": down_right, "shift_ul": up_left}
    shifts |= {"hflip_shift_dl": down_right[..., ::-1], "hflip_shift_ur": up_left[..., ::-1]}
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in shifts.items()}


def test_airbench_views_are_its_reflect_padded_shifts_and_their_mirrors():
    x = _normalised(_images(3, size=16))
    for name, expected in _airbench_shifts(x).items():
        torch.testing.assert_close(TTA_VIEWS[name](x.clone(), None, None), expected, msg=name)
    assert not torch.allclose(TTA_VIEWS["hflip_shift_ur"](x, None, None), TTA_VIEWS["hflip_shift_ul"](x, None, None))


def test_airbench_policy_weighs_plain_and_mirror_a_quarter_and_each_shift_an_eighth():
    """The registered policy, merged as airbench merges (logits), against airbench's own formula on
    hand-shifted images; a view listed twice is one forward pass."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    images = _images(4, size=16)
    x = _normalised(images)
    net(x)  # materialise the lazy layer
    calls = []
    net.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    policy = parse_params({}).tta.policies["airbench"]
    task = SingleLabel(list("abcde"))
    logp = predict_views(net.eval(), images, InputConfig(16, MEAN, STD), 8, CPU, policy, task)
    assert len(calls) == 6 and logp.shape == (8, 4, 5)  # 8 names, 6 distinct views
    with torch.no_grad():
        shifts = _airbench_shifts(x)

        def mirror(t):
            return 0.5 * net(t) + 0.5 * net(t.flip(-1))

        logits = 0.5 * mirror(x) + 0.25 * mirror(shifts["shift_dr"]) + 0.25 * mirror(shifts["shift_ul"])
    expected = torch.softmax(logits, 1).numpy()
    np.testing.assert_allclose(task.merge(logp, "logits"), expected, atol=1e-5)
    equal = task.merge(logp[[0, 2, 4, 5, 6, 7]], "logits")  # the same six views, equally weighted
    assert np.abs(equal - expected).max() > 1e-3


def test_to_input_resizes_to_the_backbone_size():
    x = to_input(torch.from_numpy(_images(2, size=12)), InputConfig(20, MEAN, STD), CPU)
    assert x.shape == (2, 3, 20, 20)


def test_policy_selection_is_cross_fitted():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 90)
    folds = np.arange(90) % 3
    good = np.full((90, 3), 0.1)
    good[np.arange(90), y] = 0.8
    flat = np.full((90, 3), 1 / 3)
    # "lucky" is perfect on fold 0 only and flat elsewhere: best overall on fold 0's strength
    lucky = flat.copy()
    lucky[folds == 0] = np.eye(3)[y[folds == 0]] * 0.98 + 0.02 / 3
    chosen, honest = select_policy({"flat": flat, "good": good}, y, folds, "log_loss", TASK3)
    assert chosen == "good" and np.array_equal(honest, good)
    chosen, honest = select_policy({"flat": flat, "lucky": lucky}, y, folds, "log_loss", TASK3)
    assert chosen == "lucky"  # in-sample, fold 0's luck decides...
    # ...but fold 0's honest rows come from the policy best on folds 1-2 (a tie, so the first: flat)
    assert np.array_equal(honest[folds == 0], flat[folds == 0])
    assert log_loss(honest, y) > log_loss(lucky, y)


def _fold_models(data, root, seeds=(0,)):
    models = {}
    for s in seeds:
        for k in range(data.n_folds):
            torch.manual_seed(100 * s + k)
            model = create_model("test_efficientnet", num_classes=3)
            mean, std = data.fold_stats(k)
            (root / f"seed{s}" / f"fold{k}").mkdir(parents=True)
            torch.save(
                {
                    "model": "test_efficientnet",
                    "num_classes": 3,
                    "state_dict": model.state_dict(),
                    "mean": mean,
                    "std": std,
                    "image_size": 12,
                    "fold": k,
                },
                root / f"seed{s}" / f"fold{k}" / "model.pt",
            )
            models[s, k] = (model.eval(), mean, std)
    return models


def test_oof_rows_come_from_their_own_fold_models_and_test_is_the_mean_of_all(comp_config, tmp_path):
    prepare(comp_config, image_size=12, n_folds=2, seed=0, out_dir=tmp_path / "prepared", workers=1)
    data = load_prepared(tmp_path / "prepared")
    models = _fold_models(data, tmp_path / "models", seeds=(3, 7))
    policies = {"none": ["identity"], "flip": ["identity", "hflip"]}
    preds = predict_backbone(data, tmp_path / "models", policies, "mean", batch_size=4, device=CPU)
    folds = data.train["fold"].to_numpy()
    for name, views in policies.items():
        got = preds.policies[name]
        assert got.seeds == ["3", "7"] and got.oof_per_seed.shape == (2, len(folds), 3)
        for k in range(2):
            per_seed = [
                predict_tta(
                    m, data.train_images[folds == k], InputConfig(12, mu, sd), 4, CPU, views=tuple(views), task=TASK3
                )
                for (s, kk), (m, mu, sd) in models.items()
                if kk == k
            ]
            np.testing.assert_allclose(got.oof_per_seed[:, folds == k], per_seed, atol=1e-6)
            np.testing.assert_allclose(got.oof[folds == k], np.mean(per_seed, 0), atol=1e-6)  # the seed bag
    np.testing.assert_allclose(
        preds.policies[preds.chosen].test, _test_mean(data, models, policies[preds.chosen]), atol=1e-6
    )
    assert not np.allclose(preds.policies["none"].oof, preds.policies["flip"].oof)
    assert preds.chosen_on.all()  # no select_rows: the choice saw every OOF row


def _test_mean(data, models, views):
    return np.mean(
        [
            predict_tta(m, data.test_images, InputConfig(12, mu, sd), 4, CPU, views=tuple(views), task=TASK3)
            for m, mu, sd in models.values()
        ],
        0,
    )


def test_tta_is_chosen_on_select_rows_and_the_chosen_views_alone_predict_the_rest(comp_config, tmp_path):
    """With tta.select_rows under the OOF's rows, the candidates are compared on that many (the same share of
    each fold), the chosen policy still covers every OOF row and the test set, the others stand on the chosen
    one's predictions off the chosen-on rows and predict no test rows."""
    prepare(comp_config, image_size=12, n_folds=2, seed=0, out_dir=tmp_path / "prepared", workers=1)
    data = load_prepared(tmp_path / "prepared")
    models = _fold_models(data, tmp_path / "models", seeds=(3,))
    policies = {"none": ["identity"], "flip": ["identity", "hflip"]}
    every = predict_backbone(data, tmp_path / "models", policies, "mean", batch_size=4, device=CPU)
    n, folds, y = len(data.train), data.folds, data.targets
    sub = predict_backbone(data, tmp_path / "models", policies, "mean", batch_size=4, device=CPU, select_rows=n // 3)
    on, chosen = sub.chosen_on, sub.chosen
    assert 0 < on.sum() < n and abs(on.sum() - n // 3) <= 1
    for k in (0, 1):  # each fold gives its share
        assert abs(on[folds == k].sum() - n // 3 * (folds == k).mean()) <= 1
    assert chosen == best_policy({p: every.policies[p].oof for p in policies}, y, on, "log_loss", TASK3)
    np.testing.assert_allclose(sub.policies[chosen].oof, every.policies[chosen].oof, atol=1e-6)
    np.testing.assert_allclose(sub.policies[chosen].test, _test_mean(data, models, policies[chosen]), atol=1e-6)
    (other,) = [p for p in policies if p != chosen]
    np.testing.assert_allclose(sub.policies[other].oof[on], every.policies[other].oof[on], atol=1e-6)
    assert not np.allclose(sub.policies[other].oof[~on], every.policies[other].oof[~on])
    np.testing.assert_array_equal(sub.policies[other].oof[~on], sub.policies[chosen].oof[~on])
    assert sub.policies[other].test is None
    np.testing.assert_array_equal(sub.honest[~on], sub.policies[chosen].oof[~on])  # rows the choice never saw


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"candidates": ["none", "sharpen"]}, "tta.candidates: 'sharpen' is not a policy of tta.policies"),
        ({"select": "hflip2"}, "tta.select: 'hflip2' is not a policy"),
        ({"backbones": {"net": "nope"}}, "tta.backbones.net: 'nope' is not a policy"),
        ({"backbones": {"other": "hflip"}}, "tta.backbones.other is not a key of train.backbones"),
        ({"policies": {"odd": []}}, "tta.policies.odd: empty list of views"),
    ],
)
def test_bad_tta_params_name_the_key_when_params_are_read(raw, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_params({"train": {"backbones": {"net": {}}}, "tta": raw}, "params.yaml")


def test_an_unregistered_view_is_named_by_the_predict_stage():
    tta = parse_params(
        {
            "train": {"backbones": {"net": {}}},
            "tta": {"policies": {"odd": ["identity", "twirl"]}, "candidates": ["odd"]},
        }
    ).tta
    with pytest.raises(ConfigError, match=re.escape("params.yaml: tta.policies.odd: unknown view 'twirl'")):
        resolve_tta(tta, "net", "params.yaml: tta")


def test_tta_pool_and_computed_policies():
    tta = parse_params({"tta": {"select": "auto", "candidates": ["hflip", "five_crop"]}}).tta
    assert resolve_tta(tta, "net", "t") == (["hflip", "five_crop"], ["none", "hflip", "five_crop"])
    fixed = parse_params({"train": {"backbones": {"net": {}}}, "tta": {"backbones": {"net": "rot90"}}}).tta
    assert resolve_tta(fixed, "net", "t") == (["rot90"], ["none", "rot90"])
