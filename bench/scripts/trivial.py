"""The smallest useful @rawhttp entry script: what is left of a request's time is the server's own overhead."""
from azureml.contrib.services.aml_request import rawhttp


def init():
    pass


@rawhttp
def run(request):
    return {"ok": True, "bytes": len(request.get_data())}
