"""BentoML serving the proxy model (proxy.py) with its adaptive batching (`batchable=True`, `max_batch_size`; its
`max_latency_ms` is a latency target, not a delay, and stays at BentoML's default).

    <bentoml venv>/bin/python bench/peers/bentoml_peer.py --port 8102 [--max-batch 64 --workers 1]

A batchable API takes a list: the driver sends {"images": [base64 JPEG]} and gets a list of one answer. The decode
runs inside the batched call (BentoML batches the API's inputs, not a later stage)."""

import os
import sys

import bentoml

import proxy

MAX_BATCH = int(os.environ.get("PEER_MAX_BATCH", "64"))
WORKERS = int(os.environ.get("PEER_WORKERS", "1"))


@bentoml.service(workers=WORKERS)
class Proxy:
    @bentoml.api(route="/score", batchable=True, max_batch_size=MAX_BATCH)
    def score(self, images: list[str]) -> list[dict]:
        return proxy.run_batch([proxy.decode(proxy.from_json({"image": image})) for image in images])


if __name__ == "__main__":
    args = proxy.options(__doc__.splitlines()[0])
    os.environ.update(PEER_MAX_BATCH=str(args.max_batch), PEER_WORKERS=str(args.workers))
    here = os.path.dirname(os.path.abspath(__file__))
    cli = os.path.join(os.path.dirname(sys.executable), "bentoml")
    os.execv(cli, [cli, "serve", "bentoml_peer:Proxy", "--port", str(args.port), "--working-dir", here])
