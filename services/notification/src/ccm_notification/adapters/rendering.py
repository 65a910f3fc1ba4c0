"""Jinja2 rendering: defaults shipped in ``ccm_notification/templates``, per-practice overrides.

A template is one source with three blocks: ``subject`` and ``text`` (rendered without escaping,
for the email subject and plain-text part, webhooks and FHIR) and ``html`` (autoescaped). All
rendering is sandboxed (practice overrides are user input) and strict: a variable the template
uses but the service did not supply is an error, never an empty gap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from jinja2 import StrictUndefined, TemplateError, meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ccm_notification.domain.kinds import CONTEXT_FIELDS, Kind, check_fields

BLOCKS = ("subject", "text", "html")


class TemplateInvalid(Exception):
    """A template that cannot be used: bad syntax, a missing block, or an unknown variable."""


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str
    html: str


def default_source(kind: str) -> str:
    return (resources.files("ccm_notification") / "templates" / f"{kind}.jinja").read_text()


class Renderer:
    def __init__(self) -> None:
        self._escaping = ImmutableSandboxedEnvironment(
            autoescape=True, undefined=StrictUndefined, trim_blocks=False
        )
        self._plain = ImmutableSandboxedEnvironment(autoescape=False, undefined=StrictUndefined)

    def validate(self, kind: Kind, source: str) -> None:
        """Refuse a template that could not render every message of its kind."""
        try:
            parsed = self._plain.parse(source)
        except TemplateError as exc:
            raise TemplateInvalid(f"syntax error: {exc}") from None
        blocks = {b.name for b in parsed.find_all(_block_node())}
        if missing := [b for b in BLOCKS if b not in blocks]:
            raise TemplateInvalid(f"missing block(s): {', '.join(missing)}")
        unknown = meta.find_undeclared_variables(parsed) - set(kind.fields) - set(CONTEXT_FIELDS)
        if unknown:
            raise TemplateInvalid(
                f"unknown variable(s) {', '.join(sorted(unknown))}; {kind.name} offers "
                f"{', '.join((*kind.fields, *CONTEXT_FIELDS))}"
            )

    def render(
        self, kind: Kind, values: dict, context: dict, source: str | None = None
    ) -> Rendered:
        """Render all three parts; MissingFields or TemplateInvalid before anything is sent."""
        variables = check_fields(kind, values) | {f: context.get(f) for f in CONTEXT_FIELDS}
        source = source if source is not None else default_source(kind.name)
        try:
            plain = self._plain.from_string(source)
            escaping = self._escaping.from_string(source)
            subject = _block(plain, "subject", variables)
            text = _block(plain, "text", variables)
            html = _block(escaping, "html", variables)
        except TemplateError as exc:
            raise TemplateInvalid(f"{kind.name}: {exc}") from None
        # One line, no control characters: a subject is an email header.
        subject = re.sub(r"\s+", " ", subject).strip()
        return Rendered(subject=subject, text=text.strip() + "\n", html=html.strip())


def _block(template, name: str, variables: dict) -> str:  # noqa: ANN001
    if name not in template.blocks:
        raise TemplateInvalid(f"missing block {name}")
    return "".join(template.blocks[name](template.new_context(variables)))


def _block_node():  # noqa: ANN202
    from jinja2 import nodes

    return nodes.Block
