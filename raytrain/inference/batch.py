"""Batch prediction on Ray: a pool of CPU actors, each with the trained model loaded once, turns
units of Parquet row groups into Parquet files of predictions.

Ray Data runs the pool (``map_batches`` over the units with an ``ActorPoolStrategy``: actor
start-up, backpressure, a retried unit when an actor dies). Each actor reads its unit's row groups
with pyarrow, predicts and writes the unit's output file itself, so rows never pass through the
object store or the driver (that copy cost three times the whole job; docs/predict.md). Only a
few numbers per unit come back to the driver.

Output: ``part-NNNNN.parquet``, one per unit, numbered in input order (files sorted by path, row
groups in order), rows in input order, written into a staging directory beside ``--out`` and
moved into place only when every unit has succeeded.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import resource
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raytrain.cluster import stderr_to_devnull
from raytrain.data.files import DataError, Source
from raytrain.errors import UserError
from raytrain.inference import scoring
from raytrain.storage import Location

PREDICTION = "prediction"
PROBABILITIES = "probabilities"
MANIFEST = "_prediction.json"  # "_": Arrow, pandas, Spark and Ray Data skip it when reading
METRICS = "_metrics.json"
UNIT_ROWS = 1 << 20  # rows per unit of work (whole row groups)


@dataclass(frozen=True)
class Unit:
    """Consecutive row groups of one file, predicted by one actor into one output file."""

    index: int
    file: str
    row_groups: tuple[int, ...]
    rows: int
    first_row: int  # the file's row number of the unit's first row

    @property
    def out_name(self) -> str:
        return f"part-{self.index:05d}.parquet"


def units_of(source: Source, unit_rows: int) -> list[Unit]:
    """The source's row groups cut into units of about ``unit_rows`` rows, in input order."""
    units: list[Unit] = []
    groups: list[int] = []
    rows, current, first, in_file = 0, None, 0, 0
    for file, group, count in source.row_groups:
        if file != current:
            in_file = 0
        if groups and (file != current or rows + count > unit_rows):
            units.append(Unit(len(units), current, tuple(groups), rows, first))
            groups, rows = [], 0
        if not groups:
            first = in_file
        current = file
        groups.append(group)
        rows += count
        in_file += count
    if groups:
        units.append(Unit(len(units), current, tuple(groups), rows, first))
    return units


@dataclass(frozen=True)
class Job:
    """One prediction: what to read, with which model, and where the files go."""

    checkpoint: str  # path or URI, loaded by every actor
    source: Source
    staging: Location
    keep: tuple[str, ...] = ()
    label: str | None = None
    batch_rows: int = 65536
    threads: int = 1
    units: list[Unit] = field(default_factory=list)


class UnitPredictor:
    """A Ray Data actor: the model loaded once, then one unit per call."""

    def __init__(self, job: Job):
        import torch

        from raytrain.inference.trained import load_checkpoint

        torch.set_num_threads(job.threads)
        self.job = job
        self.trained = load_checkpoint(job.checkpoint)  # the SHA-256 check, weights_only
        self.model = self.trained.model()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        outcomes = [
            predict_unit(self.job.units[int(i)], self.job, self.model, self.trained)
            for i in batch["unit"]
        ]
        return {key: np.array([o[key] for o in outcomes]) for key in outcomes[0]}


def predict_unit(unit: Unit, job: Job, model, trained) -> dict[str, Any]:
    """Read one unit, predict, write its file; the unit's rows, loss sum and confusion (or a
    regression's sums)."""
    import torch

    started = time.perf_counter()
    fs, classes = job.source.filesystem, trained.classes
    columns = list(dict.fromkeys([*job.source.columns, *job.keep]))
    totals = {
        "loss_sum": 0.0,
        "confusion": torch.zeros(classes, classes, dtype=torch.int64),
        "sums": torch.zeros(5, dtype=torch.float64),
    }
    done = unit.first_row
    target = job.staging / unit.out_name
    with fs.open_input_file(unit.file) as source, fs.open_output_stream(target.path) as stream:
        reader = pq.ParquetFile(source)
        batches = reader.iter_batches(
            job.batch_rows, unit.row_groups, columns, use_threads=job.threads > 1
        )
        writer = None
        for record_batch in batches:
            table = pa.Table.from_batches([record_batch])
            x = scoring.features(table, trained, unit.file, done)
            with torch.no_grad():
                logits = model(torch.from_numpy(x))
            out = _scored(table, logits, job, trained, totals, (unit.file, done))
            if writer is None:
                writer = pq.ParquetWriter(stream, out.schema)
            writer.write_table(out)
            done += len(table)
        if writer is None:  # a unit of empty row groups: still a file, with the schema
            schema = output_schema(job, classes, reader.schema_arrow, trained)
            writer = pq.ParquetWriter(stream, schema)
        writer.close()
    return {
        "unit": unit.index,
        "rows": done - unit.first_row,
        "loss_sum": totals["loss_sum"],
        "confusion": totals["confusion"].numpy().reshape(-1),
        "sums": totals["sums"].numpy(),
        "seconds": time.perf_counter() - started,
    }


def _scored(table: pa.Table, logits, job: Job, trained, totals: dict, where) -> pa.Table:
    """A batch's output rows (the kept columns, the prediction, the probabilities), its
    measures against ``--label`` added to ``totals``; ``where``: (file, rows before)."""
    import torch

    from raytrain.evaluate import regression_loss, regression_sums, tally_logits

    out = table.select(list(job.keep))
    scored = scoring.answers(logits, trained)
    if scored.probabilities is None:
        if job.label is not None:  # measured as the model learned it: the target standardised
            predicted = logits.squeeze(1)
            y = torch.from_numpy(_labels(table, job.label, trained, *where))
            totals["loss_sum"] += regression_loss(predicted, y, "mse").item()
            totals["sums"] += regression_sums(predicted, y)
        return out.append_column(PREDICTION, pa.array(scored.prediction))
    if job.label is not None:
        y = _labels(table, job.label, trained, *where)
        loss, counts = tally_logits(logits, torch.from_numpy(y), trained.classes)
        totals["loss_sum"] += loss.item()
        totals["confusion"] += counts
    kind = pa.int64() if trained.class_names is None else pa.string()
    out = out.append_column(PREDICTION, pa.array(scored.prediction, kind))
    flat = pa.array(scored.probabilities.reshape(-1))
    return out.append_column(
        PROBABILITIES, pa.FixedSizeListArray.from_arrays(flat, trained.classes)
    )


def output_schema(job: Job, classes: int, schema: pa.Schema, trained=None) -> pa.Schema:
    """The output's columns: the kept ones, the class (index, or name) and the class
    probabilities (in the order of the class indexes, or of the class names); for a
    regression, the kept ones and the predicted value."""
    encoding = trained.encoding if trained is not None else None
    if encoding is not None and encoding.target is not None:
        kept = [schema.field(name) for name in job.keep]
        return pa.schema([*kept, pa.field(PREDICTION, pa.float64())])
    class_names = encoding.class_names if encoding is not None else None
    return pa.schema(
        [
            *(schema.field(name) for name in job.keep),
            pa.field(PREDICTION, pa.int64() if class_names is None else pa.string()),
            pa.field(PROBABILITIES, pa.list_(pa.float32(), classes)),
        ]
    )


def _labels(table: pa.Table, label: str, trained, file: str, before: int) -> np.ndarray:
    classes, names = trained.classes, trained.class_names
    column = table.column(label)
    if column.null_count:
        row = before + int(np.argmax(column.is_null().to_numpy(zero_copy_only=False)))
        raise DataError(f"{file}: row {row} has no {label!r}; --label needs a label on every row")
    if trained.encoding is not None and trained.encoding.target is not None:
        y = trained.encoding.labels(table, label)  # standardised, as the model learned it
        if not np.isfinite(y).all():
            row = int(np.argmax(~np.isfinite(y)))
            raise DataError(f"{file}: row {before + row} has a {label!r} that is not a number")
        return y
    if names is not None:
        y = trained.encoding.labels(table, label)
        if (y < 0).any():
            row = int(np.argmax(y < 0))
            raise DataError(
                f"{file}: row {before + row} has {label} {column[row].as_py()!r}, but the model "
                f"knows classes {', '.join(names)}"
            )
        return y
    y = column.to_numpy(zero_copy_only=False).astype(np.int64)
    out = (y < 0) | (y >= classes)
    if out.any():
        row = before + int(np.argmax(out))
        raise DataError(
            f"{file}: row {row} has {label} {int(y[row - before])}, but the model knows classes "
            f"0..{classes - 1}"
        )
    return y


# ---- the driver's side ---------------------------------------------------------------------------


def staging_for(out: Location) -> Location:
    """Where a prediction writes before its files are complete: a hidden directory beside
    ``out`` that no reader of ``out`` sees."""
    return out.parent / f".{out.name}.partial-{secrets.token_hex(3)}"


def run(
    job: Job,
    workers: int,
    cpus_per_worker: float,
    min_workers: int | None = None,
    verbose: bool = False,
    progress: Callable[[int], None] = lambda rows: None,
) -> dict[str, Any]:
    """Predict every unit on a pool of actors (``min_workers``..``workers``, or ``workers``);
    ``progress(rows)`` hears of every unit done. Returns the totals."""
    import ray.data
    from ray.data import ActorPoolStrategy

    job.staging.mkdir()
    units = ray.data.from_items(
        [{"unit": u.index} for u in job.units], override_num_blocks=max(1, len(job.units))
    )
    most = max(1, min(workers, len(job.units)))  # an idle actor would only hold a CPU
    pool = (
        ActorPoolStrategy(size=most)
        if min_workers is None
        else ActorPoolStrategy(min_size=min(min_workers, most), max_size=most)
    )
    predicted = units.map_batches(
        UnitPredictor,
        fn_constructor_kwargs={"job": job},
        batch_size=1,
        batch_format="numpy",
        compute=pool,
        num_cpus=cpus_per_worker,
    )
    totals = {"rows": 0, "loss_sum": 0.0, "confusion": None, "sums": np.zeros(5)}
    totals["actor_seconds"] = 0.0
    # Ray Data's actor pool makes the driver's core worker log a line about restarting actors
    # whose arguments are in the object store, on stderr whatever the log level: shown only
    # with --verbose (an error still arrives here as an exception).
    quiet = contextlib.nullcontext() if verbose else stderr_to_devnull()
    try:
        with quiet:
            for outcome in predicted.iter_rows():
                _add_outcome(totals, outcome)
                progress(totals["rows"])
    except Exception as e:
        found = user_error_in(e)
        if found is None:
            raise
        raise found from None
    confusion = totals["confusion"]
    if confusion is not None:
        classes = int(round(len(confusion) ** 0.5))
        totals["confusion"] = confusion.reshape(classes, classes)
    totals["sums"] = totals["sums"].tolist()
    return totals


def _add_outcome(totals: dict[str, Any], outcome: dict[str, Any]) -> None:
    """One unit's outcome added to the totals of the prediction."""
    counts = np.asarray(outcome["confusion"], dtype=np.int64)
    totals["confusion"] = counts if totals["confusion"] is None else totals["confusion"] + counts
    totals["rows"] += int(outcome["rows"])
    totals["loss_sum"] += float(outcome["loss_sum"])
    totals["sums"] = totals["sums"] + np.asarray(outcome["sums"], dtype=np.float64)
    totals["actor_seconds"] += float(outcome["seconds"])


def user_error_in(error: BaseException) -> UserError | None:
    """The UserError an actor raised (bad data found mid-way), out of what Ray Data raises on the
    driver, or None (then it is a bug, and its traceback is wanted). Ray Data passes the actor's
    exception on as text only, inside a UserCodeException's traceback."""
    for line in reversed(str(error).splitlines()):
        found = _RAISED.match(line.strip())
        if found is None:
            continue
        module, _, name = found["cls"].rpartition(".")
        cls = getattr(importlib.import_module(module), name, None)
        if isinstance(cls, type) and issubclass(cls, UserError):
            return cls(found["message"])
    return None


_RAISED = re.compile(r"^(?P<cls>raytrain(?:\.\w+)+): (?P<message>.+)$")


def publish(staging: Location, out: Location, manifest: dict, metrics: dict | None) -> None:
    """Move the complete output into place. ``out``, if it exists, is replaced only now (the
    caller checked --overwrite). On a disk: two renames. On an object store, which cannot rename
    a prefix: the files are moved one by one and the manifest is written last, so a reader
    knows a complete output by its ``_prediction.json``."""
    manifest["driver_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    text = {MANIFEST: manifest, **({METRICS: metrics} if metrics is not None else {})}
    if out.local:
        for name, data in text.items():
            (staging / name).write_bytes((json.dumps(data, indent=2) + "\n").encode())
        old = out.parent / f".{out.name}.old-{secrets.token_hex(3)}"
        if out.exists():
            out.fs.move(out.path, old.path)
        out.fs.move(staging.path, out.path)
        if old.exists():
            old.delete_dir()
        return
    if out.exists():
        out.delete_dir()
    for child in staging.children():
        out.fs.move(child.path, (out / child.name).path)
    staging.delete_dir()
    for name in (METRICS, MANIFEST):
        if name in text:
            (out / name).write_bytes((json.dumps(text[name], indent=2) + "\n").encode())


def discard(staging: Location) -> None:
    """Remove a staging directory of a prediction that did not finish (whatever is there)."""
    try:
        if staging.exists():
            staging.delete_dir()
    except OSError:
        pass
