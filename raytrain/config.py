"""raytrain's configuration: one typed, validated, frozen object, built once on the driver.

The schema below is the only place defaults live. Every field's description is its ``--help``
text, and the command line's flags are derived from it (``raytrain.commands.args``):
``--section.field VALUE`` for every field, plus the short flags a field names in its ``flag``
entry (``--workers``).
``PRECEDENCE`` says which source wins.

Why one long module (about 480 lines): the schema is the one place defaults and their
descriptions live, section after section, with the loading and the one-line errors beside it;
a reader looks for a setting here and nowhere else.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raytrain.errors import UserError

PRECEDENCE = (
    "Settings come from, lowest to highest: the built-in defaults, then --config FILE, then "
    "--set section.field=value (in the order given), then the flags."
)
# The metrics that can pick the best checkpoint, stop early and rank a sweep's trials.
Metric = Literal[
    "val_loss",
    "val_accuracy",
    "val_auc",
    "val_f1",
    "val_log_loss",
    "val_rmse",
    "val_mae",
    "val_r2",
    "loss",
    "accuracy",
]
MAX_SEED = 2**63 - 1  # torch's generators and numpy's SeedSequence both take 0..2**63-1


class ConfigError(UserError):
    """A configuration a user got wrong: the message is one sentence, shown without a traceback."""


class _Section(BaseModel):
    # frozen: built once on the driver and only read after that; forbid: a misspelt key is an
    # error; no inf/nan: a float that is not finite never reaches torch.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False, allow_inf_nan=False)


def _flag(name: str) -> dict[str, str]:
    """A short command-line flag for a field (``--workers`` for ``scaling.workers``)."""
    return {"flag": name}


class DataConfig(_Section):
    """Where the training data comes from and how it is split."""

    path: str | None = Field(
        None,
        description="Parquet file or directory to train on (a local path, or a URI pyarrow "
        "understands). Unset: synthetic data.",
    )
    val_path: str | None = Field(
        None, description="Parquet validation data. Unset: hold out val_fraction of the rows."
    )
    feature_columns: tuple[str, ...] | None = Field(
        None,
        min_length=1,
        description="Files: the feature columns (one fixed-size-list column, or numeric and "
        "categorical columns). Unset: every column but the label.",
    )
    label_column: str = Field(
        "y",
        description="Files: the label column: class indexes 0..k-1, or class names (strings, "
        "booleans).",
    )
    categorical_columns: tuple[str, ...] | None = Field(
        None,
        description="Feature columns taken as categories besides those whose type says so "
        "(strings, booleans, dictionaries), e.g. an integer code column.",
    )
    max_categories: int = Field(
        100,
        ge=1,
        description="Values per categorical column the model tells apart: the most frequent in "
        "the training split; rarer ones and ones never seen share an 'unknown' code.",
    )
    missing: Literal["impute", "error"] = Field(
        "impute",
        description="Missing numeric values (null, NaN): 'impute' fills them with the training "
        "mean and adds a 0/1 'was missing' feature per such column; 'error' refuses them.",
    )
    ingest: Literal["auto", "memory", "stream"] = Field(
        "auto",
        description="'memory': every worker copies the training split into memory once; "
        "'stream': every worker reads its share every epoch (its row groups of Parquet files; "
        "a Ray Data shard of CSV); 'auto': memory when the copies fit in memory_limit_mb.",
    )
    memory_limit_mb: float = Field(
        1024,
        gt=0,
        description="'auto' keeps the training split in memory when the copies of it on one "
        "node (one per worker there) take at most this many MB.",
    )
    normalize: Literal["auto", "none", "standard"] = Field(
        "auto",
        description="'standard': scale every feature to mean 0 and std 1 with the training "
        "split's statistics (kept in the checkpoint, applied wherever the model is used); "
        "'auto': standard for Parquet and CSV data, none for synthetic data.",
    )
    samples: int = Field(1000, ge=2, description="Rows of synthetic data (train + validation).")
    features: int = Field(10, ge=1, description="Features per row of synthetic data.")
    classes: int = Field(
        2, ge=2, description="Classes of synthetic data (Parquet: the largest label + 1)."
    )
    labels: Literal["rule", "random"] = Field(
        "rule",
        description="'rule': labels follow a hidden linear rule plus noise, so learning shows; "
        "'random': torch.randint labels, exactly as in the tutorial (nothing to learn).",
    )
    label_noise: float = Field(
        0.5, ge=0, description="Std of the Gaussian noise added to the hidden rule's logits."
    )
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of rows held out for validation."
    )
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="Seed for generating and splitting the synthetic data."
    )


class ModelConfig(_Section):
    """Which model to train."""

    name: str = Field(
        "simple",
        description="'simple': the tutorial's nn.Linear; 'mlp': Linear+ReLU layers; or your own "
        "nn.Module as 'package.module:ClassName'.",
    )
    hidden: tuple[int, ...] = Field(
        (64,), description="Hidden layer sizes of the 'mlp' model (ignored by 'simple')."
    )
    kwargs: dict[str, Any] = Field(
        {}, description="Keyword arguments for your own model class (besides features, classes)."
    )
    task: Literal["auto", "classification", "regression"] = Field(
        "auto",
        description="'classification' of a label of class indexes or names; 'regression' of a "
        "numeric target; 'auto': regression for a floating-point label, else classification.",
    )
    embedding_dim: int | None = Field(
        None,
        ge=1,
        description="Width of each categorical column's learned embedding. Unset: about "
        "1.6 x codes^0.56, at most 16.",
    )

    @field_validator("name")
    @classmethod
    def _known_or_importable_name(cls, v: str) -> str:
        module, sep, attr = v.partition(":")
        if v in ("simple", "mlp") or (sep and module and attr):
            return v
        raise ValueError(f"must be 'simple', 'mlp' or 'package.module:ClassName', got {v!r}")

    @field_validator("hidden")
    @classmethod
    def _positive_sizes(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(h < 1 for h in v):
            raise ValueError(f"hidden sizes must be >= 1, got {list(v)}")
        return v


class EarlyStopping(_Section):
    """Stop when the checkpoint metric has not improved for a while."""

    patience: int | None = Field(
        None,
        ge=1,
        description="Stop after this many validations without an improvement of "
        "run.checkpoint_metric. Unset: never stop early.",
    )
    min_delta: float = Field(
        0.0, ge=0, description="The least change of the metric that counts as an improvement."
    )


class PowerSGD(_Section):
    """PowerSGD's settings (train.gradient_compression: powersgd): torch's hook, its names."""

    rank: int = Field(
        2,
        ge=1,
        description="The rank of each gradient matrix's approximation: higher is closer to the "
        "exact all-reduce and sends more (torch's matrix_approximation_rank).",
    )
    warm_start: bool = Field(
        True,
        description="Start each step's power iteration from the last step's factors (cheaper "
        "and closer; they are kept in checkpoints).",
    )
    start_iter: int = Field(
        10,
        ge=2,
        description="Steps of exact all-reduce before PowerSGD takes over (torch's "
        "start_powerSGD_iter; at least 2 with its error feedback).",
    )


class TrainConfig(_Section):
    """The optimisation: the same numbers mean the same maths for any worker count."""

    epochs: int = Field(10, ge=1, description="Passes over the training split.", **_flag("epochs"))
    batch_size: int = Field(
        32,
        ge=1,
        description="Global batch size, dealt out across all workers at every step.",
        **_flag("batch-size"),
    )
    lr: float = Field(
        0.01,
        gt=0,
        description="Learning rate, applied to the global batch (the peak, after any warm-up).",
        **_flag("lr"),
    )
    optimizer: Literal["sgd", "adam", "adamw"] = Field(
        "sgd", description="torch.optim.SGD (the tutorial's), Adam or AdamW."
    )
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum (the tutorial uses none).")
    nesterov: bool = Field(False, description="SGD with Nesterov momentum (needs momentum > 0).")
    weight_decay: float = Field(
        0.0, ge=0, description="Weight decay (AdamW: decoupled; SGD and Adam: L2 in the gradient)."
    )
    scheduler: Literal["constant", "step", "cosine"] = Field(
        "constant",
        description="How the learning rate changes from epoch to epoch after the warm-up: not at "
        "all, times gamma every step_size epochs, or down to 0 along a cosine by the last epoch.",
    )
    warmup_epochs: int = Field(
        0,
        ge=0,
        description="Epochs over which the learning rate rises linearly to lr before the "
        "scheduler takes over (epoch e of the warm-up trains at lr * (e + 1) / (warmup + 1)).",
    )
    step_size: int = Field(10, ge=1, description="'step' scheduler: epochs between decays.")
    gamma: float = Field(0.1, gt=0, le=1, description="'step' scheduler: factor of each decay.")
    grad_clip: float | None = Field(
        None, gt=0, description="Clip the global batch's gradient to this L2 norm. Unset: no clip."
    )
    shuffle: bool = Field(True, description="Reshuffle the training rows every epoch (seeded).")
    gradient_compression: Literal["none", "fp16", "powersgd"] = Field(
        "none",
        description="How DDP sends the gradients between workers: 'none' (float32, exactly one "
        "process's arithmetic), 'fp16' (half the bytes, rounded), or 'powersgd' (a low-rank "
        "approximation with error feedback: far fewer bytes, approximate). For slow networks.",
    )
    powersgd: PowerSGD = Field(PowerSGD(), description="rank, warm_start, start_iter.")
    loss: Literal["mse", "huber"] = Field(
        "mse",
        description="Regression's loss on the standardised target: 'mse' (squared error), or "
        "'huber' (squared near 0, linear beyond 1 standard deviation: outliers pull less).",
    )
    class_weight: Literal["none", "balanced"] = Field(
        "none",
        description="'balanced': weigh each class's loss by rows / (classes x its training "
        "rows), so that a rare class counts as much as a common one (imbalanced labels).",
    )
    seed: int = Field(
        0,
        ge=0,
        le=MAX_SEED,
        description="Seed for the model's initial weights and the shuffle order.",
        **_flag("seed"),
    )
    validate_every: int = Field(
        1,
        ge=0,
        description="Validate on the held-out rows every N epochs, on all workers in parallel "
        "(0: only at the end); every epoch that writes a checkpoint is validated too.",
    )
    early_stopping: EarlyStopping = Field(
        EarlyStopping(), description="patience and min_delta: see the fields."
    )
    checkpoint_every: int = Field(
        5, ge=0, description="Write a checkpoint every N epochs (0: only at the end, always then)."
    )
    checkpoint_best: bool = Field(
        False,
        description="Also write a checkpoint at every epoch whose run.checkpoint_metric is the "
        "best so far, so that the best checkpoint is the best epoch validated (a sweep's "
        "trials do this unless the sweep file says otherwise).",
    )
    checkpoints_to_keep: int = Field(
        2,
        ge=1,
        description="How many of the best checkpoints (by run.checkpoint_metric) to keep; the "
        "latest is always kept too, for resuming.",
    )


class ScalingConfig(_Section):
    """How many workers, and what each one gets."""

    workers: int = Field(
        2,
        ge=1,
        description="Number of Ray Train workers (processes), or an elastic range MIN-MAX (2-8): "
        "start with as many as the cluster holds, at least MIN, and grow up to MAX.",
        **_flag("workers"),
    )
    min_workers: int | None = Field(
        None,
        ge=1,
        description="Set for an elastic run (what --workers MIN-MAX sets): the fewest workers "
        "to start with.",
    )
    cpus_per_worker: float | None = Field(
        None,
        gt=0,
        description="CPUs reserved per worker; torch uses that many threads. Unset: 1, or a fair "
        "share of the cores when an embedded Ray has fewer cores than workers.",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places workers on nodes."
    )

    @model_validator(mode="before")
    @classmethod
    def _elastic_range(cls, data: Any) -> Any:
        """``workers: MIN-MAX`` is an elastic range: workers = MAX, min_workers = MIN."""
        workers = data.get("workers") if isinstance(data, dict) else None
        if not isinstance(workers, str):
            return data
        low, sep, high = workers.strip().partition("-")
        if not (low.strip().isdigit() and (not sep or high.strip().isdigit())):
            raise ValueError(
                f"scaling.workers {workers!r} should be a count (4) or an elastic range "
                "MIN-MAX (2-8)"
            )
        data = {**data, "workers": int(high if sep else low)}
        if sep:
            data["min_workers"] = int(low)
        return data


class MlflowConfig(_Section):
    """Track the run in MLflow: parameters, every epoch's metrics, results.json, the report and
    the best checkpoint (the mlflow extra)."""

    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking server (http://host:5000) or store (sqlite:///mlflow.db). "
        "Unset: no tracking.",
    )
    experiment: str = Field("raytrain", description="The MLflow experiment the run goes into.")


class RunConfig(_Section):
    """Where the run happens and where its results go."""

    name: str | None = Field(
        None,
        description="Run name (a directory under storage_path). Unset: a fresh timestamped name.",
        **_flag("name"),
    )
    storage_path: str = Field(
        "runs",
        description="Where run directories go: a directory (shared by every node on a cluster) "
        "or an object-store URI (s3://bucket/prefix, gs://...; ?endpoint_override=HOST:PORT"
        "&scheme=http for an S3-compatible server).",
        **_flag("storage-path"),
    )
    address: str | None = Field(
        None,
        description="Ray cluster to join ('auto', 'host:port'). Unset: RAY_ADDRESS, else an "
        "embedded Ray on this machine.",
        **_flag("address"),
    )
    checkpoint_metric: Metric = Field(
        "val_loss",
        description="What makes a checkpoint the best (lowest loss and log loss, highest "
        "accuracy, AUC and F1): the one the driver validates at the end, and what early "
        "stopping watches.",
    )
    max_failures: int = Field(
        2, ge=0, description="Worker-group failures Ray Train recovers from before giving up."
    )
    verbose: bool = Field(
        False, description="Show Ray's own logs and worker output.", **_flag("verbose")
    )
    mlflow: MlflowConfig = Field(
        MlflowConfig(), description="tracking_uri and experiment: see the fields."
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or v in (".", "..")):
            raise ValueError(f"must be a plain directory name without '/', got {v!r}")
        return v


class Config(_Section):
    """The whole configuration of one run."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        workers = self.scaling.workers
        if self.scaling.min_workers is not None and self.scaling.min_workers > workers:
            raise ValueError(
                f"scaling.min_workers = {self.scaling.min_workers} is more than scaling.workers = "
                f"{workers}; an elastic range is MIN-MAX with MIN <= MAX"
            )
        if self.train.batch_size < workers:
            raise ValueError(
                f"train.batch_size = {self.train.batch_size} is smaller than scaling.workers = "
                f"{workers}: every worker needs at least one row per step; use a batch size of "
                f"at least {workers}"
            )
        train = self.train
        if train.nesterov and (train.optimizer != "sgd" or train.momentum == 0):
            raise ValueError(
                "train.nesterov needs train.optimizer = sgd and train.momentum > 0, got "
                f"optimizer {train.optimizer} and momentum {train.momentum}"
            )
        if train.warmup_epochs >= train.epochs:
            raise ValueError(
                f"train.warmup_epochs = {train.warmup_epochs} is not shorter than the run's "
                f"{train.epochs} epochs; use fewer warm-up epochs or more epochs"
            )
        n_val = math.ceil(self.data.samples * self.data.val_fraction)
        if self.data.samples - n_val < 1:
            raise ValueError(
                f"data.samples = {self.data.samples} with data.val_fraction = "
                f"{self.data.val_fraction} leaves no training rows"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-ready dict (what checkpoints and results files store)."""
        return self.model_dump(mode="json")


def sections() -> dict[str, type[_Section]]:
    """The config's sections by name, in order: what the command line makes flag groups of."""
    return {name: field.annotation for name, field in Config.model_fields.items()}  # type: ignore[misc]


def load(
    path: str | Path | None = None,
    overrides: list[str] = (),
    flags: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> Config:
    """Build the Config: defaults < file < ``overrides`` ("a.b=value") < ``flags`` (dotted keys,
    values as typed on the command line).

    ``base`` (a saved ``Config.to_dict()``, when resuming a run) takes the place of the file.
    """
    raw: dict[str, Any] = _read_file(Path(path)) if path is not None else {}
    for section, fields in (base or {}).items():
        raw[section] = dict(fields)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is not of the form section.field=value")
        _put(raw, key.strip(), parse_value(value, key.strip()))
    for key, value in (flags or {}).items():
        if value is not None:
            _put(raw, key, value)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping of sections "
            f"({', '.join(Config.model_fields)}), not a {type(data).__name__}"
        )
    return data


def parse_value(text: str, dotted: str = "") -> Any:
    """Read a value typed on the command line for the field ``dotted`` the way YAML would
    (0.1 -> float, [64, 64] -> list), except that a text field takes the text as it is (a run
    named 2024 stays '2024')."""
    field = field_at(dotted)
    if field is not None and field.annotation in (str, str | None):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _put(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``raw[a][b]... = value`` for the dotted key ``a.b...``."""
    *path, field = dotted.split(".")
    if not path:
        raise ConfigError(
            f"--set key {dotted!r} needs a section and a field, e.g. train.lr "
            f"(sections: {', '.join(Config.model_fields)})"
        )
    target = raw
    for i, part in enumerate(path):
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            where = ".".join(path[: i + 1])
            raise ConfigError(f"config section {where!r} must be a mapping, got {target!r}")
    target[field] = value


def field_at(dotted: str):
    """The pydantic field of a dotted name ('train.early_stopping.patience'), or None."""
    model, field = Config, None
    for part in dotted.split("."):
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        model = field.annotation
    return field


def _one_line(error: ValidationError) -> str:
    """Turn pydantic's report into one sentence about the first problem."""
    first = error.errors()[0]
    loc = ".".join(str(part) for part in first["loc"] if not str(part).startswith("function-"))
    kind = first["type"]
    message = first["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        section, _, _ = loc.rpartition(".")
        model = Config if not section else getattr(field_at(section), "annotation", None)
        if model is None or not hasattr(model, "model_fields"):
            return f"unknown config key {loc!r}"
        where = f"section {section!r}" if section else "the top level"
        return f"unknown config key {loc!r}: {where} has {', '.join(model.model_fields)}"
    if kind == "value_error" and (not loc or loc in Config.model_fields):
        return message  # a check across fields, which names them itself
    if kind in ("model_type", "dict_type"):
        return f"config section {loc!r} must be a mapping of fields, got {first.get('input')!r}"
    return f"invalid value for {loc}: {first.get('input')!r} ({message[0].lower() + message[1:]})"
