"""PNG figures of an evaluation (matplotlib, Agg backend; no display needed).

Every function returns the PNG as ``bytes`` so the caller can write it to a local path or an
fsspec URI alike.

- :func:`loss_curves_png`: the loss terms of a ``<stage>/history.csv`` against ``epoch`` in one
  panel (log scale when they span more than a decade), validation Dice on its own axis and the
  distances (mm, second axis) in another (:func:`curve_series` says which column goes where).
- :func:`dice_boxplot_png`: per-class Dice over cases (box, whiskers at 1.5 IQR, every case as
  a jittered dot) plus the per-case mean over foreground classes.
- :func:`overlay_png`: a few slices of one case: the image, the reference and the prediction
  drawn over it (filled at 40 % opacity with the class colour, outlined).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import ListedColormap, to_rgb  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# class k >= 1 gets CLASS_COLOURS[(k - 1) % 10]
_TAB10 = plt.get_cmap("tab10")  # 10 listed colours: an int i picks the i-th
CLASS_COLOURS: tuple[tuple[float, float, float], ...] = tuple(to_rgb(_TAB10(i)) for i in range(_TAB10.N))


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


# Columns of a history.csv that are bookkeeping, not curves: epoch counters, schedule, timing,
# throughput, best-so-far markers, and step outputs that are weights or flags, not loss terms.
NOT_CURVES = frozenset(
    {
        "epoch",
        "start_epoch",
        "global_step",
        "best_epoch",
        "best_val_dice",
        "round",
        "stage",
        "step",
        "steps",
        "lr",
        "time",
        "time_s",
        "wall_s",
        "val_time_s",
        "samples_per_s",
        "throughput",
        "lambda_c",
        "lc_skipped",
    }
)


def curve_series(history: pd.DataFrame) -> dict[str, list[str]]:
    """Which columns of a ``history.csv`` are drawn, and where.

    Returns ``{"losses": [...], "dice": [...], "distances": [...]}``: loss terms (every numeric
    column not in :data:`NOT_CURVES`, not a ``val_*`` metric, not a time or rate ``*_s``), the
    validation overlap metrics (``val_dice``, in [0, 1]) and the validation distances in mm
    (``val_hd95``, ``val_asd``).
    """
    numeric = [
        c
        for c in history.columns
        if c not in NOT_CURVES
        and not str(c).endswith("_s")
        and pd.api.types.is_numeric_dtype(history[c])
        and history[c].notna().any()
    ]
    dist = [c for c in numeric if c.startswith("val_") and ("hd" in c or "asd" in c)]
    dice = [c for c in numeric if c.startswith("val_") and c not in dist]
    losses = [c for c in numeric if not c.startswith("val_")]
    return {"losses": losses, "dice": dice, "distances": dist}


def loss_curves_figure(history: pd.DataFrame, title: str) -> plt.Figure:
    """The figure of :func:`loss_curves_png` (one or two panels; see there)."""
    if "epoch" not in history.columns:
        raise ValueError(f"{title}: history has no 'epoch' column (columns {list(history.columns)})")
    series = curve_series(history)
    losses, overlap, dist = series["losses"], series["dice"], series["distances"]
    x = history["epoch"].to_numpy()
    ncols = 2 if (overlap or dist) else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.0 * ncols, 4.0), squeeze=False)
    for a in axes[0]:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax = axes[0, 0]
    for i, c in enumerate(losses):
        ax.plot(x, history[c].to_numpy(dtype=float), marker="o", ms=3, label=c, color=CLASS_COLOURS[i % 10])
    vals = history[losses].to_numpy(dtype=float) if losses else np.zeros((0,))
    vals = vals[np.isfinite(vals) & (vals > 0)]
    if vals.size and vals.max() / vals.min() > 10:
        ax.set_yscale("log")
    ax.set(xlabel="epoch", ylabel="loss", title=f"{title}: training losses")
    ax.grid(alpha=0.3)
    if losses:
        ax.legend(fontsize=8, loc="best")
    if ncols == 2:
        ax2 = axes[0, 1]
        handles = []
        for i, c in enumerate(overlap):
            handles += ax2.plot(
                x, history[c].to_numpy(dtype=float), marker="s", ms=3, label=c, color=CLASS_COLOURS[(i + 2) % 10]
            )
        ax2.set(xlabel="epoch", ylabel="Dice", title=f"{title}: validation")
        if overlap:
            ax2.set_ylim(0, 1.02)
        ax2.grid(alpha=0.3)
        if dist:
            ax3 = ax2.twinx()
            for i, c in enumerate(dist):
                handles += ax3.plot(
                    x,
                    history[c].to_numpy(dtype=float),
                    ls="--",
                    marker="^",
                    ms=3,
                    label=c,
                    color=CLASS_COLOURS[(i + 5) % 10],
                )
            ax3.set_ylabel("distance (mm)")
        ax2.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def loss_curves_png(history: pd.DataFrame, title: str) -> bytes:
    """Training curves of one stage from its ``history.csv`` (one row per epoch).

    Left panel: the loss terms (:func:`curve_series`) against ``epoch`` (log scale when they
    span more than a decade). Right panel, when present: the validation Dice on its own axis
    ([0, 1]) and, on a second axis, validation distances in mm (``val_hd95``, ``val_asd``).
    Bookkeeping columns (:data:`NOT_CURVES`: epochs, steps, lr, timing, best-so-far markers)
    are not drawn. ``title`` names the run and stage (e.g. ``"ideal-acdc finetune"``).
    """
    return _png(loss_curves_figure(history, title))


def dice_boxplot_png(dice: Mapping[str, Sequence[float]], title: str = "Dice per class") -> bytes:
    """Box plot of per-case Dice, one box per entry of ``dice`` (name -> values over cases)."""
    names = list(dice)
    data = [np.asarray([v for v in dice[n] if v is not None and np.isfinite(v)], float) for n in names]
    fig, ax = plt.subplots(figsize=(1.4 * max(len(names), 2) + 1.5, 4.0))
    ax.boxplot(data, showfliers=False, widths=0.55)
    ax.set_xticks(range(1, len(names) + 1), names)
    rng = np.random.default_rng(0)
    for i, d in enumerate(data, start=1):
        ax.scatter(
            i + rng.uniform(-0.12, 0.12, d.size), d, s=12, alpha=0.7, color=CLASS_COLOURS[(i - 1) % 10], zorder=3
        )
        if d.size:
            ax.text(i, 1.02, f"{d.mean():.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("Dice")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _label_cmap(num_classes: int) -> ListedColormap:
    colours = [(0, 0, 0, 0)] + [(*CLASS_COLOURS[(k - 1) % 10], 1.0) for k in range(1, max(num_classes, 2))]
    return ListedColormap(colours)


def overlay_png(
    image: np.ndarray,
    reference: np.ndarray,
    prediction: np.ndarray,
    slices: Sequence[int],
    label_names: Mapping[int, str],
    title: str,
) -> bytes:
    """Reference vs prediction on ``slices`` of one case.

    Args:
        image: ``(S, X, Y)`` normalised to [0, 1] (one entry per shown slice).
        reference, prediction: ``(S, X, Y)`` integer label maps.
        slices: the ``z`` index of each row (for the titles).
        label_names: ``{label: name}``; 0 is background and is not drawn.
    """
    if not (image.shape == reference.shape == prediction.shape) or image.ndim != 3:
        raise ValueError(
            f"overlay arrays must share one (S, X, Y) shape, got {image.shape}, {reference.shape}, {prediction.shape}"
        )
    k = max(int(max(label_names, default=1)), int(reference.max(initial=0)), int(prediction.max(initial=0))) + 1
    cmap = _label_cmap(k)
    rows = image.shape[0]
    fig, axes = plt.subplots(rows, 3, figsize=(9.0, 3.0 * rows), squeeze=False)
    for r in range(rows):
        # (X, Y) slice shown with X horizontal and Y up (origin lower), as ITK-SNAP shows RAS axial
        img = image[r].T
        for c, (lab, name) in enumerate(((None, "image"), (reference[r], "reference"), (prediction[r], "prediction"))):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, origin="lower", interpolation="nearest")
            if lab is not None:
                lt = lab.T
                ax.imshow(
                    np.ma.masked_equal(lt, 0),
                    cmap=cmap,
                    vmin=0,
                    vmax=k - 1,
                    alpha=0.4,
                    origin="lower",
                    interpolation="nearest",
                )
                for cls in range(1, k):
                    if np.any(lt == cls):
                        ax.contour(
                            lt == cls,
                            levels=[0.5],
                            colors=[CLASS_COLOURS[(cls - 1) % 10]],
                            linewidths=0.8,
                            origin="lower",
                        )
            ax.set_title(f"z={slices[r]}  {name}", fontsize=9)
            ax.set_axis_off()
    handles = [Patch(color=CLASS_COLOURS[(cls - 1) % 10], label=label_names.get(cls, str(cls))) for cls in range(1, k)]
    fig.legend(handles=handles, loc="lower center", ncol=max(len(handles), 1), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    return _png(fig)
