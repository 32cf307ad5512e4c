"""A trained model, ready to use outside training: find a run's best checkpoint (or take a
checkpoint by its path), load it with the same hash check as a resume, rebuild the model, and fold
the feature scaling into it, so that raw features go in and logits come out (``ScaledModel``).
Batch prediction (raytrain.inference.batch) and export (raytrain.inference.export) start here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from raytrain import config, runs
from raytrain.data.columns import Encoding
from raytrain.data.scaling import Scaling
from raytrain.errors import UserError
from raytrain.model import build_model
from raytrain.storage import Location, StorageError
from raytrain.train import checkpoint
from raytrain.train.stopping import best_of, mode_of


class ScaledModel(nn.Module):
    """A trained model with its feature scaling in front: ``model((x - mean) / std)``, the same
    arithmetic as training's ``Scaling.apply`` (a standard deviation of 0 divides by 1)."""

    def __init__(self, model: nn.Module, scaling: Scaling | None, features: int):
        super().__init__()
        self.model = model
        mean = torch.tensor(scaling.mean if scaling else [0.0] * features, dtype=torch.float32)
        std = torch.tensor(scaling.std if scaling else [1.0] * features, dtype=torch.float32)
        self.register_buffer("mean", mean)
        self.register_buffer("std", torch.where(std > 0, std, torch.ones_like(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


class RawModel(nn.Module):
    """A trained model that takes raw rows, for export: the numeric features as they come (NaN
    where missing), then one integer code per categorical column (the encoding's vocabularies:
    0 a missing value, 1 one outside the vocabulary, 2 + i the vocabulary's i-th value). The
    imputation (the training mean, and the "was missing" features) and the scaling are in the
    graph; a regression's output is in the target's own units."""

    def __init__(self, scaled: ScaledModel, encoding: Encoding):
        super().__init__()
        self.scaled = scaled
        self.width = encoding.width
        self.register_buffer("fill", torch.tensor(encoding.fill, dtype=torch.float32))
        self.register_buffer("indicators", torch.tensor(encoding.indicators, dtype=torch.long))
        target = encoding.target or (0.0, 1.0)
        self.regression = encoding.target is not None
        self.register_buffer("target", torch.tensor(target, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        numeric, codes = x[:, : self.width], x[:, self.width :]
        missing = torch.isnan(numeric)
        filled = torch.where(missing, self.fill, numeric)
        flags = missing.index_select(1, self.indicators).to(x.dtype)
        out = self.scaled(torch.cat([filled, flags, codes], dim=1))
        if self.regression:
            out = out * self.target[1] + self.target[0]
        return out


@dataclass(frozen=True)
class Trained:
    """What a checkpoint holds, checked: the run's config, the data's shape, the scaling and the
    weights."""

    checkpoint: Location
    why: str  # why this checkpoint was chosen, for the console
    epoch: int
    config: config.Config
    features: int
    classes: int
    scaling: Scaling | None
    weights: dict[str, torch.Tensor]
    encoding: Encoding | None = None  # how raw rows become x (files; None: synthetic rows)
    categories: tuple[int, ...] = ()  # codes per categorical column
    metrics: dict[str, Any] = field(default_factory=dict)  # the epoch's, as meta.json has them

    @property
    def feature_columns(self) -> tuple[str, ...]:
        if self.encoding is not None:
            return (*self.encoding.numeric, *self.encoding.categorical)
        return self.config.data.feature_columns or ("x",)

    @property
    def class_names(self) -> tuple[str, ...] | None:
        return self.encoding.class_names if self.encoding is not None else None

    def model(self) -> ScaledModel:
        """A fresh copy of the trained model, scaling folded in, in eval mode."""
        model = build_model(self.config.model, self.features, self.classes, self.categories)
        model.load_state_dict(self.weights)
        return ScaledModel(model, self.scaling, self.features).eval()

    @property
    def raw_features(self) -> int:
        """Features per raw row an export takes: numeric, then one code per categorical column
        (without the "was missing" features, which the graph makes)."""
        if self.encoding is None:
            return self.features
        return self.encoding.width + len(self.encoding.categorical)

    def export_model(self) -> nn.Module:
        """``model()``, taking raw rows (``RawModel``) when the run encoded its columns."""
        model = self.model()
        if self.encoding is None or (self.encoding.plain and self.encoding.target is None):
            return model
        return RawModel(model, self.encoding).eval()

    def describe(self) -> dict[str, Any]:
        """What an exported file or a prediction records about its model."""
        return {
            "checkpoint": str(self.checkpoint),
            "epoch": self.epoch,
            "model": self.config.model.name,
            "feature_columns": list(self.feature_columns),
            "features": self.features,
            "classes": self.classes,
            "class_names": None if self.class_names is None else list(self.class_names),
            "categorical_columns": list(self.encoding.categorical if self.encoding else ()),
            "scaled": self.scaling is not None,
            "encoding": self.encoding.to_dict() if self.encoding is not None else None,
        }


def find_checkpoint(
    target: str, storage_path: str, choose: str | None = None
) -> tuple[Location, str]:
    """The checkpoint ``target`` names, and why it was chosen: a checkpoint directory itself, or
    a run (its directory, or its name under ``storage_path``), whose best checkpoint by the run's
    ``run.checkpoint_metric`` is taken (its latest, where no checkpoint carries the metric), or
    the one ``choose`` names (a checkpoint's directory name, or its epoch)."""
    try:
        candidates = [Location.of(target), Location.of(storage_path) / target]
    except StorageError as e:
        raise UserError(f"{target!r}: {e}") from None
    for place in candidates:
        if (place / checkpoint.META_FILE).is_file():
            if choose is not None:
                raise UserError(f"--checkpoint {choose!r}: {target!r} is a checkpoint already")
            return place, "the checkpoint given"
        if (place / runs.CONFIG_FILE).is_file():
            return best_in_run(place) if choose is None else chosen_in_run(place, choose)
    raise UserError(
        f"{target!r} is not a checkpoint (a directory with {checkpoint.META_FILE}), a run "
        f"directory (with {runs.CONFIG_FILE}) or the name of a run under {storage_path!r}; "
        "`raytrain runs` lists the runs"
    )


def chosen_in_run(run_dir: Location, choose: str) -> tuple[Location, str]:
    """The run's checkpoint named ``choose``: its directory name, or its epoch (``5``)."""
    name = f"checkpoint_epoch_{int(choose):06d}" if choose.isdigit() else choose
    if (run_dir / name / checkpoint.META_FILE).is_file():
        return run_dir / name, "the checkpoint chosen"
    kept = sorted(c.name for c in run_dir.children() if c.name.startswith("checkpoint_epoch_"))
    raise UserError(
        f"--checkpoint {choose!r}: run {run_dir.name!r} has no such checkpoint; it has "
        f"{', '.join(kept) or 'none'} (a name, or an epoch number)"
    )


def best_in_run(run_dir: Location) -> tuple[Location, str]:
    """The run's best checkpoint among those on storage, by the rule training uses to pick it."""
    metric = runs.saved_config(run_dir).get("run", {}).get("checkpoint_metric", "val_loss")
    kept = []
    for child in run_dir.children():
        if child.name.startswith("checkpoint_epoch_"):
            meta = runs.read_json(child / checkpoint.META_FILE)
            if meta is not None and "epoch" in meta:
                kept.append((child, {**meta.get("metrics", {}), "epoch": meta["epoch"]}))
    if not kept:
        raise UserError(
            f"run {run_dir.name!r} in {str(run_dir.parent)!r} has no checkpoint yet (one is "
            "written at the end of training and every train.checkpoint_every epochs)"
        )
    chosen = best_of(kept, metric)
    if chosen is None:
        latest = max(kept, key=lambda cm: cm[1]["epoch"])[0]
        return latest, f"the run's latest: no checkpoint carries {metric}"
    word = "lowest" if mode_of(metric) == "min" else "highest"
    return chosen[0], f"the run's best: the {word} {metric} of {len(kept)} checkpoint(s)"


def load(
    target: str, storage_path: str = config.RunConfig().storage_path, choose: str | None = None
) -> Trained:
    """The trained model ``target`` names (see ``find_checkpoint``), checked and ready to build.
    UserError for a target that does not exist, a damaged checkpoint or a model that cannot be
    built."""
    where, why = find_checkpoint(target, storage_path, choose)
    return load_checkpoint(where, why)


def load_checkpoint(where: Location | str, why: str = "the checkpoint given") -> Trained:
    """Load one checkpoint directory (a path or URI) after its SHA-256 check."""
    where = Location.of(where)
    state = checkpoint.load_at(where)
    cfg = config.load(base=state["config"])
    features, classes = _shape(state, where)
    scaling = state.get("scaling")
    trained = Trained(
        checkpoint=where,
        why=why,
        epoch=state["epoch"],
        config=cfg,
        features=features,
        classes=classes,
        scaling=Scaling(tuple(scaling["mean"]), tuple(scaling["std"])) if scaling else None,
        weights=state["model"],
        encoding=Encoding.from_dict(state["encoding"]) if state.get("encoding") else None,
        categories=tuple((state.get("shape") or {}).get("categories", ())),
        metrics=(runs.read_json(where / checkpoint.META_FILE) or {}).get("metrics", {}),
    )
    try:
        trained.model()  # a custom class that is gone or changed: say so now, in one line
    except RuntimeError as e:
        raise UserError(
            f"checkpoint {str(where)!r}: its weights do not fit model {cfg.model.name!r} as "
            f"it is defined now ({str(e).splitlines()[0]})"
        ) from None
    return trained


def _shape(state: dict[str, Any], where: Location) -> tuple[int, int]:
    """Features per row and classes: recorded in the checkpoint, or (older checkpoints) read
    from the scaling and the validation's confusion matrix."""
    shape = state.get("shape")
    if shape:
        return shape["features"], shape["classes"]
    scaling, validation = state.get("scaling"), state.get("validation")
    if scaling and validation:
        return len(scaling["mean"]), len(validation["confusion"])
    raise checkpoint.CheckpointError(
        f"checkpoint {str(where)!r} does not record its features and classes (written by an "
        "older raytrain); train the run again"
    )
