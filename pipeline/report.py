"""The analyze stage's outputs: PNG figures, CSV tables, JSON and one self-contained HTML page.

Layout of the folder `write_report` fills (reports/oof/ in the pipeline):
  index.html                       every section, figures embedded as data: URIs (opens offline)
  summary.json                     headline numbers (`dvc metrics show`)
  analysis.json                    the page's content as data (per-class scores, pairs, worst ids, slices, advice)
  figures/backbones/<name>/*.png, figures/ensemble/*.png   each model's figures
  figures/side_by_side/*.png       the models compared
  tables/backbones/<name>/predictions.csv, tables/ensemble/...   id, fold, actual, predicted, confidence, loss
  tables/.../reliability.csv       the reliability diagram's bins
Backbones and the ensemble have separate namespaces (folders, HTML ids, JSON keys): any backbone name works.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from pipeline.io import write_json  # noqa: E402
from pipeline.metrics import proxy_of  # noqa: E402
from pipeline.slices import PROPERTIES  # noqa: E402
from pipeline.tasks import Task  # noqa: E402


def never_predicted(per_class: pd.DataFrame) -> list[str]:
    """Classes with rows that the model never predicts: the sign that it learned the class prior
    instead (try train.class_weight or train.sampler: balanced)."""
    return per_class.loc[(per_class["predicted"] == 0) & (per_class["support"] > 0), "class"].astype(str).tolist()


@dataclass
class ModelAnalysis:
    name: str
    probs: np.ndarray
    pred: np.ndarray  # each row's predicted label index (the task's `predicted`)
    losses: np.ndarray  # each row's loss (the task's `row_losses`)
    scores: dict[str, float]
    folds: pd.DataFrame
    per_class: pd.DataFrame
    confusion: np.ndarray
    pairs: list[tuple[int, int, int]]
    worst: np.ndarray
    confident_wrong: np.ndarray
    reliability: pd.DataFrame
    ece: float
    slices: pd.DataFrame
    advice: list[dict] = field(default_factory=list)
    next_steps: list[dict] = field(default_factory=list)  # the report's top lines (analyze.next_steps)
    ensemble: bool = False  # the submission's ensemble rather than one backbone
    holdout: dict | None = None  # cv.holdout's scores (reports/ensemble.json): the bag as test is predicted

    # Backbones and the ensemble live in separate namespaces of the report (its anchors, folders and
    # JSON keys), so any backbone name works, "ensemble" and "models" included.
    @property
    def anchor(self) -> str:
        """The prefix of the model's HTML ids."""
        return "ensemble" if self.ensemble else f"backbone-{self.name}"

    @property
    def folder(self) -> Path:
        """Its folder under figures/ and tables/."""
        return Path("ensemble") if self.ensemble else Path("backbones") / self.name

    @property
    def label(self) -> str:
        """Its name in the report's tables."""
        return "ensemble (submission)" if self.ensemble else self.name


@dataclass(frozen=True)
class ReportRows:
    """The training rows every section of the report shows: ids, targets, folds, class names, images."""

    ids: np.ndarray
    y: np.ndarray
    folds: np.ndarray
    classes: list[str]
    images: np.ndarray
    task: Task  # how a row's labels read, which rows are wrong, what a confusion cell holds


MAX_MATRIX_CLASSES = 30  # larger confusion matrices show the classes with the most errors


# ---------------------------------------------------------------- figures


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def _shown_classes(cm: np.ndarray) -> np.ndarray:
    if len(cm) <= MAX_MATRIX_CLASSES:
        return np.arange(len(cm))
    errors = cm.sum(1) - np.diag(cm) + cm.sum(0) - np.diag(cm)
    return np.sort(np.argsort(-errors, kind="stable")[:MAX_MATRIX_CLASSES])


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path) -> Path:
    keep = _shown_classes(cm)
    counts = cm[np.ix_(keep, keep)]
    with np.errstate(invalid="ignore", divide="ignore"):
        normed = np.nan_to_num(cm / cm.sum(1, keepdims=True))[np.ix_(keep, keep)]
    labels = [classes[i] for i in keep]
    side = 3 + 0.35 * len(keep) + 0.07 * max(map(len, labels), default=0)  # room for long class names
    fig, axes = plt.subplots(1, 2, figsize=(2 * side, side), layout="constrained")  # labels never overlap
    for ax, m, title, fmt in ((axes[0], counts, "counts", "d"), (axes[1], normed, "row-normalised (recall)", ".2f")):
        ax.imshow(m, cmap="Blues")
        ax.set_xticks(range(len(keep)), labels, rotation=90)
        ax.set_yticks(range(len(keep)), labels)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(title)
        if len(keep) <= 15:
            for (i, j), v in np.ndenumerate(m):
                ax.text(
                    j,
                    i,
                    format(v, fmt),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if v > m.max() / 2 else "black",
                )
    return _save(fig, path)


def wrap_caption(caption: str, fits) -> list[str]:
    """`caption`'s lines, each broken at spaces (a word too long for a line: between characters) so that
    `fits(line)` holds: the whole caption, on as many lines as it needs."""
    out = []
    for text in caption.split("\n"):
        line = ""
        for word in text.split(" "):
            candidate = f"{line} {word}" if line else word
            if fits(candidate):
                line = candidate
                continue
            if line:
                out.append(line)
            while not fits(word) and len(word) > 1:
                cut = max(i for i in range(1, len(word) + 1) if fits(word[:i]) or i == 1)
                out.append(word[:cut])
                word = word[cut:]
            line = word
        out.append(line)
    return out


def plot_gallery(
    images: np.ndarray, rows: np.ndarray, captions: list[str], path: Path, ncols: int = 8, tile: int = 96
) -> Path:
    """A grid of images, each captioned below, whole (wrapped to the tile's width; drawn with PIL: dozens per
    report, matplotlib is slow at it)."""
    font = ImageFont.load_default(size=11)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [wrap_caption(c, lambda line: draw.textlength(line, font=font) <= tile) for c in captions]
    lines = max((len(w) for w in wrapped), default=1)
    cell_w, cell_h = tile + 8, tile + 8 + 13 * lines
    n = max(len(rows), 1)
    ncols = min(ncols, n)
    sheet = Image.new("RGB", (ncols * cell_w, math.ceil(n / ncols) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (r, caption) in enumerate(zip(rows, wrapped)):
        x, y = (i % ncols) * cell_w + 4, (i // ncols) * cell_h + 4
        img = Image.fromarray(np.asarray(images[r]))
        resample = Image.NEAREST if img.width <= tile else Image.BILINEAR  # small images: show the pixels
        sheet.paste(img.resize((tile, tile), resample), (x, y))
        for j, line in enumerate(caption):
            draw.text((x, y + tile + 2 + 13 * j), line, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def plot_reliability(table: pd.DataFrame, ece: float, path: Path, axes=Task.CALIBRATION) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    used = table[table["rows"] > 0]
    width = float(table["hi"].iloc[0] - table["lo"].iloc[0])
    ax.bar(used["lo"], used["accuracy"], width=width, align="edge", edgecolor="black", label=axes[1])
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_title(f"reliability diagram, ECE = {ece:.4f}")
    ax.legend(loc="upper left")
    return _save(fig, path)


def plot_confidence(confidence: np.ndarray, correct: np.ndarray, path: Path, axes=Task.CALIBRATION) -> Path:
    """Each decision's confidence, correct against wrong; a regression's (float `correct`, the true value):
    predicted against true, every row a point."""
    if correct.dtype.kind == "f":
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.scatter(correct, confidence, s=4, alpha=0.4)
        ax.plot([0, 1], [0, 1], "--", color="grey")
        ax.set_xlabel("true (share of the training range)")
        ax.set_ylabel(axes[0])
        ax.set_title("predicted against true")
        return _save(fig, path)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bins = np.linspace(0, 1, 21)
    ax.hist(confidence[correct], bins=bins, alpha=0.6, label=f"correct ({correct.sum()})")
    ax.hist(confidence[~correct], bins=bins, alpha=0.6, label=f"wrong ({(~correct).sum()})")
    ax.set_yscale("log")
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("images")
    ax.legend()
    return _save(fig, path)


def plot_slices(slices: pd.DataFrame, overall: float, path: Path) -> Path:
    names = list(dict.fromkeys(slices["property"]))
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(3.2 * max(len(names), 1), 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        part = slices[slices["property"] == name]
        colours = ["tab:red" if w else "tab:blue" for w in part["weak"]]
        ax.bar([f"{lo:.3g}-{hi:.3g}" for lo, hi in zip(part["lo"], part["hi"])], part["error_rate"], color=colours)
        ax.axhline(overall, color="black", linestyle="--", linewidth=1)
        ax.set_title(name)
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    axes[0][0].set_ylabel("error rate (dashed: overall; red: weak)")
    return _save(fig, path)


def plot_matrix(matrix: pd.DataFrame, title: str, path: Path, fmt: str = ".3f") -> Path:
    fig, ax = plt.subplots(figsize=(2 + 0.5 * matrix.shape[1], 1.5 + 0.3 * matrix.shape[0]))
    ax.imshow(matrix.to_numpy(dtype=float), cmap="viridis", aspect="auto")
    ax.set_xticks(range(matrix.shape[1]), matrix.columns, rotation=45, ha="right")
    ax.set_yticks(range(matrix.shape[0]), matrix.index)
    if matrix.size <= 400:
        for (i, j), v in np.ndenumerate(matrix.to_numpy(dtype=float)):
            ax.text(j, i, "" if np.isnan(v) else format(v, fmt), ha="center", va="center", fontsize=7, color="white")
    ax.set_title(title)
    return _save(fig, path)


# ---------------------------------------------------------------- HTML pieces

CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1300px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}
td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.advice li{margin:.4em 0}.weak{background:#fde0dc}code{background:#f4f4f4;padding:1px 4px}nav a{margin-right:1em}"""


def _esc(value) -> str:
    if value is pd.NA:
        return ""
    if isinstance(value, (float, np.floating)):
        return "" if np.isnan(value) else f"{value:.4f}"
    return html.escape(str(value))


def html_table(
    frame: pd.DataFrame, table_id: str | None = None, index: bool = False, row_class: list[str] | None = None
) -> str:
    frame = frame.reset_index() if index else frame
    head = "".join(f"<th>{_esc(c)}</th>" for c in frame.columns)
    body = []
    for i, row in enumerate(frame.itertuples(index=False)):
        cls = f' class="{row_class[i]}"' if row_class and row_class[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{_esc(v)}</td>" for v in row) + "</tr>")
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def html_image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _section(ident: str, title: str, *parts: str) -> str:
    return f'<section id="{ident}"><h3>{html.escape(title)}</h3>{"".join(parts)}</section>'


# ---------------------------------------------------------------- one model


def _rows_table(a: ModelAnalysis, rows: np.ndarray, r: ReportRows) -> pd.DataFrame:
    ids, y, folds, task = r.ids, r.y, r.folds, r.task
    if not task.HAS_CONFIDENCE:  # a regression: true and predicted values, and the absolute error
        values = {"true": task.label_text(y[rows]), "predicted": task.label_text(a.probs[rows])}
        return pd.DataFrame({"id": ids[rows], "fold": folds[rows], **values, "abs_error": a.losses[rows]})
    return pd.DataFrame(
        {
            "id": ids[rows],
            "fold": folds[rows],
            "true": task.label_text(y[rows]),
            "predicted": task.label_text(a.pred[rows]),
            "confidence": task.confidence(a.probs[rows]),
            "p(true)": np.exp(-a.losses[rows]),  # the task's row loss is -log p(true label, or label set)
            "loss": a.losses[rows],
        }
    )


def _captions(a: ModelAnalysis, rows: np.ndarray, r: ReportRows) -> list[str]:
    if not r.task.HAS_CONFIDENCE:  # true -> predicted value
        true, pred = r.task.label_text(r.y[rows]), r.task.label_text(a.probs[rows])
        return [f"{r.ids[i]}\n{t} -> {p}" for i, t, p in zip(rows, true, pred)]
    true, pred, conf = r.task.label_text(r.y[rows]), r.task.label_text(a.pred[rows]), r.task.confidence(a.probs[rows])
    return [f"{r.ids[i]}\n{t} -> {p} ({c:.2f})" for i, t, p, c in zip(rows, true, pred, conf)]


def _calibration_and_slices(a: ModelAnalysis, y: np.ndarray, task: Task, fig_dir: Path) -> tuple[str, str]:
    """The calibration and the slices-and-advice sections of one model."""
    m, pred = a.anchor, a.pred
    rel_fig = plot_reliability(a.reliability, a.ece, fig_dir / "reliability.png", task.CALIBRATION)
    conf_fig = plot_confidence(*task.calibration(a.probs, pred, y), fig_dir / "confidence.png", task.CALIBRATION)
    calibration = _section(
        f"{m}-calibration",
        "Calibration",
        f'<p>Expected calibration error: <b class="ece">{a.ece:.4f}</b> '
        f"({len(a.reliability)} equal-width confidence bins).</p>",
        html_image(rel_fig, "reliability diagram"),
        html_image(
            conf_fig, "confidence histogram" if task.CALIBRATION == Task.CALIBRATION else "predicted against true"
        ),
        html_table(a.reliability, f"{m}-reliability-table"),
    )
    error_rate = float(task.errors(pred, y).mean())
    if len(a.slices):
        slice_fig = html_image(plot_slices(a.slices, error_rate, fig_dir / "slices.png"), "error rate by slice")
        slice_table = html_table(
            a.slices, f"{m}-slices-table", row_class=["weak" if w else "" for w in a.slices["weak"]]
        )
    else:
        slice_fig, slice_table = "<p>Every image property is constant: no slices.</p>", ""
    advice = (
        "".join(
            "<li>"
            + html.escape(x["text"]).replace(
                html.escape(x["params"] or "\0"), f"<code>{html.escape(x['params'] or '')}</code>"
            )
            + "</li>"
            for x in a.advice
        )
        or "<li>No weak slice: no property bucket has a significantly higher error rate.</li>"
    )
    described = "".join(f"<li><b>{k}</b>: {v}</li>" for k, v in PROPERTIES.items() if k in set(a.slices["property"]))
    slices = _section(
        f"{m}-slices",
        "Slices and augmentation advice",
        f"<p>Overall error rate {error_rate:.4f}. Properties, computed from the pixels:</p><ul>{described}</ul>",
        f'<ul class="advice" id="{m}-advice">{advice}</ul>',
        slice_fig,
        slice_table,
    )
    return calibration, slices


def _scores_section(a: ModelAnalysis, y: np.ndarray, task: Task) -> str:
    m = a.anchor
    overall = pd.DataFrame([{"rows": len(y), **a.scores, "ece": a.ece}])
    fold_rows = a.folds.copy()
    fold_rows.index.name = "fold"
    return _section(
        f"{m}-scores",
        "Scores",
        "<p>Out-of-fold: each row predicted by the fold model that did not train on it.</p>",
        html_table(overall, f"{m}-overall"),
        "<p>Per fold, then the mean and the spread (std) across folds:</p>",
        html_table(fold_rows, f"{m}-folds", index=True),
        "<p>Per class:</p>",
        html_table(a.per_class, f"{m}-per-class"),
        _never_predicted_note(a, task),
    )


def _confusion_section(
    a: ModelAnalysis, r: ReportRows, fig_dir: Path, examples_per_pair: int
) -> tuple[str, list[dict]]:
    """The confusion matrix and the most-confused pairs with their examples; and the pairs as rows."""
    ids, y, classes, images = r.ids, r.y, r.classes, r.images
    m, pred = a.anchor, a.pred
    cm_fig = plot_confusion(a.confusion, classes, fig_dir / "confusion.png")
    cm_table = ""
    if len(classes) <= MAX_MATRIX_CLASSES:
        cm_frame = pd.DataFrame(a.confusion, index=pd.Index(classes, name="true \\ predicted"), columns=classes)
        cm_table = html_table(cm_frame, f"{m}-confusion-table", index=True)
    pair_rows, pair_parts = [], []
    for t, p, n in a.pairs:
        examples = np.flatnonzero(r.task.pair_mask(pred, y, t, p))
        examples = examples[np.argsort(-r.task.pair_strength(a.probs, a.losses, examples, p), kind="stable")]
        examples = examples[:examples_per_pair]
        pair_rows.append(
            {
                "true": classes[t],
                "predicted": classes[p],
                "count": n,
                "share of true class": n / max(int(a.per_class["support"].iloc[t]), 1),
                "example ids": " ".join(map(str, ids[examples])),
            }
        )
        fig = plot_gallery(
            images,
            examples,
            _captions(a, examples, r),
            fig_dir / f"pair_{t}_{p}.png",
            ncols=examples_per_pair,
        )
        pair_parts.append(
            f"<h4>{_esc(classes[t])} predicted as {_esc(classes[p])}: {n}</h4>"
            + html_image(fig, f"{classes[t]} as {classes[p]}")
        )
    return _section(
        f"{m}-confusion",
        "Confusion matrix and most-confused pairs",
        html_image(cm_fig, "confusion matrix"),
        cm_table,
        html_table(pd.DataFrame(pair_rows), f"{m}-pairs") if pair_rows else "<p>No errors.</p>",
        *pair_parts,
    ), pair_rows


def _gallery_sections(a: ModelAnalysis, r: ReportRows, fig_dir: Path) -> dict:
    """The worst and the confidently wrong predictions: `<key>` their rows, `<key>_html` their section."""
    m = a.anchor
    galleries = {}
    kinds = [("worst", "Worst predictions (highest loss)", a.worst)]
    kinds += [("confident-wrong", "Confident and wrong (possible label noise)", a.confident_wrong)]
    if not r.task.HAS_CONFIDENCE:  # a regression states none: its worst rows are those of the largest error
        kinds[0] = ("worst", "Worst predictions (largest absolute error)", a.worst)
        kinds[1] = ("confident-wrong", "Confident and wrong", a.confident_wrong[:0])
    for key, title, rows in kinds:
        table = _rows_table(a, rows, r)
        galleries[key] = table
        fig = plot_gallery(r.images, rows, _captions(a, rows, r), fig_dir / f"{key}.png")
        galleries[key + "_html"] = _section(
            f"{m}-{key}",
            title,
            html_image(fig, title) if len(rows) else "<p>No such rows.</p>",
            "<p>Ids are the competition's train ids: look the files up to check their labels.</p>",
            html_table(table, f"{m}-{key}-table"),
        )
    return galleries


def _next_steps_list(steps: list[dict], ident: str, prefix: str = "") -> str:
    items = "".join(f"<li>{html.escape(prefix)}{html.escape(x['text'])}</li>" for x in steps)
    return f'<ul class="next" id="{ident}">{items}</ul>' if items else ""


def next_steps_section(analyses: list[ModelAnalysis]) -> str:
    """The page's top lines: the submission's (the ensemble's), then each backbone's epochs, resolution and the
    plan's choices."""
    ensemble = [a for a in analyses if a.ensemble]
    parts = [_next_steps_list(ensemble[0].next_steps, "next-steps")] if ensemble else []
    kinds = ("epochs", "resolution", "plan")
    own = [(a, [x for x in a.next_steps if x["kind"] in kinds]) for a in analyses if not a.ensemble]
    parts += [_next_steps_list(steps, f"next-steps-{a.anchor}", f"{a.name}: ") for a, steps in own if steps]
    return f'<section id="next"><h2>What to try next</h2>{"".join(parts)}</section>'


def model_section(a: ModelAnalysis, r: ReportRows, fig_dir: Path, examples_per_pair: int) -> tuple[str, dict]:
    """The HTML section of one model and its content as data."""
    m = a.anchor
    scores = _next_steps_list(a.next_steps, f"{m}-next") + _scores_section(a, r.y, r.task)
    confusion, pair_rows = _confusion_section(a, r, fig_dir, examples_per_pair)
    galleries = _gallery_sections(a, r, fig_dir)
    calibration, slices = _calibration_and_slices(a, r.y, r.task, fig_dir)
    body = (
        f'<section id="{m}"><h2>{html.escape(a.label)}</h2>{scores}{confusion}{galleries["worst_html"]}'
        f"{galleries['confident-wrong_html'] if r.task.HAS_CONFIDENCE else ''}{calibration}{slices}</section>"
    )
    data = {
        "scores": a.scores,
        "ece": a.ece,
        "folds": a.folds.reset_index(names="fold").to_dict("records"),
        "per_class": a.per_class.to_dict("records"),
        "confusion": a.confusion.tolist(),
        "confused_pairs": pair_rows,
        "worst": galleries["worst"].to_dict("records"),
        "confident_wrong": galleries["confident-wrong"].to_dict("records"),
        "reliability": a.reliability.to_dict("records"),
        "slices": a.slices.to_dict("records"),
        "advice": a.advice,
        "next_steps": a.next_steps,
    }
    return body, data


# ---------------------------------------------------------------- the page


def _never_predicted_note(a: ModelAnalysis, task: Task) -> str:
    missing = never_predicted(a.per_class)
    if not missing:
        return ""
    shown = f"<p><b>Never predicted:</b> {html.escape(', '.join(missing[:20]))}"
    shown += f"{f' and {len(missing) - 20} more' if len(missing) > 20 else ''}. "
    if task.NEVER_PREDICTED_HINT != Task.NEVER_PREDICTED_HINT:
        return shown + html.escape(task.NEVER_PREDICTED_HINT[0].upper() + task.NEVER_PREDICTED_HINT[1:]) + ".</p>"
    return shown + (
        "The model learned the class prior "
        "for these; try <code>train.class_weight: balanced</code> or <code>train.sampler: balanced</code> "
        "(compare by OOF, or let tune.space choose).</p>"
    )


def models_section(analyses: list[ModelAnalysis], div: pd.DataFrame, per_class: pd.DataFrame, fig_dir: Path) -> str:
    table = pd.DataFrame(
        [
            {
                "model": a.label,
                **a.scores,
                "ece": a.ece,
                f"fold {next(iter(a.scores))} std": a.folds.loc["std", next(iter(a.scores))],
                "weak slices": int(a.slices["weak"].sum()),
                **{
                    f"holdout {m}": v
                    for m, v in (a.holdout or {}).items()
                    if m in list(a.scores)[:1] + [proxy_of(a.scores)]
                },
            }
            for a in analyses
        ]
    )
    parts = [html_table(table, "side-by-side-scores")]
    if any(a.holdout for a in analyses):
        parts.append(
            "<p>holdout: the rows <code>cv.holdout</code> kept out of every fold, predicted as the test set is "
            "(every fold model, the chosen TTA, the ensemble fitted on OOF): what the submission should score. "
            "Nothing was chosen on them.</p>"
        )
    if len(div):
        names = list(dict.fromkeys([*div["a"], *div["b"]]))
        for key, title in (
            ("disagreement", "disagreement (share of rows predicted differently)"),
            ("error_correlation", "error correlation (lower = more diverse)"),
        ):
            matrix = pd.DataFrame(np.nan, index=names, columns=names)
            for row in div.itertuples():
                matrix.loc[row.a, row.b] = matrix.loc[row.b, row.a] = getattr(row, key)
            parts.append(html_image(plot_matrix(matrix, title, fig_dir / f"{key}.png"), title))
        parts += [
            "<p>Pairs: an ensemble gains most from accurate models whose errors are uncorrelated; "
            "the oracle accuracy is the share of rows at least one of the two gets right.</p>",
            html_table(div, "side-by-side-diversity"),
        ]
    parts += [
        "<p>Per-class accuracy (recall) per model:</p>",
        html_image(plot_matrix(per_class, "per-class accuracy", fig_dir / "per_class.png"), "per-class accuracy"),
        html_table(per_class, "side-by-side-per-class", index=True),
    ]
    return f'<section id="side-by-side"><h2>Models side by side</h2>{"".join(parts)}</section>'


def _clean(obj):
    """JSON-safe: numpy scalars to Python, NaN and NA to null."""
    if obj is pd.NA:
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if np.isnan(obj) else float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_report(
    out: Path,
    analyses: list[ModelAnalysis],
    div: pd.DataFrame,
    per_class: pd.DataFrame,
    summary: dict,
    r: ReportRows,
    examples_per_pair: int,
    title: str,
) -> None:
    """Fill the folder `out` (see the module docstring)."""
    ids, y, folds, classes = r.ids, r.y, r.folds, r.classes
    sections, data = [], {"backbones": {}}
    for a in analyses:
        body, content = model_section(a, r, out / "figures" / a.folder, examples_per_pair)
        if a.ensemble:
            data["ensemble"] = content
        else:
            data["backbones"][a.name] = content
        sections.append(body)
        pred = a.pred
        (out / "tables" / a.folder).mkdir(parents=True, exist_ok=True)
        pd.DataFrame(
            {
                "id": ids,
                "fold": folds,
                "actual": r.task.label_text(y),
                "predicted": r.task.label_text(pred),
                "confidence": r.task.confidence(a.probs),
                "loss": a.losses,
            }
        ).to_csv(out / "tables" / a.folder / "predictions.csv", index=False)
        a.reliability.to_csv(out / "tables" / a.folder / "reliability.csv", index_label="bin")
    side_by_side = models_section(analyses, div, per_class, out / "figures" / "side_by_side")
    data["side_by_side"] = {
        "diversity": div.to_dict("records"),
        "per_class_accuracy": per_class.reset_index(names="class").to_dict("records"),
    }
    links = [("next", "what to try next"), ("side-by-side", "side by side")] + [(a.anchor, a.label) for a in analyses]
    nav = "".join(f'<a href="#{x}">{html.escape(label)}</a>' for x, label in links)
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{len(y)} training images, {len(classes)} classes, {int(folds.max()) + 1} folds. "
        f"Every figure comes from out-of-fold predictions; the test set is never looked at.</p>"
        f"<nav>{nav}</nav>{next_steps_section(analyses)}{side_by_side}{''.join(sections)}</body></html>\n"
    )
    (out / "index.html").write_text(page, encoding="utf-8")
    write_json(out / "analysis.json", _clean(data))
    write_json(out / "summary.json", _clean(summary))
