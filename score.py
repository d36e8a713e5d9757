"""Reference Azure ML entry script: a TensorFlow SavedModel of image classification behind @rawhttp.

POST the bytes of one JPEG or PNG (any Content-Type but application/json) -> the top classes of that image.
POST application/json {"images": [base64, ...]} -> one result per image, scored in one model call.
Runs unchanged under Azure ML's server (azmlinfsrv) and under `scorehost serve`. `preprocess` and `run_batch` are
scorehost's optional batching hooks (Azure ML never calls them): preprocess checks a request in an HTTP worker
(JSON, base64, image headers; bad input is answered there), run_batch scores many requests in one model call in
the model process. Decoding stays in the SavedModel's graph: on a CPU it is 0.3-6 ms of a ~100 ms model call per
image, so moving it out would not pay (bench/RESULTS.md).

Settings (environment): AZUREML_MODEL_DIR (where the model is: Azure ML's <dir>/<name>/<version>/ layout, or a plain
directory holding saved_model.pb), SCORE_MAX_IMAGES (images per request, default 64), SCORE_MAX_PIXELS (per image,
default 40,000,000), SCORE_MAX_TOTAL_PIXELS (all images of one request, default 100,000,000), SCORE_MAX_JPEG_SCANS
(scans of one progressive JPEG, default 64). The work a request can cause is bounded from the image headers, before
any decoding: a 200 KB JPEG repeating one scan 1,000 times once took a core for 22 s.

Locally, without a server:  python score.py [--model-dir DIR] IMAGE...
"""

import base64
import binascii
import io
import logging
import os
import sys
import time

import ujson
from azureml.contrib.services.aml_request import AMLRequest, rawhttp
from azureml.contrib.services.aml_response import AMLResponse

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

log = logging.getLogger("score")

MAX_IMAGES = int(os.environ.get("SCORE_MAX_IMAGES", "64"))
MAX_PIXELS = int(os.environ.get("SCORE_MAX_PIXELS", "40000000"))
MAX_TOTAL_PIXELS = int(os.environ.get("SCORE_MAX_TOTAL_PIXELS", "100000000"))
MAX_JPEG_SCANS = int(os.environ.get("SCORE_MAX_JPEG_SCANS", "64"))
EXIF_ORIENTATION = 0x0112
FORMATS = ("JPEG", "PNG")

model = None  # set by init(): the Model below


class BadRequest(Exception):
    """What was wrong with the client's input; becomes a 4xx JSON answer, never a traceback."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


class Model:
    """The SavedModel's serving signature, its labels and its name/version."""

    def __init__(self, path):
        import tensorflow as tf

        self.tf = tf
        started = time.perf_counter()
        loaded = tf.saved_model.load(path)
        self._loaded = loaded  # keeps the signature's variables alive
        self.infer = loaded.signatures["serving_default"]
        inputs = self.infer.structured_input_signature[1]
        if len(inputs) != 1:
            raise ValueError(f"The model's serving signature must take exactly one input (a batch of encoded "
                             f"images); it takes {len(inputs)}: {sorted(inputs)}")
        self.input_name = next(iter(inputs))
        with open(os.path.join(path, "labels.txt"), encoding="utf-8") as f:
            self.labels = f.read().splitlines()
        parent, version = os.path.split(os.path.normpath(path))
        self.name, self.version = os.path.basename(parent), version
        if "metadata" in loaded.signatures:
            meta = {k: v.numpy().decode() for k, v in loaded.signatures["metadata"]().items()}
            self.name, self.version = meta.get("name", self.name), meta.get("version", self.version)
            log.info("model %s version %s: %s", self.name, self.version, meta.get("description", ""))
        log.info("loaded %s in %.1f s", path, time.perf_counter() - started)

    def predict(self, images):
        """Top classes for each encoded image, in one model call. Never called with an empty list."""
        out = self.infer(**{self.input_name: self.tf.constant(images)})
        ids, probabilities = out["class_ids"].numpy(), out["probabilities"].numpy()
        return [[{"label": self.labels[c], "class_id": int(c), "probability": round(float(p), 6)}
                 for c, p in zip(row_ids, row_p)] for row_ids, row_p in zip(ids, probabilities)]

    def undecodable(self, images):
        """Indices of the images the model cannot decode (asked only after a batch failed).

        Pillow decodes each one fully; if it finds no culprit, the model itself is asked, one image at a time.
        (Not TensorFlow's eager decode: each failing eager decode_image leaks its output buffer, measured at about
        0.4 MB per call in TF 2.21, which a stream of corrupt images turns into a worker's whole memory.)
        """
        from PIL import Image

        bad = []
        for i, image in enumerate(images):
            try:
                with Image.open(io.BytesIO(image)) as decoded:
                    decoded.load()
            except Exception:  # Pillow raises several types for corrupt or truncated data
                bad.append(i)
        if bad:
            return bad
        for i, image in enumerate(images):
            try:
                self.predict([image])
            except self.tf.errors.InvalidArgumentError:
                bad.append(i)
        return bad


def find_saved_model(model_dir):
    """The one directory under model_dir that holds saved_model.pb (Azure ML nests it as <name>/<version>/)."""
    if not model_dir or not os.path.isdir(model_dir):
        raise FileNotFoundError(f"AZUREML_MODEL_DIR is {model_dir!r}: not a directory")
    found = sorted(root for root, _, files in os.walk(model_dir) if "saved_model.pb" in files)
    if not found:
        raise FileNotFoundError(f"No saved_model.pb under AZUREML_MODEL_DIR={model_dir}")
    if len(found) > 1:
        raise ValueError(f"Several SavedModels under AZUREML_MODEL_DIR={model_dir}: {found}; point it at one")
    return found[0]


def init():
    global model
    model = Model(find_saved_model(os.environ.get("AZUREML_MODEL_DIR")))
    model.predict([_warm_up_image()])  # traces the graph now, so the first request is not the slow one


def _warm_up_image():
    import tensorflow as tf

    return tf.io.encode_png(tf.zeros([8, 8, 3], tf.uint8)).numpy()


def check_image(data, where):
    """Refuse what the model cannot decode, or must not (decompression and scan bombs), from the headers alone,
    before any decoding. Returns (the bytes to score, pixels): a JPEG with an EXIF orientation comes back upright."""
    from PIL import Image

    if not data:
        raise BadRequest(400, f"{where} is empty: send the bytes of a JPEG or PNG image")
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind, (width, height) = image.format, image.size
            orientation = image.getexif().get(EXIF_ORIENTATION, 1) if kind == "JPEG" else 1
    except Image.DecompressionBombError:
        raise BadRequest(413, f"{where} has too many pixels (limit {MAX_PIXELS})") from None
    except Exception:  # Pillow raises several types for unreadable data
        raise BadRequest(400, f"{where} is not an image: send the bytes of a JPEG or PNG image") from None
    if kind not in FORMATS:
        raise BadRequest(415, f"{where} is a {kind} image; only JPEG and PNG are accepted")
    if width * height > MAX_PIXELS:
        raise BadRequest(413, f"{where} is {width}x{height} pixels; the limit is {MAX_PIXELS} pixels")
    if kind == "JPEG" and (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:
        # Each scan is decoded over the whole image: a repeated scan multiplies the work without growing the file.
        raise BadRequest(413, f"{where} is a JPEG of {scans} scans; the limit is {MAX_JPEG_SCANS}")
    if orientation not in (1, None):
        data = _upright(data, where)
    return data, width * height


def _upright(data, where):
    """Phone photos are often stored sideways with an EXIF note that the model's decoder ignores: turn the image
    as the note says (re-encoded as PNG, lossless)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as image:
            out = io.BytesIO()
            ImageOps.exif_transpose(image).convert("RGB").save(out, "PNG")
            return out.getvalue()
    except Exception:
        raise BadRequest(400, f"{where} could not be decoded: the image data is corrupt or truncated") from None


def images_of(request):
    """The encoded images a request carries, checked, or BadRequest."""
    if request.method != "POST":
        raise BadRequest(405, f"{request.method} is not supported: POST an image, or JSON {{\"images\": [...]}}")
    if request.mimetype == "multipart/form-data":
        raise BadRequest(415, "A form upload (curl -F) wraps the image in multipart/form-data: send the image's "
                              "bytes as the body: curl --data-binary @image.jpg -H 'Content-Type: image/jpeg' URL")
    body = request.get_data()
    if not request.is_json:
        return [check_image(body, "The request body")[0]]
    try:
        payload = ujson.loads(body)
    except ValueError as ex:
        raise BadRequest(400, f"The body is not valid JSON: {ex}") from None
    images = payload.get("images") if isinstance(payload, dict) else None
    if not isinstance(images, list) or not images:
        raise BadRequest(400, 'Expected JSON {"images": [<base64 JPEG or PNG>, ...]} with at least one image')
    if len(images) > MAX_IMAGES:
        raise BadRequest(413, f"{len(images)} images in one request; the limit is {MAX_IMAGES}")
    decoded, pixels = [], 0
    for i, item in enumerate(images):
        if not isinstance(item, str):
            raise BadRequest(400, f"images[{i}] is not a base64 string")
        try:
            data = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(400, f"images[{i}] is not valid base64") from None
        data, size = check_image(data, f"images[{i}]")
        pixels += size
        if pixels > MAX_TOTAL_PIXELS:
            raise BadRequest(413, f"images[0..{i}] add up to {pixels} pixels; the limit per request is "
                                  f"{MAX_TOTAL_PIXELS} (SCORE_MAX_TOTAL_PIXELS)")
        decoded.append(data)
    return decoded


def _request_id():
    from flask import g  # both Azure ML's server and scorehost keep the request id there (not in a model process)

    return g.get("request_id") if g else None


def _error(status, message, request_id=None):
    body = {"message": message}
    request_id = request_id or _request_id()
    if request_id:
        body["request_id"] = request_id
    return AMLResponse(body, status, json_str=True)


def _answer(is_json, predictions):
    body = {"model": model.name, "version": model.version}
    if is_json:
        body["results"] = [{"predictions": p} for p in predictions]
    else:
        body["predictions"] = predictions[0]
    return AMLResponse(body, 200, json_str=True)


def preprocess(request):
    """One request's checked images, or its 4xx answer: what run_batch() gets for it."""
    try:
        return {"images": images_of(request), "json": request.is_json, "request_id": _request_id()}
    except BadRequest as ex:
        return _error(ex.status, ex.message)


@rawhttp
def run(request: AMLRequest):
    return run_batch([preprocess(request)])[0]


def run_batch(items):
    """Score several requests (preprocess()'s outputs) with one model call; each gets exactly the answer run() alone
    would give it."""
    answers = [item if isinstance(item, AMLResponse) else None for item in items]
    images, owners = [], []  # owners[j]: index of the request that images[j] came from
    for i, item in enumerate(items):
        if answers[i] is None:
            images.extend(item["images"])
            owners.extend([i] * len(item["images"]))
    if images:
        _predict_into(items, answers, images, owners)
    return answers


def _predict_into(items, answers, images, owners):
    try:
        predictions = model.predict(images)
    except model.tf.errors.InvalidArgumentError:
        # Headers looked fine but some image is corrupt: find which, fail only their requests, score the rest.
        bad = set(model.undecodable(images))
        if not bad:
            raise
        for j in sorted(bad):
            i = owners[j]
            if answers[i] is None:
                where = f"images[{j - owners.index(i)}]" if items[i]["json"] else "The request body"
                answers[i] = _error(400, f"{where} could not be decoded: the image data is corrupt or truncated",
                                    items[i].get("request_id"))
        keep = [j for j in range(len(images)) if answers[owners[j]] is None]
        if keep:
            _predict_into(items, answers, [images[j] for j in keep], [owners[j] for j in keep])
        return
    per_request = {}
    for owner, prediction in zip(owners, predictions):
        per_request.setdefault(owner, []).append(prediction)
    for i, found in per_request.items():
        answers[i] = _answer(items[i]["json"], found)


def warmup_item():
    """One image for warming each --batch-sizes size before traffic."""
    return {"images": [_warm_up_image()], "json": False}


def _main(argv):
    import argparse

    from werkzeug.test import EnvironBuilder
    from flask import Request

    parser = argparse.ArgumentParser(description="Score image files with this entry script, without a server.")
    parser.add_argument("--model-dir", default=os.environ.get("AZUREML_MODEL_DIR"),
                        help="model directory (default: AZUREML_MODEL_DIR)")
    parser.add_argument("images", nargs="+")
    args = parser.parse_args(argv)
    os.environ["AZUREML_MODEL_DIR"] = args.model_dir or ""
    logging.basicConfig(level=logging.INFO)
    try:
        init()
    except (FileNotFoundError, ValueError) as ex:  # no model, or several: one line, not a traceback
        print(f"score.py: {ex}", file=sys.stderr)
        return 2
    status = 0
    for path in args.images:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as ex:
            print(f"{path}: {ex.strerror}", file=sys.stderr)
            status = 1
            continue
        request = Request(EnvironBuilder(method="POST", data=data, content_type="application/octet-stream")
                          .get_environ())
        response = run(request)
        print(f"{path}: {response.get_data(as_text=True)}")
        status = status or (response.status_code >= 400)
    return status


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
