"""The offline inference bundle for Kaggle code competitions: the submission's whole prediction in one flat
folder that a notebook with internet off runs on the hidden test set.

    python -m pipeline bundle                      # writes bundle/, checks it against submissions/submission.csv
    python bundle/predict.py --test-dir DIR [--sample sample_submission.csv] --out submission.csv

bundle/ holds the weights of every fold (or refit) model the chosen submission uses (safetensors; a features+sklearn
head as numbers), bundle.json (members, each one's timm model and input config, its TTA views and merge,
the ensemble method's fitted numbers, the classes, prepare's decoding, the submission format), this
package as a pure-Python wheel, predict.py and Kaggle's dataset-metadata.json. predict.py imports the
wheel in place (no install): the very functions that wrote submission.csv decode, predict and ensemble,
and nothing from DVC, MLflow or Optuna, nor any stage module, is imported. Nothing in the bundle is unpickled.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.cache import decode_images
from pipeline.competition import CompetitionFiles, ImageFolder, find_test_images
from pipeline.ensemblers import ensemble_from_state, ensemble_state
from pipeline.errors import PipelineError
from pipeline.estimator_state import from_state, sklearn_types, to_state
from pipeline.inference import fold_input_config, fold_model
from pipeline.io import atomic_write_text, load_checkpoint, read_json, save_tensors, write_json
from pipeline.models import SOURCES, pick_device
from pipeline.paths import RunPaths, list_models
from pipeline.postprocess import step_from_state
from pipeline.sklearn_head import CLASSIFIER_FILE, load_classifier
from pipeline.submission import SubmissionFormat
from pipeline.tasks import DEFAULT_TASK, Task, create_task
from pipeline.tta import predict_views

SPEC = "bundle.json"
CHECKPOINT_FIELDS = ("model", "num_classes", "image_size", "mean", "std", "interpolation", "precision")
CHECKPOINT_FIELDS += ("fold", "seed", "sklearn_head", "feature_layer", "target_scale")
PREDICT_PY = '''"""Predict with this bundle (see bundle.json): the pipeline's own code, from the wheel beside this file.

    python predict.py --test-dir DIR [--sample sample_submission.csv] --out submission.csv
"""
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here / "{wheel}"))  # a pure-Python wheel is importable as it is: nothing to install
from pipeline.bundle import main  # noqa: E402

sys.exit(main(["--bundle", str(here), *sys.argv[1:]]))
'''


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- writing the bundle


def write_wheel(folder: Path) -> str:
    """This package's modules as a pure-Python wheel in `folder` (reproducible: fixed timestamps); its name."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("kaggle-image-pipeline")
    except PackageNotFoundError:
        ver = "0+source"
    package = Path(__file__).resolve().parent
    files = {f"pipeline/{p.relative_to(package).as_posix()}": p.read_bytes() for p in sorted(package.rglob("*.py"))}
    info = f"kaggle_image_pipeline-{ver}.dist-info"
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: kaggle-image-pipeline\nVersion: {ver}\n".encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    digest = {n: base64.urlsafe_b64encode(hashlib.sha256(b).digest()).rstrip(b"=").decode() for n, b in files.items()}
    record = "".join(f"{n},sha256={digest[n]},{len(b)}\n" for n, b in files.items()) + f"{info}/RECORD,,\n"
    files[f"{info}/RECORD"] = record.encode()
    name = f"kaggle_image_pipeline-{ver}-py3-none-any.whl"
    with zipfile.ZipFile(folder / name, "w", zipfile.ZIP_DEFLATED) as whl:
        for n, b in files.items():
            whl.writestr(zipfile.ZipInfo(n, date_time=(1980, 1, 1, 0, 0, 0)), b, zipfile.ZIP_DEFLATED)
    return name


def _source_config(name: str, folder: Path, stem: str) -> str | None:
    """An `hf-hub:` or `local-dir:` model's config.json copied into the bundle (timm builds the
    architecture from it); None for a plain timm name."""
    if not name.startswith(SOURCES):
        return None
    if name.startswith("local-dir:"):
        source = Path(name[len("local-dir:") :]) / "config.json"
    else:
        from timm.models._hub import download_from_hf  # the hub cache timm created the model from

        source = Path(download_from_hf(name[len("hf-hub:") :], "config.json"))
    target = f"{stem}.config.json"
    (folder / target).write_bytes(source.read_bytes())
    return target


def _bundle_model(path: Path, folder: Path, stem: str) -> dict:
    """One fold model into the bundle: its weights as safetensors, its features+sklearn head as numbers."""
    ckpt = load_checkpoint(path, "train this backbone again (dvc repro -f train@<backbone>)")
    tensors = {k: v.detach().clone().contiguous() for k, v in ckpt["state_dict"].items()}  # no shared storage
    save_tensors(tensors, folder / f"{stem}.safetensors")
    entry = {
        "weights": f"{stem}.safetensors",
        "checkpoint": {k: ckpt.get(k) for k in CHECKPOINT_FIELDS},
        "config": _source_config(ckpt["model"], folder, stem),
        "head": None,
    }
    if ckpt.get("sklearn_head"):
        arrays = {}

        def put(array):
            arrays[f"a{len(arrays)}"] = torch.from_numpy(np.ascontiguousarray(array))
            return f"a{len(arrays) - 1}"

        state = to_state(load_classifier(path.with_name(CLASSIFIER_FILE)), sklearn_types(), put, str(path))
        save_tensors(arrays, folder / f"{stem}.head.safetensors")
        entry["head"] = {"arrays": f"{stem}.head.safetensors", "state": state}
    return entry


def _member(backbone: str, n_folds: int, run: RunPaths, folder: Path, rule: str | None) -> dict:
    """A backbone's models as its test predictions were made, with the TTA policy it chose: its fold (x seed)
    models in the predict stage's order; under a refit (`rule`, refit.rule), the refit models in their place
    (replace) or beside them (join: the mean of the two means)."""
    tta = read_json(run.predictions(backbone) / "tta.json")
    folds = []
    if rule != "replace":
        for k, paths in list_models(run.models(backbone), n_folds).items():
            for path in paths:
                folds.append(_bundle_model(path, folder, f"{backbone}.{path.parent.parent.name}.fold{k}"))
    refits = []
    if rule is not None:
        paths = sorted(run.refit(backbone).glob("seed*/model.pt"))
        if not paths:
            raise PipelineError(f"{run.refit(backbone)}: no refit models (refit.rule {rule}); run the refit stage")
        refits = [_bundle_model(p, folder, f"{backbone}.refit.{p.parent.name}") for p in paths]
    member = {"backbone": backbone, "tta": {k: tta[k] for k in ("policy", "views", "merge")}}
    return {**member, "models": folds or refits, **({"join": refits} if rule == "join" else {})}


def write_bundle(params, run: RunPaths, folder: Path, method: str | None = None, kaggle_id: str | None = None) -> dict:
    """Write the bundle into `folder` from the finished run under `run`: its models/, predictions/*/tta.json
    and submissions/ensemble.json (`method`: one of its fitted methods; default the submission's)."""
    import sklearn
    import timm

    from pipeline.data import load_prepared
    from pipeline.tracking import experiment_name

    data = load_prepared(run.prepared, images=False)
    states = run.submissions / "ensemble.json"
    for path in [states, *(run.predictions(b) / "tta.json" for b in params.train.backbones)]:
        if not path.is_file():
            raise PipelineError(f"{path}: not found (run `dvc repro` first: the bundle packs a finished run)")
    fitted = read_json(states)
    method = method or fitted["method"]
    if method not in fitted["states"]:
        fitted_names = ", ".join(fitted["states"])
        raise PipelineError(f"{states}: no fitted method '{method}' (fitted: {fitted_names})")
    model = ensemble_from_state(fitted["states"][method], f"{states}: states.{method}")
    members = [fitted["members"][i] for i in model.used_members()]  # a member of weight 0 is left out
    spec = {
        "format": 1,
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "scikit-learn": sklearn.__version__},
        "package": write_wheel(folder),
        "classes": data.classes,
        "task": data.task_name,
        "task_options": data.task_options,
        "submission": read_json(run.prepared / "submission_format.json"),
        "images": {
            "size": params.prepare.image_size,
            "resize": params.prepare.resize,
            "image_ext": params.competition.image_ext,
        },
        "batch_size": params.predict.batch_size,
        "members": [_member(b, data.n_folds, run, folder, fitted.get("refit", {}).get(b)) for b in members],
        "ensemble": {
            "method": method,
            "state": ensemble_state(model.without_unused()),
            "postprocess": fitted.get("postprocess", {}).get(method, {"step": "identity"}),  # thresholds, temperature
        },
    }
    spec["files"] = {p.name: _sha256(p) for p in sorted(folder.iterdir())}
    write_json(folder / SPEC, spec)
    (folder / "predict.py").write_text(PREDICT_PY.format(wheel=spec["package"]))
    slug = experiment_name(params).lower().replace("_", "-")
    kaggle_id = kaggle_id or f"{os.environ.get('KAGGLE_USERNAME', 'KAGGLE_USERNAME')}/{slug}-bundle"
    write_json(
        folder / "dataset-metadata.json",
        {"title": f"{slug} bundle"[:50], "id": kaggle_id, "licenses": [{"name": "other"}]},
    )
    return spec


BLOCKED = ("mlflow", "optuna", "dvc")  # and every stage module: the runtime is the library, never a stage
STAGES = ("prepare", "plan", "tune", "train", "predict", "refit", "ensemble", "analyze", "timing")
CLEAN_RUN = """import runpy, sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r} or name in {stages!r}:
            raise ImportError(name + " is not available to the bundle")
sys.meta_path.insert(0, Blocked())
sys.argv = [{script!r}, *{args!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


def local_test_dir(comp, run: RunPaths, scratch: Path) -> Path:
    """The competition's test folder (`competition.source` is relative to the run's root); from a .zip, its
    test images are copied out into `scratch`."""
    import dataclasses

    from pipeline.competition import open_competition

    files = open_competition(dataclasses.replace(comp, source=str(run.root / comp.source)))
    if files.source.is_dir():
        return files.source / comp.test_dir
    for rel in pd.read_csv(run.prepared / "test.csv", dtype=str, keep_default_na=False)["path"]:
        (scratch / rel).parent.mkdir(parents=True, exist_ok=True)
        (scratch / rel).write_bytes(files.read(rel))
    return scratch / comp.test_dir


def compare_submissions(expected: pd.DataFrame, got: pd.DataFrame, fmt: SubmissionFormat, tol: float = 1e-5) -> float:
    """The largest probability difference between two submissions; a PipelineError naming the first row
    where they differ in columns, ids, order, a label, or a probability by more than `tol`."""
    if list(got.columns) != list(expected.columns) or len(got) != len(expected):
        raise PipelineError(
            f"{list(got.columns)} x {len(got)} rows, not {list(expected.columns)} x {len(expected)} rows"
        )
    if fmt.kind in ("label", "tags", "grade", "integer"):  # labels, tags, grades, integers: equal as written
        differ = (got.fillna("").astype(str).to_numpy() != expected.fillna("").astype(str).to_numpy()).any(1)
        gap = 0.0
    else:
        differ = got[fmt.id_column].astype(str).to_numpy() != expected[fmt.id_column].astype(str).to_numpy()
        diff = np.abs(got[fmt.columns].to_numpy(float) - expected[fmt.columns].to_numpy(float)).max(1)
        differ |= diff > tol
        gap = float(diff.max())
    if differ.any():
        row = int(np.flatnonzero(differ)[0])
        raise PipelineError(f"row {row + 2}: {got.iloc[row].tolist()} against {expected.iloc[row].tolist()}")
    return gap


def verify_bundle(folder: Path, comp, method: str, run: RunPaths) -> dict:
    """Run the bundle's predict.py on the local test images in a fresh process that cannot import
    mlflow, optuna or dvc and has no hub access; check its submission against the ensemble stage's for
    `method` and, for the submission's method, its probabilities against submissions/test_probs.csv."""
    ensemble, prepared = read_json(run.report("ensemble")), run.prepared
    expected = run.root / ensemble["methods"][method]["submission"]
    probs = run.submissions / "test_probs.csv" if method == ensemble["method"] else None
    fmt = SubmissionFormat(**read_json(prepared / "submission_format.json"))
    labels = read_json(prepared / "classes.json")
    options = {k: v for k, v in labels.items() if k not in ("classes", "task")}
    columns = create_task(labels.get("task", DEFAULT_TASK), labels["classes"], **options).columns  # the files'

    with tempfile.TemporaryDirectory(prefix="bundle-verify-") as scratch:
        scratch = Path(scratch)
        args = ["--test-dir", str(local_test_dir(comp, run, scratch).resolve()), "--out", str(scratch / "sub.csv")]
        args += ["--probs", str(scratch / "probs.csv")]
        if comp.sample_submission is not None:
            args += ["--sample", str((prepared / "sample_submission.csv").resolve())]
        code = CLEAN_RUN.format(
            blocked=BLOCKED,
            stages=[f"pipeline.{s}" for s in STAGES],
            script=str((folder / "predict.py").resolve()),
            args=args,
        )
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=scratch,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise PipelineError(f"{folder}/predict.py failed on the local test images: {last}")
        read = lambda p: pd.read_csv(p, dtype=str, keep_default_na=False)  # noqa: E731
        checks = [(expected, "sub.csv", fmt)]
        if probs is not None:
            checks.append((probs, "probs.csv", SubmissionFormat("id", columns, "probabilities")))
        gap = 0.0
        for want, got, layout in checks:
            try:
                gap = max(gap, compare_submissions(read(want), read(scratch / got), layout))
            except PipelineError as exc:
                raise PipelineError(f"{folder} does not reproduce {want}: {exc}") from None
    rows = len(read(expected))
    size = round(sum(p.stat().st_size for p in folder.iterdir()) / 2**20, 2)
    speed = round(rows / seconds, 1)
    gap = float(f"{gap:.2g}")
    return {"rows": rows, "seconds": round(seconds, 2), "images_per_s": speed, "max_abs_diff": gap, "size_mb": size}


# ---------------------------------------------------------------- predicting with it


def read_bundle(folder: str | Path) -> dict:
    """bundle.json, with every file it names present and unchanged; one line naming what is wrong."""
    folder = Path(folder)
    path = folder / SPEC
    if not path.is_file():
        raise PipelineError(f"{path}: not found (a folder `python -m pipeline bundle` wrote)")
    spec = read_json(path)
    keys = ("package", "classes", "submission", "images", "members", "ensemble", "files")
    missing = [k for k in keys if not isinstance(spec, dict) or k not in spec]
    if missing:
        raise PipelineError(f"{path}: key '{missing[0]}' missing")
    for name, digest in spec["files"].items():
        file = folder / name
        if not file.is_file():
            raise PipelineError(f"{file}: missing from the bundle")
        if _sha256(file) != digest:
            raise PipelineError(f"{file}: changed since the bundle was written (its sha256 differs from {SPEC})")
    return spec


def _load_model(entry: dict, folder: Path, scratch: Path, device: torch.device, where: str):
    """(fold model, its checkpoint fields) of one `models` entry of bundle.json."""
    from safetensors.torch import load_file

    ckpt = {**entry["checkpoint"], "state_dict": load_file(folder / entry["weights"])}
    if entry.get("config"):  # an hf-hub: / local-dir: model: timm builds it from the config.json kept beside
        source = scratch / Path(entry["weights"]).stem
        source.mkdir(exist_ok=True)
        (source / "config.json").write_bytes((folder / entry["config"]).read_bytes())
        ckpt["model"] = f"local-dir:{source}"
    head = None
    if entry.get("head"):
        arrays = load_file(folder / entry["head"]["arrays"])
        head = from_state(entry["head"]["state"], sklearn_types(), lambda ref: arrays[ref].numpy(), where)
    return fold_model(ckpt, device, head), ckpt


def member_probs(
    member: dict, images, folder: Path, scratch: Path, device, batch_size: int, task: Task, clock
) -> np.ndarray:
    """A member's test predictions as the predict (and refit) stage computes them: each model's TTA views
    merged as the task merges them, then the mean over its models, added in the same order; with `join`
    (refit.rule: join), the mean of that and the same over the refit models."""
    probs = _mean_probs(member, "models", images, folder, scratch, device, batch_size, task, clock)
    if member.get("join"):
        probs = (probs + _mean_probs(member, "join", images, folder, scratch, device, batch_size, task, clock)) / 2
    return probs


def _mean_probs(member: dict, key: str, images, folder: Path, scratch: Path, device, batch_size, task, clock):
    total = None
    tta = member["tta"]
    for i, entry in enumerate(member[key]):
        where = f"{SPEC}: members.{member['backbone']}.{key}[{i}]"
        try:
            model, ckpt = _load_model(entry, folder, scratch, device, where)
        except (KeyError, TypeError) as exc:
            raise PipelineError(f"{where}: {exc.__class__.__name__}: {exc}") from None
        cfg = fold_input_config(ckpt, device)
        desc = f"{member['backbone']} {entry['weights']}"
        model_task = task.for_model(ckpt)
        probs = model_task.merge(
            predict_views(model, images, cfg, batch_size, device, tta["views"], model_task, desc), tta["merge"]
        )
        total = probs if total is None else total + probs
        clock()
    return total / len(member[key])


def _test_set(spec: dict, test_dir: str, sample: str | None) -> tuple[CompetitionFiles, list, list, pd.DataFrame]:
    """(the test folder, test ids, their image paths, the sample submission or None)."""
    fmt = SubmissionFormat(**spec["submission"])
    files = CompetitionFiles(test_dir)
    if files.source.is_file():
        raise PipelineError(f"--test-dir {test_dir}: not a folder of test images")
    folder = ImageFolder(files, "", spec["images"]["image_ext"])
    frame = None
    if sample is not None:
        sample_path = Path(sample)
        frame = CompetitionFiles(sample_path.parent).read_csv(sample_path.name)
        if list(frame.columns) != [fmt.id_column, *fmt.columns]:
            raise PipelineError(
                f"{sample}: columns {list(frame.columns)}; the competition's are {[fmt.id_column, *fmt.columns]}"
            )
    ids, rels = find_test_images(folder, None if frame is None else frame[fmt.id_column].tolist(), str(sample))
    if not ids:
        raise PipelineError(f"{test_dir}: no test images")
    return files, ids, rels, frame


def _warn_versions(built_with: dict) -> None:
    """A warning line where this Python's torch, timm or scikit-learn differs in major.minor from the bundle's."""
    from importlib.metadata import PackageNotFoundError, version

    for package, wanted in built_with.items():
        try:
            have = version(package)
        except PackageNotFoundError:
            continue
        if have.split(".")[:2] != wanted.split(".")[:2]:
            print(f"warning: {package} {have} here, the bundle was written with {wanted}", file=sys.stderr)


class _Clock:
    """Progress over the fold models: one line each, with the time left at the pace so far."""

    def __init__(self, n_models: int, n_images: int):
        self.n, self.done, self.images, self.start = n_models, 0, n_images, time.perf_counter()

    def __call__(self) -> None:
        self.done += 1
        spent = time.perf_counter() - self.start
        eta = spent / self.done * (self.n - self.done)
        print(
            f"model {self.done}/{self.n}: {self.images} images, {spent:.0f} s so far, about {eta:.0f} s left",
            file=sys.stderr,
            flush=True,
        )


def predict_bundle(folder, test_dir, sample, out, device=None, batch_size=None, probs_out=None) -> pd.DataFrame:
    """The submission of the bundle in `folder` for the images in `test_dir`, written to `out` whole
    (and, given `probs_out`, the ensemble's probabilities as the ensemble stage writes test_probs.csv)."""
    folder = Path(folder)
    spec = read_bundle(folder)
    model = ensemble_from_state(spec["ensemble"]["state"], f"{SPEC}: ensemble.state")  # before any long work
    task = create_task(spec.get("task", DEFAULT_TASK), spec["classes"], **spec.get("task_options", {}))
    step = step_from_state(spec["ensemble"].get("postprocess", {"step": "identity"}), task)
    _warn_versions(spec.get("versions", {}))
    device = device or pick_device()
    files, ids, rels, frame = _test_set(spec, test_dir, sample)
    size, resize = spec["images"]["size"], spec["images"]["resize"]
    with tempfile.TemporaryDirectory(prefix="bundle-test-") as tmp:
        cache = Path(tmp) / "test_images.npy"
        _, _, _, bad = decode_images(files, rels, size, resize, os.cpu_count() or 1, cache, "decode test")
        if bad:
            listed = ", ".join(f"{rels[i]} ({why})" for i, why in list(bad.items())[:5])
            print(f"warning: {len(bad)} test images unreadable, predicted as black images: {listed}", file=sys.stderr)
        images = np.load(cache, mmap_mode="r")
        clock = _Clock(sum(len(m["models"]) + len(m.get("join", [])) for m in spec["members"]), len(ids))
        probs = [
            member_probs(m, images, folder, Path(tmp), device, batch_size or spec.get("batch_size", 256), task, clock)
            for m in spec["members"]
        ]
        del images
    fmt = SubmissionFormat(**spec["submission"])
    probs = step.transform(model.predict_proba(probs))
    submission = task.submission(ids, probs, fmt)
    if frame is not None:
        task.check_submission(submission, frame, fmt)
    atomic_write_text(out, submission.to_csv(index=False))
    if probs_out is not None:
        atomic_write_text(probs_out, task.frame(ids, probs).to_csv(index=False))
    return submission


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Predict a test folder with an offline bundle.")
    parser.add_argument("--bundle", required=True, help="the bundle folder (predict.py passes its own)")
    parser.add_argument("--test-dir", required=True, help="the test images (nested folders are searched)")
    parser.add_argument("--sample", help="sample_submission.csv: its ids, order and columns (default: every image)")
    parser.add_argument("--out", default="submission.csv", help="the submission file to write")
    parser.add_argument("--probs", help="also write the ensemble's probabilities here (id, one column per class)")
    parser.add_argument("--batch-size", type=int, help="default: the predict stage's")
    parser.add_argument("--device", help="cuda, cpu, ... (default: CUDA when there is one)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        device = torch.device(args.device) if args.device else None
        sub = predict_bundle(args.bundle, args.test_dir, args.sample, args.out, device, args.batch_size, args.probs)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    spent = time.perf_counter() - start
    print(f"wrote {args.out}: {len(sub)} rows in {spent:.1f} s ({len(sub) / spent:.1f} images/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
