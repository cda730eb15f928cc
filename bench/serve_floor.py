"""Ray Serve's own floor on this machine: the path a prediction of the app takes, with none of the app's code.

A Serve application of two deployments that `make bench` runs beside the app, in the same Ray instance, the same
mode (config/serve.env: HAProxy, direct ingress, gRPC between replicas) and behind the same HAProxy, under
``/floor``: a FastAPI ingress whose ``POST /floor/hop`` reads the body and makes one handle call (with a
multiplexed model id, as the app's ingress does) to a replica of a second deployment that answers at once,
and whose ``GET /floor/healthz`` answers without a call. Their latencies are the least that Serve's path costs
here: HTTP through HAProxy into an ingress replica, and one hop to another replica over gRPC and back. The
app's own path (its HTTP routes, validation, the model-aware router, the worker's cache and batching) is what
it spends beyond them.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) as classes.
from fastapi import FastAPI, Request, Response
from ray import serve

api = FastAPI(title="Ray Serve's floor")


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1})
class Echo:
    async def predict(self, body: bytes) -> bytes:
        return body


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class Front:
    def __init__(self, echo) -> None:
        self.echo = echo

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.post("/hop")
    async def hop(self, request: Request) -> Response:
        body = await request.body()
        answer = await self.echo.options(multiplexed_model_id="floor").predict.remote(body)
        return Response(answer, media_type="application/json")


app = Front.bind(Echo.bind())
