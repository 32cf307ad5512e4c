"""The report of a run: ``report.png`` (raytrain.report.plots) and a self-contained
``report.html`` (the picture inline, and the numbers), from the run directory's files alone, so
it works on a finished run, one still training, one stopped and one resumed."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import jinja2

from raytrain import runs
from raytrain.errors import UserError, first_line
from raytrain.report import plots
from raytrain.report.rundir import RunFiles, load_run
from raytrain.storage import Location, basename


def write_report(run_dir: str | Path | Location) -> tuple[Location, Location]:
    """Write report.png and report.html into a run directory; returns their paths."""
    run = load_run(run_dir)
    png = plots.render_png(run)
    paths = run.run_dir / runs.REPORT_PNG, run.run_dir / runs.REPORT_HTML
    try:
        paths[0].write_bytes(png)
        paths[1].write_bytes(render_html(run, png).encode())
    except OSError as e:
        raise UserError(
            f"cannot write the report into {str(run.run_dir)!r} ({e.strerror or first_line(e)})"
        ) from None
    return paths


TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("raytrain.report", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


def render_html(run: RunFiles, png: bytes) -> str:
    """One self-contained page: the figure (inline) and the run's numbers."""
    results = run.results or {}
    validation = results.get("validation") or {}
    train = results.get("train") or (run.rows[-1] if run.rows else {})
    return TEMPLATES.get_template("report.html.j2").render(
        name=run.run_dir.name,
        run_dir=str(run.run_dir),
        written=time.strftime("%Y-%m-%d %H:%M:%S"),
        finished=bool(results),
        resumed_from=plots.resumed_from(run.segments),
        png=base64.b64encode(png).decode(),
        summary=_summary(run, results),
        final=[
            [
                "training (last epoch)",
                _num(train.get("loss"), "{:.4f}"),
                _num(train.get("accuracy"), "{:.1%}"),
                _num(train.get("rows"), "{}"),
                _num(train.get("samples_per_s"), "{:,.0f}"),
            ],
            [
                "validation (held out)",
                _num(validation.get("loss"), "{:.4f}"),
                _num(validation.get("accuracy"), "{:.1%}"),
                _num(validation.get("rows"), "{}"),
                "",
            ],
        ],
        segments=_segments(run.segments),
        classes=_classes(validation),
        confusion_header=["true \\ predicted", *_class_names(validation)],
        confusion=[
            [name, *map(str, line)]
            for name, line in zip(
                _class_names(validation), validation.get("confusion") or [], strict=False
            )
        ],
        phases=_phases(results),
        placement=[
            [_num(p.get("rank"), "{}"), _num(p.get("node_ip"), "{}"), _num(p.get("node_id"), "{}")]
            for p in results.get("placement") or []
        ],
        epochs=[
            [
                str(row["epoch"]),
                f"{row['loss']:.4f}",
                _num(row.get("accuracy"), "{:.1%}"),
                _num(row.get("val_loss"), "{:.4f}"),
                _num(row.get("val_accuracy"), "{:.1%}"),
                _num(row.get("lr"), "{:.3g}"),
                f"{row['samples_per_s']:,.0f}",
                f"{row['epoch_time_s']:.3f}",
                basename(row["checkpoint"]) if row.get("checkpoint") else "",
            ]
            for row in run.rows
        ],
        config=json.dumps(run.config, indent=2) if run.config else "",
    )


def _summary(run: RunFiles, results: dict[str, Any]) -> list[list[str]]:
    segments = run.segments
    total = sum(s["seconds"] for s in segments)
    rows = [
        ["epochs", plots.epochs_done(run)],
        ["workers", _num(results.get("workers"), "{}")],
        ["CPUs per worker", _num(results.get("cpus_per_worker"), "{}")],
        ["torch threads per worker", _num(results.get("threads_per_worker"), "{}")],
        ["validated checkpoint", _num(results.get("checkpoint"), "{}")],
        [
            "wall time (this session)",
            _num((results.get("wall_time_s") or {}).get("total"), "{:.1f} s"),
        ],
    ]
    best = results.get("best") or {}
    if best.get("epoch") is not None:
        rows.append(["best epoch", f"{best['epoch']}: {best['why']}"])
    stopped = results.get("stopped_early")
    if stopped:
        rows.append(
            [
                "stopped early",
                f"after epoch {results.get('epochs')}; best at epoch {stopped['best_epoch']}",
            ]
        )
    if len(segments) > 1:
        rows.append(["training time, all sessions", f"{total:.1f} s in {len(segments)} sessions"])
    rows.append(["TensorBoard", f"tensorboard --logdir {run.run_dir / runs.TENSORBOARD_DIR}"])
    return rows


def _segments(segments: list[dict[str, Any]]) -> list[list[str]]:
    if len(segments) < 2 and not any(s["restarts"] for s in segments):
        return []  # one uninterrupted session: nothing to tell
    return [
        [
            str(i + 1),
            str(s["from_epoch"]),
            str(s["to_epoch"]),
            str(s["restarts"]),
            f"{s['seconds']:.1f}",
        ]
        for i, s in enumerate(segments)
    ]


def _class_names(validation: dict[str, Any]) -> list[str]:
    """The classes as the user's data names them (a label of names), else their indexes."""
    names = validation.get("class_names")
    return list(names) if names else [str(c) for c in range(len(validation.get("confusion") or []))]


def _classes(validation: dict[str, Any]) -> list[list[str]]:
    confusion = validation.get("confusion") or []
    precision, recall = validation.get("precision") or [], validation.get("recall") or []
    names = _class_names(validation)
    return [
        [
            names[c],
            _num(_at(precision, c), "{:.1%}"),
            _num(_at(recall, c), "{:.1%}"),
            str(sum(confusion[c])),
        ]
        for c in range(len(confusion))
    ]


def _phases(results: dict[str, Any]) -> list[list[str]]:
    phases = plots.phase_times(results)
    whole = sum(seconds for _, seconds in phases)
    return [
        [label, f"{seconds:.2f}", f"{seconds / whole:.0%}" if whole else ""]
        for label, seconds in phases
    ]


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _at(values: list[Any], index: int) -> Any:
    return values[index] if index < len(values) else None
