"""Ray Tune callbacks of a sweep, run on the sweep's driver: the console's lines, and releasing
what a stopped trial's TorchTrainer held. Kept apart from the rest of raytrain.sweep, which must
not import Ray Tune before it is needed; Tune pickles its callbacks with the experiment's state (for
--resume), so they hold only plain values."""

from __future__ import annotations

import sys
import time
from typing import Any

from ray import tune

from raytrain import runs
from raytrain.storage import Location
from raytrain.sweep.layout import params_text, trial_name


class TrialTable(tune.Callback):
    """The sweep's console. On a terminal: a live table of the trials (trial, status, epoch,
    the metric now and at its best, parameters), redrawn as they go and replaced by the final
    summary at the end. Anywhere else (pipes, logs, CI): a line per trial started, epoch
    validated, stopped and failed."""

    STATUS_STYLE = {"running": "cyan", "finished": "green", "stopped": "yellow", "failed": "red"}

    def __init__(self, metric: str, mode: str, epochs: int):
        self.metric, self.mode, self.epochs = metric, mode, epochs
        self.rows: dict[str, dict[str, Any]] = {}  # trial name -> what the table shows
        self._live = None

    def __getstate__(self):  # Tune saves its callbacks for --resume: not the terminal's state
        return {**self.__dict__, "_live": None}

    def _row(self, trial) -> dict[str, Any]:
        return self.rows.setdefault(
            trial_name(trial.trial_id),
            {"status": "pending", "epoch": 0, "value": None, "best": None, "params": {}},
        )

    def _update(self, trial, line: str, **changes) -> None:
        row = self._row(trial)
        row.update(changes)
        if changes.get("value") is not None:
            better = min if self.mode == "min" else max
            row["best"] = (
                changes["value"] if row["best"] is None else better(row["best"], changes["value"])
            )
        if self._live is None and sys.stdout.isatty():
            self._start_live()
        if self._live is not None:
            self._live.update(self.table(), refresh=True)
        else:
            print(f"{trial_name(trial.trial_id)}  {line}", flush=True)

    def _start_live(self) -> None:
        from rich.console import Console as RichConsole
        from rich.live import Live

        self._live = Live(
            self.table(),
            console=RichConsole(file=sys.stdout, highlight=False),
            refresh_per_second=2,
            transient=True,  # the summary printed at the end says it all again
        )
        self._live.start()
        _LIVE.append(self._live)

    def table(self):
        from rich.table import Table

        done = sum(row["status"] in ("finished", "stopped", "failed") for row in self.rows.values())
        table = Table(title=f"{done}/{len(self.rows)} trials done", title_justify="left", box=None)
        for name in ("trial", "status", "epoch", self.metric, "best", "parameters"):
            table.add_column(name, justify="right" if name in ("epoch", "best") else "left")
        for name, row in sorted(self.rows.items()):
            style = self.STATUS_STYLE.get(row["status"], "")
            table.add_row(
                name,
                f"[{style}]{row['status']}[/]" if style else row["status"],
                f"{row['epoch']}/{self.epochs}",
                _number(row["value"]),
                _number(row["best"]),
                params_text(row["params"]),
            )
        return table

    def on_trial_start(self, iteration, trials, trial, **info):
        params = {k: v for k, v in trial.config.items()}
        self._update(trial, f"started  {params_text(params)}", status="running", params=params)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        value = value if isinstance(value, int | float) else None
        epoch = result.get("epoch") or 0
        self._update(
            trial,
            f"epoch {epoch}/{self.epochs}  {self.metric} {_number(value)}",
            epoch=epoch,
            value=value,
        )

    def on_trial_complete(self, iteration, trials, trial, **info):
        done = (trial.last_result or {}).get("epoch", 0)
        if done >= self.epochs:
            self._update(trial, "finished", status="finished")
        else:
            self._update(trial, f"stopped by ASHA after epoch {done}", status="stopped")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._update(trial, "failed (sweep.json says why)", status="failed")

    def on_experiment_end(self, trials, **info):
        close_live()


_LIVE: list = []  # live tables being shown: closed at the experiment's end, or on Ctrl-C


def close_live() -> None:
    """Stop any live table, so that what comes next lands on a clean terminal."""
    while _LIVE:
        _LIVE.pop().stop()


def _number(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "-"


class ReleaseStopped(tune.Callback):
    """Remove the placement groups of a stopped trial's worker group once the trial is gone.

    A trial that ASHA stops (or that fails) is ended by ending its process, and its TorchTrainer's
    controller with it. Ray Train's own cleaner removes the controller's placement group only
    where Ray's State API answers (a dashboard): without one the group stays reserved for the
    rest of the sweep, and after a few stopped trials the next one cannot start its workers.
    Rank 0 writes its placement group into each start line of metrics.jsonl; a group is removed
    only a while after its trial ended (removing it under a controller still alive would make
    Ray Train start the workers again, in a new group)."""

    GRACE_S = 10.0

    def __init__(self, sweep_dir: str):
        self.sweep_dir = sweep_dir
        self.ended: dict[str, float] = {}  # trial id -> when Tune said it ended

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended.setdefault(trial.trial_id, time.monotonic())

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended.setdefault(trial.trial_id, time.monotonic())

    def on_step_end(self, iteration, trials, **info):
        due = [t for t, at in self.ended.items() if time.monotonic() - at > self.GRACE_S]
        for trial_id in due:
            self.release(trial_id)
            del self.ended[trial_id]

    def on_experiment_end(self, trials, **info):
        for trial_id in list(self.ended):
            self.release(trial_id)
        self.ended.clear()

    def release(self, trial_id: str) -> None:
        from ray._raylet import PlacementGroupID
        from ray.util import remove_placement_group
        from ray.util.placement_group import PlacementGroup, placement_group_table

        run_dir = Location.of(self.sweep_dir) / trial_name(trial_id)
        table = placement_group_table()
        for line in runs.read_lines(run_dir):
            group = line.get("start", {}).get("placement_group")
            if group and table.get(group, {}).get("state") not in (None, "REMOVED"):
                remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(group)))
