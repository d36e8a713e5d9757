"""TorchServe's handler for the proxy model (module-level entry point: TorchServe calls handle(data, context) with
the whole batch its frontend formed)."""

import json

import proxy


def handle(data, context):
    if data is None:  # the load-time call
        return None
    images = [proxy.decode(bytes(row.get("data") or row.get("body"))) for row in data]
    return [json.dumps(answer) for answer in proxy.run_batch(images)]
