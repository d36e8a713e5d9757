"""Answers with the GPU its worker was pinned to and the worker's pid."""
import os


def init():
    pass


def run(data):
    return {"pid": os.getpid(), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "growth": os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH")}
