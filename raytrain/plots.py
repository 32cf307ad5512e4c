"""The report's figure and page, drawn from a run's files (see ``raytrain.report.write_report``).

``render_png`` draws one 1400x900 figure with four panels: training loss and accuracy per epoch
(with the final validation value), where the run's time went, and samples/s per worker per epoch.
``render_html`` builds one self-contained page: the figure (inline, base64) and the numbers.
matplotlib is imported only when a figure is drawn, so importing this module costs nothing.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path
from typing import Any

# results.json "phases": seconds per phase of the run, in the order they happen.
PHASES = {
    "ray_start": "Ray start-up",
    "data_preparation": "data preparation",
    "startup": "start-up (model, workers)",  # runs before the finer split below
    "worker_startup": "worker start-up",
    "model_definition": "model definition",
    "ddp_setup": "DDP set-up",
    "worker_data_copy": "data copy (workers)",
    "training": "training",
    "teardown": "teardown",
    "validation": "validation",
}

_TRAIN, _VAL, _CHECKPOINT = "#1f77b4", "#d62728", "#2ca02c"


def phase_times(results: dict[str, Any] | None) -> tuple[list[tuple[str, float]], bool]:
    """(label, seconds) of the run's phases, and whether the run recorded them (results.json
    ``phases``). Older runs only have ``wall_time_s``: fit() (data, start-up and training) and
    the whole run, which the rest of the run is the difference to."""
    results = results or {}
    phases = results.get("phases")
    if isinstance(phases, dict) and phases:
        keys = [key for key in PHASES if key in phases]
        keys += [key for key in phases if key not in PHASES]
        return [(PHASES.get(key, key.replace("_", " ")), float(phases[key])) for key in keys], True
    wall = results.get("wall_time_s") or {}
    if "train" in wall and "total" in wall:
        fit, total = float(wall["train"]), float(wall["total"])
        return [
            ("data, start-up and training (fit)", fit),
            ("validation and results", max(0.0, total - fit)),
        ], False
    return [], False


def render_png(
    name: str,
    rows: list[dict[str, Any]],
    results: dict[str, Any] | None,
    config: dict[str, Any] | None,
    dpi: int = 100,
) -> bytes:
    """The report figure as PNG bytes (14 x 9 inches: 1400x900 at the default dpi)."""
    from matplotlib.figure import Figure  # pyplot's global state is not needed for a file

    fig = Figure(figsize=(14, 9), dpi=dpi, layout="constrained")
    (loss_ax, acc_ax), (time_ax, speed_ax) = fig.subplots(2, 2)
    fig.suptitle(_title(name, rows, results, config), fontsize=14)
    validation = (results or {}).get("validation") or {}
    last_epoch = rows[-1]["epoch"] if rows else (results or {}).get("epochs", 1)
    _metric_panel(loss_ax, rows, validation, last_epoch, "loss", "cross-entropy loss", 1, "{:.4f}")
    _metric_panel(acc_ax, rows, validation, last_epoch, "accuracy", "accuracy (%)", 100, "{:.1f}%")
    loss_ax.set_title("Training loss per epoch (lower is better)")
    acc_ax.set_title("Training accuracy per epoch")
    if rows or validation.get("accuracy") is not None:
        low = min([row["accuracy"] * 100 for row in rows] + [validation.get("accuracy", 1) * 100])
        acc_ax.set_ylim(max(0.0, low - 5), 101)
    _phase_panel(time_ax, results)
    _speed_panel(speed_ax, rows)
    for ax in (loss_ax, acc_ax, time_ax, speed_ax):
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _metric_panel(ax, rows, validation, last_epoch: int, key, label, scale, fmt) -> None:
    """Training ``key`` per epoch, checkpoints marked, and the final model's validation value."""

    epochs = [row["epoch"] for row in rows]
    values = [row[key] * scale for row in rows]
    if rows:
        last = f"training, last epoch {fmt.format(values[-1])}"
        ax.plot(epochs, values, "-o", color=_TRAIN, markersize=4, label=last)
    else:
        _empty(ax, "no per-epoch metrics: metrics.jsonl is missing", y=0.8)
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
        ax.axhline(val, color=_VAL, linestyle="--", linewidth=1.2)
        final = f"validation of the final model: {fmt.format(val)}"
        ax.plot([last_epoch], [val], "*", color=_VAL, markersize=14, label=final)
    ax.set_ylabel(label)
    _epoch_axis(ax, epochs[0] if epochs else last_epoch, last_epoch)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=10)


def _epoch_axis(ax, first: int, last: int) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if last - first < 2:
        ax.set_xlim(first - 1, last + 1)  # one or two epochs: whole-epoch ticks all the same


def _title(name: str, rows, results, config) -> str:
    parts = []
    results = results or {}
    if results.get("workers") is not None:
        cpus = results.get("cpus_per_worker")
        parts.append(f"{results['workers']} workers" + (f" x {cpus:g} CPU" if cpus else ""))
    model = (config or {}).get("model", {}).get("name")
    if model:
        parts.append(f"model {model}")
    total = (config or {}).get("train", {}).get("epochs")
    done = rows[-1]["epoch"] if rows else results.get("epochs", 0)
    parts.append(f"{done}/{total} epochs" if total else f"{done} epochs")
    accuracy = (results.get("validation") or {}).get("accuracy")
    if accuracy is not None:
        parts.append(f"validation accuracy {accuracy:.1%}")
    elif not results:
        parts.append("no results.json (still training, or stopped)")
    return f"raytrain run {name}\n" + ",  ".join(parts)


def _empty(ax, text: str, y: float = 0.5) -> None:
    ax.text(0.5, y, text, transform=ax.transAxes, ha="center", va="center", color="gray")


def _phase_panel(ax, results) -> None:
    phases, recorded = phase_times(results)
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
    note = "" if recorded else " (this run did not record its phases)"
    ax.set_title(f"Where the time went: {total:.1f} s in all{note}")


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


def render_html(
    run_dir: Path,
    rows: list[dict[str, Any]],
    results: dict[str, Any] | None,
    config: dict[str, Any] | None,
    png: bytes,
) -> str:
    """One self-contained page: the figure (inline) and the run's numbers."""
    results = results or {}
    validation = results.get("validation") or {}
    train = results.get("train") or (rows[-1] if rows else {})
    total = (config or {}).get("train", {}).get("epochs")
    done = rows[-1]["epoch"] if rows else results.get("epochs", 0)
    sections = [
        f"<h1>raytrain run {_e(run_dir.name)}</h1>",
        f"<p class=sub>{_e(str(run_dir))} &middot; report written "
        f"{_e(time.strftime('%Y-%m-%d %H:%M:%S'))}"
        + ("" if results else " &middot; <b>no results.json: still training, or stopped</b>")
        + "</p>",
        f'<img alt="loss, accuracy, phase times and throughput of the run" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}">',
        "<h2>Summary</h2>",
        _table(
            None,
            [
                ["epochs", f"{done}/{total}" if total else str(done)],
                ["workers", _fmt(results.get("workers"))],
                ["CPUs per worker", _fmt(results.get("cpus_per_worker"))],
                ["torch threads per worker", _fmt(results.get("threads_per_worker"))],
                ["final checkpoint", _fmt(results.get("checkpoint"))],
                [
                    "wall time (whole run)",
                    _num((results.get("wall_time_s") or {}).get("total"), "{:.1f} s"),
                ],
                ["TensorBoard", f"tensorboard --logdir {run_dir / 'tensorboard'}"],
            ],
        ),
        "<h2>Final numbers</h2>",
        _table(
            ["", "loss", "accuracy", "rows", "samples/s"],
            [
                [
                    "training (last epoch)",
                    _num(train.get("loss"), "{:.4f}"),
                    _num(train.get("accuracy"), "{:.1%}"),
                    _fmt(train.get("rows")),
                    _num(train.get("samples_per_s"), "{:,.0f}"),
                ],
                [
                    "validation (held out, on the driver)",
                    _num(validation.get("loss"), "{:.4f}"),
                    _num(validation.get("accuracy"), "{:.1%}"),
                    _fmt(validation.get("rows")),
                    "",
                ],
            ],
        ),
    ]
    confusion = validation.get("confusion")
    if confusion:
        precision, recall = validation.get("precision", []), validation.get("recall", [])
        sections += [
            "<h2>Per class (validation)</h2>",
            _table(
                ["class", "precision", "recall", "rows"],
                [
                    [
                        str(c),
                        _num(_at(precision, c), "{:.1%}"),
                        _num(_at(recall, c), "{:.1%}"),
                        str(sum(confusion[c])),
                    ]
                    for c in range(len(confusion))
                ],
            ),
            "<h2>Confusion matrix (validation)</h2>",
            "<p class=sub>Rows: true class; columns: predicted class.</p>",
            _table(
                ["true \\ predicted", *(str(c) for c in range(len(confusion)))],
                [[str(c), *(str(n) for n in line)] for c, line in enumerate(confusion)],
            ),
        ]
    phases, recorded = phase_times(results)
    if phases:
        whole = sum(s for _, s in phases)
        sections += [
            "<h2>Where the time went</h2>",
            "" if recorded else "<p class=sub>This run did not record its phases.</p>",
            _table(
                ["phase", "seconds", "share"],
                [
                    [label, f"{seconds:.2f}", f"{seconds / whole:.0%}" if whole else ""]
                    for label, seconds in phases
                ],
            ),
        ]
    placement = results.get("placement") or []
    if placement:
        sections += [
            "<h2>Workers and placement</h2>",
            _table(
                ["rank", "node IP", "node id"],
                [
                    [_fmt(p.get("rank")), _fmt(p.get("node_ip")), _fmt(p.get("node_id"))]
                    for p in placement
                ],
            ),
        ]
    if rows:
        sections += [
            "<h2>Epochs</h2>",
            _table(
                ["epoch", "loss", "accuracy", "samples/s", "epoch time (s)", "checkpoint"],
                [
                    [
                        str(row["epoch"]),
                        f"{row['loss']:.4f}",
                        f"{row['accuracy']:.1%}",
                        f"{row['samples_per_s']:,.0f}",
                        f"{row['epoch_time_s']:.3f}",
                        Path(row["checkpoint"]).name if row.get("checkpoint") else "",
                    ]
                    for row in rows
                ],
            ),
        ]
    if config:
        sections.append(
            f"<h2>Config</h2><pre>{_e(json.dumps(config, indent=2))}</pre>",
        )
    body = "\n".join(section for section in sections if section)
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>raytrain run {_e(run_dir.name)}</title><style>{_CSS}</style></head>\n"
        f"<body>\n{body}\n</body></html>\n"
    )


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1400px;color:#222}"
    "img{width:100%;max-width:1400px;border:1px solid #ddd}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em}"
    "th,td{border:1px solid #ccc;padding:.3em .8em;text-align:right}"
    "th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}"
    ".sub{color:#666}pre{background:#f6f6f6;padding:1em;overflow:auto}"
)


def _table(header: list[str] | None, rows: list[list[str]]) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _fmt(value: Any) -> str:
    return "-" if value is None else str(value)


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _at(values: list[Any], index: int) -> Any:
    return values[index] if index < len(values) else None
