"""The sweep file: a raytrain config (the base every trial starts from) plus a ``sweep:`` section
saying what to search, how, and by which metric. Read and checked here, before Ray starts; turned
into Ray Tune's search space, search algorithm and scheduler by raytrain.sweep.tuner.

    train: {epochs: 3}
    scaling: {workers: 2}
    sweep:
      trials: 8                 # samples of the space (a grid: every point this many times)
      concurrent: 2             # trials at once
      metric: val_loss          # default: run.checkpoint_metric; mode follows the name
      search: random            # random | grid | optuna
      scheduler: asha           # asha | none
      space:
        train.lr: {loguniform: [0.001, 0.3]}
        model.name: {choice: [simple, mlp]}
        train.batch_size: {grid: [32, 64]}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from raytrain import config
from raytrain.config import ConfigError, Metric
from raytrain.storage import Location
from raytrain.train.stopping import mode_of

KINDS = ("choice", "grid", "uniform", "loguniform", "randint")


class SweepConfig(BaseModel):
    """The ``sweep:`` section."""

    model_config = ConfigDict(extra="forbid")

    trials: int = Field(8, ge=1, description="How many trials (samples of the space).")
    concurrent: int = Field(2, ge=1, description="How many trials run at once.")
    metric: Metric | None = Field(
        None, description="What the sweep optimises; default: the base config's checkpoint metric."
    )
    search: Literal["random", "grid", "optuna"] = Field(
        "random", description="random (and grid points), or Optuna's TPE (the optuna extra)."
    )
    scheduler: Literal["asha", "none"] = Field(
        "asha", description="ASHA stops trials whose metric lags at each rung; none runs all."
    )
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial runs at least.")
    reduction_factor: float = Field(2, gt=1, description="ASHA: 1/this of trials go on per rung.")
    seed: int = Field(0, ge=0, description="Seed of the search (which points are drawn).")
    space: dict[str, dict[str, list[Any]]] = Field(
        ..., description="Dotted config field -> {kind: values}; kinds: " + ", ".join(KINDS)
    )

    @field_validator("space")
    @classmethod
    def _kinds(cls, space: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        if not space:
            raise ValueError("the search space is empty: name at least one field")
        for field, spec in space.items():
            if len(spec) != 1 or next(iter(spec)) not in KINDS:
                raise ValueError(
                    f"{field}: give one of {', '.join(KINDS)} with its values, e.g. "
                    "{loguniform: [0.001, 0.1]}"
                )
            kind, values = next(iter(spec.items()))
            if not isinstance(values, list) or not values:
                raise ValueError(f"{field}: {kind} needs a list of values")
            if kind in ("uniform", "loguniform", "randint") and (
                len(values) != 2 or not values[0] < values[1]
            ):
                raise ValueError(f"{field}: {kind} needs [low, high] with low < high")
            if kind == "loguniform" and values[0] <= 0:
                raise ValueError(f"{field}: loguniform needs a low above 0")
        return space

    @property
    def mode(self) -> str:
        return mode_of(self.metric or "val_loss")


class SweepError(ConfigError):
    """A sweep file that cannot be used (one sentence naming the file and the field)."""


def load(path: str | Path) -> tuple[dict[str, Any], SweepConfig]:
    """The base config (a checked ``Config.to_dict()``) and the sweep section of a sweep file.
    Every point of the space is checked against the config schema: a field that does not exist
    or a value it refuses is an error now, not in the middle of the sweep."""
    raw = _read(str(path))
    section = raw.pop("sweep", None)
    if not isinstance(section, dict):
        raise SweepError(f"sweep file {str(path)!r} has no sweep: section (see docs/sweeps.md)")
    base = config.load(base=raw)
    try:
        sweep = SweepConfig.model_validate(section)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise SweepError(f"sweep file {str(path)!r}: sweep.{where}: {message}") from None
    base = keep_what_is_ranked(path, raw, base, sweep)
    if sweep.metric is None:
        sweep = sweep.model_copy(update={"metric": base.run.checkpoint_metric})
    for field, spec in sweep.space.items():
        kind, values = next(iter(spec.items()))
        for value in values if kind in ("choice", "grid") else values[:2]:
            try:
                trial_config(base.to_dict(), {field: value})
            except ConfigError as e:
                raise SweepError(f"sweep file {str(path)!r}: sweep.space.{field}: {e}") from None
    if sweep.search == "grid" and any(next(iter(s)) != "grid" for s in sweep.space.values()):
        raise SweepError(
            f"sweep file {str(path)!r}: search: grid takes only grid: values in the space; use "
            "search: random to mix grid points with sampled ones"
        )
    return base.to_dict(), sweep


def keep_what_is_ranked(
    path: str | Path, raw: dict[str, Any], base: config.Config, sweep: SweepConfig
) -> config.Config:
    """The base config with which every trial keeps the checkpoint the sweep ranks it by: its
    best checkpoint is chosen by the sweep's metric, and every epoch that improves it writes
    one (``train.checkpoint_best``, unless the file sets it)."""
    given = (raw.get("run") or {}).get("checkpoint_metric")
    if sweep.metric is not None and given is not None and given != sweep.metric:
        raise SweepError(
            f"sweep file {str(path)!r}: sweep.metric {sweep.metric} and run.checkpoint_metric "
            f"{given} differ; a trial keeps its best checkpoint by the metric the sweep ranks "
            "it by: drop one of them"
        )
    flags: dict[str, Any] = {"run.checkpoint_metric": sweep.metric or base.run.checkpoint_metric}
    if (raw.get("train") or {}).get("checkpoint_best") is None:
        flags["train.checkpoint_best"] = True
    return config.load(base=base.to_dict(), flags=flags)


def trial_config(base: dict[str, Any], params: dict[str, Any], **flags: Any) -> config.Config:
    """The config of one trial: the base with the trial's ``params`` (dotted names) and
    ``flags`` (dotted names too: its run name and storage) set."""
    return config.load(base=base, flags={**params, **flags})


def _read(path: str) -> dict[str, Any]:
    where = Location.of(path)
    if not where.is_file():
        raise SweepError(f"sweep file {path!r} does not exist")
    try:
        data = yaml.safe_load(where.read_text())
    except yaml.YAMLError:
        raise SweepError(f"sweep file {str(path)!r} is not valid YAML") from None
    if not isinstance(data, dict):
        raise SweepError(f"sweep file {str(path)!r} must hold config sections and a sweep: section")
    return data
