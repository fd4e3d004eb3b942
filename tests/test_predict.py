import numpy as np
import torch

from pipeline.data import to_input
from pipeline.models import create_model
from pipeline.predict import predict_backbone, predict_proba
from pipeline.prepare import prepare
from pipeline.data import load_prepared

CPU = torch.device("cpu")
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _images(n, size=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_hflip_tta_is_the_mean_over_the_image_and_its_mirror():
    torch.manual_seed(0)
    model = create_model("test_resnet", num_classes=4).eval()
    images = _images(5)
    with torch.no_grad():
        x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) \
            / torch.tensor(STD).view(1, 3, 1, 1)
        plain = torch.softmax(model(x), 1).numpy()
        mirrored = torch.softmax(model(x.flip(3)), 1).numpy()
    got = predict_proba(model, images, MEAN, STD, 12, batch_size=2, device=CPU, hflip=True)
    np.testing.assert_allclose(got, (plain + mirrored) / 2, atol=1e-5)
    np.testing.assert_allclose(predict_proba(model, images, MEAN, STD, 12, 2, CPU), plain, atol=1e-5)
    assert not np.allclose(plain, mirrored)


def test_to_input_resizes_to_the_backbone_size():
    x = to_input(torch.from_numpy(_images(2, size=12)), MEAN, STD, 20, CPU)
    assert x.shape == (2, 3, 20, 20)


def test_oof_rows_come_from_their_own_fold_model_and_test_is_the_fold_mean(comp_config, tmp_path):
    prepare(comp_config, image_size=12, n_folds=2, seed=0, out_dir=tmp_path / "prepared", workers=1,
            raw_dir=tmp_path / "raw")
    data = load_prepared(tmp_path / "prepared")
    models = []
    for k in range(2):
        torch.manual_seed(k)
        model = create_model("test_efficientnet", num_classes=3)
        mean, std = data.fold_stats(k)
        (tmp_path / "models" / f"fold{k}").mkdir(parents=True)
        torch.save({"model": "test_efficientnet", "num_classes": 3, "state_dict": model.state_dict(),
                    "mean": mean, "std": std, "image_size": 12, "fold": k},
                   tmp_path / "models" / f"fold{k}" / "model.pt")
        models.append((model.eval(), mean, std))
    oof, test = predict_backbone(data, tmp_path / "models", hflip=False, batch_size=4, device=CPU)
    folds = data.train["fold"].to_numpy()
    for k, (model, mean, std) in enumerate(models):
        expected = predict_proba(model, data.train_images[folds == k], mean, std, 12, 4, CPU)
        np.testing.assert_allclose(oof[folds == k], expected, atol=1e-6)
    expected_test = np.mean([predict_proba(m, data.test_images, mu, sd, 12, 4, CPU) for m, mu, sd in models], 0)
    np.testing.assert_allclose(test, expected_test, atol=1e-6)
