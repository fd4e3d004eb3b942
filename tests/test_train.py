"""The training loop on real tiny timm models, with a real MLflow store in tmp_path."""
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.data import load_prepared
from pipeline.errors import PipelineError
from pipeline.models import create_model
from pipeline.prepare import prepare
from pipeline.tracking import Tracker
from pipeline.train import FoldSettings, train_backbone

SETTINGS = FoldSettings(epochs=4, batch_size=4, lr=1e-2, weight_decay=0.0, warmup_epochs=0.5, image_size=16,
                        hflip=True, translate=0.1, monitor="accuracy", num_workers=0, seed=0)


@pytest.fixture
def prepared(comp_config, tmp_path):
    prepare(comp_config, image_size=16, n_folds=2, seed=0, out_dir=tmp_path / "prepared", workers=1,
            raw_dir=tmp_path / "raw")
    return load_prepared(tmp_path / "prepared")


def test_cv_training_writes_oof_checkpoints_and_an_mlflow_tree(prepared, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(True, "unit", uri=uri)
    with tracker.run("test_resnet", params={"backbone": "test_resnet"}):
        oof, metrics = train_backbone(prepared, "test_resnet", SETTINGS, tmp_path / "models", torch.device("cpu"),
                                      tracker)

    targets = prepared.train["target"].to_numpy()
    assert oof.shape == (24, 3)
    np.testing.assert_allclose(oof.sum(1), 1.0, atol=1e-5)  # every row filled by its fold's model
    assert metrics["oof"]["accuracy"] == pytest.approx(float((oof.argmax(1) == targets).mean()))
    assert metrics["oof"]["accuracy"] > 0.7  # colour-coded classes: learnt, not chance (1/3)
    for k in range(2):
        ckpt = torch.load(tmp_path / "models" / f"fold{k}" / "model.pt", weights_only=True)
        assert ckpt["model"] == "test_resnet" and ckpt["num_classes"] == 3
        assert ckpt["mean"] == prepared.fold_stats(k)[0]  # normalised with its own training part

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("unit")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(parent) == 1 and parent[0].data.params["backbone"] == "test_resnet"
    assert sorted(r.info.run_name for r in children) == ["fold0", "fold1"]
    history = client.get_metric_history(children[0].info.run_id, "val_accuracy")
    assert [m.step for m in history] == [0, 1, 2, 3]  # one point per epoch
    assert "best_accuracy" in children[0].data.metrics
    assert parent[0].data.tags.get("git_commit")


def test_training_is_seeded(prepared, tmp_path):
    off = Tracker(False, "x")
    a, _ = train_backbone(prepared, "test_efficientnet", SETTINGS, tmp_path / "a", torch.device("cpu"), off)
    b, _ = train_backbone(prepared, "test_efficientnet", SETTINGS, tmp_path / "b", torch.device("cpu"), off)
    np.testing.assert_array_equal(a, b)


def test_unknown_backbone_is_named():
    with pytest.raises(PipelineError, match="unknown timm model 'resnet_nope'"):
        create_model("resnet_nope", num_classes=3)


def test_local_pretrained_weights_are_loaded_with_a_new_head(tmp_path):
    torch.manual_seed(1)
    source = create_model("test_resnet", num_classes=7)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    model = create_model("test_resnet", num_classes=3, pretrained=path)
    assert model.fc.out_features == 3
    loaded, saved, fresh = (m.state_dict()["layer1.0.conv1.weight"]
                            for m in (model, source, create_model("test_resnet", num_classes=3)))
    torch.testing.assert_close(loaded, saved)
    assert not torch.equal(fresh, saved)


def test_missing_pretrained_file_is_named(tmp_path):
    with pytest.raises(PipelineError, match="weights file '.*absent.pth' not found"):
        create_model("test_resnet", num_classes=3, pretrained=tmp_path / "absent.pth")
