"""Builds the reference SavedModels offline (no model hub is reachable), in Azure ML's `<dir>/<name>/<version>/` layout.

Both models share one serving signature, the one the reference score.py expects:
  serving_default(images: tf.string [None]) -> {"class_ids": int32 [None, k], "probabilities": float32 [None, k]}
Decoding (JPEG or PNG), resizing and preprocessing happen inside the graph, so a client sends encoded bytes and the
model's own input pipeline cannot drift from the server's. Each version directory also holds `labels.txt`.

- `resnet50`: the real ResNet50 architecture with RANDOM weights (keras.applications.ResNet50(weights=None)); right
  for speed and memory, meaningless as a classifier. The `metadata` signature and the log say so.
- `colors`: a tiny classifier of solid colours, trained in seconds on generated images; its answers are checkable.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable

import numpy as np

log = logging.getLogger("scorehost.models")

IMAGENET_LABELS = os.path.join(os.path.dirname(__file__), "data", "imagenet_labels.txt")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30),
    "cyan": (30, 210, 220), "magenta": (210, 30, 210), "white": (245, 245, 245), "black": (15, 15, 15),
}
TOP_K = 5


def _quiet_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import tensorflow as tf

    return tf


def _save(out_dir: str, name: str, version: str, network, size: int, preprocess: Callable, labels: list[str],
          description: str) -> str:
    """Wrap `network` (decoded float images -> class probabilities) with decode and top-k, and save it."""
    tf = _quiet_tensorflow()
    k = min(TOP_K, len(labels))

    class Serving(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = network

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        def serve(self, images):
            def decode(data):
                image = tf.io.decode_image(data, channels=3, expand_animations=False)
                return tf.image.resize(tf.cast(image, tf.float32), [size, size])

            pixels = tf.map_fn(decode, images, fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
            top = tf.math.top_k(self.network(preprocess(pixels), training=False), k=k)
            return {"class_ids": top.indices, "probabilities": top.values}

        @tf.function(input_signature=[])
        def metadata(self):
            return {"description": tf.constant(description), "name": tf.constant(name),
                    "version": tf.constant(version)}

    module = Serving()
    path = os.path.join(out_dir, name, version)
    os.makedirs(path, exist_ok=True)
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve, "metadata": module.metadata})
    with open(os.path.join(path, "labels.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(labels) + "\n")
    return path


def build_resnet50(out_dir: str, version: str = "1") -> str:
    tf = _quiet_tensorflow()
    import keras

    network = keras.applications.ResNet50(weights=None)
    with open(IMAGENET_LABELS, encoding="utf-8") as f:
        labels = f.read().splitlines()
    mean_bgr = tf.constant([103.939, 116.779, 123.68])

    def preprocess(rgb):  # keras.applications.resnet50.preprocess_input ("caffe" mode): RGB->BGR, minus the mean
        return rgb[..., ::-1] - mean_bgr

    description = ("ResNet50 architecture with RANDOM weights (keras.applications.ResNet50(weights=None), built "
                   "offline): class scores are meaningless; use it for speed and memory, not for answers.")
    log.info("resnet50: %s", description)  # where it lands and how long it took: the caller says, once
    return _save(out_dir, "resnet50", version, network, 224, preprocess, labels, description)


def color_images(per_class: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Solid colours with noise and brightness jitter, labelled by colour index."""
    rng = np.random.default_rng(seed)
    rgb = np.array(list(COLORS.values()), dtype=np.float32)
    labels = np.repeat(np.arange(len(rgb)), per_class)
    scale = rng.uniform(0.85, 1.15, size=(len(labels), 1, 1, 1))
    noise = rng.normal(0, 12, size=(len(labels), size, size, 3))
    images = np.clip(rgb[labels][:, None, None, :] * scale + noise, 0, 255).astype(np.float32)
    return images, labels


def build_colors(out_dir: str, version: str = "1") -> str:
    _quiet_tensorflow()
    import keras

    keras.utils.set_random_seed(0)
    network = keras.Sequential([
        keras.Input((16, 16, 3)),
        keras.layers.Conv2D(16, 1, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(len(COLORS), activation="softmax"),
    ])
    network.compile(optimizer=keras.optimizers.Adam(0.02), loss="sparse_categorical_crossentropy",
                    metrics=["accuracy"])
    images, labels = color_images(per_class=64, size=16)
    network.fit(images / 255.0, labels, epochs=30, batch_size=64, verbose=0)
    description = "Solid-colour classifier trained on generated images; answers are checkable."
    return _save(out_dir, "colors", version, network, 16, lambda rgb: rgb / 255.0, list(COLORS), description)


BUILDERS: dict[str, Callable[[str], str]] = {"resnet50": build_resnet50, "colors": build_colors}


def build(name: str, out_dir: str) -> str:
    """Build model `name` into `out_dir/<name>/<version>/`, whole or not at all: it is built in a temporary
    directory beside it and renamed into place when complete, so a build interrupted at any moment (Ctrl-C, a
    kill) leaves no partial model for the next run to mistake for one. A model already there is replaced."""
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}-building-", dir=out_dir)
    try:
        built = BUILDERS[name](staging)
        final = os.path.join(out_dir, name, os.path.basename(built))
        os.makedirs(os.path.dirname(final), exist_ok=True)
        if os.path.exists(final):
            os.rename(final, os.path.join(staging, "replaced"))
        os.rename(built, final)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# Where each demo model is kept: one model per root, so AZUREML_MODEL_DIR can point at a root (score.py refuses a
# directory holding several SavedModels).
DEMO_ROOTS = {"resnet50": "models", "colors": "models-colors"}


def demo_model_dir(name: str = "resnet50") -> str:
    """An embedded demo model's AZUREML_MODEL_DIR, built on first use (said on the console, with its time).

    Built in a child process: `scorehost serve` forks gunicorn workers from the calling process, and TensorFlow
    imported before a fork deadlocks the forked worker's init()."""
    from . import HOME

    root = os.path.join(HOME, DEMO_ROOTS[name])
    if not os.path.exists(os.path.join(root, name, "1", "saved_model.pb")):
        note = " (random weights)" if name == "resnet50" else ""
        print(f"scorehost: building the demo model {name}{note} in {root} ...", flush=True)
        started = time.perf_counter()
        # Its output is shown only if it fails: on Ctrl-C (which the terminal sends it too) the caller says one line.
        child = subprocess.Popen([sys.executable, "-m", "scorehost.cli", "model", name, "--out", root],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            output, _ = child.communicate()
        except KeyboardInterrupt:
            try:
                child.wait(10)  # it was interrupted too, and removes its temporary directory on the way out
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            raise
        if child.returncode:
            raise SystemExit(f"scorehost: building the demo model {name} failed (exit {child.returncode}):\n"
                             + output.decode(errors="replace")[-3000:])
        print(f"scorehost: demo model built in {time.perf_counter() - started:.1f} s", flush=True)
    return root
