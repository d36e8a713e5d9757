"""A PyTorch ResNet50 entry script for the GPU measurement (random weights, fp16; JPEG decode on the CPU).

Same contract as the reference score.py: POST a JPEG -> top 5 classes. `run_batch` scores many requests in one
forward pass, for scorehost's dynamic batching; `run` is the unbatched path Azure ML would call.
"""
import io

import torch
import torchvision
from azureml.contrib.services.aml_request import rawhttp
from azureml.contrib.services.aml_response import AMLResponse
from PIL import Image

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
model = None


def init():
    global model
    torch.backends.cudnn.benchmark = True
    model = torchvision.models.resnet50(weights=None).eval().to(DEVICE, DTYPE)
    with torch.inference_mode():
        for n in (1, 8, 32, 64):  # warm cuDNN's autotuner for the batch sizes batching will produce
            model(torch.zeros(n, 3, 224, 224, device=DEVICE, dtype=DTYPE))
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def decode(data):
    """JPEG bytes -> normalised 3x224x224 float tensor, on the CPU."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image.draft("RGB", (448, 448))  # let libjpeg decode at a reduced scale when the image is large
    image = image.resize((224, 224), Image.BILINEAR)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(224, 224, 3).permute(2, 0, 1)
    return (pixels.float() / 255 - MEAN) / STD


def predict(batch):
    with torch.inference_mode():
        x = batch.to(DEVICE, DTYPE, non_blocking=True)
        probabilities = torch.softmax(model(x).float(), dim=1)
        top = torch.topk(probabilities, 5, dim=1)
        return top.indices.cpu().tolist(), top.values.cpu().tolist()


@rawhttp
def run(request):
    return run_batch([request])[0]


def run_batch(requests):
    answers, tensors, owners = [None] * len(requests), [], []
    for i, request in enumerate(requests):
        try:
            tensors.append(decode(request.get_data()))
            owners.append(i)
        except Exception:
            answers[i] = AMLResponse({"message": "The request body is not a JPEG or PNG image"}, 400, json_str=True)
    if tensors:
        ids, probabilities = predict(torch.stack(tensors))
        for i, row_ids, row_p in zip(owners, ids, probabilities):
            answers[i] = {"predictions": [{"class_id": c, "probability": round(p, 6)} for c, p in zip(row_ids, row_p)]}
    return answers
