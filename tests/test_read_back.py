"""Files the pipeline writes and later reads back, cut short or damaged (an interrupted copy, a full
disk): one PipelineError naming the file and what to do, never a traceback from torch or json."""

import json
import re
from pathlib import Path

import pytest
import torch

from pipeline.backbone import Backbone, planned
from pipeline.config import TrainSettings
from pipeline.errors import PipelineError
from pipeline.inference import load_fold_model
from pipeline.models import create_model
from pipeline.resume import FoldState, load_finished

CPU = torch.device("cpu")


def _fold_checkpoint(path: Path) -> Path:
    model = create_model("test_resnet", 3)
    ckpt = {
        "model": "test_resnet",
        "num_classes": 3,
        "state_dict": model.state_dict(),
        "image_size": 16,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "interpolation": "bilinear",
        "precision": None,
    }
    torch.save(ckpt, path)
    return path


def _cut(path: Path, keep: float = 0.5) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return data


@pytest.mark.parametrize("damage", ["truncated", "zeros", "empty"])
def test_a_damaged_fold_checkpoint_is_one_line_naming_it(tmp_path, damage):
    path = _fold_checkpoint(tmp_path / "model.pt")
    load_fold_model(path, CPU)  # intact: loads
    data = _cut(path) if damage == "truncated" else path.read_bytes()
    if damage == "zeros":
        path.write_bytes(data[:100] + bytes(len(data) - 100))
    elif damage == "empty":
        path.write_bytes(b"")
    with pytest.raises(PipelineError) as info:
        load_fold_model(path, CPU)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot be read, truncated or corrupt (") and "\n" not in message
    assert message.endswith("train this backbone again (dvc repro -f train@<backbone>)")


def test_a_damaged_resume_state_or_finished_fold_is_named_with_what_to_do(tmp_path):
    state = tmp_path / "state.pt"
    torch.save({"model": {}, "epoch": 3}, state)
    _cut(state)
    with pytest.raises(
        PipelineError, match=re.escape(f"{state}: cannot be read") + r".*delete it and this fold starts"
    ):
        FoldState(state, None, None, None, None, None, "accuracy").resume()
    done = tmp_path / "fold0.pt"
    torch.save({"state_dict": {}, "checkpoint": {}}, done)
    _cut(done, 0.3)
    trains_again = re.escape(f"{done}: cannot be read") + r".*delete it and this fold trains again"
    with pytest.raises(PipelineError, match=trains_again):
        load_finished(done)


def test_a_cut_plan_file_names_its_line_and_column(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps({"epochs": 12, "val_every": 3})[:-5])
    backbone = Backbone("b", "test_resnet", None, TrainSettings(), 16, {})
    with pytest.raises(PipelineError, match=re.escape(f"{tmp_path / 'b.json'}: not valid JSON (line 1, column")):
        planned(backbone, tmp_path, budget=True)
