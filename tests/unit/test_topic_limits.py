"""ensure_topics' raise of existing topics' record limit, over the answers a broker gives
(the raise itself on real Kafka: tests/integration/test_large_events.py)."""

import pytest
import structlog

from ccm_shared.transport import MAX_MESSAGE_BYTES, _raise_record_limits


class _Described:
    API_VERSION = 2

    def __init__(self, resources):
        self.resources = resources


class _Altered:
    def __init__(self, resources):
        self.resources = resources


class BrokerAnswers:
    """An admin client answering DescribeConfigs/AlterConfigs as a broker with ACLs would."""

    def __init__(self, described, alter_code=0):
        self.described, self.alter_code, self.altered = described, alter_code, []

    async def describe_configs(self, resources):
        return [_Described([self.described[r.name] for r in resources])]

    async def alter_configs(self, resources):
        self.altered += [(r.name, dict(r.configs)) for r in resources]
        return [_Altered([(self.alter_code, None, 2, r.name) for r in resources])]


def _topic(name, limit, *, source=1, code=0, extra=()):
    entries = [("max.message.bytes", str(limit), False, source, False, []), *extra]
    return name, (code, None, 2, name, entries if not code else [])


@pytest.mark.parametrize(("answers", "alter_code", "altered", "warned"), [
    # a 1 MB topic with its own retention: raised, retention sent back
    ([_topic("a", 1048588, extra=[("retention.ms", "9", False, 1, False, []),
                                  ("cleanup.policy", "delete", False, 5, False, [])])],
     0, [("a", {"retention.ms": "9", "max.message.bytes": str(MAX_MESSAGE_BYTES)})], []),
    # large enough (the broker's own default here), or larger: left alone
    ([_topic("b", MAX_MESSAGE_BYTES, source=4), _topic("c", 2 * MAX_MESSAGE_BYTES)], 0, [], []),
    # not allowed to read its settings (29): named in a warning, nothing changed
    ([_topic("d", 0, code=29)], 0, [], ["d"]),
    # deleted since it was listed (3): nothing to say
    ([_topic("e", 0, code=3)], 0, [], []),
    # not allowed to change them: named in a warning
    ([_topic("f", 1048588)], 29, [("f", {"max.message.bytes": str(MAX_MESSAGE_BYTES)})], ["f"]),
])
async def test_what_is_raised_and_what_is_said(answers, alter_code, altered, warned):
    broker = BrokerAnswers(dict(answers), alter_code)
    with structlog.testing.capture_logs() as logs:
        await _raise_record_limits(broker, [name for name, _ in answers])
    assert broker.altered == altered
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [t for e in warnings for t in e["topics"]] == warned
