"""What a sweep found, from its trials' run directories and Ray Tune's results: a row per trial
(parameters, best value, epochs, status), the best trial, and sweep.json, sweep.csv and
best.yaml (the best trial's config, to train again)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from typing import Any

import yaml

from raytrain import runs
from raytrain.storage import Location
from raytrain.sweep.layout import BEST_FILE, RESULTS_CSV, RESULTS_JSON, TRIAL_PREFIX
from raytrain.train.checkpoint import persisted
from raytrain.train.stopping import best_of

_TRIAL_ID = re.compile(r"_([0-9a-f]{5}_\d{5})")


def trials_done(sweep_dir: Location, grid) -> int:
    """How many of Tune's trials ran to an end: failed, reported an epoch (finished or stopped
    early by the scheduler) or wrote results.json. A trial still pending when Ctrl-C came is
    TERMINATED in Tune's grid too, but never ran: it is not done."""
    done = 0
    for result in grid:
        found = _TRIAL_ID.search(os.path.basename(str(result.path).rstrip("/")))
        trial = (result.metrics or {}).get("trial_id") or (found.group(1) if found else None)
        finished = trial and (sweep_dir / f"{TRIAL_PREFIX}{trial}" / runs.RESULTS_FILE).is_file()
        reported = (result.metrics or {}).get("epoch") is not None
        done += bool(result.error is not None or reported or finished)
    return done


def summarize(sweep_dir: Location, sweep, epochs: int, grid, interrupted: bool) -> list[dict]:
    """Every trial's parameters, best metric, epochs, status and run directory, from its run
    directory (its config and metrics rows) and Tune's results (errors)."""
    errors, seconds = {}, {}
    for result in grid:
        found = _TRIAL_ID.search(os.path.basename(str(result.path).rstrip("/")))
        trial = (result.metrics or {}).get("trial_id") or (found.group(1) if found else None)
        if trial and result.error is not None:
            errors[trial] = _first_line(result.error)
        if trial and (result.metrics or {}).get("time_total_s") is not None:
            seconds[trial] = result.metrics["time_total_s"]  # to its last validated epoch
    rows = []
    for run_dir in sorted(sweep_dir.children(), key=lambda loc: loc.name):
        if not run_dir.name.startswith(TRIAL_PREFIX) or not (run_dir / runs.CONFIG_FILE).is_file():
            continue
        trial = run_dir.name.removeprefix(TRIAL_PREFIX)
        saved = runs.saved_config(run_dir)
        params = {field: _get(saved, field) for field in sweep.space}
        rows_of_run = runs.read_metrics(run_dir)
        # Ranked by what the trial keeps: the best epoch whose checkpoint is there, chosen by the
        # rule that picks a run's best checkpoint.
        saved = [(row, row) for row in rows_of_run if row.get("checkpoint")]
        kept = best_of([(r, m) for r, m in saved if persisted(r["checkpoint"])], sweep.metric)
        best = kept[1] if kept else None
        done = max((row["epoch"] for row in rows_of_run), default=0)
        finished = (run_dir / runs.RESULTS_FILE).is_file()
        if trial in errors:
            status = "failed"
        elif finished:
            status = "finished"
        elif interrupted:
            status = "unfinished"
        else:
            status = "stopped early"
        rows.append(
            {
                "trial": run_dir.name,
                "status": status,
                "params": params,
                "best": best[sweep.metric] if best else None,
                "best_epoch": best["epoch"] if best else None,
                "epochs": done,
                "stopped_early": status == "stopped early",
                "error": errors.get(trial),
                "seconds": seconds.get(trial),
                "run_dir": str(run_dir),
            }
        )
    return rows


def _get(saved: dict, dotted: str) -> Any:
    section, _, field = dotted.partition(".")
    value = saved.get(section, {})
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _first_line(error: BaseException) -> str:
    text = str(error)
    for line in reversed(text.splitlines()):  # the trial's own error, after Ray's traceback
        if re.match(r"^[\w.]+(Error|Exception|Stopped)\b", line.strip()):
            return line.strip()
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def best_trial(sweep, summary: list[dict]) -> dict | None:
    sign = 1 if sweep.mode == "min" else -1
    ranked = [row for row in summary if row["best"] is not None and row["status"] != "failed"]
    return min(ranked, key=lambda r: (sign * r["best"], r["trial"])) if ranked else None


def write_results(
    sweep_dir: Location, sweep, summary: list[dict], wall: float, ray_start: float
) -> None:
    """sweep.json, sweep.csv and best.yaml (the best trial's full config, to train again), and
    the sweep's report."""
    best = best_trial(sweep, summary)
    data = {
        "metric": sweep.metric,
        "mode": sweep.mode,
        "sweep": sweep.model_dump(mode="json"),
        "best": best,
        "trials": summary,
        "wall_time_s": wall,
        "ray_start_s": ray_start,
        # Trials' own time (each from its start to its last validated epoch), summed: against
        # (wall - ray_start) x concurrent, how busy the slots for trials were.
        "trials_time_s": sum(row["seconds"] or 0 for row in summary),
    }
    (sweep_dir / RESULTS_JSON).write_bytes((json.dumps(data, indent=2) + "\n").encode())
    table = io.StringIO()
    fields = list(sweep.space)
    writer = csv.writer(table)
    writer.writerow(["trial", "status", *fields, sweep.metric, "best_epoch", "epochs", "run_dir"])
    for row in summary:
        writer.writerow(
            [
                row["trial"],
                row["status"],
                *(row["params"][f] for f in fields),
                row["best"],
                row["best_epoch"],
                row["epochs"],
                row["run_dir"],
            ]
        )
    (sweep_dir / RESULTS_CSV).write_bytes(table.getvalue().encode())
    from raytrain.sweep.report import write_report

    write_report(sweep_dir, data)
    if best is not None:
        saved = runs.saved_config(Location.of(best["run_dir"]))
        saved["run"] = {k: v for k, v in saved["run"].items() if k not in ("name", "storage_path")}
        if best["status"] == "stopped early":
            saved["train"]["epochs"] = best["epochs"]
        text = (
            f"# The best trial of sweep {sweep_dir.name}: {best['trial']}, {sweep.metric} "
            f"{best['best']:.6g} at epoch {best['best_epoch']}.\n"
            f"# raytrain train --config best.yaml trains it again, the same way.\n"
        ) + yaml.safe_dump(saved, sort_keys=False)
        (sweep_dir / BEST_FILE).write_bytes(text.encode())
