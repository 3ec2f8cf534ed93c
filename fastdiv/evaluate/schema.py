"""The schema of ``results.json``: :data:`RESULTS_SCHEMA` (a JSON Schema, draft 2020-12 subset) and
:func:`validate_results`, which checks it plus the rules a schema cannot state (one cell per ε, one
flag string per repeat). The checker below covers the keywords the schema uses, so validation needs no
third-party package."""
from __future__ import annotations

import re

__all__ = ["RESULTS_SCHEMA", "SCHEMA_NAME", "SCHEMA_VERSION", "validate_results"]

SCHEMA_NAME = "fastdiv.evaluate.results"
SCHEMA_VERSION = 1

_NUM_OR_NULL = {"type": ["number", "null"]}
_FRACTION = {"type": "number", "minimum": 0, "maximum": 1}
# an ε: a fraction of the [0, 1] range for ℓ∞, any length >= 0 for ℓ2 (validate_results checks the ℓ∞ bound)
_EPS = {"type": "number", "minimum": 0}
_ACC = {"type": "object", "required": ["mean", "std", "values"],
        "properties": {"mean": _FRACTION, "std": {"type": "number", "minimum": 0},
                       "values": {"type": "array", "items": _FRACTION, "minItems": 1}}}
_FLAGS = {"type": "array", "items": {"type": "string", "pattern": "^[01]*$"}}
_CELL = {"type": "object", "required": ["eps", "ensemble", "worst_case"],
         "properties": {"eps": _EPS, "settings": {"type": "object"}, "ensemble": _ACC, "worst_case": _ACC,
                        "correct": _FLAGS, "worst_correct": _FLAGS}}
_ROW = {"type": "object", "required": ["key", "label", "attack", "form", "results"],
        "properties": {"key": {"type": "string"}, "label": {"type": "string"},
                       "attack": {"type": ["string", "null"]},
                       "form": {"type": ["string", "null"], "enum": ["fixed", "one", "mean", None]},
                       "results": {"type": "array", "items": _CELL}}}
_STAT = {"type": "object", "required": ["mean", "std", "quantiles"],
         "properties": {"mean": _NUM_OR_NULL, "std": _NUM_OR_NULL, "quantiles": {"type": "object"},
                        "values": {"type": "array", "items": _NUM_OR_NULL}}}
_CHECK = {"type": "object", "required": ["id", "name", "status", "detail", "numbers"],
          "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 5}, "name": {"type": "string"},
                         "status": {"type": "string", "enum": ["pass", "fail", "skipped"]},
                         "detail": {"type": "string"}, "numbers": {"type": ["object", "array"]}}}

#: JSON Schema (draft 2020-12 subset) of ``results.json``; :func:`validate_results` checks it without
#: third-party packages. Accuracies are fractions in [0, 1]; per-example flags are '0'/'1' strings in
#: test-set order, one per repeat.
RESULTS_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "fastdiv evaluate results",
    "type": "object",
    "required": ["schema", "schema_version", "created", "fastdiv_version", "torch_version", "device", "world_size",
                 "model", "data", "settings", "clean", "table", "curve", "transfer", "gradients", "obfuscation",
                 "timing"],
    "properties": {
        "schema": {"type": "string", "enum": [SCHEMA_NAME]},
        "schema_version": {"type": "integer", "enum": [SCHEMA_VERSION]},
        "created": {"type": "string"}, "fastdiv_version": {"type": "string"}, "torch_version": {"type": "string"},
        "device": {"type": "string"}, "world_size": {"type": "integer", "minimum": 1},
        "command": {"type": ["string", "null"]},
        "run": {"type": ["object", "null"]},
        "protocol": {"type": ["object", "null"], "required": ["name", "description", "cascade", "config"]},
        "model": {"type": "object", "required": ["name", "class", "stochastic", "members", "parameters"],
                  "properties": {"name": {"type": "string"}, "class": {"type": "string"},
                                 "stochastic": {"type": "boolean"}, "randomness": {"type": "string"},
                                 "members": {"type": ["integer", "null"]},
                                 "parameters": {"type": "integer", "minimum": 0}}},
        "data": {"type": "object", "required": ["dataset", "split", "num_examples", "in_shape"],
                 "properties": {"dataset": {"type": "string"}, "split": {"type": "string"},
                                "num_examples": {"type": "integer", "minimum": 1},
                                "in_shape": {"type": "array", "items": {"type": "integer"}}}},
        "settings": {"type": "object", "required": ["attacks", "eps", "forms", "steps", "alpha_factor", "eot_samples",
                                                    "ensemble_samples", "repeats", "seed"],
                     "properties": {"eps": {"type": "array", "items": _EPS, "minItems": 1},
                                    "attacks": {"type": "array", "items": {"type": "string"}},
                                    "repeats": {"type": "integer", "minimum": 1}}},
        "clean": {"type": "object", "required": ["ensemble", "worst_case"],
                  "properties": {"ensemble": _ACC, "worst_case": _ACC, "correct": _FLAGS, "worst_correct": _FLAGS}},
        "table": {"type": "object", "required": ["eps", "rows", "total"],
                  "properties": {"eps": {"type": "array", "items": _EPS}, "rows": {"type": "array", "items": _ROW},
                                 "total": _ROW}},
        "curve": {"type": ["object", "null"], "required": ["attack", "form", "label", "points"],
                  "properties": {"points": {"type": "array", "items": {
                      "type": "object", "required": ["eps", "ensemble", "worst_case"],
                      "properties": {"eps": _EPS, "ensemble": _ACC, "worst_case": _ACC}}}}},
        "transfer": {"type": "object", "required": ["sample_models", "mra", "surrogate"],
                     "properties": {
                         "sample_models": {"type": ["object", "null"],
                                           "required": ["k", "eps", "attack", "source", "matrix", "off_diagonal_mean"],
                                           "properties": {"k": {"type": "integer", "minimum": 2},
                                                          "source": {"enum": ["members", "sample_models"]},
                                                          "matrix": {"type": "array", "items": {
                                                              "type": "array", "items": _FRACTION}}}},
                         "mra": {"type": ["object", "null"], "required": ["benign", "members", "results"]},
                         "surrogate": {"type": ["object", "null"], "required": ["name", "eps", "rows"]}}},
        "gradients": {"type": ["object", "null"],
                      "properties": {"stats": {"type": ["object", "null"], "additionalProperties": _STAT},
                                     "projection": {"type": ["object", "null"],
                                                    "required": ["example", "num_samples", "rho", "points", "mean"]},
                                     "cosine": {"type": ["object", "null"], "required": ["example", "matrix"]},
                                     "diversity": {"type": ["object", "null"],
                                                   "required": ["k", "ambiguity_entropy", "l_d", "l_s"]},
                                     "gaas": {"type": ["object", "null"],
                                              "required": ["ks", "eps", "fraction", "all_k", "mean_count"]}}},
        "obfuscation": {"type": "object", "required": ["checks", "passed"],
                        "properties": {"checks": {"type": "array", "items": _CHECK},
                                       "passed": {"type": ["boolean", "null"]}}},
        "timing": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}},
    },
}

# JSON types -> Python types; a bool is not a number (JSON tells them apart, Python's isinstance does not)
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None), "number": (int, float),
          "integer": int}


def _is(value, json_type: str) -> bool:
    return isinstance(value, _TYPES[json_type]) and not (json_type in ("number", "integer") and isinstance(value, bool))


def _check(value, schema: dict, path: str) -> None:
    """Raises ``ValueError`` naming ``results<path>`` where ``value`` breaks ``schema`` (type, enum,
    minimum / maximum, pattern, required / properties / additionalProperties, minItems / items)."""
    where = f"results{path}"
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_is(value, t) for t in types):
            raise ValueError(f"{where}: expected {'/'.join(types)}, got {type(value).__name__}")
    if "enum" in schema and value not in schema["enum"]:
        raise ValueError(f"{where}: {value!r} is not one of {schema['enum']}")
    if _is(value, "number"):
        if value < schema.get("minimum", value):
            raise ValueError(f"{where}: {value} < minimum {schema['minimum']}")
        if value > schema.get("maximum", value):
            raise ValueError(f"{where}: {value} > maximum {schema['maximum']}")
    elif isinstance(value, str) and "pattern" in schema and not re.fullmatch(schema["pattern"], value):
        raise ValueError(f"{where}: {value[:40]!r} does not match {schema['pattern']}")
    elif isinstance(value, dict):
        missing = [key for key in schema.get("required", []) if key not in value]
        if missing:
            raise ValueError(f"{where}: missing required key {missing[0]!r}")
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        for key, v in value.items():
            if key in props:
                _check(v, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                _check(v, extra, f"{path}.{key}")
            elif extra is False:
                raise ValueError(f"{where}: unexpected key {key!r}")
    elif isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            raise ValueError(f"{where}: needs at least {schema['minItems']} items, got {len(value)}")
        for i, v in enumerate(value if "items" in schema else []):
            _check(v, schema["items"], f"{path}[{i}]")


def validate_results(results: dict) -> dict:
    """Checks ``results`` against :data:`RESULTS_SCHEMA` plus the cross-field rules (one cell per ε in
    every row, one flag string per repeat, each of ``num_examples`` characters). Raises ``ValueError``
    with the path of the first problem; returns ``results``."""
    _check(results, RESULTS_SCHEMA, "")
    eps = results["table"]["eps"]
    if eps != results["settings"]["eps"]:
        raise ValueError("results.table.eps: differs from settings.eps")
    if results["settings"].get("norm", "linf") == "linf" and any(e > 1 for e in eps):
        raise ValueError(f"results.settings.eps: an ℓ∞ ε must be in [0, 1], got {eps}")
    n, reps = results["data"]["num_examples"], results["settings"]["repeats"]

    def flags_ok(where: str, rec: dict) -> None:
        for key in ("correct", "worst_correct"):
            if key in rec and (len(rec[key]) != reps or any(len(s) != n for s in rec[key])):
                raise ValueError(f"results{where}.{key}: expected {reps} strings of {n} flags")
        for key in ("ensemble", "worst_case"):
            if key in rec and len(rec[key]["values"]) != reps:
                raise ValueError(f"results{where}.{key}.values: expected {reps} values (one per repeat)")

    flags_ok(".clean", results["clean"])
    rows = results["table"]["rows"]
    for i, row in enumerate(rows + [results["table"]["total"]]):
        where = f".table.rows[{i}]" if i < len(rows) else ".table.total"
        if [c["eps"] for c in row["results"]] != eps:
            raise ValueError(f"results{where}.results: expected one cell per ε {eps}")
        for j, c in enumerate(row["results"]):
            flags_ok(f"{where}.results[{j}]", c)
    return results
