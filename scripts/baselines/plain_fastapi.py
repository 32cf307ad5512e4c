"""A plain FastAPI app serving a raytrain model: what a user would write by hand, no Ray.

    RAYTRAIN_CHECKPOINT=runs/r/checkpoint_epoch_000003 uvicorn plain_fastapi:app --workers 1

One uvicorn worker, one torch thread. ``POST /predict`` takes one record or a list of records
(JSON objects of the raw columns), reads them into an Arrow table, encodes them with the
checkpoint's encoding, runs the model (scaling folded in), and answers the class and its
probabilities per record, as raytrain serve does, but without batching across requests,
without per-field validation and without replicas.
"""

import os

import numpy as np
import pyarrow as pa
import torch
from fastapi import FastAPI, Request

from raytrain.inference.trained import load_checkpoint

torch.set_num_threads(1)
trained = load_checkpoint(os.environ["RAYTRAIN_CHECKPOINT"])
model = trained.model()
encoding = trained.encoding
classes = list(trained.class_names or [str(i) for i in range(trained.classes)])
app = FastAPI()


@app.post("/predict")
async def predict(request: Request) -> dict:
    body = await request.json()
    records = body if isinstance(body, list) else [body]
    table = pa.Table.from_pylist(records)
    x = torch.from_numpy(np.ascontiguousarray(encoding.encode(table), dtype=np.float32))
    with torch.no_grad():
        probabilities = torch.softmax(model(x), dim=1).numpy()
    best = probabilities.argmax(axis=1)
    return {
        "predictions": [
            {
                "prediction": classes[b],
                "probabilities": dict(zip(classes, p.tolist(), strict=False)),
            }
            for b, p in zip(best, probabilities, strict=False)
        ]
    }
