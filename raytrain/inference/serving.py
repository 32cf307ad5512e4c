"""A trained model as an HTTP service on Ray Serve: ``POST /predict`` with raw records as the
training data had them, ``GET /`` describing the model, ``GET /healthz``, and FastAPI's own
``/docs`` and ``/openapi.json``.

    from raytrain.inference.serving import Options, app
    serve.run(app(Options(checkpoint="runs/r/checkpoint_epoch_000010")), route_prefix="/")

``app`` is also the import path of a Serve config file (``raytrain.inference.serving:app``, its
``args`` an ``Options``), which is what ``raytrain serve --print-config`` writes for ``serve
deploy`` and a KubeRay RayService.

Each replica loads the checkpoint once (the SHA-256 check) and builds its FastAPI app from it:
one field per input column, so that FastAPI and pydantic validate every request and the OpenAPI
page shows the columns. A request's records become an Arrow table and go through the code batch
prediction uses (raytrain.inference.scoring): the same encoding, the same answers. Only the
model's forward pass is batched across requests (``@serve.batch``), so that one bad request
never fails the others in its batch: it is refused before it joins one.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

BODY_LIMIT = 1 << 20  # bytes of one request's body, unless Options.max_body_bytes says otherwise


class Options(BaseModel):
    """How the deployment serves; the ``args`` of the application in a Serve config file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: str = Field(description="The checkpoint directory: a path or a URI.")
    chosen: str = Field("the checkpoint given", description="Why this checkpoint, for GET /.")
    replicas: int = Field(1, ge=1, description="Replicas (fixed); ignored with autoscale.")
    autoscale: tuple[int, int] | None = Field(
        None, description="(min, max) replicas, scaled by Serve on ongoing requests."
    )
    cpus_per_replica: float = Field(1.0, gt=0, description="CPUs reserved per replica.")
    threads: int = Field(1, ge=1, description="Torch threads per replica.")
    max_batch_size: int = Field(32, ge=1, description="Requests per forward pass, at most.")
    batch_wait_ms: float = Field(
        2.0, ge=0, description="How long a batch waits for more requests once it has one."
    )
    max_body_bytes: int = Field(BODY_LIMIT, ge=1, description="A request body's limit.")


@serve.deployment(
    name="model",
    max_ongoing_requests=64,
    # Per-request access log lines cost throughput and say nothing the client does not know.
    logging_config={"enable_access_log": False},
    health_check_period_s=2,
    # Stopping: a replica finishes what it holds within seconds (a forward pass takes
    # milliseconds), so Ctrl-C and scaling down do not wait out Serve's 20 s default.
    graceful_shutdown_wait_loop_s=0.5,
    graceful_shutdown_timeout_s=5,
)
@serve.ingress()
class ModelServer:
    """One replica: the model loaded once, a FastAPI app built from its columns."""

    def __init__(self, options: Options):
        import torch

        from raytrain.inference.trained import load_checkpoint

        torch.set_num_threads(options.threads)
        self.options = options
        self.trained = load_checkpoint(options.checkpoint)
        self.model = self.trained.model()
        self.columns = input_columns(self.trained)
        self._forward.set_max_batch_size(options.max_batch_size)
        self._forward.set_batch_wait_timeout_s(options.batch_wait_ms / 1000)
        self.started = time.time()

    def __serve_build_asgi_app__(self):
        from raytrain.inference.api import build_api

        return build_api(self)

    def describe(self) -> dict[str, Any]:
        """What GET / answers."""
        from raytrain.inference.scoring import regression

        trained = self.trained
        return {
            "run": trained.checkpoint.parent.name,
            "checkpoint": str(trained.checkpoint),
            "chosen": self.options.chosen,
            "epoch": trained.epoch,
            "validation": trained.metrics,
            "task": "regression" if regression(trained) else "classification",
            "classes": class_keys(trained),
            "label": trained.encoding.label if trained.encoding is not None else None,
            "model": trained.config.model.name,
            "columns": self.columns,
            "max_body_bytes": self.options.max_body_bytes,
            "endpoints": {
                "POST /predict": "one record (a JSON object of columns) or a list of them",
                "GET /healthz": "ok while the replica serves",
                "GET /docs": "the OpenAPI page",
            },
        }

    async def answer(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Answers for validated records, in their order. DataError for rows the model cannot
        take (refused here, before the batch)."""
        from raytrain.inference.scoring import answers, features

        x = features(table_of(records, self.columns), self.trained, "the request")
        logits = await self._forward(x)
        return as_json(answers(logits, self.trained), self.trained)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _forward(self, batches: list[np.ndarray]) -> list:
        """One forward pass over the rows of every request in the batch, split back."""
        import torch

        sizes = [len(x) for x in batches]
        with torch.no_grad():
            logits = self.model(torch.from_numpy(np.concatenate(batches)))
        return list(torch.split(logits, sizes))


def app(args: Options) -> Any:
    """The Serve application: one deployment, its replicas as ``args`` say. Serve's application
    builder for config files, too."""
    if isinstance(args, dict):
        args = Options(**args)
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": args.cpus_per_replica}}
    if args.autoscale is not None:
        low, high = args.autoscale
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "initial_replicas": low,
            "target_ongoing_requests": 2 * args.max_batch_size,
        }
    else:
        options["num_replicas"] = args.replicas
    return ModelServer.options(**options).bind(args)


def input_columns(trained) -> list[dict[str, Any]]:
    """The columns a record has, in the order of the training data: each a name, a type
    (``number``, ``numbers`` for one list column, ``category``) and what it takes."""
    encoding = trained.encoding
    if encoding is None:
        numeric, width, vocabularies = trained.feature_columns, trained.features, {}
    else:
        numeric, width = encoding.numeric, encoding.width
        vocabularies = dict(zip(encoding.categorical, encoding.vocabularies, strict=True))
    columns: list[dict[str, Any]] = []
    if len(numeric) == 1 and width > 1:
        columns.append({"name": numeric[0], "type": "numbers", "length": width})
    else:
        columns.extend({"name": name, "type": "number", "missing": "null"} for name in numeric)
    for name, vocabulary in vocabularies.items():
        columns.append(
            {
                "name": name,
                "type": "category",
                "known": len(vocabulary),
                "examples": list(vocabulary[:5]),
                "missing": "null",
            }
        )
    if encoding is None:  # a run without an encoding: a missing value cannot be imputed
        for column in columns:
            column.pop("missing", None)
    return columns


def table_of(records: list[dict[str, Any]], columns: list[dict[str, Any]]):
    """Validated records as an Arrow table of the raw columns (a category as a string, as the
    vocabularies hold them: booleans 'true'/'false', integers their digits)."""
    import pyarrow as pa

    arrays = {}
    for column in columns:
        name, kind = column["name"], column["type"]
        values = [record[name] for record in records]
        if kind == "number":
            arrays[name] = pa.array(values, pa.float64())
        elif kind == "numbers":
            arrays[name] = pa.array(values, pa.list_(pa.float64()))
        else:
            arrays[name] = pa.array([_category(v) for v in values], pa.string())
    return pa.table(arrays)


def _category(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def class_keys(trained) -> list[str] | None:
    """The classes as the answers name them (their names, or their indexes as strings)."""
    from raytrain.inference.scoring import regression

    if regression(trained):
        return None
    if trained.class_names is not None:
        return list(trained.class_names)
    return [str(i) for i in range(trained.classes)]


def as_json(answers, trained) -> list[dict[str, Any]]:
    """Per record: the prediction, and (classification) each class's probability by name."""
    prediction = answers.prediction.tolist()
    if answers.probabilities is None:
        return [{"prediction": value} for value in prediction]
    keys = class_keys(trained)
    return [
        {"prediction": p, "probabilities": dict(zip(keys, row, strict=True))}
        for p, row in zip(prediction, answers.probabilities.tolist(), strict=True)
    ]
