"""Pure rules of the notification service: links, signatures, directory merges, templates."""

from datetime import UTC, datetime, timedelta

import pytest

from ccm_notification.adapters.rendering import Renderer, TemplateInvalid, default_source
from ccm_notification.domain.directory import (
    UnknownField,
    apply_manual,
    apply_source,
    choose_channel,
    empty_record,
    human_name,
)
from ccm_notification.domain.kinds import KINDS, MissingFields, backoff_seconds
from ccm_notification.domain.signing import (
    LinkExpired,
    LinkInvalid,
    sign_link,
    verify_link,
    verify_webhook,
    webhook_signature,
)

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
SECRET = "unit-secret-key-0123456789abcdef0123"


# -- signed links ------------------------------------------------------------------------------


def test_a_genuine_link_verifies_until_it_expires():
    token = sign_link(SECRET, "ack", {"m": "m1", "p": "acme"}, NOW + timedelta(hours=1))
    assert verify_link(SECRET, "ack", token, NOW + timedelta(minutes=59))["m"] == "m1"
    with pytest.raises(LinkExpired):
        verify_link(SECRET, "ack", token, NOW + timedelta(hours=1))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t[:5] + ("x" if t[5] != "x" else "y") + t[6:],  # payload altered
        lambda t: t[:-3] + ("A" if t[-3] != "A" else "B") + t[-2:],  # signature altered
        lambda t: t.replace(".", ""),  # not two parts
        lambda t: "garbage",
    ],
)
def test_an_altered_link_is_invalid(mutate):
    token = sign_link(SECRET, "ack", {"m": "m1", "p": "acme"}, NOW + timedelta(hours=1))
    with pytest.raises(LinkInvalid):
        verify_link(SECRET, "ack", mutate(token), NOW)


def test_a_link_for_one_action_cannot_be_used_for_another_or_with_another_key():
    token = sign_link(
        SECRET, "call-slot", {"c": "c1", "p": "acme", "s": 0}, NOW + timedelta(hours=1)
    )
    with pytest.raises(LinkInvalid):
        verify_link(SECRET, "ack", token, NOW)
    with pytest.raises(LinkInvalid):
        verify_link("another-secret-key-0123456789abcdef", "call-slot", token, NOW)


def test_webhook_signature_verifies_and_rejects_changes_and_replays():
    body = b'{"id":"1"}'
    header = webhook_signature("whsec_x", 1_800_000_000, body)
    assert verify_webhook("whsec_x", header, body, now=1_800_000_100)
    assert not verify_webhook("whsec_x", header, b'{"id":"2"}', now=1_800_000_100)
    assert not verify_webhook("whsec_y", header, body, now=1_800_000_100)
    assert not verify_webhook("whsec_x", header, body, now=1_800_000_000 + 301)
    assert not verify_webhook("whsec_x", "v1=abc", body, now=1_800_000_000)


# -- directory ---------------------------------------------------------------------------------


def test_ehr_values_fill_unpinned_fields():
    merge = apply_source(empty_record(), {}, (), {"name": "Dr. A", "email": "a@x.test"})
    assert merge.current["email"] == "a@x.test" and merge.changes["email"] == [None, "a@x.test"]
    assert merge.held == {}


def test_a_manual_edit_pins_the_field_against_later_ehr_updates():
    base = apply_source(empty_record(), {}, (), {"email": "ehr@x.test"})
    manual = apply_manual(base.current, base.source, base.pinned, {"email": "fixed@x.test"})
    assert manual.pinned == ("email",)
    later = apply_source(
        manual.current, manual.source, manual.pinned, {"email": "ehr2@x.test", "name": "Dr. B"}
    )
    assert later.current["email"] == "fixed@x.test" and later.current["name"] == "Dr. B"
    assert later.held == {"email": "ehr2@x.test"} and later.source["email"] == "ehr2@x.test"
    released = apply_manual(later.current, later.source, later.pinned, {}, ("email",))
    assert released.current["email"] == "ehr2@x.test" and released.pinned == ()


def test_fields_the_ehr_does_not_know_are_not_pinned_and_unknown_fields_refused():
    merge = apply_manual(empty_record(), {}, (), {"webhook_url": "https://h.test/x"})
    assert merge.pinned == ()
    with pytest.raises(UnknownField):
        apply_manual(empty_record(), {}, (), {"favourite_colour": "blue"})


@pytest.mark.parametrize(
    "record,expected",
    [
        (
            {"email": "a@x.test", "webhook_url": "https://h", "preferred_channel": "webhook"},
            ("webhook", "https://h"),
        ),
        ({"email": "a@x.test", "preferred_channel": "fhir"}, ("email", "a@x.test")),
        ({"fhir_endpoint": "https://ehr/fhir"}, ("fhir", "https://ehr/fhir")),
        ({}, None),
    ],
)
def test_preferred_channel_is_used_when_it_has_an_address(record, expected):
    assert choose_channel(record) == expected


def test_human_name_prefers_text_then_parts():
    assert human_name({"text": "Dr. Jo Ng"}) == "Dr. Jo Ng"
    assert human_name({"family": "Ng", "given": ["Jo"], "prefix": ["Dr."]}) == "Dr. Jo Ng"
    assert human_name(None) is None


@pytest.mark.parametrize("attempt,expected", [(1, 30), (2, 60), (5, 480), (20, 3600)])
def test_backoff_doubles_and_is_capped(attempt, expected):
    assert backoff_seconds(attempt, 30, 3600) == expected


# -- templates ---------------------------------------------------------------------------------

CONTEXT = {"practice_name": "Maple", "provider_name": "Dr. <Ng>", "ack_url": None}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_default_template_is_valid_for_its_kind(kind):
    Renderer().validate(KINDS[kind], default_source(kind))


def test_a_missing_required_field_is_an_error_not_an_empty_gap():
    with pytest.raises(MissingFields, match="gap"):
        Renderer().render(KINDS["care-gap-alert"], {"patient": "Patient/1"}, CONTEXT)


def test_html_is_escaped_and_text_is_not():
    rendered = Renderer().render(
        KINDS["care-gap-alert"], {"patient": "Patient/1", "gap": "A1c <7%"}, CONTEXT
    )
    assert "Dr. &lt;Ng&gt;" in rendered.html and "A1c &lt;7%" in rendered.html
    assert "Dear Dr. <Ng>," in rendered.text
    assert rendered.subject == "[Action needed] Care gap for Patient/1: A1c <7%"


def test_subject_is_a_single_line_even_with_newlines_in_values():
    rendered = Renderer().render(
        KINDS["care-gap-alert"], {"patient": "Patient/1", "gap": "a\r\nBcc: x@evil.test"}, CONTEXT
    )
    assert "\n" not in rendered.subject and "\r" not in rendered.subject


@pytest.mark.parametrize(
    "source,problem",
    [
        ("{% block subject %}x{% endblock %}", "missing block"),
        (
            "{% block subject %}{{ ssn }}{% endblock %}{% block text %}{% endblock %}"
            "{% block html %}{% endblock %}",
            "unknown variable",
        ),
        ("{% block subject %}{{ x }{% endblock %}", "syntax"),
    ],
)
def test_a_bad_override_is_refused(source, problem):
    with pytest.raises(TemplateInvalid, match=problem):
        Renderer().validate(KINDS["attestation-reminder"], source)


# Found by fuzzing: each escaped validate() (parsing, or compiling for the variables' analysis)
# as its own exception, which the API answered 500 instead of refusing the template.
@pytest.mark.parametrize(
    "subject,problem",
    [
        ("{{ gap|nosuchfilter }}", "syntax error: No filter named 'nosuchfilter'.$"),
        ("{{ gap is nosuchtest }}", "syntax error: No test named 'nosuchtest'.$"),
        ("x{% endblock %}{% block subject %}y", "block 'subject' defined twice"),
        ("{{ " + "(" * 5000 + "gap" + ")" * 5000 + " }}", "nested too deeply"),
        ("{% if gap %}" * 2000 + "{% endif %}" * 2000, "nested too deeply"),
        ("{{ gap" + "|upper" * 5000 + " }}", "nested too deeply"),
        ("{{ " + "1" * 5000 + " }}", "ValueError: Exceeds the limit"),
    ],
)
def test_an_override_that_does_not_compile_is_refused_not_raised(subject, problem):
    source = (f"{{% block subject %}}{subject}{{% endblock %}}"
              "{% block text %}x{% endblock %}{% block html %}x{% endblock %}")
    with pytest.raises(TemplateInvalid, match=problem):
        Renderer().validate(KINDS["care-gap-alert"], source)


def test_overrides_are_sandboxed():
    source = (
        "{% block subject %}{{ month.__class__.__mro__ }}{% endblock %}"
        "{% block text %}x{% endblock %}{% block html %}x{% endblock %}"
    )
    with pytest.raises(TemplateInvalid):
        Renderer().render(
            KINDS["attestation-reminder"],
            {"month": "2026-11", "due_date": "2026-12-01"},
            CONTEXT,
            source,
        )


def override(text: str) -> str:
    """A care-gap-alert override whose text block is ``text``."""
    return (
        "{% block subject %}Gap for {{ patient }}{% endblock %}"
        f"{{% block text %}}{text}{{% endblock %}}{{% block html %}}{{{{ gap }}}}{{% endblock %}}"
    )


GAP_VALUES = {"patient": "Patient/1", "gap": "A1c"}


@pytest.mark.parametrize(
    "text, problem",
    [
        ("{{ 1/0 }}", "ZeroDivisionError"),
        ("{{ '%d' % gap }}", "TypeError"),
        ("{{ details.upper() }}", "no optional fields"),  # fails without the optional field
    ],
)
def test_an_override_that_raises_when_rendered_is_refused(text, problem):
    with pytest.raises(TemplateInvalid, match=problem):
        Renderer().validate(KINDS["care-gap-alert"], override(text))


def test_an_error_raised_while_rendering_is_template_invalid_not_a_crash():
    with pytest.raises(TemplateInvalid, match="ZeroDivisionError"):
        Renderer().render(KINDS["care-gap-alert"], GAP_VALUES, CONTEXT, override("{{ 1/0 }}"))


RUNAWAY = [
    ("{% for i in range(100000) %}{% for j in range(8000) %}{% endfor %}{% endfor %}", "range"),
    ("{% for i in range(9000) %}{% for j in range(9000) %}{% endfor %}{% endfor %}", "steps"),
    ("{% for i in range(9000) %}{% for c in gap * 3000 %}{% endfor %}{% endfor %}", "steps"),
    ("{% for i in range(9000) %}{{ 'x' * 9000 }}{% endfor %}", "longer than"),
    ("{{ 'x' * 10**9 }}", "repetition"),
    ("{{ 7 ** 100000000 }}", "power"),
    ("{{ gap|center(10**9) }}", "over the limit"),
    ("{{ gap.ljust(10**9) }}", "over the limit"),
    ("{{ '%999999999d' % 1 }}", "over the limit"),
    ("{{ '{:>999999999}'.format(gap) }}", "over the limit"),
    ("{{ ('x' * 50000).replace('x', 'yyyyy') }}", "replace"),
    ("{{ ('x' * 1000)|list|join('y' * 1000) }}", "join"),
    ("{{ ('\n' * 90000)|indent(900) }}", "indent"),
    ("{% set ns = namespace(s=gap) %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}", "larger than"),
    ("{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", "RecursionError"),
    # What buffers or joins builds in one step, sized before it is built (found by review):
    # each of these reached hundreds of megabytes, or would have reached gigabytes, first.
    ("{% set s = 'x' * 100000 %}{% set big %}{% for b in range(1000) %}{{ s }}{% endfor %}"
     "{% endset %}{{ big|length }}", "builds more than"),
    ("{% set s = 'x' * 100000 %}{% macro m() %}{% for b in range(1000) %}{{ s }}{% endfor %}"
     "{% endmacro %}{{ m()|length }}", "builds more than"),
    ("{% set s = 'x' * 100000 %}{% filter upper %}{% for b in range(1000) %}{{ s }}"
     "{% endfor %}{% endfilter %}", "builds more than"),
    ("{% set s = 'x' * 100000 %}{{ ([s] * 3000)|join|length }}", "join"),
    ("{% set s = 'x' * 100000 %}{{ ''.join([s] * 3000)|length }}", "join"),
    ("{% set s = 'x' * 100000 %}{{ ('{0}' * 2000).format(s)|length }}", "format"),
    ("{% set s = 'x' * 50000 %}{{ ('%s' * 2000) % ((s,) * 2000) }}", "format"),
    ("{{ ('\t' * 100000).expandtabs(1000)|length }}", "expandtabs"),
]


@pytest.mark.parametrize("text, problem", RUNAWAY)
def test_a_runaway_override_is_refused_on_upload_within_the_limits(text, problem):
    started = datetime.now(UTC)
    with pytest.raises(TemplateInvalid, match=problem):
        Renderer().validate(KINDS["care-gap-alert"], override(text))
    assert datetime.now(UTC) - started < timedelta(seconds=2)


@pytest.mark.parametrize("text, problem", RUNAWAY[:4])
def test_a_runaway_override_stored_earlier_stops_at_the_limits_when_sent(text, problem):
    with pytest.raises(TemplateInvalid, match=problem):
        Renderer().render(KINDS["care-gap-alert"], GAP_VALUES, CONTEXT, override(text))


def test_the_wall_clock_limit_stops_a_render_that_is_within_its_steps():
    from ccm_notification.adapters.rendering import Limits

    slow = Renderer(Limits(steps=10**9, seconds=0.2))
    started = datetime.now(UTC)
    with pytest.raises(TemplateInvalid, match="longer than 0.2 s"):
        slow.render(KINDS["care-gap-alert"], GAP_VALUES, CONTEXT, override(RUNAWAY[1][0]))
    assert datetime.now(UTC) - started < timedelta(seconds=2)


def test_ordinary_template_features_stay_allowed():
    text = (
        "{% for i in range(3) %}{{ i }}{% if not loop.last %},{% endif %}{% endfor %} "
        "{{ '%s: %.1f'|format(gap, 2.25) }} {{ '{}!'.format(gap) }} {{ gap|truncate(20) }} "
        "{{ (details or 'none')|wordwrap(40) }} {{ gap|center(9) }} {{ [gap, patient]|join(', ') }}"
        " {{ '%05d' % 42 }} {{ 2 ** 10 }} {{ '-' * 20 }}"
    )
    Renderer().validate(KINDS["care-gap-alert"], override(text))
    rendered = Renderer().render(KINDS["care-gap-alert"], GAP_VALUES, CONTEXT, override(text))
    assert rendered.text == (
        "0,1,2 A1c: 2.2 A1c! A1c none    A1c    A1c, Patient/1 00042 1024 --------------------\n"
    )
