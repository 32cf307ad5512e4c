"""The HTTP interface of a served model (raytrain.inference.serving), as a FastAPI app built per
replica from the model's input columns.

``POST /predict`` takes one record (``{"column": value, ...}``) or a list of records and answers
``{"predictions": [...]}``, one per record in the order sent: ``{"prediction": ...,
"probabilities": {class: p, ...}}``, or ``{"prediction": value}`` for a regression. A column's
value may be ``null`` (a missing value, imputed as in training); a column that is absent, a
string where a number is needed, an empty list, or a body over the limit is refused with one
line naming what is wrong: ``{"error": "..."}``, status 422 (413 for the body's size, 400 for
a body that is not JSON). Columns the model does not read are ignored.
"""

# No "from __future__ import annotations": FastAPI reads the endpoints' annotations at run time.

import json
from typing import Annotated, Any

from fastapi import Body, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, Strict, StrictBool, StrictInt, StrictStr
from typing_extensions import TypedDict  # pydantic needs it (not typing's) before 3.12

from raytrain.data.files import DataError

Number = Annotated[float, Strict()] | None  # an integer is a number; "1.5" is not


def build_api(server) -> FastAPI:
    """The app of one replica (a raytrain.inference.serving.ModelServer)."""
    columns = server.columns
    record = record_model(columns)
    body_type = Annotated[list[record], Field(min_length=1)] | record
    api = FastAPI(
        title=f"raytrain: {server.trained.checkpoint.parent.name}",
        description=f"The model of {server.trained.checkpoint}; GET / describes it.",
    )
    api.add_middleware(BodyLimit, limit=server.options.max_body_bytes)

    @api.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError) -> JSONResponse:
        status, message = refusal(exc.errors(), exc.body, columns)
        return JSONResponse({"error": message}, status_code=status)

    @api.post("/predict", responses={200: {"model": Predictions}})
    async def predict(body: Annotated[body_type, Body()]) -> JSONResponse:
        records = body if isinstance(body, list) else [body]
        try:
            answered = await server.answer(records)
        except DataError as e:
            return JSONResponse({"error": str(e)}, status_code=422)
        return JSONResponse({"predictions": answered})

    @api.get("/")
    async def describe() -> dict[str, Any]:
        return server.describe()

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return api


class Predictions(BaseModel):
    """The answer to POST /predict (for the OpenAPI page)."""

    predictions: list[dict[str, Any]] = Field(
        description="Per record, in the order sent: the prediction, and for a classification "
        "each class's probability by class name."
    )


def record_model(columns: list[dict[str, Any]]) -> type:
    """One record's type: a key per input column, by the column's own name (a TypedDict:
    pydantic validates it into a plain dict, and FastAPI shows its schema); other keys are
    ignored."""
    fields: dict[str, Any] = {}
    for column in columns:
        kind = column["type"]
        if kind == "number":
            annotation = Number
        elif kind == "numbers":
            n = column["length"]
            annotation = Annotated[list[float], Field(min_length=n, max_length=n)]
        else:
            annotation = StrictStr | StrictInt | StrictBool | None
        fields[column["name"]] = Annotated[annotation, Field(description=expected(column))]
    return TypedDict("Record", fields)


def expected(column: dict[str, Any]) -> str:
    """What a column takes, in words."""
    kind = column["type"]
    if kind == "number":
        return "a number, or null for a missing value" if "missing" in column else "a number"
    if kind == "numbers":
        return f"a list of {column['length']} numbers"
    examples = ", ".join(repr(v) for v in column["examples"][:3])
    return f"a category (a string such as {examples}; an unknown one is allowed), or null"


def refusal(errors, body, columns) -> tuple[int, str]:
    """One line for what pydantic found wrong with a body: (status, message)."""
    invalid = [e for e in errors if e["type"] == "json_invalid"]
    if invalid:
        return 400, f"the body is not valid JSON ({invalid[0].get('ctx', {}).get('error', '')})"
    if isinstance(body, bytes):  # sent as another content type: FastAPI did not parse it
        return 415, "the body is not sent as JSON; send it with Content-Type: application/json"
    if body is None:
        return 422, "the body is empty; send one record (a JSON object of columns) or a list"
    if isinstance(body, list):
        branch, where = "list", "record {}"
    elif isinstance(body, dict):
        branch, where = "Record", None
    else:
        return 422, (
            f"the body is {_shown(body)}; send one record (a JSON object of columns) or a list "
            "of records"
        )
    mine = [e for e in errors if len(e["loc"]) > 1 and str(e["loc"][1]).startswith(branch)]
    mine = mine or errors
    first = mine[0]
    loc = list(first["loc"][2:])
    prefix = ""
    if where is not None and loc and isinstance(loc[0], int):
        prefix = where.format(loc.pop(0)) + ": "
    if not loc:
        if first["type"] == "too_short":
            return 422, "the body is an empty list; send one record or a list of records"
        return 422, f"{prefix}{_shown(first.get('input'))} is not a record (a JSON object)"
    name = str(loc[0])
    column = next((c for c in columns if c["name"] == name), None)
    wants = expected(column) if column is not None else "a value"
    places = {tuple(e["loc"][: 4 if where else 3]) for e in mine}  # (body, branch, [i,] column)
    more = f" (and {len(places) - 1} more problem(s))" if len(places) > 1 else ""
    if first["type"] == "missing":
        return 422, f"{prefix}column {name!r} is missing; expected {wants}{more}"
    return 422, f"{prefix}column {name!r} is {_shown(first.get('input'))}; expected {wants}{more}"


def _shown(value: Any) -> str:
    """A value as the client sent it (JSON)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class BodyLimit:
    """Refuse a request whose body is over ``limit`` bytes (413) by its Content-Length, or, for
    a body sent in chunks, once that much has arrived: the replica never holds more."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.limit:
                return await self._refuse(send, f"{int(length):,} bytes")
            return await self.app(scope, receive, send)
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                return await self._refuse(send, f"more than {self.limit:,} bytes")
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)

    async def _refuse(self, send, size: str) -> None:
        message = (
            f"the body has {size}, over this service's limit of {self.limit:,} bytes; send "
            "fewer records per request"
        )
        await JSONResponse({"error": message}, status_code=413)({"type": "http"}, None, send)
