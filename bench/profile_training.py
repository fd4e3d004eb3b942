"""Benchmark: where a `make run` hour goes, phase by phase, for the backbones in params.yaml.

    python bench/profile_training.py [--params params.yaml] [--batches 30] [--repeats 3]

For each backbone it times, on the prepared cache (data/prepared; random images if absent), with the
backbone's own training settings:
  decode     JPEG decoding as `prepare` does it (32 px JPEGs encoded from the cache), one process
  augment    the Dataset's albumentations pipeline + the DataLoader's collation
  to_input   uint8 -> normalised float batch (channels_last where the pipeline uses it)
  forward    forward pass + loss
  backward   backward pass
  optimizer  optimizer step + lr scheduler step
  eval       validation inference (one view)
  predict    inference with every view of the largest TTA candidate policy
then the pipeline's own `train_one_epoch` on the same batches against the bare loop of
bench/train_overhead.py (pre-normalised tensors, no loader). Medians of `--repeats` alternating runs.

Finally it scales the per-image costs by what params.yaml asks for (rows, folds, epochs, seeds,
views) into an estimate of the training and prediction seconds per phase. Last lines:
`RESULT <backbone> train_vs_bare <ratio>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from train_overhead import bare_loop  # noqa: E402

from pipeline.config import load_params, resolve_train_settings  # noqa: E402
from pipeline.data import (  # noqa: E402
    ImageDataset,
    InputConfig,
    build_loader,
    build_train_transform,
    load_prepared,
    to_input,
)
from pipeline.images import decode_image  # noqa: E402
from pipeline.inference import predict  # noqa: E402
from pipeline.loop import LRSchedule, build_optimizer, train_one_epoch  # noqa: E402
from pipeline.models import create_model, pick_device, use_channels_last  # noqa: E402
from pipeline.tasks.single_label import SingleLabel  # noqa: E402
from pipeline.tta import predict_tta  # noqa: E402

TASK = SingleLabel([str(c) for c in range(10)])  # the benchmark's 10-class head


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def phase_times(model, loader, optimizer, scheduler, device, mean, std, size, label_smoothing) -> dict[str, float]:
    """Seconds per phase over one pass of `loader`, the steps of `train_one_epoch` taken apart."""
    cl = use_channels_last(device)
    t = dict.fromkeys(("augment", "to_input", "forward", "backward", "optimizer"), 0.0)
    model.train()
    it = iter(loader)
    while True:
        start = time.perf_counter()
        try:
            images, targets = next(it)
        except StopIteration:
            break
        t["augment"] += time.perf_counter() - start
        box = {}
        t["to_input"] += _timed(
            lambda: box.update(x=to_input(images, InputConfig(size, tuple(mean), tuple(std)), device, cl))
        )
        t["forward"] += _timed(
            lambda: box.update(loss=F.cross_entropy(model(box["x"]), targets, label_smoothing=label_smoothing))
        )
        t["backward"] += _timed(lambda: box["loss"].backward())

        def step():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()

        t["optimizer"] += _timed(step)
    return t


def decode_rate(images: np.ndarray) -> float:
    blobs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
        blobs.append(buf.getvalue())
    size = images.shape[1]
    return len(blobs) / _timed(lambda: [decode_image(b, size, "squash") for b in blobs])


def profile_backbone(name, model_name, s, image_size, images, targets, mean, std, views, batches, repeats, device):
    n, cfg = batches * s.batch_size, InputConfig(image_size, tuple(mean), tuple(std))
    imgs, ys = np.array(images[:n]), np.array(targets[:n])
    torch.manual_seed(0)
    initial = create_model(model_name, 10).state_dict()

    def fresh():
        model = create_model(model_name, 10, drop_rate=s.drop_rate)
        model.load_state_dict(initial)
        model.to(device)
        return model.to(memory_format=torch.channels_last) if use_channels_last(device) else model

    def loader():
        transform = build_train_transform(s.augment, 0, p=s.augment_p, cache_size=imgs.shape[1])
        return build_loader(ImageDataset(imgs, ys, transform), s.batch_size, True, 0, 0, device)

    def opt_sched(model):
        optimizer = build_optimizer(model, s)
        return optimizer, LRSchedule(optimizer, dataclasses.replace(s, epochs=10, warmup_epochs=1), batches)

    x = to_input(torch.from_numpy(imgs), cfg, device, use_channels_last(device))
    bare_batches = [
        (x[i : i + s.batch_size], torch.from_numpy(ys[i : i + s.batch_size]).to(device))
        for i in range(0, n, s.batch_size)
    ]
    bare_loop(fresh(), bare_batches[:2], s.lr)  # warm-up
    phases, pipe, bare = [], [], []
    for _ in range(repeats):
        model = fresh()
        phases.append(phase_times(model, loader(), *opt_sched(model), device, mean, std, image_size, s.label_smoothing))
        model = fresh()
        pipe.append(
            n
            / _timed(
                lambda: train_one_epoch(
                    model,
                    loader(),
                    *opt_sched(model),
                    device,
                    cfg,
                    label_smoothing=s.label_smoothing,
                    task=TASK,
                    where="bench",
                )
            )
        )
        bare.append(n / _timed(lambda: bare_loop(fresh(), bare_batches, s.lr)))
    per_image = {k: statistics.median(p[k] for p in phases) / n for k in phases[0]}
    model = fresh()
    evals = [
        len(imgs) / _timed(lambda: predict(model, imgs, cfg, 2 * s.batch_size, device, TASK)) for _ in range(repeats)
    ]
    preds = [
        len(imgs)
        / _timed(lambda: predict_tta(model, imgs, cfg, 2 * s.batch_size, device, views=tuple(views), task=TASK))
        for _ in range(repeats)
    ]
    per_image["eval"] = 1 / statistics.median(evals)
    per_image["predict"] = 1 / statistics.median(preds)
    return per_image, statistics.median(pipe), statistics.median(bare)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    params = load_params(args.params)
    device = pick_device()
    if Path("data/prepared/classes.json").exists():
        data = load_prepared("data/prepared")
        images, targets = np.asarray(data.train_images), data.train["target"].to_numpy()
        n_train, n_test, n_folds = len(images), len(data.test), data.n_folds
        mean, std = data.fold_stats(0)
        source = "data/prepared"
    else:
        rng = np.random.default_rng(0)
        size = params.prepare.image_size
        images = rng.integers(0, 256, size=(4096, size, size, 3), dtype=np.uint8)
        targets = rng.integers(0, 10, size=len(images))
        n_train, n_test, n_folds, mean, std = len(images), 1024, params.cv.n_folds, [0.5] * 3, [0.25] * 3
        source = "random images"
    tta = params.tta
    candidates = tta.candidates or list(tta.policies)
    views = sorted({v for c in candidates for v in tta.policies[c]})  # predict computes each view once
    decode = decode_rate(images[:2000])
    print(
        f"device {device.type}, {torch.get_num_threads()} threads, {source}: {n_train} train / {n_test} test rows, "
        f"{n_folds} folds; median of {args.repeats}"
    )
    print(f"decode: {decode:.0f} images/s per process (prepare decodes {n_train + n_test} images once)")
    for name in params.train.backbones:
        s = resolve_train_settings(params.train, name)
        image_size = s.image_size or params.prepare.image_size
        per_image, pipe, bare = profile_backbone(
            name,
            params.train.backbones[name].model or name,
            s,
            image_size,
            images,
            targets,
            mean,
            std,
            views,
            args.batches,
            args.repeats,
            device,
        )
        seeds = len(s.seeds or [s.seed])
        fold_rows = n_train * (n_folds - 1) / n_folds
        counts = {
            k: fold_rows * n_folds * s.epochs * seeds
            for k in ("augment", "to_input", "forward", "backward", "optimizer")
        }
        validated = sum(1 for e in range(1, s.epochs + 1) if e % s.val_every == 0 or e == s.epochs)
        counts["eval"] = n_train * validated * seeds  # each validated epoch predicts its fold's validation rows
        counts["predict"] = (n_train + n_test * n_folds) * seeds  # OOF rows once, test rows once per fold model
        seconds = {k: per_image[k] * counts[k] for k in per_image}
        total = sum(seconds.values())
        print(
            f"\n{name} at {image_size} px, batch {s.batch_size}, {s.epochs} epochs ({validated} validated) x {n_folds} "
            f"folds x {seeds} seed(s), TTA views {len(views)}"
        )
        print(f"  {'phase':<10} {'images/s':>10} {'est. seconds':>13} {'share':>6}")
        for k in per_image:
            print(f"  {k:<10} {1 / per_image[k]:>10.0f} {seconds[k]:>13.0f} {seconds[k] / total:>6.1%}")
        print(f"  {'total':<10} {'':>10} {total:>13.0f}")
        print(f"  training images/s: pipeline {pipe:.0f}, bare loop {bare:.0f}")
        print(f"RESULT {name} train_vs_bare {pipe / bare:.3f}")


if __name__ == "__main__":
    main()
