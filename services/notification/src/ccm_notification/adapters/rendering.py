"""Jinja2 rendering: defaults shipped in ``ccm_notification/templates``, per-practice overrides.

A template is one source with three blocks: ``subject`` and ``text`` (rendered without escaping,
for the email subject and plain-text part, webhooks and FHIR) and ``html`` (autoescaped). All
rendering is sandboxed (practice overrides are user input) and strict: a variable the template
uses but the service did not supply is an error, never an empty gap.

Rendering is also **bounded** (``Limits``): a practice's override runs in the service's process,
so one render may spend only so many loop iterations, calls, filters and operators, so much wall
time, and build only so large a value or block; the operations that could allocate a huge value
in one step (repetition, powers, widths, ``join``/``replace``/``indent``) are checked before they
run. Anything over a limit is ``TemplateInvalid``, like any other error raised while rendering.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from functools import wraps
from importlib import resources
from typing import Any

from jinja2 import StrictUndefined, TemplateError, meta, nodes, pass_context
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ccm_notification.domain.kinds import CONTEXT_FIELDS, Kind, check_fields, sample_values

BLOCKS = ("subject", "text", "html")


class TemplateInvalid(Exception):
    """A template that cannot be used: bad syntax, a missing block, an unknown variable, an error
    while rendering, or a render over the limits."""


@dataclass(frozen=True)
class Limits:
    """What one render (all three blocks) may spend."""

    steps: int = 100_000  # loop iterations, calls, filters and intercepted operators
    seconds: float = 2.0  # wall-clock time
    chars: int = 100_000  # characters of one block, and of any value the template builds
    range_items: int = 10_000  # items of one range()
    width: int = 1_000  # a width or count argument: center, indent, slice, %-format widths …
    int_bits: int = 10_000  # an integer the template builds (``**``, ``*``)


LIMITS = Limits()


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str
    html: str


def default_source(kind: str) -> str:
    return (resources.files("ccm_notification") / "templates" / f"{kind}.jinja").read_text()


class Renderer:
    def __init__(self, limits: Limits = LIMITS) -> None:
        self.limits = limits
        self._escaping = _BoundedSandbox(limits, autoescape=True, undefined=StrictUndefined)
        self._plain = _BoundedSandbox(limits, autoescape=False, undefined=StrictUndefined)

    def validate(self, kind: Kind, source: str) -> None:
        """Refuse a template that could not render every message of its kind: its syntax,
        blocks and variables, then a render with sample values (with and without the optional
        fields), which must neither raise nor exceed the limits."""
        # Parsing, and the variables' analysis (it compiles the template: an unknown filter or
        # test, a block defined twice are found there), fail on the source's own faults as
        # rendering does, TemplateError or not: nesting deeper than Python recurses, an integer
        # literal longer than Python converts (ValueError). Uncaught, they answered 500.
        try:
            parsed = self._plain.parse(source)
            used = meta.find_undeclared_variables(parsed)
        except TemplateError as exc:  # the message alone: the analysis adds "<introspection>"
            raise TemplateInvalid(f"syntax error: {exc.message or exc}") from None
        except RecursionError:
            raise TemplateInvalid("nested too deeply") from None
        except Exception as exc:  # noqa: BLE001 - any error of a user's template is its own
            raise TemplateInvalid(f"{type(exc).__name__}: {exc}") from None
        blocks = {b.name for b in parsed.find_all(nodes.Block)}
        if missing := [b for b in BLOCKS if b not in blocks]:
            raise TemplateInvalid(f"missing block(s): {', '.join(missing)}")
        unknown = used - set(kind.fields) - set(CONTEXT_FIELDS)
        if unknown:
            raise TemplateInvalid(
                f"unknown variable(s) {', '.join(sorted(unknown))}; {kind.name} offers "
                f"{', '.join((*kind.fields, *CONTEXT_FIELDS))}"
            )
        context = {"practice_name": "Sample Clinic", "provider_name": "Dr. Sample",
                   "ack_url": "https://ccm.example/v1/ack/sample"}
        full = sample_values(kind)
        without_optional = {f: v for f, v in full.items() if f not in kind.optional}
        for values, case in ((full, "sample values"), (without_optional, "no optional fields")):
            try:
                self.render(kind, values, context, source)
            except TemplateInvalid as exc:
                raise TemplateInvalid(f"does not render with {case}: {exc}") from None

    def render(
        self, kind: Kind, values: dict, context: dict, source: str | None = None
    ) -> Rendered:
        """Render all three parts; MissingFields or TemplateInvalid before anything is sent."""
        variables = check_fields(kind, values) | {f: context.get(f) for f in CONTEXT_FIELDS}
        source = source if source is not None else default_source(kind.name)
        token = _BUDGET.set(_Budget(self.limits))
        try:
            for name, value in variables.items():
                _check_size(value, f"the value of {name}")
            plain = self._plain.from_string(source)
            escaping = self._escaping.from_string(source)
            subject = _block(plain, "subject", variables, self.limits)
            text = _block(plain, "text", variables, self.limits)
            html = _block(escaping, "html", variables, self.limits)
        except TemplateInvalid as exc:
            raise TemplateInvalid(f"{kind.name}: {exc}") from None
        except TemplateError as exc:
            raise TemplateInvalid(f"{kind.name}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any error of a user's template is its own
            raise TemplateInvalid(f"{kind.name}: {type(exc).__name__}: {exc}") from None
        finally:
            _BUDGET.reset(token)
        # One line, no control characters: a subject is an email header.
        subject = re.sub(r"\s+", " ", subject).strip()
        return Rendered(subject=subject, text=text.strip() + "\n", html=html.strip())


def _block(template, name: str, variables: dict, limits: Limits) -> str:  # noqa: ANN001
    if name not in template.blocks:
        raise TemplateInvalid(f"missing block {name}")
    parts: list[str] = []
    size = 0
    # Consumed piece by piece, so a block over the limit stops as soon as it is.
    for piece in template.blocks[name](template.new_context(variables)):
        size += len(piece)
        if size > limits.chars:
            raise TemplateInvalid(f"block {name} is longer than {limits.chars} characters")
        parts.append(piece)
    return "".join(parts)


# -- the budget of one render ----------------------------------------------------------------


class _Budget:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.steps = limits.steps
        self.deadline = time.monotonic() + limits.seconds

    def spend(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise TemplateInvalid(
                f"rendering takes more than {self.limits.steps} steps (loop iterations, calls, "
                "filters, operators)"
            )
        if time.monotonic() > self.deadline:
            raise TemplateInvalid(f"rendering takes longer than {self.limits.seconds} s")


# Set for the duration of one render (in whichever thread renders).
_BUDGET: ContextVar[_Budget | None] = ContextVar("ccm_render_budget", default=None)


def _limits() -> Limits:
    budget = _BUDGET.get()
    return budget.limits if budget is not None else LIMITS


def _spend() -> None:
    if (budget := _BUDGET.get()) is not None:
        budget.spend()


def _check_size(value: Any, what: str) -> Any:  # noqa: ANN401
    limits = _limits()
    if isinstance(value, str | bytes | list | tuple | dict | set | frozenset):
        if len(value) > limits.chars:
            raise TemplateInvalid(f"{what} is larger than {limits.chars} items or characters")
    elif isinstance(value, int) and value.bit_length() > limits.int_bits:
        raise TemplateInvalid(f"{what} is an integer larger than {limits.int_bits} bits")
    return value


def _check_width(value: Any, what: str) -> None:  # noqa: ANN401
    width = _limits().width
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > width:
        raise TemplateInvalid(f"{what} {value} is over the limit of {width}")


# printf widths/precisions ("%999999d", "%.*f") and str.format specs ("{:>999999}").
_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")
_FORMAT_SPEC = re.compile(r"\{[^{}]*?:[^{}]*?(\d+)")


def _check_format(fmt: Any, printf: bool) -> None:  # noqa: ANN401
    if not isinstance(fmt, str):
        return
    if printf:
        for match in _PRINTF_SPEC.finditer(fmt):
            for number in match.groups():
                if number == "*":
                    raise TemplateInvalid("a '*' width in a %-format is not allowed")
                if number:
                    _check_width(int(number), "a %-format width")
    else:
        for match in _FORMAT_SPEC.finditer(fmt):
            _check_width(int(match.group(1)), "a format width")


def _check_join(separator: Any, items: Any) -> None:  # noqa: ANN401
    """A join's size before it is made: the separators and the items' own text."""
    if isinstance(items, str | list | tuple | dict | set | frozenset):
        limit = _limits().chars
        size = len(str(separator)) * max(len(items) - 1, 0)
        for item in items:
            size += len(item) if isinstance(item, str) else len(str(item))
            if size > limit:
                raise TemplateInvalid(f"join would be longer than {limit} characters")


def _check_replace(text: Any, old: Any, new: Any) -> None:  # noqa: ANN401
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        grows = text.count(old) * max(len(new) - len(old), 0)
        if len(text) + grows > _limits().chars:
            raise TemplateInvalid(f"replace would be longer than {_limits().chars} characters")


# str methods whose integer argument is a width or a count of copies.
_WIDTH_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})


def _check_filled(template: str, values: Iterable[Any]) -> None:  # noqa: ANN401
    """A format's size before it is made: every placeholder may take the longest value."""
    longest = max((len(str(v)) for v in values), default=0)
    if len(template) + template.count("{" if "{" in template else "%") * longest \
            > _limits().chars:
        raise TemplateInvalid(f"a format would be longer than {_limits().chars} characters")


def _check_method(method: Any, args: tuple, kwargs: dict) -> None:  # noqa: ANN401
    owner = getattr(method, "__self__", None)
    if not isinstance(owner, str):
        return
    name = getattr(method, "__name__", "")
    if name in _WIDTH_METHODS:
        for arg in (*args, *kwargs.values()):
            _check_width(arg, f"the width of {name}()")
        if name == "expandtabs":  # every tab may become a whole width
            width = args[0] if args else kwargs.get("tabsize", 8)
            if isinstance(width, int) and len(owner) + owner.count("\t") * width \
                    > _limits().chars:
                raise TemplateInvalid(f"expandtabs would be longer than {_limits().chars} "
                                      "characters")
    elif name == "join" and args:
        _check_join(owner, args[0])
    elif name == "replace" and len(args) >= 2:  # noqa: PLR2004 - replace(old, new[, count])
        _check_replace(owner, args[0], args[1])


def _bounded_range(*args: int) -> range:
    values = range(*args)
    if len(values) > _limits().range_items:
        raise TemplateInvalid(f"range() of more than {_limits().range_items} items")
    return values


@pass_context  # never evaluated at compile time: the budget exists only while rendering
def _iterate(_context: Any, iterable: Iterable) -> Iterator:  # noqa: ANN401
    """Every loop iteration spends a step (nested loops multiply)."""
    for item in iterable:
        _spend()
        yield item


_ITERATE = "ccm_bounded_iteration"


def _guard_filter(name: str, func: Any) -> Any:  # noqa: ANN401
    """A filter that spends a step, checks its size arguments first and its result after."""
    value_at = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0

    @wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        _spend()
        value, params = (args[value_at] if len(args) > value_at else None), args[value_at + 1:]
        if name == "format":
            _check_format(value, printf=True)
        else:
            for param in (*params, *kwargs.values()):
                _check_width(param, f"an argument of the {name} filter")
        if name == "join":
            _check_join(params[0] if params else kwargs.get("d", ""), value)
        elif name == "replace" and len(params) >= 2:  # noqa: PLR2004
            _check_replace(str(value), str(params[0]), str(params[1]))
        elif name == "indent" and isinstance(value, str):
            width = params[0] if params else kwargs.get("width", 4)
            indent = width if isinstance(width, str) else " " * int(width)
            if len(value) + value.count("\n") * len(indent) > _limits().chars:
                raise TemplateInvalid(f"indent would be longer than {_limits().chars} characters")
        return _check_size(func(*args, **kwargs), f"the result of the {name} filter")

    return guarded


class _BoundedCodeGenerator(CodeGenerator):
    """Compiles every ``for`` loop over ``ccm_bounded_iteration`` and every ``~`` through a
    size check (the hooks the sandbox itself does not have)."""

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        for loop in list(node.find_all(nodes.For)):
            loop.iter = nodes.Filter(loop.iter, _ITERATE, [], [], None, None, lineno=loop.lineno)
        super().visit_Template(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.bounded(")
        super().visit_Concat(node, frame)
        self.write(")")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, limits: Limits, **options: Any) -> None:  # noqa: ANN401
        super().__init__(**options)
        self.limits = limits
        self.globals["range"] = _bounded_range
        self.globals.pop("lipsum", None)  # lorem ipsum of any length: no use in a message
        self.filters = {name: _guard_filter(name, f) for name, f in self.filters.items()}
        self.filters[_ITERATE] = _iterate

    def bounded(self, value: Any) -> Any:  # noqa: ANN401
        return _check_size(value, "a concatenation")

    def concat(self, parts: Iterable[str]) -> str:
        """What a ``{% set %}`` block, a macro or a ``{% filter %}`` block wrote, joined: its
        size counted before the join (joined first, a loop could build gigabytes)."""
        _spend()
        limit, size, pieces = _limits().chars, 0, []
        for piece in parts:
            size += len(piece)
            if size > limit:
                raise TemplateInvalid(f"a block, macro or filter section builds more than "
                                      f"{limit} characters")
            pieces.append(piece)
        return "".join(pieces)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:  # noqa: ANN401
        _spend()
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(times, int):
                    if len(seq) * times > _limits().chars:
                        raise TemplateInvalid(
                            f"repetition longer than {_limits().chars} items or characters"
                        )
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and max(left.bit_length(), 1) * right > _limits().int_bits:
                raise TemplateInvalid(f"a power larger than {_limits().int_bits} bits")
        elif operator == "%":
            _check_format(left, printf=True)
            if isinstance(left, str):
                _check_filled(left, right if isinstance(right, tuple)
                              else right.values() if isinstance(right, dict) else [right])
        return _check_size(super().call_binop(context, operator, left, right), "a result")

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401, N805
        _spend()
        _check_method(__obj, args, kwargs)
        return _check_size(super().call(__context, __obj, *args, **kwargs), "a result")

    def wrap_str_format(self, value: Any) -> Any:  # noqa: ANN401
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        template = value.__self__
        _check_format(template, printf=False)

        @wraps(wrapped)
        def sized(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
            # The sandbox hands the template this wrapper, not str.format: sized here.
            given = args[0].values() if value.__name__ == "format_map" and args and \
                isinstance(args[0], dict) else [*args, *kwargs.values()]
            _check_filled(template, given)
            return wrapped(*args, **kwargs)

        return sized
