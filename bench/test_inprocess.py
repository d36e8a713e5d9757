"""In-process micro-benchmarks: model time, decode time and framework overhead as separate numbers.

    pytest bench/ --benchmark-only

- `test_model_batch[N]`: the reference score.py's model call for N images (ResNet50, CPU): model time.
- `test_score_run_batch[N]`: score.py's whole run() path for a JSON batch of N images: model + base64 + checks.
- `test_decode_*`: decoding one JPEG (TensorFlow, as the model's graph does) and checking its header (Pillow, as
  score.py does before any model call): decode time.
- `test_server_overhead_*`: a trivial script through scorehost's and AIHS's Flask apps, without the network:
  framework overhead per request.
"""

from __future__ import annotations

import base64
import json
import os

import pytest

BATCHES = (1, 8, 32)


def _batch(images: list[bytes], n: int) -> list[bytes]:
    return [images[i % len(images)] for i in range(n)]


@pytest.mark.parametrize("n", BATCHES)
def test_model_batch(benchmark, score, images, n):
    batch = _batch(images, n)
    benchmark.extra_info["images"] = n
    result = benchmark(score.model.predict, batch)
    assert len(result) == n


@pytest.mark.parametrize("n", BATCHES)
def test_score_run_batch(benchmark, score, images, n):
    from flask import Request
    from werkzeug.test import EnvironBuilder

    body = json.dumps({"images": [base64.b64encode(b).decode() for b in _batch(images, n)]}).encode()

    def run():
        request = Request(EnvironBuilder(method="POST", data=body, content_type="application/json").get_environ())
        return score.run(request)

    benchmark.extra_info["images"] = n
    assert benchmark(run).status_code == 200


@pytest.mark.parametrize("size", [0, 1, 2], ids=["224x224", "640x480", "1280x720"])
def test_decode_tensorflow(benchmark, images, size):
    import tensorflow as tf

    data = tf.constant(images[size])
    benchmark(lambda: tf.io.decode_image(data, channels=3, expand_animations=False))


@pytest.mark.parametrize("size", [0, 1, 2], ids=["224x224", "640x480", "1280x720"])
def test_decode_header_check(benchmark, score, images, size):
    benchmark(score.check_image, images[size], "body")


TRIVIAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "trivial.py")


def _post(client, body: bytes):
    response = client.post("/score", data=body, content_type="image/jpeg")
    assert response.status_code == 200
    return response


def test_server_overhead_scorehost(benchmark, images):
    from server.app import create_app
    from server.settings import resolve

    client = create_app(resolve({"entry_script": TRIVIAL}, {})).test_client()
    benchmark(_post, client, images[0])


def test_server_overhead_aihs(benchmark, images, monkeypatch):
    monkeypatch.setenv("AZUREML_ENTRY_SCRIPT", TRIVIAL)
    monkeypatch.setenv("AML_APP_ROOT", os.path.dirname(TRIVIAL))
    from azureml_inference_server_http.server.create_app import create

    client = create().test_client()
    benchmark(_post, client, images[0])
