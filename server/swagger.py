"""/swagger.json: the OpenAPI document Azure ML serves for an entry script, built once when the script loads.

A user's own swagger file in the app root wins (swagger.json or swagger2.json for version 2, swagger3.json,
swagger3.1.json); otherwise Azure ML's templates are filled with inference-schema's input and output schemas, or
with an empty object schema for a script without @input_schema. Versions: 2 (alias 2.0), 3 (alias 3.0), 3.1.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

TEMPLATES = os.path.join(os.path.dirname(__file__), "swagger_templates")

# version -> (aliases, template file, user files tried in order)
VERSIONS: dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]] = {
    "2": (("2", "2.0"), "swagger2_template.json", ("swagger.json", "swagger2.json")),
    "3": (("3", "3.0"), "swagger3_template.json", ("swagger3.json",)),
    "3.1": (("3.1",), "swagger3_template.json", ("swagger3.1.json",)),
}


class SwaggerNotFound(Exception):
    pass


class Swagger:
    def __init__(self, run: Callable, app_root: str, environ: Optional[dict[str, str]] = None):
        environ = dict(os.environ) if environ is None else environ
        self.documents: dict[str, dict] = {}
        self.supported: list[str] = []
        for version, (aliases, template, user_files) in VERSIONS.items():
            document = self._user_file(app_root, user_files) or self._generate(run, version, aliases, template, environ)
            if document is not None:
                self.supported.append(version)
                for alias in aliases:
                    self.documents[alias] = document
        self.supported.sort()

    def get(self, version: str) -> dict:
        supported = ", ".join(self.supported)
        if not any(version in aliases for aliases, _, _ in VERSIONS.values()):
            raise SwaggerNotFound(f"Swagger version [{version}] is not valid. Supported versions: [{supported}].")
        if version not in self.documents:
            raise SwaggerNotFound(f"Swagger version [{version}] is not supported for the scoring script. "
                                  f"Supported swagger versions: [{supported}].")
        return self.documents[version]

    @staticmethod
    def _user_file(app_root: str, names: tuple[str, ...]) -> Optional[dict]:
        for name in names:
            try:
                with open(os.path.join(app_root, name), encoding="utf-8") as f:
                    return json.load(f)
            except FileNotFoundError:
                continue
        return None

    @staticmethod
    def _generate(run: Callable, version: str, aliases: tuple[str, ...], template: str,
                  environ: dict[str, str]) -> Optional[dict]:
        from inference_schema.schema_util import (get_input_schema, get_output_schema, get_supported_versions,
                                                  is_schema_decorated)

        if not set(aliases) & set(get_supported_versions(run)):
            return None
        if is_schema_decorated(run):
            input_schema, output_schema = get_input_schema(run), get_output_schema(run)
        else:
            input_schema = output_schema = {"type": "object", "example": {}}
        prefix = environ.get("SERVICE_PATH_PREFIX", "")
        with open(os.path.join(TEMPLATES, template), encoding="utf-8") as f:
            text = (f.read().replace("$SERVICE_NAME$", environ.get("SERVICE_NAME", "ML service"))
                    .replace("$SERVICE_VERSION$", environ.get("SERVICE_VERSION", "1.0"))
                    .replace("$PATH_PREFIX$", f"/{prefix.strip('/')}" if prefix else ""))
        document: dict[str, Any] = json.loads(text)
        if version == "2":
            document["definitions"]["ServiceInput"] = input_schema
            document["definitions"]["ServiceOutput"] = output_schema
        else:
            document["components"]["schemas"]["ServiceInput"] = input_schema
            document["components"]["schemas"]["ServiceOutput"] = output_schema
        if version == "3.1":
            document["openapi"] = "3.1.0"
        return document
