"""The reference score.py with the small colour model (checkable answers) and the ResNet50 model, in-process,
over HTTP under scorehost, and under Azure ML's own server."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys

import pytest
from flask import Request
from werkzeug.test import EnvironBuilder

from images import b64, jpeg_claiming, png_claiming, scan_bomb, sideways, solid, truncated_jpeg
from scorehost import REFERENCE_SCRIPT, processes
from scorehost.models import COLORS
from corpus import Case, send

JSON = (("Content-Type", "application/json"),)
JPEG = (("Content-Type", "image/jpeg"),)


def load_score_module(model_dir: str, name: str):
    os.environ["AZUREML_MODEL_DIR"] = model_dir
    spec = importlib.util.spec_from_file_location(name, REFERENCE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.init()
    return module


@pytest.fixture(scope="module")
def score(colors_model):
    """score.py initialised in this process on the colour model, with model calls counted."""
    module = load_score_module(colors_model, "score_colors")
    calls = []
    infer = module.model.infer

    def counted(**kwargs):
        batch = next(iter(kwargs.values()))
        assert batch.shape[0] > 0, "the model must never receive an empty batch"
        calls.append(int(batch.shape[0]))
        return infer(**kwargs)

    module.model.infer = counted
    module.calls = calls
    return module


def request(body: bytes | None = None, content_type: str = "image/jpeg", method: str = "POST") -> Request:
    return Request(EnvironBuilder(method=method, data=body, content_type=content_type).get_environ())


def answer(response) -> tuple[int, dict]:
    return response.status_code, json.loads(response.get_data())


@pytest.mark.parametrize("color", list(COLORS))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_colour_model_is_right_in_process(score, color, fmt):
    status, body = answer(score.run(request(solid(COLORS[color], fmt=fmt))))
    assert status == 200 and (body["model"], body["version"]) == ("colors", "1")
    top = body["predictions"]
    assert top[0]["label"] == color and top[0]["probability"] > 0.5
    assert len(top) == 5 and [p["probability"] for p in top] == sorted((p["probability"] for p in top), reverse=True)
    assert top[0]["class_id"] == list(COLORS).index(color)


def test_json_batch_is_one_model_call(score):
    score.calls.clear()
    names = list(COLORS)
    payload = json.dumps({"images": [b64(solid(COLORS[n])) for n in names]}).encode()
    status, body = answer(score.run(request(payload, "application/json")))
    assert status == 200 and score.calls == [len(names)]
    assert [r["predictions"][0]["label"] for r in body["results"]] == names


BAD_INPUTS = [
    # (description, body, content type, method, status, words in the message)
    ("empty body", b"", "image/jpeg", "POST", 400, "empty"),
    ("text, not an image", b"hello, I am not a JPEG", "image/jpeg", "POST", 400, "not an image"),
    ("truncated JPEG", truncated_jpeg(), "image/jpeg", "POST", 400, "could not be decoded"),
    ("GIF", solid((1, 2, 3), fmt="GIF"), "image/gif", "POST", 415, "GIF"),
    ("decompression bomb", png_claiming(100_000, 100_000), "image/png", "POST", 413, "pixels"),
    ("GET", None, "image/jpeg", "GET", 405, "GET is not supported"),
    ("invalid JSON", b"{nope", "application/json", "POST", 400, "not valid JSON"),
    ("JSON without images", b'{"img": []}', "application/json", "POST", 400, "images"),
    ("JSON list", b"[1]", "application/json", "POST", 400, "images"),
    ("empty image list", b'{"images": []}', "application/json", "POST", 400, "at least one"),
    ("invalid base64", b'{"images": ["%%%not base64"]}', "application/json", "POST", 400, "images[0] is not valid base64"),
    ("non-string item", b'{"images": [42]}', "application/json", "POST", 400, "images[0] is not a base64 string"),
    ("bad image at index 2", json.dumps({"images": [b64(solid((9, 9, 9))), b64(solid((200, 9, 9))),
                                                    b64(b"junk")]}).encode(),
     "application/json", "POST", 400, "images[2] is not an image"),
    ("corrupt image at index 1", json.dumps({"images": [b64(solid((9, 9, 9))), b64(truncated_jpeg())]}).encode(),
     "application/json", "POST", 400, "images[1] could not be decoded"),
    ("too many images", json.dumps({"images": [b64(solid((9, 9, 9)))] * 65}).encode(),
     "application/json", "POST", 413, "65 images"),
    ("JPEG scan bomb", scan_bomb(), "image/jpeg", "POST", 413, "scans"),
    ("too many pixels in one request", json.dumps({"images": [b64(jpeg_claiming(6000, 6000))] * 3}).encode(),
     "application/json", "POST", 413, "SCORE_MAX_TOTAL_PIXELS"),
]


def test_exif_orientation_is_applied_on_both_paths(score):
    from PIL import Image

    red, blue = (220, 20, 20), (20, 20, 220)
    data = sideways(red, blue)
    single = score.images_of(request(data))
    batch = score.images_of(request(json.dumps({"images": [b64(data), b64(solid(red))]}).encode(), "application/json"))
    for upright in (single[0], batch[0]):
        with Image.open(io.BytesIO(upright)) as image:
            left, right = image.getpixel((4, 16)), image.getpixel((60, 16))
        assert left[0] > 150 > left[2] and right[2] > 150 > right[0]  # red on the left, as the photo was taken
    assert batch[1] != single[0]  # an image without the note is left as it is


@pytest.mark.parametrize("what,body,ctype,method,status,words", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_in_process(score, what, body, ctype, method, status, words):
    got_status, got = answer(score.run(request(body, ctype, method)))
    assert (got_status, words in got["message"]) == (status, True), got
    assert "Traceback" not in got["message"] and "tensorflow" not in got["message"].lower()


def test_run_batch_fails_only_the_bad_request(score):
    score.calls.clear()
    good, bad = solid(COLORS["blue"]), truncated_jpeg()
    items = [score.preprocess(request(body)) for body in (good, bad, b"junk", solid(COLORS["red"]))]
    answers = score.run_batch(items)
    assert [a.status_code for a in answers] == [200, 400, 400, 200]
    assert json.loads(answers[3].get_data())["predictions"][0]["label"] == "red"
    assert score.calls[0] == 3  # junk never reached the model; the truncated one was found after the batch failed


@pytest.fixture(scope="module", params=["run", "model-process"])
def served(request, start_server, colors_model):
    """The reference score.py served each way: each worker calling run(), and a model process calling run_batch()
    on preprocess()'s items (padded batch sizes, warmed with warmup_item())."""
    batching = ("--batch-max", "4", "--batch-sizes", "1,2,4") if request.param == "model-process" else ()
    return start_server("scorehost", REFERENCE_SCRIPT, colors_model, extra_args=batching)


def test_served_equals_in_process(score, served):
    data = solid(COLORS["magenta"], (120, 80))
    over_http = send(served.url, Case("score.py", "POST", "/score", data, JPEG))
    assert over_http.status == 200
    assert json.loads(over_http.body) == json.loads(score.run(request(data)).get_data())
    batch = json.dumps({"images": [b64(solid(COLORS["cyan"])), b64(solid(COLORS["yellow"], fmt="PNG"))]}).encode()
    over_http = send(served.url, Case("score.py", "POST", "/score", batch, JSON))
    assert json.loads(over_http.body) == json.loads(score.run(request(batch, "application/json")).get_data())


@pytest.mark.parametrize("what,body,ctype,method,status,words", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_over_http_then_next_request_succeeds(served, what, body, ctype, method, status, words):
    got = send(served.url, Case("score.py", method, "/score", body, (("Content-Type", ctype),)))
    message = json.loads(got.body)
    assert got.status == status and words in message["message"]
    assert message["request_id"] == got.header("x-request-id")
    assert got.header("content-type") == "application/json"
    ok = send(served.url, Case("score.py", "POST", "/score", solid(COLORS["green"]), JPEG))
    assert ok.status == 200 and json.loads(ok.body)["predictions"][0]["label"] == "green"


def test_same_answers_under_azure_ml_server(start_server, colors_model, served):
    aihs = start_server("aihs", REFERENCE_SCRIPT, colors_model)
    cases = [Case("score.py", "POST", "/score", solid(COLORS[c]), JPEG) for c in ("red", "white")]
    cases += [Case("score.py", "POST", "/score", json.dumps({"images": [b64(solid(COLORS["black"]))] * 3}).encode(),
                   JSON),
              Case("score.py", "POST", "/score", b"junk", JPEG),
              Case("score.py", "GET", "/score")]
    for case in cases:
        ours, theirs = send(served.url, case), send(aihs.url, case)
        assert ours.status == theirs.status
        ours_body, theirs_body = json.loads(ours.body), json.loads(theirs.body)
        ours_body.pop("request_id", None), theirs_body.pop("request_id", None)
        assert ours_body == theirs_body


def test_score_py_scores_files_without_a_server(colors_model, tmp_path):
    red, junk = tmp_path / "red.jpg", tmp_path / "junk.jpg"
    red.write_bytes(solid(COLORS["red"]))
    junk.write_bytes(b"junk")
    done = subprocess.run([sys.executable, REFERENCE_SCRIPT, "--model-dir", colors_model, str(red)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.split(": ", 1)[1])["predictions"][0]["label"] == "red"
    done = subprocess.run([sys.executable, REFERENCE_SCRIPT, "--model-dir", colors_model, str(junk)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "not an image" in done.stdout


def test_score_py_without_a_server_says_what_is_wrong_in_one_line(colors_model, tmp_path):
    import shutil

    both = tmp_path / "models"
    shutil.copytree(colors_model, both / "a")
    shutil.copytree(colors_model, both / "b")
    red = tmp_path / "red.jpg"
    red.write_bytes(solid(COLORS["red"]))
    for model_dir, words in ((both, "Several SavedModels"), (tmp_path / "none", "not a directory")):
        done = subprocess.run([sys.executable, REFERENCE_SCRIPT, "--model-dir", str(model_dir), str(red)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr


def test_init_refuses_ambiguous_or_missing_models(tmp_path, colors_model):
    module = load_score_module(colors_model, "score_again")
    with pytest.raises(FileNotFoundError, match="No saved_model.pb"):
        os.environ["AZUREML_MODEL_DIR"] = str(tmp_path)
        module.init()
    assert module.find_saved_model(os.path.join(colors_model, "colors", "1")).endswith("colors/1")


@pytest.mark.slow
def test_resnet50_gives_five_ranked_classes(resnet_model):
    module = load_score_module(resnet_model, "score_resnet")
    status, body = answer(module.run(request(solid((120, 80, 40), (640, 480)))))
    assert status == 200 and (body["model"], body["version"]) == ("resnet50", "1")
    probabilities = [p["probability"] for p in body["predictions"]]
    assert len(probabilities) == 5 and probabilities == sorted(probabilities, reverse=True)
    assert 0 < sum(probabilities) <= 1 + 1e-6
    assert all(p["label"] for p in body["predictions"])
    batch = json.dumps({"images": [b64(solid((i * 30, 60, 90))) for i in range(4)]}).encode()
    status, body = answer(module.run(request(batch, "application/json")))
    assert status == 200 and len(body["results"]) == 4


@pytest.mark.slow
def test_serve_with_no_arguments_builds_the_demo_model_and_answers(tmp_path):
    """The README's first command, from an empty model cache: the demo ResNet50 is built (in a child process: a
    TensorFlow imported in gunicorn's master deadlocks the forked worker) and the server answers with 5 classes."""
    port = processes.free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("AZUREML_MODEL_DIR", "AZUREML_ENTRY_SCRIPT")}
    env.update(SCOREHOST_HOME=str(tmp_path), SCOREHOST_PORT=str(port))  # no model set by earlier tests here
    server = processes.ServerProcess("scorehost", [processes._bin("scorehost"), "serve"], env, port, str(tmp_path))
    try:
        server.wait_healthy(300)
        answer = send(server.url, Case("score.py", "POST", "/score", solid((200, 120, 40), (320, 240)), JPEG))
        assert answer.status == 200 and len(json.loads(answer.body)["predictions"]) == 5
        assert (tmp_path / "models" / "resnet50" / "1" / "saved_model.pb").exists()  # built on first use
        output = server.output()  # the build is said in a few lines, without TensorFlow's INFO noise
        assert "building the demo model resnet50 (random weights)" in output and "demo model built in" in output
        assert "Assets written" not in output and "unsupported characters" not in output
    finally:
        server.stop()
