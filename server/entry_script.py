"""Loads the user's entry script and decides, once, how its run() will be called.

Azure ML calls run() in one of three input modes, chosen from how run() is declared: `@rawhttp` (the Flask request
itself), `@input_schema` (the JSON body unpacked into parameters), or undecorated (the body as a UTF-8 string).
Each mode is one small class that turns a request into run()'s keyword arguments; the choice is made when the
script loads, never per request.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import inspect
import io
import json
import logging
import os
import sys
from types import ModuleType
from typing import Any, Callable, Optional

import flask
from werkzeug.exceptions import RequestEntityTooLarge

from .errors import BadInput, MethodNotAllowed, PayloadTooLarge, UnsupportedInput
from .model_process import RequestSnapshot

log = logging.getLogger("scorehost.entry_script")


class ScriptLoadError(Exception):
    """The script cannot be served: import failed, init/run missing, or run() declared in a way Azure ML refuses."""


# The types werkzeug parses as a form (FormDataParser.parse), which AIHS's `request.data` then reads as empty.
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def unparsed_body(request: flask.Request) -> bytes:
    """The body as AIHS's `request.data` has it for an undecorated run(): werkzeug parses a form (`curl -d`, a
    multipart upload) and leaves nothing, so run() gets "" (passed through here, a first curl worked locally and
    failed on Azure ML: an outside review). The same parser decides (a multipart without a boundary is left whole,
    a part over Flask's MAX_FORM_MEMORY_SIZE is 413), on the body the front read, not a second copy of it."""
    body = request.get_data()
    if request.mimetype not in FORM_TYPES:
        return body
    try:
        rest, _, _ = request.make_form_data_parser().parse(io.BytesIO(body), request.mimetype,
                                                           request.content_length, request.mimetype_params)
    except RequestEntityTooLarge as ex:
        raise PayloadTooLarge(f"A form field is over {request.max_form_memory_size} bytes ({ex.description})") from None
    return rest.read()


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
    except RecursionError:
        raise BadInput("A query value is nested too deeply to parse as JSON.") from None


def query_parameters(request: flask.Request) -> dict[str, Any]:
    """GET query as Azure ML reads it: each value parsed as JSON where it parses; a repeated key becomes a list."""
    parsed: dict[str, Any] = {}
    for key in request.args.keys():
        values = [_json_or_text(v) for v in request.args.getlist(key)]
        parsed[key] = values[0] if len(values) == 1 else values
    return parsed


class InputMode:
    """Turns a request into run()'s keyword arguments (request_headers excluded)."""

    name = "base"

    def arguments(self, request: flask.Request) -> dict[str, Any]:
        if request.method == "GET":
            return self.from_query(request)
        if request.method == "POST":
            return self.from_body(request)
        raise MethodNotAllowed()

    def from_query(self, request: flask.Request) -> dict[str, Any]:
        raise NotImplementedError

    def from_body(self, request: flask.Request) -> dict[str, Any]:
        raise NotImplementedError


class RawRequestInput(InputMode):
    """@rawhttp: run() gets the request itself, whatever the method, and answers it."""

    name = "@rawhttp"

    def __init__(self, parameter: str):
        self.parameter = parameter

    def arguments(self, request: flask.Request) -> dict[str, Any]:
        return {self.parameter: request}


class StringInput(InputMode):
    """Undecorated run(): the POST body as a UTF-8 string, or the GET query as a JSON string."""

    name = "undecorated"

    def __init__(self, parameter: str):
        self.parameter = parameter

    def from_query(self, request: flask.Request) -> dict[str, Any]:
        return {self.parameter: json.dumps(query_parameters(request))}

    def from_body(self, request: flask.Request) -> dict[str, Any]:
        try:
            return {self.parameter: str(unparsed_body(request), "utf-8")}
        except UnicodeDecodeError as ex:
            raise BadInput(f"Input cannot be decoded as UTF-8: {ex}") from None


class SchemaInput(InputMode):
    """@input_schema: a JSON object whose keys are run()'s parameters."""

    name = "@input_schema"

    def __init__(self, parameters: list[inspect.Parameter]):
        self.parameters = parameters

    def from_query(self, request: flask.Request) -> dict[str, Any]:
        return self._pick(query_parameters(request))

    def from_body(self, request: flask.Request) -> dict[str, Any]:
        if not request.is_json:
            raise UnsupportedInput("Expects Content-Type to be application/json")
        body = request.get_data()
        try:
            decoded = json.loads(body)
        except json.JSONDecodeError as ex:
            if body:
                raise BadInput(f"POST body could not be decoded as JSON: {ex}") from None
            raise BadInput("POST body is empty. Expecting a JSON dictionary.") from None
        except (ValueError, RecursionError) as ex:  # an integer of over 4,300 digits; nesting past the stack
            why = "it is nested too deeply" if isinstance(ex, RecursionError) else str(ex)
            raise BadInput(f"POST body could not be decoded as JSON: {why}") from None
        if not isinstance(decoded, dict):
            raise BadInput("POST body should be a JSON dictionary.")
        return self._pick(decoded)

    def _pick(self, body: dict[str, Any]) -> dict[str, Any]:
        arguments = {}
        for p in self.parameters:
            value = body.get(p.name, p.default)
            if value is inspect.Parameter.empty:
                raise BadInput(f"A value is not provided for the {p.name!r} parameter.")
            arguments[p.name] = value
        return arguments


def defines(path: str, function: str) -> bool:
    """Whether the script defines `function` at module level, read without importing it: the master decides the
    serving mode before any worker exists, and must not import TensorFlow or CUDA before forking."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return False
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == function
               for node in tree.body)


def _import_file(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("entry_module", path)
    if spec is None or spec.loader is None:
        raise ScriptLoadError(f"Cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class OneLoop(asyncio.DefaultEventLoopPolicy):
    """asyncio.get_event_loop() in init() and run() as where Azure ML's server calls them, on its main thread: one
    loop, made on first use, the same in both (a client or future made in init() is driven in run()). scorehost
    calls the script from other threads (the init thread, app threads, the model process's batching thread), where
    the default policy raised "There is no current event loop" (an outside review); a loop per thread then broke
    init()'s futures in run() (a second review). Any thread without a loop of its own gets the process's one. With
    --threads above 1, two run() calls driving it at once fail as they would on one thread."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: Optional[asyncio.AbstractEventLoop] = None

    def get_event_loop(self) -> asyncio.AbstractEventLoop:
        try:
            return super().get_event_loop()
        except RuntimeError:
            if self.loop is None or self.loop.is_closed():
                self.loop = self.new_event_loop()
            self.set_event_loop(self.loop)
            return self.loop


def _rawhttp_flag() -> Any:
    """@rawhttp marks nothing on run() itself: it sets a module flag in azureml.contrib.services (its own design)."""
    from azureml.contrib.services import aml_request

    return aml_request


class EntryScript:
    """A loaded entry script: its init(), its run(), how run() is called, and the optional run_batch()."""

    def __init__(self, path: str, module: ModuleType, run: Callable, input_mode: InputMode, wants_headers: bool):
        self.path = path
        self.module = module
        self.run = run
        self.input_mode = input_mode
        self.wants_headers = wants_headers
        self.run_batch: Optional[Callable] = getattr(module, "run_batch", None)
        self.preprocess: Optional[Callable] = getattr(module, "preprocess", None)

    @classmethod
    def load(cls, path: str, app_root: str = ".", source_dir: Optional[str] = None) -> "EntryScript":
        """Import the script with sys.path as azmlinfsrv has it: the current directory first (gunicorn's `chdir`
        puts it there), then the app root and AZUREML_SOURCE_DIRECTORY (under the app root); not the script's own
        directory, which neither adds (a script importing a module beside it in a subfolder fails there, so it fails
        here too, with a hint)."""
        path = os.path.realpath(os.path.join(app_root, path))
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        sources = [os.path.realpath(os.path.join(app_root, source_dir))] if source_dir else []
        for directory in (os.path.realpath(app_root), *sources):
            if directory not in sys.path:
                sys.path.append(directory)
        if not isinstance(asyncio.get_event_loop_policy(), OneLoop):
            asyncio.set_event_loop_policy(OneLoop())
        flag = _rawhttp_flag()
        flag._rawHttpRequested = False  # a script loaded earlier in this process must not leak its mode
        try:
            module = _import_file(path)
        except ModuleNotFoundError as ex:
            beside = os.path.join(os.path.dirname(path), (ex.name or "").split(".")[0])
            if ex.name and os.path.dirname(path) not in sys.path and (
                    os.path.isfile(beside + ".py") or os.path.isdir(beside)):
                raise ScriptLoadError(
                    f"{ex} ({beside} is beside the script, but Azure ML's server puts the current directory and the "
                    f"app root on sys.path, not the script's folder: serve with --app-root {os.path.dirname(path)}, "
                    "as Azure ML's code folder would be)") from ex
            raise
        raw = bool(flag._rawHttpRequested)
        for name in ("init", "run"):
            if not callable(getattr(module, name, None)):
                raise ScriptLoadError(f"User script at {path} does not have a {name}() function defined.")
        run = module.run
        driver = getattr(module, "driver_module", None)
        if isinstance(driver, ModuleType) and callable(getattr(driver, "run", None)):
            run = driver.run  # SDK-generated proxies forward to the real script; call it directly, as Azure ML does
        input_mode, wants_headers = cls._analyse(run, raw)
        log.info("run() is %s: %s", input_mode.name, path)
        return cls(path, module, run, input_mode, wants_headers)

    @staticmethod
    def _analyse(run: Callable, raw: bool) -> tuple[InputMode, bool]:
        from inference_schema.schema_util import is_schema_decorated

        params = list(inspect.signature(run).parameters.values())
        allowed = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        if any(p.kind not in allowed for p in params):
            raise ScriptLoadError("run() cannot accept positional-only arguments, *args, or **kwargs.")
        wants_headers = any(p.name == "request_headers" for p in params)
        params = [p for p in params if p.name != "request_headers"]
        if not params:
            if wants_headers:
                raise ScriptLoadError('run() needs to accept an argument other than "request_headers".')
            raise ScriptLoadError("run() needs to accept an argument for input data.")
        schema = is_schema_decorated(run)
        if raw and schema:
            raise ScriptLoadError("run() cannot be decorated with both @rawhttp and @input_schema")
        if raw:
            return RawRequestInput(params[0].name), wants_headers
        if schema:
            return SchemaInput(params), wants_headers
        return StringInput(params[0].name), wants_headers

    def init(self) -> None:
        self.module.init()

    def batch_item(self, request: flask.Request) -> Any:
        """What run_batch() gets for this request, made in the HTTP worker: preprocess(x) when the script has
        preprocess(), else x itself, where x is what run() would get (for @input_schema, its keyword arguments; for
        @rawhttp, the request, which crosses to the model process as a snapshot). preprocess() may return a Flask
        Response (the request's answer, the model skipped) or raise an HTTPException such as BadRequest (its status)."""
        kwargs = self.input_mode.arguments(request)
        value = kwargs if isinstance(self.input_mode, SchemaInput) else next(iter(kwargs.values()))
        if self.preprocess is not None:
            return self.preprocess(value)
        return RequestSnapshot.of(value) if isinstance(value, flask.Request) else value

    def call_run(self, request: flask.Request) -> Callable[[], Any]:
        """Parse the request now (bad input fails here, in the request thread) and return the run() call to make."""
        kwargs = self.input_mode.arguments(request)
        if self.wants_headers:
            kwargs["request_headers"] = dict(request.headers)
        return lambda: self.run(**kwargs)
