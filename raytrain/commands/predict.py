"""``raytrain predict``: score Parquet rows with a trained model on Ray and write the predictions
as Parquet; with ``--label``, also measure the model.

    raytrain predict RUN --data new.parquet --out predictions/ --keep id
    raytrain predict runs/RUN/checkpoint_epoch_000010 --data s3://bucket/rows --out preds/
    raytrain predict RUN --data val.parquet --out scored/ --label y   # + accuracy, loss, confusion

Everything a user can get wrong is checked before any actor starts (exit 2, one line): the run or
checkpoint and its hash, the data's columns, types and width, the output path.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from raytrain.commands.args import add_cluster_args, cluster_config, error
from raytrain.errors import EXIT_INTERRUPTED, EXIT_OK, UserError
from raytrain.report.console import Console
from raytrain.storage import Location, StorageError

_PROGRESS_EVERY_S = 10.0


def add_parser(sub) -> None:
    """``raytrain predict``."""
    parser = sub.add_parser(
        "predict",
        help="score Parquet rows with a trained model, on Ray",
        description="Score Parquet rows with a trained model on Ray and write the predictions "
        "as Parquet; with --label, also measure the model.",
    )
    parser.set_defaults(run=run)
    parser.add_argument(
        "target",
        metavar="RUN|CHECKPOINT",
        help="A run (its name under --storage-path, or its directory): its best checkpoint by "
        "the run's checkpoint metric; or a checkpoint directory.",
    )
    parser.add_argument("--data", required=True, help="Parquet file or directory, or a URI.")
    parser.add_argument(
        "--out",
        required=True,
        help="Directory for the predictions (part-NNNNN.parquet), local or a URI.",
    )
    parser.add_argument(
        "--keep",
        default="",
        metavar="COLUMNS",
        help="Comma-separated input columns to copy beside each prediction (e.g. id,date).",
    )
    parser.add_argument(
        "--label",
        metavar="COLUMN",
        help="The data's label column: also report accuracy, loss and the confusion matrix "
        "(printed, and written to _metrics.json in --out).",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace --out if it exists.")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=65536,
        help="Rows per model call in each actor (default: %(default)s).",
    )
    add_cluster_args(parser, what="prediction actors")


def _columns(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def prepare(args: argparse.Namespace):
    """Every check before Ray starts: the model, the data, the output. Returns (Trained, Source,
    output Location, keep). Raises UserError."""
    from raytrain.data import files
    from raytrain.inference.batch import PREDICTION, PROBABILITIES
    from raytrain.inference.trained import load

    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    keep = _columns(args.keep)
    clash = {PREDICTION, PROBABILITIES} & set(keep)
    if clash:
        raise UserError(
            f"--keep {args.keep!r}: the output's own columns are {PREDICTION!r} and "
            f"{PROBABILITIES!r}; rename {', '.join(sorted(clash))} in the data or leave it out"
        )
    try:
        out, data = Location.of(args.out), Location.of(args.data)
    except StorageError as e:
        raise UserError(str(e)) from None
    trained = load(args.target, args.storage_path)
    columns = ", ".join(trained.feature_columns)
    encoding = trained.encoding
    plan = None
    if encoding is not None:  # the columns as trained, whatever types this data has
        plan = (
            encoding.numeric,
            encoding.categorical,
            encoding.class_names is not None,
            encoding.target is not None,
        )
    source = files.find(
        args.data,
        trained.feature_columns,
        args.label,
        also=keep,
        hint=f"the model reads feature column(s) {columns}; --keep and --label name columns "
        "of the data",
        plan=plan,
    )
    if source.format != "parquet":
        raise UserError(f"--data {args.data!r} holds CSV files; raytrain predict reads Parquet")
    width = encoding.width if encoding is not None else trained.features
    if source.width is not None and source.width != width:
        raise UserError(
            f"--data {args.data!r} has {source.width} features per row in {columns}, but the "
            f"model was trained on {trained.features}"
        )
    if out.fs.type_name == data.fs.type_name and (
        out.path == data.path or out.path.startswith(data.path.rstrip("/") + "/")
    ):
        raise UserError(f"--out {args.out!r} is inside --data {args.data!r}; write elsewhere")
    if out.exists() and not args.overwrite:
        raise UserError(f"--out {args.out!r} exists; pass --overwrite to replace it")
    return trained, source, out, keep


def run(args: argparse.Namespace) -> int:
    """Run the predict command; returns the exit code."""
    console = Console()
    started = time.perf_counter()
    staging = None
    try:
        checked = prepare(args)
        from raytrain.cluster import connect
        from raytrain.inference import batch as inference

        staging = inference.staging_for(checked[2])
        with connect(cluster_config(args, args.data, str(checked[2].parent))) as plan:
            manifest, metrics = execute(args, checked, plan, console, staging)
        summary(console, args.out, manifest, metrics, time.perf_counter() - started)
    except UserError as e:
        return error(str(e))
    except KeyboardInterrupt:
        console.line(f"raytrain: interrupted; nothing was written to {args.out}")
        return EXIT_INTERRUPTED
    finally:
        if staging is not None:  # again once Ray has stopped: no actor writes there any more
            inference.discard(staging)
    return EXIT_OK


def execute(args: argparse.Namespace, checked, plan, console: Console, staging=None):
    """Predict on the connected Ray as ``plan`` says, writing into ``staging`` (default: a fresh
    one beside --out), and move the output into place; returns the manifest and the metrics
    (None without --label). Nothing is left at --out or beside it unless every unit
    succeeded."""
    from raytrain.inference import batch as inference

    trained, source, out, keep = checked
    units = inference.units_of(source, inference.UNIT_ROWS)
    console.header(header(trained, source, plan, out, len(units)))
    job = inference.Job(
        checkpoint=str(trained.checkpoint),
        source=source,
        staging=staging or inference.staging_for(out),
        keep=keep,
        label=args.label,
        batch_rows=args.batch_size,
        threads=plan.threads,
        units=units,
    )
    try:
        began = time.perf_counter()
        totals = inference.run(
            job,
            plan.workers,
            plan.cpus_per_worker,
            plan.min_workers,
            args.verbose,
            Progress(console, sum(u.rows for u in units)),
        )
        seconds = time.perf_counter() - began
        metrics = _metrics(totals, args.label, trained) if args.label else None
        manifest = _manifest(trained, source, out, job, totals, plan, seconds)
        inference.publish(job.staging, out, manifest, metrics)
    finally:
        inference.discard(job.staging)  # gone already when published
    return manifest, metrics


class Progress:
    """A line every ten seconds while units finish: rows done, share and rate."""

    def __init__(self, console: Console, total: int):
        self.console, self.total = console, total
        self.started = self.last = time.perf_counter()

    def __call__(self, rows: int) -> None:
        now = time.perf_counter()
        if now - self.last < _PROGRESS_EVERY_S or rows >= self.total:
            return
        self.last = now
        rate = rows / (now - self.started)
        self.console.line(
            f"predicted {rows:,} of {self.total:,} rows ({rows / self.total:.0%}), "
            f"{rate:,.0f} rows/s"
        )


def header(trained, source, plan, out: Location, units: int) -> list[tuple[str, str]]:
    where = "embedded Ray on this machine" if plan.embedded else f"Ray cluster at {plan.address}"
    rows = sum(count for _, _, count in source.row_groups)
    epoch = f"epoch {trained.epoch}, {trained.why}"
    items = [
        ("model", f"{trained.checkpoint} ({epoch})"),
        ("data", f"{rows:,} rows in {len(source.files)} Parquet file(s)"),
        (
            "actors",
            f"{plan.workers_text} x {plan.cpus_per_worker:g} CPU, {plan.threads} torch thread(s) "
            f"each, {where}",
        ),
        ("out", str(out)),
    ]
    if plan.note:
        items.insert(3, ("note", plan.note.replace("workers", "actors")))
    if units < plan.workers:
        items.insert(3, ("note", f"{units} unit(s) of about a million rows: {units} actor(s) work"))
    return items


def _metrics(totals: dict[str, Any], label: str, trained) -> dict[str, Any]:
    import torch

    from raytrain.evaluate import summarize

    if not totals["rows"]:
        raise UserError("--label: the data has no rows to measure the model on")
    encoding = trained.encoding
    if encoding is not None and encoding.target is not None:
        from raytrain.evaluate import regression_metrics

        metrics = {"rows": totals["rows"], "loss": totals["loss_sum"] / totals["rows"]}
        metrics.update(regression_metrics(totals["sums"], encoding.target))
    else:
        metrics = summarize(totals["loss_sum"], torch.tensor(totals["confusion"].tolist()))
    return {**metrics, "label_column": label, **trained.describe()}


def _manifest(trained, source, out, job, totals, plan, seconds: float) -> dict[str, Any]:
    from raytrain.inference.scoring import regression

    return {
        "format": 1,
        "out": str(out),
        "data": [str(Location(source.filesystem, f)) for f in source.files],
        "rows": totals["rows"],
        "columns": [*job.keep, "prediction", *([] if regression(trained) else ["probabilities"])],
        "label_column": job.label,
        "model": trained.describe(),
        "files": [
            {"name": u.out_name, "input": u.file, "row_groups": list(u.row_groups), "rows": u.rows}
            for u in job.units
        ],
        "actors": plan.workers_text,
        "cpus_per_actor": plan.cpus_per_worker,
        # prediction: from the actors' start to the last unit; actors_busy: the units' own
        # time (read, predict, write), summed over actors.
        "seconds": {
            "ray_start": plan.ray_start_s,
            "prediction": seconds,
            "actors_busy": totals["actor_seconds"],
        },
        "rows_per_s": totals["rows"] / seconds if seconds else None,
    }


def summary(console: Console, out, manifest, metrics, wall: float) -> None:
    rows, seconds = manifest["rows"], manifest["seconds"]["prediction"]
    console.line(
        f"predicted {rows:,} rows in {seconds:.1f} s ({manifest['rows_per_s'] or 0:,.0f} rows/s) "
        f"into {len(manifest['files'])} file(s)"
    )
    if metrics is not None and "rmse" in metrics:
        console.line(
            f"{metrics['label_column']}: rmse {metrics['rmse']:.4g}  mae {metrics['mae']:.4g}  "
            f"r2 {metrics['r2']:.3f}  ({metrics['rows']:,} rows)"
        )
    elif metrics is not None:
        console.line(
            f"{metrics['label_column']}: acc {metrics['accuracy']:.1%}  loss {metrics['loss']:.4f}"
            f"  ({metrics['rows']:,} rows; confusion, true x predicted: {metrics['confusion']})"
        )
    console.line(f"done in {wall:.1f} s; predictions in {out}")
