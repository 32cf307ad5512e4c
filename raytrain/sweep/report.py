"""The report of a sweep: ``sweep.png`` (the metric against each searched parameter, and every
trial's validation curve) and a self-contained ``sweep.html`` (the picture inline, and the
table of trials), from sweep.json and the trials' run directories."""

from __future__ import annotations

import base64
import io
import time
from typing import Any

from raytrain import runs
from raytrain.report.page import TEMPLATES
from raytrain.storage import Location

PNG, HTML = "sweep.png", "sweep.html"
_COLORS = {"finished": "tab:blue", "stopped early": "tab:orange", "failed": "tab:red"}


def render_png(sweep_dir: Location, results: dict[str, Any], dpi: int = 100) -> bytes:
    from matplotlib.figure import Figure

    trials, metric = results["trials"], results["metric"]
    fields = list(results["sweep"]["space"])
    fig = Figure(figsize=(5 * (len(fields) + 1), 4.5), dpi=dpi, layout="constrained")
    axes = fig.subplots(1, len(fields) + 1, squeeze=False)[0]
    best = (results.get("best") or {}).get("trial")
    fig.suptitle(
        f"sweep {sweep_dir.name}: {len(trials)} trials, {metric} "
        f"({'lower' if results['mode'] == 'min' else 'higher'} is better)",
        fontsize=13,
    )
    for ax, field in zip(axes, fields, strict=False):
        _parameter_panel(ax, field, trials, metric, results["sweep"]["space"][field], best)
    _curves_panel(axes[-1], trials, metric, best)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _parameter_panel(ax, field: str, trials, metric: str, domain, best) -> None:
    """Each trial's best value against one searched parameter (a log axis for wide ranges)."""
    kind = next(iter(domain))
    shown = [t for t in trials if t["best"] is not None]
    values = [t["params"][field] for t in shown]
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if numeric:
        xs = values
        if kind == "loguniform" or (values and min(values) > 0 and max(values) / min(values) > 50):
            ax.set_xscale("log")
    else:
        labels = sorted({str(v) for v in values})
        xs = [labels.index(str(v)) for v in values]
        ax.set_xticks(range(len(labels)), labels)
    for t, x in zip(shown, xs, strict=True):
        ax.scatter(
            x,
            t["best"],
            color=_COLORS.get(t["status"], "gray"),
            s=90 if t["trial"] == best else 40,
            edgecolors="black" if t["trial"] == best else "none",
            zorder=3,
        )
    ax.set_xlabel(field)
    ax.set_ylabel(f"best {metric}")
    ax.set_title(f"{metric} against {field}")


def _curves_panel(curves, trials, metric: str, best) -> None:
    """Every trial's validation curve, the best one thick."""
    for t in trials:
        rows = [r for r in runs.read_metrics(Location.of(t["run_dir"])) if metric in r]
        if rows:
            curves.plot(
                [r["epoch"] for r in rows],
                [r[metric] for r in rows],
                marker="o",
                color=_COLORS.get(t["status"], "gray"),
                linewidth=2.5 if t["trial"] == best else 1,
                alpha=1 if t["trial"] == best else 0.6,
            )
    curves.set_xlabel("epoch")
    curves.set_ylabel(metric)
    curves.set_title("validation curves (thick: the best trial)")
    for status, color in _COLORS.items():
        curves.plot([], [], color=color, label=status)
    curves.legend(fontsize=9)


def write_report(sweep_dir: Location, results: dict[str, Any]) -> tuple[Location, Location]:
    """Write sweep.png and sweep.html into the sweep directory; returns their paths."""
    png = render_png(sweep_dir, results)
    fields = list(results["sweep"]["space"])
    rows = [
        [
            t["trial"],
            t["status"],
            *(_cell(t["params"][f]) for f in fields),
            _cell(t["best"]),
            t["best_epoch"] if t["best_epoch"] is not None else "",
            t["epochs"],
            t["error"] or "",
        ]
        for t in results["trials"]
    ]
    html = TEMPLATES.get_template("sweep.html.j2").render(
        name=sweep_dir.name,
        sweep_dir=str(sweep_dir),
        written=time.strftime("%Y-%m-%d %H:%M:%S"),
        png=base64.b64encode(png).decode(),
        header=[
            "trial",
            "status",
            *fields,
            f"best {results['metric']}",
            "at epoch",
            "epochs",
            "error",
        ],
        rows=rows,
        best=results.get("best"),
        metric=results["metric"],
    )
    paths = sweep_dir / PNG, sweep_dir / HTML
    paths[0].write_bytes(png)
    paths[1].write_bytes(html.encode())
    return paths


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
