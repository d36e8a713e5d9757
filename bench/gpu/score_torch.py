"""A PyTorch ResNet50 entry script for the GPU measurement (random weights, fp16, channels_last).

Same contract as the reference score.py: POST a JPEG or PNG -> top 5 classes. Under scorehost with a GPU:
- `preprocess` (HTTP workers, CPU): checks the body; a JPEG travels on as its bytes (a numpy buffer: no copy on the
  way), a PNG is decoded and resized here with Pillow; anything else is answered 400 here, without the GPU.
- `run_batch` (the model process): every JPEG of the batch decoded in one nvJPEG call on the GPU
  (`torchvision.io.decode_jpeg(list, device="cuda")`), resized on the GPU, then one fp16 forward pass. A JPEG the
  GPU decoder refuses (broken, or a variant nvJPEG lacks) is retried on the CPU; if that fails too, that request
  alone gets 400.
`run` is the unbatched path Azure ML calls: run_batch([preprocess(request)]). Without CUDA it all runs on the CPU.
"""
import io

import numpy as np
import torch
import torchvision
from azureml.contrib.services.aml_request import rawhttp
from azureml.contrib.services.aml_response import AMLResponse
from PIL import Image

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
SIZE = 224
MEAN = torch.tensor([0.485, 0.456, 0.406], device=DEVICE).view(1, 3, 1, 1) * 255
STD = torch.tensor([0.229, 0.224, 0.225], device=DEVICE).view(1, 3, 1, 1) * 255
model = None


def init():
    global model
    torch.backends.cudnn.benchmark = True  # kernels tuned per batch size: scorehost warms each padded size first
    model = torchvision.models.resnet50(weights=None).eval().to(DEVICE, DTYPE, memory_format=torch.channels_last)


def _bad(message):
    return AMLResponse({"message": message}, 400, json_str=True)


def preprocess(request):
    data = request.get_data()
    if data[:3] == b"\xff\xd8\xff":
        return ("jpeg", np.frombuffer(data, np.uint8))
    try:
        image = Image.open(io.BytesIO(data))
        if image.format != "PNG":
            raise ValueError(image.format)
        return ("pixels", np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)))
    except Exception:
        return _bad("The request body is not a JPEG or PNG image")


def warmup_item():
    out = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (128, 64, 32)).save(out, "JPEG")
    return ("jpeg", np.frombuffer(out.getvalue(), np.uint8))


def _resize(chw):
    """uint8 CxHxW on the device -> float 3xSIZExSIZE (grey images become RGB)."""
    if chw.shape[0] == 1:
        chw = chw.expand(3, -1, -1)
    return torch.nn.functional.interpolate(chw[None].float(), size=(SIZE, SIZE), mode="bilinear",
                                           align_corners=False)[0]


def _decode_jpegs(arrays):
    """Decoded images (on DEVICE) or None per JPEG: one batched GPU call, then one by one if the batch fails."""
    if not arrays:
        return []
    # A body read in this process is a read-only buffer; one that crossed from an HTTP worker is writable already.
    tensors = [torch.from_numpy(a if a.flags.writeable else a.copy()) for a in arrays]
    mode = torchvision.io.ImageReadMode.RGB
    try:
        return [_resize(t) for t in torchvision.io.decode_jpeg(tensors, mode=mode, device=DEVICE)]
    except (RuntimeError, ValueError):
        pass
    decoded = []
    for t in tensors:
        try:
            decoded.append(_resize(torchvision.io.decode_jpeg(t, mode=mode, device=DEVICE)))
        except (RuntimeError, ValueError):
            try:  # the CPU decoder accepts some JPEGs nvJPEG refuses
                decoded.append(_resize(torchvision.io.decode_jpeg(t, mode=mode).to(DEVICE)))
            except (RuntimeError, ValueError):
                decoded.append(None)
    return decoded


def predict(batch):
    """batch: float Nx3xSIZExSIZE in 0..255 on DEVICE -> (top-5 ids, top-5 probabilities) per image."""
    with torch.inference_mode():
        x = ((batch - MEAN) / STD).to(DTYPE).contiguous(memory_format=torch.channels_last)
        probabilities = torch.softmax(model(x).float(), dim=1)
        top = torch.topk(probabilities, 5, dim=1)
        return top.indices.cpu().tolist(), top.values.cpu().tolist()


@rawhttp
def run(request):
    return run_batch([preprocess(request)])[0]


def run_batch(items):
    answers = [item if isinstance(item, AMLResponse) else None for item in items]
    jpegs = [i for i, item in enumerate(items) if answers[i] is None and item[0] == "jpeg"]
    images = dict(zip(jpegs, _decode_jpegs([items[i][1] for i in jpegs])))
    for i, item in enumerate(items):
        if answers[i] is None and item[0] == "pixels":
            images[i] = torch.from_numpy(np.ascontiguousarray(item[1])).to(DEVICE).permute(2, 0, 1).float()
    for i, image in list(images.items()):
        if image is None:
            answers[i] = _bad("The request body is a broken JPEG")
            del images[i]
    if images:
        owners = sorted(images)
        ids, probabilities = predict(torch.stack([images[i] for i in owners]))
        for i, row_ids, row_p in zip(owners, ids, probabilities):
            answers[i] = {"predictions": [{"class_id": c, "probability": round(p, 6)} for c, p in zip(row_ids, row_p)]}
    return answers
