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
import json
import logging
import os
import sys
from types import ModuleType
from typing import Any, Callable, Optional

import flask

from .errors import BadInput, MethodNotAllowed, UnsupportedInput
from .model_process import RequestSnapshot

log = logging.getLogger("scorehost.entry_script")


class ScriptLoadError(Exception):
    """The script cannot be served: import failed, init/run missing, or run() declared in a way Azure ML refuses."""


# A body of these types reaches an undecorated run() as "" under Azure ML's server: Flask parses it as a form first
# (`curl -d` sends the first). Found by an outside review: passed through here, a first curl worked locally only.
FORM_TYPES = ("application/x-www-form-urlencoded", "application/x-url-encoded", "multipart/form-data")


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
            if request.mimetype in FORM_TYPES:  # AIHS reads `request.data`, empty once Flask parsed the form
                return {self.parameter: ""}
            return {self.parameter: str(request.get_data(), "utf-8")}
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


class LoopPerThread(asyncio.DefaultEventLoopPolicy):
    """asyncio.get_event_loop() works in init() and run() as it does where Azure ML's server calls them, on its main
    thread: the default policy makes a loop on first use there only, and scorehost calls the script from other
    threads (the init thread, app threads, the model process's batching thread), where it raised "There is no
    current event loop" (an outside review). Here each thread gets its own loop on first use."""

    def get_event_loop(self) -> asyncio.AbstractEventLoop:
        try:
            return super().get_event_loop()
        except RuntimeError:
            loop = self.new_event_loop()
            self.set_event_loop(loop)
            return loop


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
        """Import the script with the app root and AZUREML_SOURCE_DIRECTORY (under the app root) on sys.path, in
        Azure ML's order, and nothing else: not the script's own directory, which Azure ML's server does not add
        (a script importing a module beside it in a subfolder of the app root fails there, so it fails here too,
        with a hint)."""
        path = os.path.realpath(os.path.join(app_root, path))
        sources = [os.path.realpath(os.path.join(app_root, source_dir))] if source_dir else []
        for directory in (os.path.realpath(app_root), *sources):
            if directory not in sys.path:
                sys.path.append(directory)
        asyncio.set_event_loop_policy(LoopPerThread())
        flag = _rawhttp_flag()
        flag._rawHttpRequested = False  # a script loaded earlier in this process must not leak its mode
        try:
            module = _import_file(path)
        except ModuleNotFoundError as ex:
            beside = os.path.join(os.path.dirname(path), (ex.name or "").split(".")[0])
            if ex.name and os.path.dirname(path) not in sys.path and (
                    os.path.isfile(beside + ".py") or os.path.isdir(beside)):
                raise ScriptLoadError(
                    f"{ex} ({beside} is beside the script, but Azure ML's server puts only the app root on sys.path, "
                    f"not the script's folder: serve with --app-root {os.path.dirname(path)}, as Azure ML's code "
                    "folder would be)") from ex
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
