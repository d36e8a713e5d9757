"""@rawhttp (imported from the package root): run() answers every method itself."""
from azureml.contrib.services import rawhttp
from azureml.contrib.services.aml_response import AMLResponse
from flask import Response


def init():
    pass


@rawhttp
def run(request):
    status = int(request.args.get("status", "200"))
    if request.args.get("plain"):
        return Response(request.get_data(), status=status, mimetype="text/plain")
    if request.method == "GET":
        return {"method": "GET", "args": request.args.to_dict(flat=False)}
    if request.method == "POST":
        body = request.get_data()
        return AMLResponse(body[::-1], status, {"X-Echo": "a, b", "Content-Type": "application/octet-stream"})
    if request.args.get("none"):
        return AMLResponse(None, status)
    return AMLResponse({"method": request.method}, status, json_str=True)
