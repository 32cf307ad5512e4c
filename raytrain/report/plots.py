"""The report's figure: one 1400x900 PNG with four panels, training loss and accuracy per epoch
(with the final validation value), where the run's time went, and samples/s per worker per epoch.
matplotlib is imported only when a figure is drawn, so importing this module costs nothing.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

from raytrain.runs import PHASES

if TYPE_CHECKING:
    from raytrain.report.rundir import RunFiles

_TRAIN, _VAL, _CHECKPOINT = "#1f77b4", "#d62728", "#2ca02c"


def phase_times(results: dict[str, Any] | None) -> list[tuple[str, float]]:
    """(label, seconds) of the phases results.json recorded (none before it is written)."""
    phases = (results or {}).get("phases") or {}
    return [(label, float(phases[key])) for key, label in PHASES.items() if key in phases]


def resumed_from(segments: list[dict[str, Any]]) -> int | None:
    """The epoch the last session of a resumed run started from (None if never resumed)."""
    return segments[-1]["from_epoch"] if len(segments) > 1 else None


def epochs_done(run: RunFiles) -> str:
    """'done/total' epochs, e.g. '100/100'."""
    total = ((run.config or {}).get("train") or {}).get("epochs")
    done = run.rows[-1]["epoch"] if run.rows else (run.results or {}).get("epochs", 0)
    return f"{done}/{total}" if total else str(done)


def render_png(run: RunFiles, dpi: int = 100) -> bytes:
    """The report figure as PNG bytes (14 x 9 inches: 1400x900 at the default dpi)."""
    from matplotlib.figure import Figure  # pyplot's global state is not needed for a file

    rows, results = run.rows, run.results
    fig = Figure(figsize=(14, 9), dpi=dpi, layout="constrained")
    (loss_ax, acc_ax), (time_ax, speed_ax) = fig.subplots(2, 2)
    fig.suptitle(_title(run), fontsize=14)
    validation = dict((results or {}).get("validation") or {})
    validation["epoch"] = ((results or {}).get("best") or {}).get("epoch")
    last_epoch = rows[-1]["epoch"] if rows else (results or {}).get("epochs", 1)
    regression = "rmse" in validation or any("val_rmse" in row for row in rows)
    loss = "loss (standardised target)" if regression else "cross-entropy loss"
    _metric_panel(loss_ax, rows, validation, last_epoch, "loss", loss, 1, "{:.4f}")
    loss_ax.set_title("Loss per epoch, training and validation (lower is better)")
    if regression:
        _pairs_panel(acc_ax, validation)
    else:
        _metric_panel(
            acc_ax, rows, validation, last_epoch, "accuracy", "accuracy (%)", 100, "{:.1f}%"
        )
        acc_ax.set_title("Accuracy per epoch, training and validation")
    if not regression and (rows or validation.get("accuracy") is not None):
        seen = [row[k] * 100 for row in rows for k in ("accuracy", "val_accuracy") if k in row]
        low = min(seen + [(validation.get("accuracy") or 1) * 100])
        acc_ax.set_ylim(max(0.0, low - 5), 101)
    _phase_panel(time_ax, results)
    _speed_panel(speed_ax, rows)
    start = resumed_from(run.segments)
    if start is not None:
        for ax in (loss_ax, acc_ax, speed_ax):
            ax.axvline(start + 0.5, color="gray", linestyle=":", linewidth=1)
        loss_ax.annotate(
            f"resumed after epoch {start}",
            (start + 0.5, 0.02),
            xycoords=("data", "axes fraction"),
            xytext=(4, 0),
            textcoords="offset points",
            ha="left",
            va="bottom",
            fontsize=9,
            color="gray",
        )
    for ax in (loss_ax, acc_ax, time_ax, speed_ax):
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _metric_panel(ax, rows, validation, last_epoch: int, key, label, scale, fmt) -> None:
    """Training and validation ``key`` per epoch, checkpoints marked, and the validation of the
    model the driver chose at the end."""
    epochs = [row["epoch"] for row in rows]
    values = [row[key] * scale for row in rows]
    if rows:
        last = f"training, last epoch {fmt.format(values[-1])}"
        ax.plot(epochs, values, "-o", color=_TRAIN, markersize=4, label=last)
    else:
        _empty(ax, "no per-epoch metrics: metrics.jsonl is missing", y=0.8)
    checked = [(row["epoch"], row[f"val_{key}"] * scale) for row in rows if f"val_{key}" in row]
    if checked:
        last = f"validation, last {fmt.format(checked[-1][1])}"
        ax.plot(*zip(*checked, strict=True), "-o", color=_VAL, markersize=4, label=last)
    saved = [(row["epoch"], row[key] * scale) for row in rows if row.get("checkpoint")]
    if saved:
        ax.plot(
            *zip(*saved, strict=True),
            "s",
            markersize=10,
            markerfacecolor="none",
            markeredgecolor=_CHECKPOINT,
            markeredgewidth=1.5,
            label="checkpoint written",
        )
    if validation.get(key) is not None:
        val = validation[key] * scale
        at = validation.get("epoch") or last_epoch
        final = f"the chosen checkpoint: {fmt.format(val)}"
        ax.plot([at], [val], "*", color=_VAL, markersize=14, label=final)
    ax.set_ylabel(label)
    _epoch_axis(ax, epochs[0] if epochs else last_epoch, last_epoch)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=10)


def _pairs_panel(ax, validation: dict[str, Any]) -> None:
    """Regression: the chosen checkpoint's predictions against the actual values of held-out
    rows (up to a few thousand), the line where they would be equal, and, inset, how the
    residuals (predicted - actual) spread."""
    pairs = validation.get("pairs") or []
    ax.set_title("Predicted against actual, held-out rows (the chosen checkpoint)")
    ax.set_xlabel("actual")
    ax.set_ylabel("predicted")
    if not pairs:
        _empty(ax, "no predictions recorded", y=0.5)
        return
    actual, predicted = zip(*pairs, strict=True)
    low, high = min(*actual, *predicted), max(*actual, *predicted)
    ax.plot([low, high], [low, high], "--", color="gray", linewidth=1, label="predicted = actual")
    label = f"{len(pairs):,} rows: RMSE {validation['rmse']:.4g}, R\u00b2 {validation['r2']:.3f}"
    ax.scatter(actual, predicted, s=6, alpha=0.4, color=_VAL, label=label)
    ax.legend(loc="upper left", fontsize=10)
    inset = ax.inset_axes([0.62, 0.08, 0.35, 0.3])
    inset.hist([p - a for a, p in pairs], bins=40, color=_TRAIN)
    inset.set_title("residuals (predicted - actual)", fontsize=8)
    inset.tick_params(labelsize=7)


def _epoch_axis(ax, first: int, last: int) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if last - first < 2:
        ax.set_xlim(first - 1, last + 1)  # one or two epochs: whole-epoch ticks all the same


def _title(run: RunFiles) -> str:
    results = run.results or {}
    parts = []
    if results.get("workers") is not None:
        cpus = results.get("cpus_per_worker")
        parts.append(f"{results['workers']} workers" + (f" x {cpus:g} CPU" if cpus else ""))
    model = ((run.config or {}).get("model") or {}).get("name")
    if model:
        parts.append(f"model {model}")
    parts.append(f"{epochs_done(run)} epochs")
    start = resumed_from(run.segments)
    if start is not None:
        parts.append(f"resumed from epoch {start} ({len(run.segments)} sessions)")
    accuracy = (results.get("validation") or {}).get("accuracy")
    if accuracy is not None:
        parts.append(f"validation accuracy {accuracy:.1%}")
    elif not results:
        parts.append("no results.json (still training, or stopped)")
    return f"raytrain run {run.run_dir.name}\n" + ",  ".join(parts)


def _empty(ax, text: str, y: float = 0.5) -> None:
    ax.text(0.5, y, text, transform=ax.transAxes, ha="center", va="center", color="gray")


def _phase_panel(ax, results) -> None:
    phases = phase_times(results)
    if not phases:
        ax.set_title("Where the time went")
        ax.set_xticks([])
        ax.set_yticks([])
        _empty(ax, "no phase times: results.json is not written yet")
        return
    labels = [label.replace(" (", "\n(") for label, _ in phases]  # narrow: the bars get the room
    seconds = [value for _, value in phases]
    total = sum(seconds)
    colors = ["#8c564b", "#9467bd", _TRAIN, _VAL, "#7f7f7f", "#bcbd22"]
    bars = ax.barh(labels, seconds, color=colors[: len(seconds)], height=0.5)
    ax.invert_yaxis()  # first phase on top
    ax.bar_label(
        bars,
        labels=[f"{s:.1f} s ({s / total:.0%})" if total else f"{s:.1f} s" for s in seconds],
        padding=4,
        fontsize=10,
    )
    ax.set_xlim(0, max(seconds) * 1.25 or 1)
    ax.set_xlabel("seconds")
    ax.set_title(f"Where the time went (this session): {total:.1f} s in all")


def _speed_panel(ax, rows) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.set_title("Throughput per worker")
    per_rank: dict[int, tuple[list[int], list[float]]] = {}
    for row in rows:
        for worker in row.get("workers", []):
            epochs, speeds = per_rank.setdefault(worker["rank"], ([], []))
            epochs.append(row["epoch"])
            speeds.append(worker["samples_per_s"])
    if not per_rank:
        ax.set_xticks([])
        ax.set_yticks([])
        _empty(ax, "no per-epoch metrics in metrics.jsonl yet")
        return
    for rank in sorted(per_rank):
        epochs, speeds = per_rank[rank]
        ax.plot(epochs, speeds, "-o", markersize=3, label=f"rank {rank}")
    last = rows[-1]
    ax.set_title(
        f"Throughput per worker (all workers, last epoch: {last['samples_per_s']:,.0f} samples/s)"
    )
    ax.set_ylabel("training samples / second (per worker)")
    ax.set_ylim(0, 1.1 * max(max(speeds) for _, speeds in per_rank.values()))
    _epoch_axis(ax, rows[0]["epoch"], last["epoch"])
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.legend(loc="lower right", fontsize=9, ncol=max(1, len(per_rank) // 8 + 1))
