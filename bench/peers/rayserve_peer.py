"""Ray Serve serving the proxy model (proxy.py) with its own batching: `@serve.batch(max_batch_size,
batch_wait_timeout_s)`.

    <ray venv>/bin/python bench/peers/rayserve_peer.py --port 8104 [--max-batch 64 --delay-ms 10 --workers 1]

POST /score with the JPEG body; the replica decodes it (per request), then the batch call runs in a thread so the
replica's event loop goes on taking requests. `max_ongoing_requests` is raised from Ray's default (5), which would
cap a batch at 5. Answers carry a Content-Length (a dict would go out chunked, which bench/loadgen.py does not
read)."""

import asyncio
import os
import time

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

import proxy

HERE = os.path.dirname(os.path.abspath(__file__))


def deployment(max_batch: int, delay_s: float, replicas: int):
    @serve.deployment(num_replicas=replicas, max_ongoing_requests=2 * max_batch)
    class Proxy:
        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=delay_s)
        async def score(self, images: list) -> list:
            return await asyncio.to_thread(proxy.run_batch, images)

        async def __call__(self, request: Request) -> JSONResponse:  # a length, not Ray's chunked default
            return JSONResponse(await self.score(proxy.decode(await request.body())))

    return Proxy


if __name__ == "__main__":
    args = proxy.options(__doc__.splitlines()[0])
    env = {k: os.environ[k] for k in ("PIPELINE_COST_S", "PROXY_STATS") if k in os.environ}
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, runtime_env={"env_vars": {**env, "PYTHONPATH": HERE}})
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(deployment(args.max_batch, args.delay_ms / 1000, args.workers).bind(), route_prefix="/score")
    while True:
        time.sleep(3600)
