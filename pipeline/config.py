"""Typed configuration: defaults live here, `params.yaml` overrides them.

Every section of `params.yaml` maps to one frozen dataclass below. Unknown keys
and values of the wrong type fail loudly with the dotted key's name, e.g.
``params.yaml: unknown key 'train.lrr'``.

    python -c "from pipeline.config import load_params; print(load_params('params.yaml'))"
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import PipelineError

# the scores of pipeline/metrics.py; log_loss is minimised, the others maximised
Metric = Literal[
    "accuracy",
    "log_loss",
    "macro_f1",
    "roc_auc",
    "quadratic_weighted_kappa",
    "f_beta",
    "micro_f1",
    "mean_column_auc",
    "rmse",
    "mae",
]


@dataclass(frozen=True)
class CompetitionConfig:
    """Where the competition's raw files are and how they are laid out (Kaggle conventions)."""

    # a folder or a .zip of one; a folder holding the file SKLEARN_DIGITS gets scikit-learn's digits rendered into it
    source: str = "data/raw/sklearn-digits"
    train_csv: str | None = "train.csv"  # null: ImageFolder layout, train_dir/<class>/<file>
    id_column: str = "id"
    # one label column (a class, or multi-label tags joined by label_delimiter), or a list of 0/1 columns, one per
    # label; left at "label" when train.csv has no such column and every other column holds 0/1, those columns
    label_column: str | list[str] = "label"
    # auto: prepare says what it read, and why (a numeric column with non-integers or over 20 distinct values is a
    # regression; integer classes and grades stay single_label unless set to regression)
    task: Literal["auto", "single_label", "multilabel", "regression"] = "auto"
    label_delimiter: str = " "  # multilabel: what joins an image's tags in the label column (Planet: a space)
    empty_labels: bool = False  # multilabel: an image may have no label (an empty tag list or all-0 columns)
    beta: float = 1.0  # metric f_beta: F-beta over images (Planet: 2)
    path_column: str | None = None  # train.csv column with each image's path inside train_dir (else the id)
    group_column: str | None = None  # rows sharing a group stay in one fold
    train_dir: str = "train"
    test_dir: str = "test"
    image_ext: str = (
        ".jpg"  # tried after the id (or path); a file whose name is the id with another extension also matches
    )
    sample_submission: str | None = "sample_submission.csv"  # null: every image under test_dir, `id,label` out
    answers: str | None = "solution.csv"  # test labels, if the competition ships them (local leaderboard)
    max_train_rows: int | None = None  # stratified subsample for quick runs
    metric: Metric = "accuracy"  # the competition's metric: what ensemble.metric defaults to (choices: the proxy)
    positive_class: str | None = None  # binary, one probability column: the class it is the probability of


@dataclass(frozen=True)
class PrepareConfig:
    image_size: int = 32  # every image is decoded once and resized to this square size in the cache
    resize: Literal["squash", "pad", "center_crop"] = "squash"  # how a non-square image becomes square
    skip_bad_images: bool = False  # drop undecodable or missing training images (listed); a bad test image is an error
    workers: int = 0  # decoding processes; 0 = one per CPU core


@dataclass(frozen=True)
class CVConfig:
    n_folds: int = 5
    seed: int = 42
    holdout: float | None = None  # a stratified (group-aware) share kept out of every fold, scored like the test set
    # how many of the n_folds are trained (folds 0..m-1; the others' rows stay in every training part):
    # null = all; m; auto = under budget.minutes the plan's choice (pipeline/plan.py: `plan_scheme`)
    train_folds: int | str | None = None


@dataclass(frozen=True)
class TrainSettings:
    """Hyperparameters of one backbone's training; each can be overridden per backbone."""

    epochs: int = 5
    batch_size: int = 32
    # network input side: null = the pretrained weights' own, else prepare.image_size; auto = the plan's choice among
    # a few sides at or below the cache's (random weights: and the images' median native side) (plan.py:
    # side_candidates, plan_from_speeds; without a budget the largest)
    image_size: int | str | None = None
    # transfer learning: full | freeze | linear_probe | features+sklearn | auto (the plan picks features+sklearn or
    # full from the updates per model and the rows per class: pipeline/plan.py, choose_finetune)
    finetune: Literal["full", "freeze", "linear_probe", "features+sklearn", "auto"] = "full"
    freeze_stages: int = -1  # freeze: stem + this many stages; -1 = everything but the head
    unfreeze_epoch: int | None = None  # freeze: train everything from this epoch (0-based) on
    sklearn_classifier: Literal["logistic_regression", "svm"] = "logistic_regression"  # features+sklearn
    # features+sklearn: the features the classifier is fitted on; null = the pooled last features, else one of
    # timm's feature_info stages, by index (0 = the stem's, -1 = the last stage's) or by module name (layer2)
    feature_layer: int | str | None = None
    layer_decay: float | None = None  # layer-wise lr decay: lr x decay^(depth from the head)
    # optimisation
    optimizer: str = "adamw"  # any timm optimizer name: adamw, sgd (Nesterov momentum), lamb, ...
    lr: float = 3e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    scheduler: Literal["cosine", "linear", "step", "constant"] = "cosine"  # timm's, per update, after linear warmup
    min_lr: float = 0.0  # where cosine and linear end
    warmup_epochs: float = 1.0
    step_epochs: float = 2.0  # step: decay the lr by step_gamma every step_epochs
    step_gamma: float = 0.1
    grad_accum_steps: int = 1
    clip_grad_norm: float | None = None
    # regularisation
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mixup_off_epoch: int | None = None  # mixup/cutmix switched off from this epoch (0-based) on
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dirac_init: bool = False  # from scratch: every 3x3 conv's first channels start as the identity (airbench's)
    ema_decay: float | None = None  # EMA of weights; each epoch keeps whichever of EMA/live validates better
    early_stopping_patience: int | None = None  # stop a fold after this many epochs without improvement
    monitor: Metric = "accuracy"  # the validation metric that picks the best epoch (params.yaml: competition.metric)
    val_every: int = 1  # validate every N epochs and after the last; = epochs: the last epoch's weights, no choice
    # class imbalance: loss weights inversely proportional to the training part's class counts, and/or
    # batches drawn with replacement so that every class is equally likely
    class_weight: Literal["none", "balanced"] = "none"
    # regression: the loss on the target scaled on the fold's training rows (mse / smooth_l1: standardised; bce: the
    # training range scaled to [0, 1] through a sigmoid, Pawpularity's)
    regression_loss: Literal["mse", "smooth_l1", "bce"] = "mse"
    sampler: Literal["uniform", "balanced"] = "uniform"
    # input normalisation: null = the pretrained weights' own (timm's data config, or the source run's), else
    # each fold's training statistics
    mean: list[float] | None = None
    std: list[float] | None = None
    # how a batch is resized from the cache to the input side, in training and for every TTA view: null = the
    # pretrained weights' own (timm's data config: bicubic for most), else bilinear
    interpolation: Literal["bilinear", "bicubic", "nearest", "area"] | None = None
    # augmentation (train only): albumentations transforms in order, {ClassName: {kwargs}}, applied to the
    # cache's images; null = a random shift by up to 3/32 of the side (pad + crop at the cache size)
    augment: list[dict[str, dict]] | None = None
    augment_p: float = 1.0  # augmentation strength: the share of training images the whole list is applied to
    # speed
    # autocast: null = mixed precision on CUDA (bf16, else fp16), fp32 on the CPU; auto = on the CPU, bf16 if a
    # short probe of this model and batch measures it faster on this machine, else fp32; or fp32 | bf16 | fp16
    precision: Literal["auto", "fp32", "bf16", "fp16"] | None = None
    compile: str | None = None  # torch.compile backend: null = off, "inductor" = torch.compile's default
    num_workers: int | None = None  # DataLoader workers; null = 0 on CPU, min(8, cores) on GPU
    seed: int = 42
    # bagging: every fold is trained once per seed; its OOF is the mean over seeds, test the mean over all
    seeds: list[int] | None = None  # null = [seed]
    bootstrap: bool = False  # each seed trains on a bootstrap resample (with replacement) of the fold's training rows


def _backbone_config():
    """BackboneConfig: `model`, `pretrained`, and an optional override of every TrainSettings field."""
    hints = typing.get_type_hints(TrainSettings)
    overrides = [(f.name, hints[f.name] | None, None) for f in dataclasses.fields(TrainSettings)]
    cls = dataclasses.make_dataclass(
        "BackboneConfig",
        [("model", str | None, None), ("pretrained", bool | str | None, None), *overrides],
        frozen=True,
    )
    cls.__module__ = __name__
    return cls


BackboneConfig = _backbone_config()
BackboneConfig.__doc__ = """One backbone: its timm `model` name (defaults to its key; a tag picks pretrained weights,
e.g. convnext_tiny.fb_in22k), `pretrained` (true: timm's weights from the Hugging Face hub or its cache; a local
timm/.safetensors file; a finished run's model.pt or its export), and overrides of any `train.*` setting."""


@dataclass(frozen=True)
class TrainConfig(TrainSettings):
    monitor: Metric | None = None  # null = PROXY_METRIC (log loss; multi-label: mean BCE)
    backbones: dict[str, BackboneConfig] = field(
        default_factory=lambda: {"regnetx_002": BackboneConfig(lr=0.01), "resnet10t": BackboneConfig(image_size=16)}
    )


def resolve_train_settings(train: TrainConfig, backbone: str, tuned: dict | None = None) -> TrainSettings:
    """Settings of one backbone, each key from the first of: `train.backbones.<backbone>.<key>` in
    params.yaml, the tuned value (`tuned`, from the tune stage), the shared `train.<key>`."""
    shared = {
        f.name: getattr(train, f.name) for f in dataclasses.fields(TrainSettings) if getattr(train, f.name) is not None
    }  # None: TrainSettings' default
    chosen = train.backbones[backbone]
    explicit = {
        f.name: getattr(chosen, f.name)
        for f in dataclasses.fields(TrainSettings)
        if getattr(chosen, f.name) is not None
    }
    return dataclasses.replace(TrainSettings(**shared), **{**(tuned or {}), **explicit})


def check_train_settings(s: TrainSettings, where: str) -> None:
    """Raise ConfigError naming the key for what a field's type cannot say: the choices of a Literal
    field (for values that come from tuning rather than params.yaml) and the cross-field rules."""
    hints = typing.get_type_hints(TrainSettings)
    for f in dataclasses.fields(TrainSettings):
        if typing.get_origin(hints[f.name]) is Literal and getattr(s, f.name) not in typing.get_args(hints[f.name]):
            raise ConfigError(
                f"{where}.{f.name} must be one of {list(typing.get_args(hints[f.name]))}, got {getattr(s, f.name)!r}"
            )
    if (s.mixup_alpha > 0 or s.cutmix_alpha > 0) and s.batch_size % 2:
        raise ConfigError(f"{where}.batch_size must be even with mixup/cutmix, got {s.batch_size}")
    for name in ("mean", "std"):
        values = getattr(s, name)
        if values is not None and (len(values) != 3 or (name == "std" and min(values) <= 0)):
            raise ConfigError(
                f"{where}.{name} must be 3 numbers (one per RGB channel{', each > 0' if name == 'std' else ''}), "
                f"got {values}"
            )
    if (s.mean is None) != (s.std is None):
        raise ConfigError(f"{where}: set mean and std together, or neither")
    if s.feature_layer is not None and s.finetune not in ("features+sklearn", "auto"):
        raise ConfigError(f"{where}.feature_layer is for finetune: features+sklearn, not {s.finetune}")
    side = s.image_size
    if side is not None and side != "auto" and not (isinstance(side, int) and side >= 1):
        raise ConfigError(f"{where}.image_size must be >= 1, auto or null (the cache's size), got {s.image_size!r}")
    for name, (low, high, closed_low, closed_high) in RANGES.items():
        value = getattr(s, name)
        if value is None:
            continue
        if (value < low if closed_low else value <= low) or (value > high if closed_high else value >= high):
            span = (
                f"{'>=' if closed_low else '>'} {low}"
                if high == INF
                else f"in {'[' if closed_low else '('}{low}, {high}{']' if closed_high else ')'}"
            )
            raise ConfigError(f"{where}.{name} must be {span}, got {value!r}")


# the numeric training settings' valid ranges: (low, high, low allowed, high allowed); None values are skipped
INF = float("inf")
RANGES = {
    "epochs": (1, INF, True, False),
    "batch_size": (1, INF, True, False),
    "grad_accum_steps": (1, INF, True, False),
    "val_every": (1, INF, True, False),
    "early_stopping_patience": (1, INF, True, False),
    "lr": (0, INF, True, False),
    "weight_decay": (0, INF, True, False),
    "momentum": (0, 1, True, False),
    "warmup_epochs": (0, INF, True, False),
    "min_lr": (0, INF, True, False),
    "step_epochs": (0, INF, False, False),
    "step_gamma": (0, 1, False, True),
    "clip_grad_norm": (0, INF, False, False),
    "label_smoothing": (0, 1, True, False),
    "mixup_alpha": (0, INF, True, False),
    "cutmix_alpha": (0, INF, True, False),
    "drop_rate": (0, 1, True, False),
    "drop_path_rate": (0, 1, True, False),
    "ema_decay": (0, 1, False, False),
    "layer_decay": (0, 1, False, True),
    "augment_p": (0, 1, True, True),
    "freeze_stages": (-1, INF, True, False),
    "unfreeze_epoch": (0, INF, True, False),
    "mixup_off_epoch": (0, INF, True, False),
}


# the tune stage sets these itself: a trial's epochs (tune.epochs), and one model per fold (no bag)
SET_BY_TUNING = {"epochs", "seed", "seeds"}
TUNABLE = {f.name for f in dataclasses.fields(TrainSettings)} - {"augment", "mean", "std"} - SET_BY_TUNING
DISTRIBUTIONS = ("float", "int", "categorical")


def check_tune_space(space: dict[str, dict], where: str) -> None:
    """Raise ConfigError naming the entry of a search space that Optuna could not draw from."""
    for name, spec in space.items():
        key = f"{where}.{name}"
        if name in SET_BY_TUNING:
            raise ConfigError(f"{key}: set by the tune stage itself (tune.epochs; one seed per fold), not tunable")
        if name not in TUNABLE:
            raise ConfigError(f"{key}: unknown parameter (tunable: {', '.join(sorted(TUNABLE))})")
        kind = spec.get("type")
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"{key}.type must be one of {list(DISTRIBUTIONS)}, got {kind!r}")
        if kind == "categorical":
            if not spec.get("choices"):
                raise ConfigError(f"{key}.choices must be a non-empty list")
        else:
            if "low" not in spec or "high" not in spec:
                raise ConfigError(f"{key}: needs low and high")
            if float(spec["low"]) > float(spec["high"]):
                raise ConfigError(f"{key}: low {spec['low']} > high {spec['high']}")
            if spec.get("log") and float(spec["low"]) <= 0:
                raise ConfigError(f"{key}: a log scale needs low > 0")
        unknown = set(spec) - {"type", "low", "high", "log", "step", "choices", "when"}
        if unknown:
            raise ConfigError(f"{key}: unknown field '{sorted(unknown)[0]}'")
        for other in spec.get("when") or {}:
            if other not in space and other not in TUNABLE:
                raise ConfigError(f"{key}.when: unknown parameter '{other}'")


@dataclass(frozen=True)
class TuneConfig:
    """Optuna search per backbone; the best values feed that backbone's train stage."""

    enabled: bool = False
    n_trials: int = 8  # finished (complete or pruned) trials per study, across reruns and workers
    folds: list[int] = field(default_factory=lambda: [0, 1])  # the folds a trial trains, in order
    epochs: int | None = 2  # epochs per fold in a trial; null = train.epochs
    metric: Metric | None = None  # the mean over the folds; null = PROXY_METRIC
    sampler: Literal["tpe", "random", "qmc"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    startup_trials: int = 3  # trials before pruning starts
    storage: str | None = None  # SQLAlchemy URL; null = $OPTUNA_STORAGE or the repository's optuna.db
    heartbeat_seconds: int = 10  # a trial silent for 2x this is failed and retried with its parameters
    max_retry: int = 2
    seed: int = 42
    # search space: {param: {type: float|int|categorical, low, high, log, step, choices, when: {param: value}}}
    space: dict[str, dict] = field(
        default_factory=lambda: {
            "lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
            "weight_decay": {"type": "float", "low": 1e-4, "high": 0.1, "log": True},
            "label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
            "drop_path_rate": {"type": "float", "low": 0.0, "high": 0.2},
            "mixup_alpha": {"type": "categorical", "choices": [0.0, 0.2, 0.4]},
            "augment_p": {"type": "float", "low": 0.3, "high": 1.0},  # augmentation strength
        }
    )
    backbones: dict[str, dict[str, dict]] = field(default_factory=dict)  # per-backbone additions/replacements


@dataclass(frozen=True)
class PredictConfig:
    batch_size: int = 256


DEFAULT_TTA_POLICIES = {
    "none": ["identity"],
    "hflip": ["identity", "hflip"],
    "flips": ["identity", "hflip", "vflip"],
    "rot90": ["identity", "rot90", "rot180", "rot270"],
    "five_crop": ["identity", "crop_tl", "crop_tr", "crop_bl", "crop_br", "crop_center"],
    "brightness": ["identity", "brighter", "darker"],
    # both mirrors, each also translated by one pixel both ways, equal weights
    "hflip_shift": ["identity", "hflip", "shift_ul", "shift_dr", "hflip_shift_ul", "hflip_shift_dr"],
    # airbench94's (Keller Jordan's CIFAR-10 speed runs): plain and mirror 1/4 each (listed twice), each one
    # shifted 1 px up-left and down-right (reflected edges, then mirrored) 1/8 each; airbench merges logits
    "airbench": [
        *["identity", "identity", "hflip", "hflip"],
        *["shift_ul", "shift_dr", "hflip_shift_ur", "hflip_shift_dl"],
    ],
}


def plan_entry(plan_dir: str | Path, backbone: str) -> dict | None:
    """What the plan stage wrote for `backbone` (plan_dir/<backbone>.json), None before it ran."""
    path = Path(plan_dir) / f"{backbone}.json"
    return yaml.safe_load(path.read_text()) if path.exists() else None  # JSON is YAML


@dataclass(frozen=True)
class TTAConfig:
    """Test-time augmentation, chosen per backbone on OOF predictions (read by the predict stage)."""

    select: str = "auto"  # a policy name, or auto: the candidate with the best OOF `metric`, per backbone
    # the policies auto compares (each view costs a forward pass); null = all. The demo's: no flips, for digits
    candidates: list[str] | None = field(default_factory=lambda: ["none", "five_crop", "brightness"])
    # mean of probabilities | geometric (renormalised) | logits (softmax of the mean logits)
    merge: Literal["mean", "geometric", "logits"] = "mean"
    metric: Metric | None = None  # null = PROXY_METRIC
    policies: dict[str, list[str]] = field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_TTA_POLICIES.items()}
    )
    backbones: dict[str, str] = field(default_factory=dict)  # per-backbone `select`, e.g. {resnet10t: hflip}
    # the OOF rows the candidates are compared on (the same share of each fold's, seeded); the chosen policy's
    # views alone predict the others, test and holdout. null = every OOF row
    select_rows: int | None = 4000

    def policies_for(self, backbone: str) -> tuple[list[str], list[str]]:
        """The policies the predict stage of `backbone` chooses from, and those it computes: the same plus
        `none`, so the no-TTA score is always reported."""
        select = self.backbones.get(backbone, self.select)
        pool = (self.candidates or list(self.policies)) if select == "auto" else [select]
        return pool, list(dict.fromkeys((["none"] if "none" in self.policies else []) + pool))

    def without_tta(self) -> TTAConfig:
        """This config with every backbone whose policy is chosen on OOF (`select: auto`, here or per backbone)
        set to `none`: what the plan prices where TTA's views may cost more epochs than they buy."""
        if "none" not in self.policies:
            return self
        auto = {b: "none" for b, select in self.backbones.items() if select == "auto"}
        return dataclasses.replace(
            self, select="none" if self.select == "auto" else self.select, backbones={**self.backbones, **auto}
        )

    def planned(self, plan_dir: str | Path, backbone: str) -> TTAConfig:
        """This config with the plan's TTA for `backbone` (plan_dir/<backbone>.json's `tta`, where the plan chose
        one: `plan_tta`); as it is otherwise."""
        entry = plan_entry(plan_dir, backbone)
        if not entry or "tta" not in entry:
            return self
        return dataclasses.replace(self, backbones={**self.backbones, backbone: entry["tta"]})

    def views_computed(self, backbone: str) -> int:
        """How many distinct views the predict stage of `backbone` computes per image: all the plan needs
        of this section (`select`, `candidates`, `policies`, `backbones`; not `merge` or `metric`)."""
        return len({v for policy in self.policies_for(backbone)[1] for v in self.policies[policy]})

    def views_chosen_at_most(self, backbone: str) -> int:
        """The most distinct views per image the chosen policy can have: what a refit predicts with."""
        return max(len(set(self.policies[policy])) for policy in self.policies_for(backbone)[0])


@dataclass(frozen=True)
class EnsembleConfig:
    """Ensembles fitted on OOF, scored by cross-fitting over the folds; one submission per method."""

    method: str = "auto"  # the method behind submission.csv; auto = the best honest OOF `metric`
    methods: list[str] = field(
        default_factory=lambda: ["soft_voting", "hard_voting", "caruana", "optimized", "rank_average", "stacking"]
    )
    metric: Metric | None = None  # fits caruana's weights and picks `auto`; null = competition.metric
    weights: dict[str, float] = field(default_factory=dict)  # soft_voting: backbone -> weight; missing ones get 1


@dataclass(frozen=True)
class AnalyzeConfig:
    """The OOF error-analysis report (reports/oof/index.html)."""

    top_k: int = 16  # images in the worst-predictions and confident-and-wrong galleries
    confused_pairs: int = 5  # most-confused (true, predicted) pairs shown, each with examples
    examples_per_pair: int = 6
    calibration_bins: int = 15  # equal-width confidence bins of the reliability diagram and ECE
    slice_buckets: int = 5  # quantile buckets per image property
    significance: float = 0.05  # a weak slice needs p < significance / (buckets tested), Fisher exact test


@dataclass(frozen=True)
class RefitConfig:
    """A full-data refit of every backbone after CV (the refit stage), and how it enters the submission."""

    # true: refit@<backbone> trains on every training row for the epochs CV chose; auto: the plan's choice (under
    # budget.minutes: where one fold and the refit each get train.epochs; pipeline/plan.py: `plan_refit`)
    enabled: bool | Literal["auto"] = False
    seeds: list[int] | None = None  # one refit model per seed; null = [the backbone's train.seed]
    rule: Literal["replace", "join"] = "replace"  # a backbone's test (and holdout) predictions: the refit
    # models' alone, or the mean of theirs and the fold bag's; fixed, never chosen on holdout or test

    @property
    def replaces_fold_bags(self) -> bool:
        """The fold models' test (and holdout) predictions are not used: predict computes OOF alone."""
        if self.enabled == "auto":
            raise PipelineError(
                "refit.enabled: auto is the plan's choice: read it with refit.planned(plan_dir, backbone) first"
            )
        return self.enabled and self.rule == "replace"

    def planned(self, plan_dir: str | Path, backbone: str) -> RefitConfig:
        """This config with `enabled: auto` as the plan stage chose it (plan_dir/<backbone>.json's `refit`)."""
        if self.enabled != "auto":
            return self
        entry = plan_entry(plan_dir, backbone)
        if not entry or "refit" not in entry:
            raise PipelineError(
                f"{Path(plan_dir) / backbone}.json: no refit for refit.enabled: auto; run the plan stage first"
            )
        return dataclasses.replace(self, enabled=bool(entry["refit"]))


@dataclass(frozen=True)
class BudgetConfig:
    """A time budget for the whole `dvc repro`, met by planning every backbone's epochs (the plan stage)."""

    minutes: float | None = None  # null: the epochs of params.yaml, nothing measured
    probe_batches: int = 150  # the speed probe's timed pass at most (fewer under a short budget: plan.probe_batches)


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    experiment: str | None = None  # defaults to the competition's name
    log_models: bool = False  # the fold checkpoints as MLflow artefacts too (DVC stores them; the run names the folder)


@dataclass(frozen=True)
class Params:
    competition: CompetitionConfig = field(default_factory=CompetitionConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    tta: TTAConfig = field(default_factory=TTAConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    refit: RefitConfig = field(default_factory=RefitConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


class ConfigError(PipelineError):
    pass


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read `path` and return the resolved `Params`; raise ConfigError naming the bad key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    return parse_params(raw, source=str(path))


def parse_params(raw: dict, source: str = "params") -> Params:
    """Build `Params` from a params.yaml mapping and check every section's cross-field rules once,
    so that downstream code can trust it. (Names that live in a registry, TTA views, ensemble
    methods and timm models, are checked by the stage that owns the registry, before any work.)"""
    params = _resolve_metrics(_build(Params, raw, prefix="", source=source))
    _check_sections(params, source)
    return params


PROXY_METRIC = "log_loss"  # smooth in the predictions, defined for every classification task (multi-label: mean BCE)
REGRESSION_PROXY = "rmse"  # a regression's (competition.task: regression, or a regression metric)
REGRESSION_METRICS = ("rmse", "mae")


def _resolve_metrics(p: Params) -> Params:
    """Every choice made on OOF or validation rows before the last step (best epoch, early stopping,
    tuning, the TTA policy) left null is made on the smooth proxy, log loss: a decision metric (accuracy,
    F1 at a threshold not yet fitted) is a noisy, flat guide on a few hundred rows. The ensemble's
    method choice and its last step (thresholds) take the competition's metric. Each stays overridable."""
    metric = p.competition.metric
    regression = p.competition.task == "regression" or metric in REGRESSION_METRICS
    default = REGRESSION_PROXY if regression else PROXY_METRIC
    proxy = lambda section: dataclasses.replace(section, metric=section.metric or default)  # noqa: E731
    return dataclasses.replace(
        p,
        train=dataclasses.replace(p.train, monitor=p.train.monitor or default),
        tune=proxy(p.tune),
        tta=proxy(p.tta),
        ensemble=dataclasses.replace(p.ensemble, metric=p.ensemble.metric or metric),
    )


def _check_sections(p: Params, source: str) -> None:
    if p.budget.minutes is not None and p.budget.minutes <= 0:
        raise ConfigError(f"{source}: budget.minutes must be > 0 (or null: no budget), got {p.budget.minutes}")
    if p.refit.seeds is not None and not p.refit.seeds:
        raise ConfigError(f"{source}: refit.seeds must be null or a non-empty list")
    if p.budget.probe_batches < 1:
        raise ConfigError(f"{source}: budget.probe_batches must be >= 1, got {p.budget.probe_batches}")
    if p.prepare.image_size < 1:
        raise ConfigError(f"{source}: prepare.image_size must be >= 1, got {p.prepare.image_size}")
    backbones = list(p.train.backbones)
    for name in backbones:
        check_train_settings(resolve_train_settings(p.train, name), f"{source}: train.backbones.{name}")
    if p.cv.holdout is not None and not 0 < p.cv.holdout <= 0.5:
        raise ConfigError(f"{source}: cv.holdout must be null or a share in (0, 0.5], got {p.cv.holdout}")
    folds = p.cv.train_folds
    if folds is not None and folds != "auto" and not (isinstance(folds, int) and 1 <= folds <= p.cv.n_folds):
        raise ConfigError(
            f"{source}: cv.train_folds must be null, auto or a number of folds in 1..{p.cv.n_folds}, got {folds!r}"
        )
    for key, fixed in (("finetune", "full or features+sklearn"), ("image_size", "a number")):
        auto = [b for b in backbones if getattr(resolve_train_settings(p.train, b), key) == "auto"]
        if p.tune.enabled and auto:
            raise ConfigError(
                f"{source}: train.backbones.{auto[0]}: {key}: auto is chosen by the plan stage, after tune; "
                f"set {fixed} to tune it, or tune.enabled: false"
            )
    for k in p.tune.folds:
        if not 0 <= k < p.cv.n_folds:
            raise ConfigError(f"{source}: tune.folds: fold {k} does not exist (cv.n_folds={p.cv.n_folds})")
    _check_keys(p.tune.backbones, backbones, f"{source}: tune.backbones")
    for name in backbones:
        check_tune_space({**p.tune.space, **p.tune.backbones.get(name, {})}, f"{source}: tune.space")
    tta = p.tta
    for name, views in tta.policies.items():
        if not views:
            raise ConfigError(f"{source}: tta.policies.{name}: empty list of views")
    _check_keys(tta.backbones, backbones, f"{source}: tta.backbones")
    if tta.select_rows is not None and tta.select_rows < 1:
        raise ConfigError(f"{source}: tta.select_rows must be >= 1 or null, got {tta.select_rows}")
    choices = {
        "candidates": tta.candidates or [],
        "select": [tta.select],
        **{f"backbones.{b}": [v] for b, v in tta.backbones.items()},
    }
    for key, names in choices.items():
        missing = [n for n in names if n not in tta.policies and not (key != "candidates" and n == "auto")]
        if missing:
            raise ConfigError(f"{source}: tta.{key}: '{missing[0]}' is not a policy of tta.policies")
    ens = p.ensemble
    _check_keys(ens.weights, backbones, f"{source}: ensemble.weights")
    weights = [ens.weights.get(b, 1.0) for b in backbones]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"{source}: ensemble.weights must be non-negative with a positive sum")
    if not ens.methods:
        raise ConfigError(f"{source}: ensemble.methods: empty")
    if ens.method != "auto" and ens.method not in ens.methods:
        raise ConfigError(f"{source}: ensemble.method: '{ens.method}' is not auto or one of ensemble.methods")


def _check_keys(mapping: dict, backbones: list[str], where: str) -> None:
    unknown = sorted(set(mapping) - set(backbones))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]} is not a key of train.backbones")


def to_dict(obj: Any) -> Any:
    """Plain dict/list form of a config (for YAML, JSON and MLflow)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}"""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _build(cls, raw: Any, prefix: str, source: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'")
    kwargs = {key: _coerce(hints[key], value, f"{prefix}{key}", source) for key, value in raw.items()}
    return cls(**kwargs)


def _coerce(hint, value: Any, key: str, source: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if bool in inner and len(inner) > 1:  # bool | str: a YAML true/false, else the other type
            return value if isinstance(value, bool) else _coerce(inner[-1], value, key, source)
        lists = [a for a in inner if typing.get_origin(a) is list]
        if lists and len(inner) == 2:  # str | list[str]: a list, else the other type
            return _coerce(
                lists[0] if isinstance(value, list) else next(a for a in inner if a not in lists), value, key, source
            )
        if inner == [int, str]:  # int | str: a stage index, else a name
            return value if isinstance(value, int) and not isinstance(value, bool) else _coerce(str, value, key, source)
        (inner,) = inner
        return _coerce(inner, value, key, source)
    if dataclasses.is_dataclass(hint):
        return _build(hint, {} if value is None else value, key + ".", source)
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{source}: '{key}' must be one of {list(args)}, got {value!r}")
    if hint is dict:  # free-form keyword arguments, e.g. of an albumentations transform
        if value is None or isinstance(value, dict):
            return dict(value or {})
        raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = args
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return {str(k): _coerce(vt, v, f"{key}.{k}", source) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a type added to the dataclasses without a rule here
        raise TypeError(f"no coercion rule for {hint}")
    raise ConfigError(f"{source}: '{key}' must be {hint.__name__}, got {value!r}")
