"""Every command's --json output is one envelope that the generated JSON schema accepts.

The schema comes from the result models (`vramplan schema`, render.json_schema); the outputs are
real CLI runs. The validator below covers the keywords pydantic emits, so the test needs no
extra dependency (jsonschema, when installed, checks the same outputs too)."""

from __future__ import annotations

import json
import math
import re

import pytest
from click.testing import CliRunner
from vramplan.cli import main
from vramplan.render import json_schema

TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is_type(value, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, TYPES[name])


def errors(value, schema: dict, root: dict, where: str = "$") -> list[str]:
    """Where `value` breaks `schema` (empty when it conforms)."""
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        return errors(value, {**root["$defs"][name], **{k: v for k, v in schema.items() if k != "$ref"}}, root, where)
    pick = schema.get("discriminator")
    if pick and isinstance(value, dict) and value.get(pick["propertyName"]) in pick["mapping"]:
        return errors(value, {"$ref": pick["mapping"][value[pick["propertyName"]]]}, root, where)
    out: list[str] = []
    for key in ("anyOf", "oneOf"):
        if key in schema:
            found = [errors(value, option, root, where) for option in schema[key]]
            matches = sum(not f for f in found)
            if matches == 0:  # the closest option says what is wrong
                out += min(found, key=len)
            elif key == "oneOf" and matches > 1:
                out.append(f"{where}: {matches} of the oneOf options match")
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, n) for n in names):
            return [*out, f"{where}: {type(value).__name__} is not {schema['type']}"]
    if "const" in schema and value != schema["const"]:
        out.append(f"{where}: {value!r} != {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{where}: {value!r} not in {schema['enum']}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            out.append(f"{where}: {value} < {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            out.append(f"{where}: {value} > {schema['maximum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            out.append(f"{where}: {value} <= {schema['exclusiveMinimum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", math.inf):
            out.append(f"{where}: length {len(value)} out of bounds")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            out.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", math.inf):
            out.append(f"{where}: more than {schema['maxItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                out += errors(item, schema["items"], root, f"{where}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        out += [f"{where}: missing {key}" for key in schema.get("required", []) if key not in value]
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                out += errors(item, props[key], root, f"{where}.{key}")
            elif extra is False:
                out.append(f"{where}: unexpected {key}")
            elif isinstance(extra, dict):
                out += errors(item, extra, root, f"{where}.{key}")
    return out


@pytest.fixture(scope="module")
def schema():
    return json_schema()


def _output(*args: str, exit_code: int = 0) -> dict:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == exit_code, result.output
    return json.loads(result.output)


CASES = {
    "estimate": ["estimate", "smollm2-135m-instruct", "--gpu", "l4", "--json"],
    "estimate-precisions": ["estimate", "gpt2", "--precision", "all", "--gpu", "t4", "--json"],
    "plan": ["plan", "llama-3.2-1b", "--gpu", "h100", "--gpu", "l4", "--json"],
    "plan-max": ["plan", "gpt2", "--gpu", "h100", "--max", "context", "--tp", "1", "--pp", "1", "--json"],
    "models": ["models", "--json"],
}


@pytest.mark.parametrize("command", CASES)
def test_real_outputs_match_the_schema(schema, command):
    data = _output(*CASES[command])
    assert data["schema_version"] == 1 and data["command"] == command
    assert set(data) == {"schema_version", "command", "request", "result"}
    assert errors(data, schema, schema) == []


def test_vllm_plan_plot_and_a_plan_that_does_not_fit_match_the_schema(schema, tmp_path):
    outputs = [
        _output("plan", "llama-3.1-8b", "--runtime", "vllm", "--gpu", "h100", "--tp", "2", "--json"),
        _output("plan", "llama-3.1-70b", "--gpu", "rtx4090", "--max-gpus", "2", "--json", exit_code=1),
    ]
    pytest.importorskip("matplotlib")
    outputs.append(_output("plot", "gpt2", "-o", str(tmp_path / "c.png"), "--json"))
    for data in outputs:
        assert errors(data, schema, schema) == []


def test_the_validator_catches_what_breaks_the_schema(schema):
    data = _output(*CASES["estimate"])
    assert errors({**data, "extra": 1}, schema, schema)
    assert errors({**data, "schema_version": 2}, schema, schema)
    broken = json.loads(json.dumps(data))
    broken["result"]["peak_device_bytes"] = "lots"
    assert any("peak_device_bytes" in e for e in errors(broken, schema, schema))
    del broken["result"]["breakdown"]
    assert any("breakdown" in e for e in errors(broken, schema, schema))


def test_the_schema_command_prints_it(schema):
    result = CliRunner().invoke(main, ["schema"])
    assert result.exit_code == 0 and json.loads(result.output) == json.loads(json.dumps(schema))


def test_jsonschema_agrees_when_installed(schema):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator(schema).validate(_output(*CASES["plan"]))
