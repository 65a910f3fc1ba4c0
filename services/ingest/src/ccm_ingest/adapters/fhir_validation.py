"""FHIR R4 validation at the boundary: ``fhir.resources.R4B`` structure and datatypes, then the
rules of ours in ``domain.rules``. Errors become OperationOutcome issues naming the element."""

from __future__ import annotations

import json
import re
from datetime import date, datetime, time
from decimal import Decimal
from functools import cache, lru_cache
from typing import Annotated, Any, Union, get_args, get_origin

from defusedxml import DefusedXmlException
from defusedxml import ElementTree as DefusedET
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from ccm_ingest.domain.model import SUPPORTED_TYPES, FhirRejected, Issue
from ccm_ingest.domain.rules import check_resource


@lru_cache(maxsize=32)
def _model(resource_type: str):  # noqa: ANN202
    return get_fhir_model_class(resource_type)


def load_models() -> None:
    """Import the models of every supported type now (fhir.resources loads them on first use):
    at start-up, so the first requests do not pay for it and the models are among what the
    server freezes out of the garbage collector's reach."""
    for resource_type in SUPPORTED_TYPES:
        _model(resource_type)


def _expression(resource_type: str, loc: tuple) -> str:
    path = resource_type
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in ("root", "__root__"):
            path += f".{part}"
    return path


def _issue_code(error_type: str) -> str:
    if error_type.endswith("missing"):
        return "required"
    if error_type == "extra_forbidden":
        return "structure"
    return "value"


def structural_issues(resource: dict[str, Any]) -> list[Issue]:
    """What ``fhir.resources.R4B`` finds wrong with the resource (datatypes, cardinality…)."""
    rtype = resource["resourceType"]
    if unknown := _unknown_contained_types(resource, rtype):
        return unknown
    try:
        _model(rtype).model_validate(resource)
    except ValidationError as exc:
        issues = []
        for error in exc.errors(include_url=False):
            where = _expression(rtype, tuple(error.get("loc", ())))
            message = error.get("msg", "invalid")
            if error["type"] == "extra_forbidden":
                message = f"{where} is not an element of FHIR R4 {rtype}"
            elif (kind := message.removeprefix("Value error, ").partition(" value string does "
                                                                          "not match")[0]) \
                    in _FORMATS:
                message = f"not a FHIR {kind[0].lower()}{kind[1:]}: write {_FORMATS[kind]}"
            issues.append(Issue("error", _issue_code(error["type"]), f"{where}: {message}",
                                (where,)))
        return issues
    except (TypeError, ValueError, KeyError, AttributeError):
        # The library raises these for some shapes; their messages are about its own code.
        return [Issue("error", "structure", f"{rtype}: an element holds a JSON value of a "
                      "shape FHIR R4 does not allow there (e.g. a number where a resource or "
                      "an object belongs)", (rtype,))]
    return _json_types(resource, _model(rtype), rtype)


# The forms of FHIR's date and time types, for the library's "value string does not match spec
# regex", which says neither.
_FORMATS = {
    "Date": "YYYY, YYYY-MM or YYYY-MM-DD (e.g. 1974-12-25)",
    "DateTime": "YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss with a zone (Z or +hh:mm, "
                "e.g. 2026-03-04T14:00:00-05:00; fractions of a second allowed)",
    "Instant": "YYYY-MM-DDThh:mm:ss with a zone (Z or +hh:mm; fractions of a second allowed)",
    "Time": "hh:mm:ss (fractions of a second allowed)",
    "Decimal": "a JSON number",
}


def _unknown_contained_types(resource: dict[str, Any], rtype: str) -> list[Issue]:
    """Contained resources of no R4 type (the library fails on them with a KeyError)."""
    contained = resource.get("contained")
    issues = []
    for i, item in enumerate(contained if isinstance(contained, list) else []):
        kind = item.get("resourceType") if isinstance(item, dict) else None
        if isinstance(kind, str) and _resource_model(kind) is None:
            issues.append(Issue("error", "structure", f"contained resource type {kind!r} "
                                "is not a FHIR R4 resource type this server can validate",
                                (f"{rtype}.contained[{i}].resourceType",)))
    return issues


def _resource_model(kind: Any) -> Any:
    """The model of a contained resource's type, None for no (concrete) resource type."""
    if not isinstance(kind, str) or kind in ("Resource", "DomainResource"):  # abstract
        return None
    try:
        return _model(kind)
    except (KeyError, ValueError, ImportError, AttributeError):
        return None


# What a decoded JSON value is, in JSON's words (a resourceType that is no string).
_VALUE_KIND = {bool: "a boolean", int: "a number", float: "a number", list: "an array",
               dict: "an object", type(None): "null"}


def validate_resource(resource: Any, *, expected_type: str | None = None) -> dict[str, Any]:
    """The resource, if it is a valid R4 resource of a supported type; else FhirRejected."""
    if not isinstance(resource, dict):
        raise FhirRejected(400, [Issue("error", "structure", "the body is not a JSON object")])
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str):
        raise FhirRejected(400, [Issue("error", "structure", "resourceType is missing"
                                       if "resourceType" not in resource else
                                       "resourceType must be a string naming a resource type "
                                       f"(\"Patient\"), not {_VALUE_KIND[type(rtype)]}",
                                       ("resourceType",))])
    to_base = (" (a transaction or batch Bundle is POSTed to the base, /fhir)"
               if rtype == "Bundle" else "")
    if expected_type is not None and rtype != expected_type:
        raise FhirRejected(400, [Issue("error", "invalid", f"resourceType {rtype!r} does not "
                                       f"match the URL ({expected_type}){to_base}",
                                       ("resourceType",))])
    if rtype not in SUPPORTED_TYPES:
        raise FhirRejected(422, [unsupported_type_issue(rtype, to_base)])
    issues = check_resource(resource)
    # R5 shapes first: the library's messages about them would only confuse.
    if not any(i.code == "structure" for i in issues):
        issues += [i for i in structural_issues(resource) if i not in issues]
    text = resource.get("text")
    if type(text) is dict and type(text.get("div")) is str:
        issues += narrative_issues(text["div"], f"{rtype}.text.div")
    if issues:
        raise FhirRejected(422, issues)
    return resource


def unsupported_type_issue(rtype: str, hint: str = "") -> Issue:
    return Issue("error", "not-supported", f"resource type {rtype!r} is not supported here; "
                 f"supported: {', '.join(SUPPORTED_TYPES)}{hint}", ("resourceType",))


# ---- JSON value types --------------------------------------------------------------------------
# The library coerces what FHIR's JSON format forbids: "false", 0 or "yes" for a boolean, "25"
# for an integer or decimal, a number for a date, dateTime, instant or time (read as seconds
# since 1970), and takes null for any element. Stored as sent, such a value would reach events
# and every reader in a type other than its own ("false" reads as true; a dateTime 1700000000
# failed the CCM mapping with a 500, and careplan and billing set its events aside).

_INTEGERS = {"Integer", "PositiveInt", "UnsignedInt"}
_RESOURCE = "resource"  # a contained resource: the model of its own resourceType


def _kind(annotation: Any) -> Any:
    """boolean / integer / decimal / date / dateTime / instant / time (primitives whose JSON
    type the library does not enforce), a complex element's model class, ``_RESOURCE``, or
    None."""
    for arg in (get_args(annotation) or (annotation,)):
        if arg is type(None):
            continue
        if arg is bool:
            return "boolean"
        if get_origin(arg) is Annotated:
            base, *meta = get_args(arg)
            names = {type(m).__name__ for m in meta}
            if names & _INTEGERS:
                return "integer"
            if base is Decimal:
                return "decimal"
            if base in (datetime, date, time):
                return _DATE_TYPES.get(next(iter(names), ""), "dateTime")
            return None
        if get_origin(arg) in (list, Union) or get_args(arg):
            return _kind(arg)
        if getattr(arg, "__name__", "") == "ResourceType":
            return _RESOURCE
        if hasattr(arg, "get_model_klass"):
            return arg.get_model_klass()
    return None


@cache
def _shape(model: Any) -> dict[str, Any]:
    """JSON name → what ``_kind`` says of it, for the elements it says something of."""
    shape = {}
    for name, field in model.model_fields.items():
        if (kind := _kind(field.annotation)) is not None:
            shape[field.alias or name] = kind
    return shape


# The date and time types' metadata class (fhir.resources) → their FHIR name; JSON strings all.
_DATE_TYPES = {"Date": "date", "DateTime": "dateTime", "Instant": "instant", "Time": "time"}
_JSON_TYPES = {"boolean": (bool,), "integer": (int,), "decimal": (int, float),
               **dict.fromkeys(_DATE_TYPES.values(), (str,))}
_JSON_KIND = {"boolean": "true or false", "integer": "number without a fraction or exponent",
              "decimal": "number", **dict.fromkeys(_DATE_TYPES.values(), "string")}


def _json_types(value: dict[str, Any], model: Any, path: str) -> list[Issue]:
    """Issues for null elements, empty arrays and objects (FHIR JSON has none; ele-1),
    extensions with both or neither of a value and extensions (ext-1), and booleans, integers
    and decimals of another JSON type (paths are only built for what is reported or descended
    into)."""
    if not value:
        return [Issue("error", "structure", f"{path}: an element needs a value or children "
                      "(ele-1; leave an empty one out)", (path,))]
    issues = []
    shape = _shape(model)
    for key, item in value.items():
        if item is None or item == [] or item == {}:
            where = f"{path}.{key}"
            issues.append(Issue("error", "structure", f"{where}: "
                                f"{'null' if item is None else json.dumps(item)} is not a FHIR "
                                "JSON value (leave the element out; ele-1)", (where,)))
            continue
        if key in _EXTENSIONS and type(item) is list:
            issues += _ext_1(item, f"{path}.{key}")
        kind = shape.get(key)
        if kind is None:
            continue
        if type(kind) is str and kind != _RESOURCE:
            allowed = _JSON_TYPES[kind]
            if type(item) is list:
                bad = [(f"{path}.{key}[{i}]", one) for i, one in enumerate(item)
                       if one is not None and type(one) not in allowed]
            else:
                bad = [] if type(item) in allowed else [(f"{path}.{key}", item)]
            issues += [Issue("error", "value", f"{at}: a FHIR {kind} is a JSON "
                             f"{_JSON_KIND[kind]}, not {json.dumps(one)[:40]}", (at,))
                       for at, one in bad]
        elif type(item) is dict:
            issues += _json_types_of(item, kind, f"{path}.{key}")
        elif type(item) is list:
            for i, one in enumerate(item):
                if type(one) is dict:
                    issues += _json_types_of(one, kind, f"{path}.{key}[{i}]")
    return issues


_EXTENSIONS = ("extension", "modifierExtension")


def _ext_1(extensions: list[Any], path: str) -> list[Issue]:
    """ext-1: an extension has either a value[x] or extensions, not both, not neither."""
    issues = []
    for i, ext in enumerate(extensions):
        if type(ext) is not dict:
            continue
        valued = any(k.startswith("value") for k in ext)
        if valued == bool(ext.get("extension")):
            where = f"{path}[{i}]"
            issues.append(Issue("error", "invariant", f"{where}: ext-1: an extension has either "
                                f"a value[x] or extensions, not {'both' if valued else 'neither'}",
                                (where,)))
    return issues


def _json_types_of(value: dict[str, Any], kind: Any, path: str) -> list[Issue]:
    if kind == _RESOURCE:
        kind = _resource_model(value.get("resourceType"))
    return [] if kind is None else _json_types(value, kind, path)


# ---- Narrative (txt-1, txt-2) ------------------------------------------------------------------
# Narrative is XHTML that every viewer of the record renders: R4 allows only basic formatting in
# it, no scripts, forms, frames, objects or event attributes. Stored as sent and shown later, a
# <script> or onclick= would run in the viewer of whoever reads the record.

XHTML = "http://www.w3.org/1999/xhtml"
_ELEMENTS = frozenset(
    "a abbr acronym address b bdo big blockquote br caption cite code col colgroup dd dfn div dl "
    "dt em h1 h2 h3 h4 h5 h6 hr i img kbd li ol p pre q samp small span strong sub sup table "
    "tbody td tfoot th thead tr tt ul var".split())
_ATTRIBUTES = frozenset(
    "abbr accesskey align alt axis bgcolor border cellhalign cellpadding cellspacing cellvalign "
    "char charoff charset cite class colspan compact coords dir frame headers height href "
    "hreflang hspace id lang longdesc name nowrap rel rev rowspan rules scope shape span src "
    "start style summary tabindex title type usemap valign value vspace width".split())
_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
# A link may not run a script; an image may be inline (data:image/…) but not a script. Browsers
# read a URL's scheme after removing every tab and newline and the leading and trailing control
# characters and spaces (WHATWG URL): "java&#9;script:" is javascript: to them, so to us.
_SCRIPTED = {"href": re.compile(r"(javascript|vbscript|data):", re.IGNORECASE),
             "src": re.compile(r"(javascript|vbscript):", re.IGNORECASE)}
_URL_NOISE = re.compile(r"[\t\n\r]")
_CONTROLS_AND_SPACE = "".join(map(chr, range(0x21)))


def _scheme_part(url: str) -> str:
    return _URL_NOISE.sub("", url).strip(_CONTROLS_AND_SPACE)


def narrative_issues(div: str, where: str) -> list[Issue]:
    """txt-1 (only basic XHTML formatting: no scripts, forms, frames, objects or event
    attributes) and txt-2 (some content) of ``Narrative.div``."""
    def bad(message: str) -> list[Issue]:
        return [Issue("error", "invariant", f"{where}: {message}", (where,))]

    if "<!--" in div or "<?" in div or "<![CDATA[" in div:
        # XML drops them, but a viewer inserting the div as HTML ends a comment at "<!-->" and
        # a CDATA section or processing instruction at the first ">": what the check never saw
        # (an <img onerror=…> inside one) would run. Narrative has no use for them.
        return bad("txt-1: a narrative has no comments, CDATA sections or processing "
                   "instructions")
    try:
        root = DefusedET.fromstring(div, forbid_dtd=True)
    except DefusedXmlException:
        return bad("txt-1: a narrative has no DOCTYPE or entity declarations")
    except DefusedET.ParseError as exc:
        hint = (": HTML entities such as &nbsp; are not XML; write &#160; (or the character)"
                if "undefined entity" in str(exc) else "")
        return bad(f"txt-1: not well-formed XHTML ({str(exc)[:80]}){hint}")
    if root.tag != f"{{{XHTML}}}div":
        return bad(f"txt-1: the narrative is a <div xmlns=\"{XHTML}\">")
    images = False
    for node in root.iter():
        namespace, _, name = node.tag.rpartition("}")
        images = images or name == "img"
        if namespace[1:] != XHTML or name not in _ELEMENTS:
            return bad(f"txt-1: <{name}> is not allowed in a narrative (basic XHTML formatting "
                       "only: no scripts, forms, frames or objects)")
        for attribute, value in node.attrib.items():
            if attribute not in _ATTRIBUTES and attribute != _XML_LANG:
                return bad(f"txt-1: the attribute {attribute!r} of <{name}> is not allowed in a "
                           "narrative (basic formatting attributes only; no event attributes)")
            if attribute in _SCRIPTED and _SCRIPTED[attribute].match(_scheme_part(value)):
                return bad(f"txt-1: <{name} {attribute}> may not run a script")
    if not images and not "".join(root.itertext()).strip():
        return bad("txt-2: the narrative has no content")
    return []
