"""@rawhttp imported from the module, as the original ResNet50 score.py does; also reads the request headers."""
from azureml.contrib.services.aml_request import AMLRequest, rawhttp
from azureml.contrib.services.aml_response import AMLResponse


def init():
    pass


@rawhttp
def run(request: AMLRequest):
    return AMLResponse({"method": request.method, "custom": request.headers.get("X-Custom"),
                        "length": len(request.get_data())}, 200, json_str=True)
