"""MLServer serving the proxy model (proxy.py) with its adaptive batching (`max_batch_size`, `max_batch_time`).

    <mlserver venv>/bin/python bench/peers/mlserver_peer.py --port 8103 [--max-batch 64 --delay-ms 10 --workers 1]

POST /score with the JPEG body: a custom handler decodes it (per request, like a preprocess step), then calls the
model's predict(), which MLServer's adaptive batcher has wrapped, with a V2 request of one image; the batcher merges
such requests into one predict() call. Inference stays in the server process (`parallel_workers` 0): one copy."""

import json
import os
import sys
import tempfile

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.context import model_context
from mlserver.handlers import custom_handler
from mlserver.types import InferenceRequest, InferenceResponse
from starlette.requests import Request

import proxy

HERE = os.path.dirname(os.path.abspath(__file__))


class ProxyModel(MLModel):
    async def load(self) -> bool:
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        images = NumpyCodec.decode_input(payload.inputs[0])
        answers = proxy.run_batch(list(images))
        output = StringCodec.encode_output("answer", [json.dumps(a) for a in answers])
        return InferenceResponse(model_name=self.name, outputs=[output])

    @custom_handler(rest_path="/score")
    async def score(self, request: Request) -> dict:
        image = proxy.decode(await request.body())
        one = InferenceRequest(inputs=[NumpyCodec.encode_input("image", np.expand_dims(image, 0))])
        with model_context(self.settings):  # as MLServer's own data plane calls predict()
            response = await self.predict(one)
        return json.loads(StringCodec.decode_output(response.outputs[0])[0])


if __name__ == "__main__":
    args = proxy.options(__doc__.splitlines()[0])
    folder = tempfile.mkdtemp(prefix="mlserver-")
    with open(os.path.join(folder, "settings.json"), "w") as f:
        json.dump({"host": "127.0.0.1", "http_port": args.port, "grpc_port": proxy.free_port(),
                   "metrics_port": proxy.free_port(), "parallel_workers": 0}, f)
    with open(os.path.join(folder, "model-settings.json"), "w") as f:
        json.dump({"name": "score", "implementation": "mlserver_peer.ProxyModel", "max_batch_size": args.max_batch,
                   "max_batch_time": args.delay_ms / 1000}, f)
    os.environ["PYTHONPATH"] = HERE + os.pathsep + os.environ.get("PYTHONPATH", "")
    cli = os.path.join(os.path.dirname(sys.executable), "mlserver")
    os.execv(cli, [cli, "start", folder])
