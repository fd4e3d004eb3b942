"""Benchmark: the cifar10-cpu preset against a peer, airbench94, on the same rows and the same machine.

    python bench/airbench_peer.py data/raw/cifar10.zip [--epochs 12] [--minutes 20] [--parts equal,budget]
        [--pipeline-from CLONE] [--set refit.enabled=true ...]

The peer is airbench94 (Keller Jordan, github.com/KellerJordan/cifar10-airbench, airbench94.py, MIT
licence), re-implemented below for the CPU from its published code: the same net (2x2 patch-whitening
stem, three conv groups of widths 64/256/256, dirac-initialised convs, batch norm with frozen weights and
momentum 0.6), Nesterov SGD at batch 1,024 with its decoupled lr 11.5 / wd 0.0153 and 64x lr on the norm
biases, its triangular schedule, lookahead/EMA from epoch 3, its whitening bias trained for 3 epochs, random
2 px reflect-padded translation and its alternating flip, label smoothing 0.2; bf16 autocast here where the
original runs fp16 on a GPU, where the pipeline's `precision: auto` probe finds it faster than fp32 on this
machine (else fp32: on a CPU with AVX2 alone bf16 is emulated, 10x slower). Its TTA: mirror + 1 px
translations, logits weighted 1/4, 1/4, 1/8 x 4.

Both sides read the preset's prepared cache (32 px, its cv.n_folds and cv.holdout), prepared once in --work.
1. equal: both trained --epochs epochs on fold 0's training rows, scored on fold 0's validation rows
   without and with each side's TTA (the pipeline: the preset's `airbench` policy and merge):
       RESULT airbench_peer accuracy_ratio <pipeline/airbench, no TTA> tta_accuracy_ratio <with TTA>
       images_per_s_ratio <pipeline/airbench, training>
2. budget: the same wall clock, --minutes each: the preset's whole submission pipeline (prepare, plan,
   train of the folds its plan chooses, predict with TTA, refit, ensemble, analyze, timing;
   budget.minutes = --minutes) in --work/pipeline, against airbench trained on every row outside the
   holdout for the epochs that fit its share (the minutes less the seconds the pipeline's prepare took,
   as the peer reuses its cache) and predicting holdout and test with its TTA; both scored on the holdout:
       RESULT airbench_budget minutes <m> pipeline_holdout <acc> airbench_holdout <acc> airbench_epochs <e>
   --pipeline-from CLONE takes the pipeline's side from a finished `make run PRESET=cifar10-cpu` there
   (its record: every stage, its prepared cache and so the same holdout) instead of running it again;
   --set KEY=VALUE ... runs an alternative (e.g. refit.enabled=true refit.rule=join) over the preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.backbone import Backbone  # noqa: E402
from pipeline.config import parse_params, resolve_train_settings  # noqa: E402
from pipeline.data import Rows, load_prepared  # noqa: E402
from pipeline.fold import train_fold  # noqa: E402
from pipeline.inference import fold_input_config, fold_model  # noqa: E402
from pipeline.precision import probe_precision, resolve_precision  # noqa: E402
from pipeline.prepare import prepare  # noqa: E402
from pipeline.presets import load_preset, merge  # noqa: E402
from pipeline.tta import predict_views  # noqa: E402

PRESET, MODEL, CPU = "cifar10-cpu", "cifar_net_l", torch.device("cpu")
HYP = dict(
    batch_size=1024, lr=11.5, momentum=0.85, weight_decay=0.0153, bias_scaler=64.0, label_smoothing=0.2,
    ema_start_epochs=3, ema_decay_base=0.95, ema_decay_pow=3.0, ema_every=5, whiten_bias_epochs=3,
    translate=2, bn_momentum=0.6, widths=(64, 256, 256), scale=1 / 9,
)  # fmt: skip


def preset_params() -> dict:
    """params.yaml with the preset merged in, as `python -m pipeline preset cifar10-cpu` writes it."""
    return merge(yaml.safe_load((ROOT / "params.yaml").read_text()), load_preset(PRESET, ROOT / "configs/presets"))


# ---------------------------------------------------------------- airbench94, for the CPU


class BatchNorm(nn.BatchNorm2d):
    def __init__(self, n: int):
        super().__init__(n, eps=1e-12, momentum=1 - HYP["bn_momentum"])
        self.weight.requires_grad = False


class Conv(nn.Conv2d):
    def __init__(self, cin: int, cout: int, kernel_size: int = 3, padding="same", bias: bool = False):
        super().__init__(cin, cout, kernel_size=kernel_size, padding=padding, bias=bias)

    def reset_parameters(self):
        super().reset_parameters()
        if self.bias is not None:
            self.bias.data.zero_()
        w = self.weight.data
        torch.nn.init.dirac_(w[: w.size(1)])  # an implicit residual: the first channels pass through


class ConvGroup(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.pool, self.norm1 = Conv(cin, cout), nn.MaxPool2d(2), BatchNorm(cout)
        self.conv2, self.norm2, self.activ = Conv(cout, cout), BatchNorm(cout), nn.GELU()

    def forward(self, x):
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


class Scale(nn.Module):
    def forward(self, x):
        return x * HYP["scale"]


PEER = {"bf16": True}  # set in main by the same probe as the pipeline's `precision: auto`


def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=PEER["bf16"])


def make_net(n_classes: int) -> nn.Sequential:
    w = HYP["widths"]
    net = nn.Sequential(
        Conv(3, 24, kernel_size=2, padding=0, bias=True),
        nn.GELU(),
        ConvGroup(24, w[0]),
        ConvGroup(w[0], w[1]),
        ConvGroup(w[1], w[2]),
        nn.MaxPool2d(3),
        nn.Flatten(),
        nn.Linear(w[2], n_classes, bias=False),
        Scale(),
    )
    net[0].weight.requires_grad = False
    return net.to(memory_format=torch.channels_last)


def init_whitening(conv: nn.Conv2d, x: torch.Tensor, eps: float = 5e-4) -> None:
    c, (h, w) = x.shape[1], conv.weight.shape[2:]
    patches = x.unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c, h, w).float()
    flat = patches.view(len(patches), -1)
    eigval, eigvec = torch.linalg.eigh(flat.T @ flat / len(flat), UPLO="U")
    eigval, eigvec = eigval.flip(0).view(-1, 1, 1, 1), eigvec.T.reshape(c * h * w, c, h, w).flip(0)
    scaled = eigvec / torch.sqrt(eigval + eps)
    conv.weight.data[:] = torch.cat((scaled, -scaled))


def batch_crop(images: torch.Tensor, side: int, gen: torch.Generator) -> torch.Tensor:
    r = (images.size(-1) - side) // 2
    shifts = torch.randint(-r, r + 1, size=(len(images), 2), generator=gen)
    out = torch.empty((len(images), images.shape[1], side, side), dtype=images.dtype)
    for sy in range(-r, r + 1):
        for sx in range(-r, r + 1):
            mask = (shifts[:, 0] == sy) & (shifts[:, 1] == sx)
            out[mask] = images[mask, :, r + sy : r + sy + side, r + sx : r + sx + side]
    return out


def normalised(images, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float().div_(255)
    return ((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)).contiguous()


def triangle(steps: int, start=0.2, end=0.07, peak=0.23) -> torch.Tensor:
    xp, fp = torch.tensor([0, int(peak * steps), steps]), torch.tensor([start, 1, end])
    x = torch.arange(1 + steps)
    m = (fp[1:] - fp[:-1]) / (xp[1:] - xp[:-1])
    b = fp[:-1] - m * xp[:-1]
    idx = torch.clamp(torch.sum(torch.ge(x[:, None], xp[None, :]), 1) - 1, 0, len(m) - 1)
    return m[idx] * x + b[idx]


def train_airbench(x: torch.Tensor, y: torch.Tensor, n_classes: int, epochs: float, seed: int = 0):
    """airbench94's training loop on normalised images `x`; returns (net, training seconds, steps)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    bs, momentum = HYP["batch_size"], HYP["momentum"]
    kilostep = 1024 * (1 + 1 / (1 - momentum))
    lr, wd = HYP["lr"] / kilostep, HYP["weight_decay"] * bs / kilostep
    lr_bias = lr * HYP["bias_scaler"]
    net = make_net(n_classes)
    started = time.perf_counter()
    init_whitening(net[0], x[:5000])
    norm_biases = [p for k, p in net.named_parameters() if "norm" in k and p.requires_grad]
    others = [p for k, p in net.named_parameters() if "norm" not in k and p.requires_grad]
    opt = torch.optim.SGD(
        [
            dict(params=norm_biases, lr=lr_bias, weight_decay=wd / lr_bias),
            dict(params=others, lr=lr, weight_decay=wd / lr),
        ],
        momentum=momentum,
        nesterov=True,
    )
    per_epoch = len(x) // bs
    total = math.ceil(per_epoch * epochs)
    schedule = triangle(total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: schedule[i])
    loss_fn = nn.CrossEntropyLoss(label_smoothing=HYP["label_smoothing"], reduction="none")
    flip = torch.rand(len(x), generator=gen) < 0.5  # pre-flipped half; then all flipped every other epoch
    pad = HYP["translate"]
    padded = F.pad(torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x), (pad,) * 4, "reflect")
    ema, step = None, 0
    for epoch in range(math.ceil(epochs)):
        net[0].bias.requires_grad = epoch < HYP["whiten_bias_epochs"]
        images = batch_crop(padded, x.shape[-1], gen)
        images = images.flip(-1) if epoch % 2 == 1 else images
        order = torch.randperm(len(images), generator=gen)
        net.train()
        for i in range(per_epoch):
            idx = order[i * bs : (i + 1) * bs]
            with autocast():
                out = net(images[idx].contiguous(memory_format=torch.channels_last))
            loss = loss_fn(out.float(), y[idx]).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if epoch >= HYP["ema_start_epochs"] and step % HYP["ema_every"] == 0:
                if ema is None:
                    ema = {k: v.clone() for k, v in net.state_dict().items()}
                else:
                    rho = HYP["ema_decay_base"] ** HYP["ema_every"] * (step / total) ** HYP["ema_decay_pow"]
                    _lookahead(net, ema, rho)
            if step >= total:
                break
        if ema is not None:
            _lookahead(net, ema, 1.0)
    return net, time.perf_counter() - started, step


def _lookahead(net: nn.Module, ema: dict, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.values(), net.state_dict().values()):
            if p.dtype.is_floating_point:
                e.lerp_(p, 1 - decay)
                p.copy_(e)


@torch.no_grad()
def airbench_logits(net: nn.Module, x: torch.Tensor, level: int) -> torch.Tensor:
    """airbench94's inference: 0 plain, 1 mirror, 2 mirror + 1 px translations (its weights)."""
    net.eval()

    def run(t):
        with autocast():
            return net(t.contiguous(memory_format=torch.channels_last)).float()

    def mirror(t):
        return 0.5 * run(t) + 0.5 * run(t.flip(-1))

    out = []
    for t in x.split(1000):
        if level == 0:
            out.append(run(t))
        elif level == 1:
            out.append(mirror(t))
        else:
            padded, side = F.pad(t, (1,) * 4, "reflect"), t.shape[-1]
            shifted = [padded[:, :, :side, :side], padded[:, :, 2 : side + 2, 2 : side + 2]]
            out.append(0.5 * mirror(t) + 0.5 * torch.stack([mirror(s) for s in shifted]).mean(0))
    return torch.cat(out)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


# ---------------------------------------------------------------- 1. equal epochs on fold 0


def pipeline_fold0(data, params, epochs: int) -> dict:
    """The preset's training of fold 0 for `epochs` epochs, and its validation scores by TTA policy."""
    s = dataclasses.replace(resolve_train_settings(params.train, MODEL), epochs=epochs, val_every=epochs)
    result, ckpt = train_fold(
        data, 0, Backbone(MODEL, MODEL, None, s, 32, {}), torch.device("cpu"), where="pipeline fold 0"
    )
    seconds = sum(r["epoch_seconds"] for r in result.history)
    va = np.flatnonzero(data.folds == 0)
    y = data.targets[va]
    model, cfg = fold_model(ckpt, torch.device("cpu")), fold_input_config(ckpt, torch.device("cpu"))
    policies = params.tta.policies
    names = ["none", "hflip", "hflip_shift", "airbench"]
    views = list(dict.fromkeys(v for p in names for v in policies[p]))
    logp = predict_views(model, Rows(data.train_images, va), cfg, 512, torch.device("cpu"), views, data.task)
    out = {"seconds": seconds, "images_per_s": (len(data.train) - len(va)) * epochs / seconds}
    for p in names:
        sel = [views.index(v) for v in policies[p]]
        for how in ("mean", "logits"):
            out[f"{p}/{how}"] = data.task.scores(data.task.merge(logp[sel], how), y, ("accuracy", "log_loss"))
    return out


def airbench_fold0(data, epochs: float) -> dict:
    tr, va = np.flatnonzero(data.folds != 0), np.flatnonzero(data.folds == 0)
    mean, std = data.fold_stats(0)
    x, y = normalised(Rows(data.train_images, tr), mean, std), torch.from_numpy(data.targets[tr])
    net, seconds, steps = train_airbench(x, y, len(data.classes), epochs)
    xv, yv = normalised(Rows(data.train_images, va), mean, std), torch.from_numpy(data.targets[va])
    started = time.perf_counter()
    levels = {level: accuracy(airbench_logits(net, xv, level), yv) for level in (0, 1, 2)}
    infer = (time.perf_counter() - started) / (len(va) * 9)  # 1 + 2 + 6 forward passes per image
    return {"seconds": seconds, "images_per_s": steps * HYP["batch_size"] / seconds, "levels": levels, "infer_s": infer}


# ---------------------------------------------------------------- 2. the same wall clock


def overrides(pairs: list[str]) -> dict:
    """--set a.b=value ... as a nested mapping (values read as YAML: true, 2, [42, 43])."""
    out: dict = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return out


def run_pipeline(work: Path, raw: dict, backbones: list[str]) -> dict[str, float]:
    """Every stage `dvc repro` runs (prepare to timing, analyze included) for params `raw`, stage by stage in
    `work` (params.yaml written there, checked first): each stage's seconds, summed over backbones."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    parse_params(raw, str(work / "params.yaml"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    per_backbone = [[s, "--backbone", b] for s in ("train", "predict", "refit") for b in backbones]
    seconds = {}
    for stage in [["prepare"], ["plan"], *per_backbone, ["ensemble"], ["analyze"], ["timing"]]:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline", *stage], cwd=work, env=env, check=True)
        seconds[stage[0]] = seconds.get(stage[0], 0.0) + time.perf_counter() - started
    return seconds


def pipeline_budget(work: Path, source: str, minutes: float, changes: dict) -> dict:
    """The preset's submission pipeline with budget.minutes = `minutes` (and `changes` over it), every stage
    `dvc repro` runs (analyze and timing included), stage by stage in `work`."""
    raw = preset_params()
    merge(raw, {"competition": {"source": source}, "budget": {"minutes": minutes}, "tracking": {"enabled": False}})
    merge(raw, changes)
    return pipeline_recorded(work, run_pipeline(work, raw, [MODEL]))


def pipeline_recorded(run: Path, seconds: dict | None = None) -> dict:
    """The figures of a finished run in `run` (a clone's `make run PRESET=cifar10-cpu`: its reports/timing.json
    holds each stage's seconds, so that the record is the pipeline's side), the fold bag's holdout beside
    the refit's where one ran."""
    timing = json.loads((run / "reports/timing.json").read_text())
    report = json.loads((run / "reports/ensemble.json").read_text())
    plan = json.loads((run / f"plan/{MODEL}.json").read_text())
    if seconds is None:
        seconds = {stage: row["actual_s"] for stage, row in timing["stages"].items() if row["actual_s"] is not None}
    refit = json.loads((run / f"refit/{MODEL}/refit.json").read_text()) if (run / "refit").exists() else {}
    member = report["backbones"][MODEL]
    return {
        "seconds": seconds,
        "holdout": report["holdout"],
        "oof": report["oof"],
        "epochs": plan.get("epochs"),
        "folds": plan.get("folds"),
        "scheme": json.loads((run / "reports/plan.json").read_text()).get("scheme"),
        "refit": {k: refit.get(k) for k in ("enabled", "epochs", "seeds")},
        "holdout_fold_bag": member.get("holdout_fold_bag", member.get("holdout")),
        "planned_total_s": timing.get("planned_total_seconds"),
        "actual_over_planned": timing.get("actual_over_planned"),
    }


def airbench_budget(data, seconds: float, train_speed: float, infer_s: float) -> dict:
    """airbench on every row outside the holdout, for the epochs that fit `seconds` with its TTA
    predictions of the holdout and test images; scored on the holdout."""
    mean, std = data.stats["mean"], data.stats["std"]
    x, y = normalised(data.train_images, mean, std), torch.from_numpy(data.targets)
    started = time.perf_counter()
    predict_s = infer_s * 6 * (len(data.holdout) + len(data.test))
    epochs = max(1.0, round((0.97 * seconds - predict_s) * train_speed / len(x), 1))
    net, _, _ = train_airbench(x, y, len(data.classes), epochs)
    xh, yh = normalised(data.holdout_images, mean, std), torch.from_numpy(data.holdout["target"].to_numpy())
    held = {level: accuracy(airbench_logits(net, xh, level), yh) for level in (0, 2)}
    airbench_logits(net, normalised(data.test_images, mean, std), 2)  # the submission's predictions
    return {"epochs": epochs, "holdout": held, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--parts", default="equal,budget")
    parser.add_argument("--work", default="/tmp/airbench_peer")
    parser.add_argument("--pipeline-from", type=Path, help="a clone where the preset ran")
    parser.add_argument("--set", nargs="*", default=[], help="params over the preset's, e.g. refit.enabled=true")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    chosen, figures = resolve_precision("auto", CPU, lambda: probe_precision(make_net(10), 256, 32, CPU))
    PEER["bf16"] = chosen == "bf16"
    print(f"RESULT airbench_precision {chosen} {json.dumps(figures)}", flush=True)
    source, work, parts = str(Path(args.source).resolve()), Path(args.work), args.parts.split(",")
    params = parse_params(preset_params(), PRESET)
    prepared = args.pipeline_from / "data/prepared" if args.pipeline_from else work / "prepared"
    if not (prepared / "classes.json").exists():
        comp = dataclasses.replace(params.competition, source=source, answers=None)
        prepare(comp, 32, params.cv.n_folds, params.cv.seed, prepared, holdout=params.cv.holdout)
    data = load_prepared(prepared)
    peer = None
    if "equal" in parts:
        mine, peer = pipeline_fold0(data, params, args.epochs), airbench_fold0(data, args.epochs)
        print(f"RESULT pipeline_fold0 {json.dumps(mine)}\nRESULT airbench_fold0 {json.dumps(peer)}", flush=True)
        tta = f"airbench/{params.tta.merge}"
        print(
            f"RESULT airbench_peer epochs {args.epochs} accuracy_ratio "
            f"{mine['none/mean']['accuracy'] / peer['levels'][0]:.4f} tta_accuracy_ratio "
            f"{mine[tta]['accuracy'] / peer['levels'][2]:.4f} images_per_s_ratio "
            f"{mine['images_per_s'] / peer['images_per_s']:.4f}",
            flush=True,
        )
    if "budget" in parts:
        if args.pipeline_from:
            mine = pipeline_recorded(args.pipeline_from)
        else:
            mine = pipeline_budget(work / "pipeline", source, args.minutes, overrides(args.set))
        if peer is None:  # its speeds from a short run
            peer = airbench_fold0(data, 0.3)
        share = args.minutes * 60 - mine["seconds"]["prepare"]  # the peer reuses the prepared cache
        theirs = airbench_budget(data, share, peer["images_per_s"], peer["infer_s"])
        print(f"RESULT pipeline_budget {json.dumps(mine)}\nRESULT airbench_budget_run {json.dumps(theirs)}")
        print(
            f"RESULT airbench_budget minutes {args.minutes} pipeline_holdout {mine['holdout']['accuracy']:.4f} "
            f"airbench_holdout {theirs['holdout'][2]:.4f} airbench_epochs {theirs['epochs']} "
            f"pipeline_seconds {sum(mine['seconds'].values()):.0f} airbench_seconds {theirs['seconds']:.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
