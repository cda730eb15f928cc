"""The benchmark's single-process peers for the embedding and entity tasks, served the way their users
serve them: one FastAPI process on uvicorn, the model loaded once at start, a synchronous route (FastAPI
runs each request in its thread pool, so concurrent requests run at once, each on torch's default threads).

* ``feature-extraction`` (``TASK_PEER_EMBED``, a folder): sentence-transformers, ``SentenceTransformer(path)``
  and ``encode(texts)`` with its defaults (its own pooling and normalisation, batches of 32 within a request);
* ``token-classification`` (``TASK_PEER_NER``, a folder): transformers' ``pipeline("token-classification",
  aggregation_strategy="simple")``, called on the request's texts.

Neither batches requests together: each request is one ``encode`` or one pipeline call. The models' ids are
``TASK_PEER_EMBED_ID`` and ``TASK_PEER_NER_ID`` (default ``embed`` and ``ner``); ``POST /predict`` takes the
app's native body and answers its shape (``model_id``, ``predictions``), ``GET /info`` says how it runs.

    TASK_PEER_EMBED=models/embed TASK_PEER_NER=models/ner uvicorn bench.task_peer:app --port 8002
"""

from __future__ import annotations

import os
from typing import Any

import torch
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from sentence_transformers import SentenceTransformer
from transformers import pipeline

EMBED_ID = os.environ.get("TASK_PEER_EMBED_ID", "embed")
NER_ID = os.environ.get("TASK_PEER_NER_ID", "ner")

embedder = SentenceTransformer(os.environ["TASK_PEER_EMBED"], device="cpu")
tagger = pipeline(
    "token-classification", model=os.environ["TASK_PEER_NER"], aggregation_strategy="simple", device="cpu"
)
app = FastAPI(title="single-process task peers")


class Body(BaseModel):
    model_id: str
    input_data: str | list[str]


def _plain(entity: dict[str, Any]) -> dict[str, Any]:
    """An entity of the pipeline's answer with JSON types (its scores are numpy floats)."""
    return {k: float(v) if k == "score" else v for k, v in entity.items()}


@app.get("/info")
def info() -> dict:
    return {
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "models": {EMBED_ID: "sentence-transformers encode", NER_ID: "transformers token-classification pipeline"},
    }


@app.post("/predict")
def predict(body: Body) -> dict:
    texts = [body.input_data] if isinstance(body.input_data, str) else body.input_data
    if body.model_id == EMBED_ID:
        predictions: list[Any] = [{"embedding": v.tolist()} for v in embedder.encode(texts)]
    elif body.model_id == NER_ID:
        found = tagger(texts)
        predictions = [[_plain(e) for e in entities] for entities in found]
    else:
        raise HTTPException(404, f"no model {body.model_id!r} here")
    return {"model_id": body.model_id, "predictions": predictions}
