"""Ray Tune callbacks of a sweep, run on the sweep's driver: the console's lines, and releasing
what a stopped trial's TorchTrainer held. Kept apart from raytrain.tune, which must not import
Ray Tune to parse a command line; Tune pickles its callbacks with the experiment's state (for
--resume), so they hold only plain values."""

from __future__ import annotations

import time

from ray import tune

from raytrain import runs
from raytrain.storage import Location
from raytrain.tune import params_text, trial_name


class TrialLines(tune.Callback):
    def __init__(self, metric: str, epochs: int):
        self.metric, self.epochs = metric, epochs

    def _line(self, text: str) -> None:
        print(text, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._line(f"{trial_name(trial.trial_id)}  started  {params_text(trial.config)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        shown = f"{value:.4f}" if isinstance(value, float) else "-"
        self._line(
            f"{trial_name(trial.trial_id)}  epoch {result.get('epoch')}/{self.epochs}  "
            f"{self.metric} {shown}"
        )

    def on_trial_complete(self, iteration, trials, trial, **info):
        done = (trial.last_result or {}).get("epoch", 0)
        how = "finished" if done >= self.epochs else f"stopped by ASHA after epoch {done}"
        self._line(f"{trial_name(trial.trial_id)}  {how}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(f"{trial_name(trial.trial_id)}  failed (sweep.json says why)")


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
