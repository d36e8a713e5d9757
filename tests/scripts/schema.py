"""@input_schema: the JSON body's keys become run()'s parameters; request_headers is passed too."""
from inference_schema.parameter_types.standard_py_parameter_type import StandardPythonParameterType
from inference_schema.schema_decorators import input_schema, output_schema


def init():
    pass


@input_schema("a", StandardPythonParameterType(1))
@input_schema("b", StandardPythonParameterType("x"))
@output_schema(StandardPythonParameterType({"a": 1, "b": "x", "custom": "c"}))
def run(a, b="default", request_headers=None):
    return {"a": int(a), "b": str(b), "custom": (request_headers or {}).get("X-Custom", "")}
