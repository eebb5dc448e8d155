"""JSON schema -> GBNF, with llama-cpp-python's converter (part of our pinned dependency) and checks around it.

The converter handles type, properties, required, additionalProperties, items/prefixItems, min/maxItems, enum,
const, anyOf/oneOf (both as anyOf), allOf of objects, $ref/$defs, min/maxLength, simple patterns and the
date/time/uuid formats. It silently drops every other constraint, so schemas using one are refused rather
than answered with JSON that breaks them. Two bugs are patched so that output is always valid JSON.
"""
from __future__ import annotations

import functools
import json
import re

from llama_cpp.llama_grammar import RESERVED_NAMES, BuiltinRule, SchemaConverter

from edgelm.errors import UsageError

from .grammar import MAX_REPEAT, check_gbnf

# constraint keywords the converter would silently drop, so its output could break the schema
_UNSUPPORTED = frozenset({
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems", "contains",
    "minContains", "maxContains", "minProperties", "maxProperties", "patternProperties", "propertyNames",
    "dependentRequired", "dependentSchemas", "dependencies", "not", "if", "then", "else", "additionalItems",
    "unevaluatedProperties", "unevaluatedItems", "$dynamicRef", "$recursiveRef",
})
# the converter honours one of these groups per schema (first match wins) and ignores the others
_GROUPS = {
    "$ref": {"$ref"}, "anyOf/oneOf": {"anyOf", "oneOf"}, "const": {"const"}, "enum": {"enum"},
    "object": {"properties", "required", "additionalProperties"}, "allOf": {"allOf"},
    "array": {"items", "prefixItems", "minItems", "maxItems"}, "pattern": {"pattern"},
    "length": {"minLength", "maxLength"},
}
# JSON forbids raw control characters in strings; the converter's own rule lets them through
_JSON_CHAR = BuiltinRule(r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})', [])


class _Converter(SchemaConverter):
    """llama-cpp-python's JSON-schema converter with two fixes so that every output is valid JSON."""

    def _add_primitive(self, name: str, rule: BuiltinRule):
        return super()._add_primitive(name, _JSON_CHAR if name == "char" else rule)

    def _format_literal(self, literal: str) -> str:
        # json.dumps output keeps its backslash escapes only if GBNF sees them escaped too
        return super()._format_literal(literal.replace("\\", "\\\\"))

    def visit(self, schema, name):
        # lengths as GBNF {m,n}: the converter nests one ( )? per optional item, too deep for llama.cpp
        array = "items" in schema and schema.get("type") in (None, "array")
        lo_key, hi_key = ("minItems", "maxItems") if array else ("minLength", "maxLength")
        if (not {lo_key, hi_key} & schema.keys() or isinstance(schema.get("items"), list)
                or schema.get("type") not in (None, "array" if array else "string")):
            return super().visit(schema, name)
        rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
        lo, hi = schema.get(lo_key, 0), schema.get(hi_key)
        if array:
            item = self.visit(schema["items"], f"{name}{'-' if name else ''}item")
            more = f'("," space {item}){{{max(lo - 1, 0)},{"" if hi is None else max(hi - 1, 0)}}}'
            body = f"{item} {more}" if lo else ("" if hi == 0 else f"({item} {more})?")
            return self._add_rule(rule_name, f'"[" space {body} "]" space')
        char = self._add_primitive("char", _JSON_CHAR)
        return self._add_rule(rule_name, f'"\\"" {char}{{{lo},{"" if hi is None else hi}}} "\\"" space')


def schema_to_gbnf(schema: dict | str) -> str:
    """A JSON schema (dict or JSON text) -> GBNF whose every sentence is JSON valid under the schema."""
    if isinstance(schema, str):
        return _convert(schema)
    if not isinstance(schema, dict):
        raise UsageError(f"json_schema must be a dict or JSON text, not {type(schema).__name__}")
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError, RecursionError) as err:
        raise UsageError(f"json_schema is not JSON-serialisable: {err}") from None
    return _convert(text)


@functools.lru_cache(maxsize=32)  # validate() and the sampler both ask for it
def _convert(text: str) -> str:
    try:
        return _convert_checked(text)
    except RecursionError:
        raise UsageError("json_schema is nested too deeply") from None


def _convert_checked(text: str) -> str:
    try:
        schema = json.loads(text)
    except ValueError as err:
        raise UsageError(f"json_schema is not valid JSON: {err}") from None
    if not isinstance(schema, dict):
        raise UsageError(f"json_schema must be a JSON object, not {type(schema).__name__}")
    _check_schema(schema, "$")
    schema = _inline_root_ref(schema)
    converter = _Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        converter.visit(converter.resolve_refs(schema, "input"), "")
    except (AssertionError, ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        raise UsageError(f"json_schema cannot be converted to a grammar: {err}") from None
    gbnf = converter.format_grammar()
    try:
        check_gbnf(gbnf)
    except UsageError as err:  # e.g. a pattern's {m,n} nests one group per optional item
        raise UsageError(f"json_schema converts to a grammar llama.cpp cannot take: {err}") from None
    return gbnf


def _inline_root_ref(schema: dict) -> dict:
    """{"$ref": "#/$defs/x", "$defs": ...} -> x with the $defs: the converter skips everything beside a $ref."""
    ref = schema.get("$ref")
    if not (isinstance(ref, str) and ref.startswith("#/")):
        return schema
    target = schema
    for part in ref[2:].split("/"):
        target = target.get(part) if isinstance(target, dict) else None
    if not isinstance(target, dict) or "$ref" in target:
        raise UsageError(f"json_schema: cannot resolve the top-level $ref {ref!r}")
    return {**target, **{k: schema[k] for k in ("$defs", "definitions") if k in schema}}


def _check_schema(node, path: str) -> None:
    if not isinstance(node, dict):
        raise UsageError(f"json_schema at {path}: a schema must be an object, not {node!r}")
    bad = sorted(_UNSUPPORTED & node.keys())
    if bad:
        raise UsageError(f"json_schema at {path}: '{bad[0]}' is not supported by the grammar converter")
    groups = [g for g, keys in _GROUPS.items() if keys & node.keys()]
    if len(groups) > 1:
        raise UsageError(f"json_schema at {path}: '{groups[0]}' and '{groups[1]}' in one schema; "
                         f"the converter would honour only '{groups[0]}' (nest them with allOf/anyOf)")
    if isinstance(node.get("type"), list) and groups:
        raise UsageError(f"json_schema at {path}: a list of types cannot carry '{groups[0]}'; use anyOf")
    if not isinstance(node.get("required", []), list) or not isinstance(node.get("properties", {}), dict):
        raise UsageError(f"json_schema at {path}: 'required' must be an array and 'properties' an object")
    missing = set(node.get("required", ())) - set(node.get("properties", {}))
    if missing:
        raise UsageError(f"json_schema at {path}: required property '{sorted(missing)[0]}' is not in properties")
    if "pattern" in node:
        _check_pattern(node["pattern"], path)
    if "format" in node and {"minLength", "maxLength"} & node.keys():
        raise UsageError(f"json_schema at {path}: 'format' with minLength/maxLength is not supported")
    for lo_key, hi_key in (("minItems", "maxItems"), ("minLength", "maxLength")):
        lo, hi = node.get(lo_key, 0), node.get(hi_key, 0)
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_REPEAT for v in (lo, hi)):
            raise UsageError(f"json_schema at {path}: {lo_key}/{hi_key} must be integers in [0, {MAX_REPEAT}]")
        if hi_key in node and lo > hi:
            raise UsageError(f"json_schema at {path}: {lo_key} {lo} > {hi_key} {hi} cannot be satisfied")
    for key in ("properties", "$defs", "definitions"):
        if not isinstance(node.get(key, {}), dict):
            raise UsageError(f"json_schema at {path}: '{key}' must be an object")
        for name, sub in node.get(key, {}).items():
            _check_schema(sub, f"{path}.{key}.{name}")
    for key in ("anyOf", "oneOf", "allOf", "prefixItems", "enum"):
        if not isinstance(node.get(key, []), list):
            raise UsageError(f"json_schema at {path}: '{key}' must be an array")
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        for i, sub in enumerate(node.get(key, ())):
            _check_schema(sub, f"{path}.{key}[{i}]")
    for key in ("items", "additionalProperties"):
        sub = node.get(key)
        for i, s in enumerate(sub if isinstance(sub, list) else [sub]):
            if isinstance(s, dict):
                _check_schema(s, f"{path}.{key}" + (f"[{i}]" if isinstance(sub, list) else ""))


def _check_pattern(pattern, path: str) -> None:
    """The converter copies a pattern's characters into the JSON string raw: allow only JSON-safe ones."""
    if not isinstance(pattern, str) or not (pattern.startswith("^") and pattern.endswith("$")):
        raise UsageError(f"json_schema at {path}: pattern must be a string anchored as ^...$")
    body = pattern[1:-1]
    unsafe = any(c in '."\\' or ord(c) < 0x20 for c in body) or "[^" in body or "(?" in body
    spans = [(lo, hi) for cls in re.findall(r"\[([^\]]*)\]", body) for lo, hi in re.findall(r"(.)-(.)", cls)]
    if unsafe or any(lo <= q <= hi for lo, hi in spans for q in '"\\'):
        raise UsageError(f"json_schema at {path}: pattern {pattern!r} is not supported: use literal characters, "
                         f"[a-z] style classes, groups, | and quantifiers (no '.', '[^', escapes or quotes)")
