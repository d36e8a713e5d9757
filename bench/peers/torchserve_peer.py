"""TorchServe serving the proxy model (proxy.py, torchserve_handler.py) with its own batching: the frontend's
`batchSize` and `maxBatchDelay`, one Python worker (`minWorkers`/`maxWorkers`).

    <torchserve venv>/bin/python bench/peers/torchserve_peer.py --port 8105 [--max-batch 64 --delay-ms 10]

The model is registered as "score": POST /predictions/score with the JPEG body. Needs Java 17 (openjdk-17-jre-headless)
and the venv's torchserve and torch-model-archiver. The handler decodes inside the batch (TorchServe batches
requests, then one worker handles the batch)."""

import json
import os
import subprocess
import sys
import tempfile

import proxy

HERE = os.path.dirname(os.path.abspath(__file__))


if __name__ == "__main__":
    args = proxy.options(__doc__.splitlines()[0])
    bindir = os.path.dirname(sys.executable)
    store = tempfile.mkdtemp(prefix="torchserve-store-")
    subprocess.run([os.path.join(bindir, "torch-model-archiver"), "--model-name", "score", "--version", "1.0",
                    "--handler", os.path.join(HERE, "torchserve_handler.py"),
                    "--extra-files", os.path.join(HERE, "proxy.py"), "--export-path", store], check=True)
    models = {"score": {"1.0": {"defaultVersion": True, "marName": "score.mar", "minWorkers": args.workers,
                                "maxWorkers": args.workers, "batchSize": args.max_batch,
                                "maxBatchDelay": int(args.delay_ms), "responseTimeout": 120}}}
    config = os.path.join(store, "config.properties")
    with open(config, "w") as f:
        f.write(f"inference_address=http://127.0.0.1:{args.port}\n"
                f"management_address=http://127.0.0.1:{proxy.free_port()}\n"
                f"metrics_address=http://127.0.0.1:{proxy.free_port()}\n"
                f"model_store={store}\nload_models=score.mar\ndisable_token_authorization=true\n"
                f"install_py_dep_per_model=false\nmodels={json.dumps(models)}\n")
    os.environ["PATH"] = bindir + os.pathsep + os.environ["PATH"]
    os.execv(os.path.join(bindir, "torchserve"), ["torchserve", "--start", "--foreground", "--ncs",
                                                  "--disable-token-auth", "--ts-config", config,
                                                  "--model-store", store])
