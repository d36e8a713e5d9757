"""Every error the server answers with, and its HTTP status, in one place.

Each error is a type; `STATUS` maps the type to its status code, and `error_response` turns any of them into the
JSON body Azure ML's server sends (`{"message": ...}`). Errors that exist only in scorehost (auth, size limit,
overload) also carry the request id in the body, since no Azure ML client depends on their shape.
"""

from __future__ import annotations

import http
import json
import uuid
from typing import Optional

from azureml.contrib.services.aml_response import AMLResponse


class ServerError(Exception):
    """Base of every error the server turns into a response; `message` goes to the client as is."""

    extra_headers: dict[str, str] = {}
    #: run() itself failed: Azure ML marks such answers with x-ms-run-function-failed: True.
    run_function_failed = False
    #: scorehost-only error: its body also names the request id.
    scorehost_only = False

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple:
        """Errors cross from a model process to its HTTP workers (server/wire.py) with their type, message and
        headers, whatever their constructor takes. A subclass the script defined may not be rebuilt on the other
        side (a class inside a function does not even pickle): it crosses as the nearest of this module's types,
        so it keeps its status."""
        cls = next(c for c in type(self).__mro__ if c.__module__ == __name__)
        headers = self.extra_headers if cls is type(self) else {str(k): str(v) for k, v in self.extra_headers.items()}
        return _rebuild, (cls, self.message, headers)


def _rebuild(cls: type, message: str, extra_headers: dict[str, str]) -> "ServerError":
    error = cls.__new__(cls)
    ServerError.__init__(error, message)
    error.extra_headers = extra_headers
    return error


class BadInput(ServerError):
    """The request body or query cannot be turned into run()'s arguments."""


class UnreadableBody(BadInput):
    """The body cannot be read as framed (broken chunking, fewer bytes than Content-Length). Azure ML: 500 or worse."""

    scorehost_only = True


class UnsupportedInput(ServerError):
    """The body has a Content-Type the script's input mode cannot take."""


class MethodNotAllowed(ServerError):
    def __init__(self) -> None:
        super().__init__("Method not allowed")


class HeaderTooLong(ServerError):
    """A request id header is longer than Azure ML allows (100 characters)."""


class Unauthorized(ServerError):
    scorehost_only = True
    extra_headers = {"WWW-Authenticate": "Bearer"}


class PayloadTooLarge(ServerError):
    scorehost_only = True


class Overloaded(ServerError):
    """The batching queue is full: the client should come back, not pile up."""

    scorehost_only = True

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.extra_headers = {"Retry-After": str(retry_after_s)}


class ModelUnavailable(ServerError):
    """No model process answers (starting, or restarting after a crash or a hung run_batch())."""

    scorehost_only = True
    extra_headers = {"Retry-After": "1"}

    def __init__(self, message: str = "The model is starting or restarting: retry shortly.") -> None:
        super().__init__(message)


class ScoringTimeout(ServerError):
    run_function_failed = True

    def __init__(self, timeout_ms: int):
        super().__init__(f"Scoring timeout after {timeout_ms} ms")


class ScriptFailed(ServerError):
    """run() raised; the traceback goes to the log only."""

    run_function_failed = True

    def __init__(self) -> None:
        super().__init__("An unexpected error occurred in scoring script. Check the logs for more info.")


class ResultUnusable(ServerError):
    """run_batch()'s result for one request cannot cross from the model process to the HTTP worker (it does not
    pickle there, or does not unpickle here: a class only init() imported, a lock): that request fails, alone."""

    scorehost_only = True
    run_function_failed = True


class ItemTooLarge(ServerError):
    """The item made for run_batch() (preprocess()'s output, or the request) is larger than a model process takes."""

    scorehost_only = True


class ModelOutOfMemory(ServerError):
    """The framework ran out of (GPU) memory: the request may well succeed later, or smaller. Azure ML says 500."""

    scorehost_only = True
    run_function_failed = True
    extra_headers = {"Retry-After": "1"}

    def __init__(self) -> None:
        super().__init__("The model ran out of memory on this request: retry later, or send fewer images at once.")


# Out-of-memory errors by class name, so that no framework needs importing: TensorFlow, PyTorch (CUDA), Python.
OUT_OF_MEMORY_NAMES = {"ResourceExhaustedError", "OutOfMemoryError", "MemoryError"}


def script_error(error: BaseException) -> ServerError:
    """What an exception raised by the entry script becomes: 503 for out-of-memory, else Azure ML's 500."""
    if any(cls.__name__ in OUT_OF_MEMORY_NAMES for cls in type(error).__mro__):
        return ModelOutOfMemory()
    return ScriptFailed()


class ProtocolError(ServerError):
    """The front could not read a request as HTTP (server/front.py): answered before any app code runs, then the
    connection closes. The message names the HTTP reason and what was wrong."""

    scorehost_only = True


class MalformedRequest(ProtocolError):
    pass


class RequestTimeout(ProtocolError):
    """The client stopped sending in the middle of a request (nginx's client_body_timeout)."""


class RequestLineTooLong(ProtocolError):
    pass


class HeaderFieldsTooLarge(ProtocolError):
    pass


class UnsupportedTransferCoding(ProtocolError):
    """A Transfer-Encoding other than chunked (gzip, deflate, ...): its bytes would reach run() still coded."""


class InternalError(ServerError):
    def __init__(self) -> None:
        super().__init__("An unexpected internal error occurred. Check the logs for more info.")


STATUS: dict[type[ServerError], int] = {
    BadInput: 400,
    MalformedRequest: 400,
    Unauthorized: 401,
    MethodNotAllowed: 405,
    RequestTimeout: 408,
    PayloadTooLarge: 413,
    RequestLineTooLong: 414,
    UnsupportedInput: 415,
    HeaderTooLong: 431,
    HeaderFieldsTooLarge: 431,
    ScoringTimeout: 500,
    ResultUnusable: 500,
    ItemTooLarge: 500,
    ScriptFailed: 500,
    InternalError: 500,
    Overloaded: 503,
    ModelOutOfMemory: 503,
    ModelUnavailable: 503,
    UnsupportedTransferCoding: 501,
}


def status_of(error: ServerError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def message_response(status: int, message: str, request_id: Optional[str] = None,
                     run_function_failed: bool = False) -> AMLResponse:
    """The JSON error answer, built exactly as Azure ML's server builds it."""
    body = {"message": message}
    if request_id:
        body["request_id"] = request_id
    return AMLResponse(body, status, json_str=True, run_function_failed=run_function_failed)


def error_response(error: ServerError, request_id: Optional[str]) -> AMLResponse:
    response = message_response(status_of(error), error.message,
                                request_id if error.scorehost_only else None, error.run_function_failed)
    for name, value in error.extra_headers.items():
        response.headers[name] = value
    return response


def raw_error_response(error: ServerError) -> bytes:
    """A whole HTTP answer for an error met before (or without) the app: JSON with a new request id, then close."""
    head, body = raw_error_parts(error)
    return head + b"Connection: close\r\n\r\n" + body


def raw_error_parts(error: ServerError) -> tuple[bytes, bytes]:
    """That answer's head, but its Connection line and the blank line, and its body: as an app thread hands an
    answer to the connection, which decides Connection (server/connection.py, `answer`)."""
    status = status_of(error)
    reason = http.HTTPStatus(status).phrase
    request_id = str(uuid.uuid4())
    message = f"{reason}: {error.message}" if isinstance(error, ProtocolError) else error.message
    body = json.dumps({"message": message, "request_id": request_id}).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in error.extra_headers.items())
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nx-request-id: {request_id}\r\n{extra}")
    return head.encode("latin-1"), body
