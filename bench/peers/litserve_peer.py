"""LitServe serving the proxy model (proxy.py) with its own batching: `max_batch_size` and `batch_timeout`.

    <litserve venv>/bin/python bench/peers/litserve_peer.py --port 8101 [--max-batch 64 --delay-ms 10 --workers 1]

LitServe reads a request body as JSON (or a form): the driver sends {"image": base64 JPEG}. decode_request() runs
in the inference worker, per request, before the batch is formed."""

import litserve as ls

import proxy


class ProxyAPI(ls.LitAPI):
    def setup(self, device):
        pass

    def decode_request(self, request):
        return proxy.decode(proxy.from_json(request))

    def predict(self, images):
        return proxy.run_batch(list(images))

    def batch(self, inputs):
        return inputs

    def unbatch(self, outputs):
        return outputs

    def encode_response(self, output):
        return output


if __name__ == "__main__":
    args = proxy.options(__doc__.splitlines()[0])
    api = ProxyAPI(max_batch_size=args.max_batch, batch_timeout=args.delay_ms / 1000, api_path="/score")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers, timeout=60)
    server.run(port=args.port, generate_client_file=False)
