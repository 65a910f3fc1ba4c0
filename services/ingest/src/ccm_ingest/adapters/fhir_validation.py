"""FHIR R4 validation at the boundary: ``fhir.resources.R4B`` structure and datatypes, then the
rules of ours in ``domain.rules``. Errors become OperationOutcome issues naming the element."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

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
            issues.append(Issue("error", _issue_code(error["type"]), f"{where}: {message}",
                                (where,)))
        return issues
    except (TypeError, ValueError, KeyError, AttributeError):
        # The library raises these for some shapes; their messages are about its own code.
        return [Issue("error", "structure", f"{rtype}: an element holds a JSON value of a "
                      "shape FHIR R4 does not allow there (e.g. a number where a resource or "
                      "an object belongs)", (rtype,))]
    return []


def _unknown_contained_types(resource: dict[str, Any], rtype: str) -> list[Issue]:
    """Contained resources of no R4 type (the library fails on them with a KeyError)."""
    contained = resource.get("contained")
    issues = []
    for i, item in enumerate(contained if isinstance(contained, list) else []):
        kind = item.get("resourceType") if isinstance(item, dict) else None
        if isinstance(kind, str):
            try:
                _model(kind)
            except (KeyError, ValueError, ImportError, AttributeError):
                issues.append(Issue("error", "structure", f"contained resource type {kind!r} "
                                    "is not a FHIR R4 resource type",
                                    (f"{rtype}.contained[{i}].resourceType",)))
    return issues


def validate_resource(resource: Any, *, expected_type: str | None = None) -> dict[str, Any]:
    """The resource, if it is a valid R4 resource of a supported type; else FhirRejected."""
    if not isinstance(resource, dict):
        raise FhirRejected(400, [Issue("error", "structure", "the body is not a JSON object")])
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str):
        raise FhirRejected(400, [Issue("error", "structure", "resourceType is missing",
                                       ("resourceType",))])
    if expected_type is not None and rtype != expected_type:
        raise FhirRejected(400, [Issue("error", "invalid", f"resourceType {rtype!r} does not "
                                       f"match the URL ({expected_type})", ("resourceType",))])
    if rtype not in SUPPORTED_TYPES:
        raise FhirRejected(422, [unsupported_type_issue(rtype)])
    issues = check_resource(resource)
    # R5 shapes first: the library's messages about them would only confuse.
    if not any(i.code == "structure" for i in issues):
        issues += [i for i in structural_issues(resource) if i not in issues]
    if issues:
        raise FhirRejected(422, issues)
    return resource


def unsupported_type_issue(rtype: str) -> Issue:
    return Issue("error", "not-supported", f"resource type {rtype!r} is not supported here; "
                 f"supported: {', '.join(SUPPORTED_TYPES)}", ("resourceType",))
