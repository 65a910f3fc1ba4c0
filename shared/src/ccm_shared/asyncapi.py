"""The AsyncAPI 3 document, generated from what the installed services declare.

Every topic a service produces is a channel owned by it; every consumer group is a receive
operation. Topic names equal event types (``<producer>.<entity>.<event>.v<N>``), and each has a
JSON Schema for its ``data`` in ``contracts/events/``. ``ccm contracts`` rewrites the document;
a test keeps the committed copy in step.
"""

from __future__ import annotations

from ccm_shared.consumer import DLQ_SUFFIX
from ccm_shared.events import PRACTICE_TOPIC_PREFIX, practice_topic
from ccm_shared.service import ServiceDefinition

DESCRIPTION = """Events exchanged by the ccm-platform services over Apache Kafka.

Every message is a CloudEvents 1.0 envelope in structured JSON mode (events/envelope.schema.json)
with the extension attributes `tenant` (the practice), `sequence` (per tenant and patient) and
`correlationid`. The Kafka key is `{tenant}:{patient}` for patient events, else `{tenant}`, so a
patient's events stay in order on one partition. Kafka headers carry only `content-type`,
`ce_type`, `ce_tenant` and `correlation-id`, never PHI.

Each consumed topic has a dead-letter topic `<topic>.dlq` carrying the original message with the
headers `dlq-error`, `dlq-reason`, `dlq-consumer`, `dlq-source` and `dlq-attempts`; `dlq-reason`
names no data of the event (a validation error's places and rules, else the error's type)."""


def _message_name(topic: str) -> str:
    return "".join(p.capitalize() for p in topic.replace("-", ".").split(".")[:-1])


def build(definitions: list[ServiceDefinition], consumers: dict[str, list[tuple[str, tuple]]]):
    """``consumers`` maps service name to (group, topics) pairs."""
    channels: dict = {}
    operations: dict = {}
    messages: dict = {}
    for d in definitions:
        for topic in d.produces:
            name = _message_name(topic)
            messages[name] = {
                "name": topic,
                "contentType": "application/cloudevents+json",
                "payload": {
                    "allOf": [
                        {"$ref": "./events/envelope.schema.json"},
                        {
                            "properties": {
                                "type": {"const": topic},
                                "data": {"$ref": f"./events/{topic}.schema.json"},
                            }
                        },
                    ]
                },
            }
            channels[topic] = {
                "address": topic,
                "x-owner": d.name,
                "messages": {name: {"$ref": f"#/components/messages/{name}"}},
            }
            operations[f"{d.name}.publish.{topic}"] = {
                "action": "send",
                "channel": {"$ref": f"#/channels/{_esc(topic)}"},
            }
        for event_type in d.produces_per_practice:
            name = _message_name(event_type)
            messages.setdefault(name, _message(event_type))
            address = practice_topic("{practice}", event_type)
            channels[address] = {
                "address": address,
                "x-owner": d.name,
                "description": f"{event_type} events of one practice only, for that practice's "
                "systems. Read access per practice: a prefixed ACL on "
                f"'{PRACTICE_TOPIC_PREFIX}<practice>.'.",
                "parameters": {"practice": {"description": "The practice (tenant) id"}},
                "messages": {name: {"$ref": f"#/components/messages/{name}"}},
            }
            operations[f"{d.name}.publish.{address}"] = {
                "action": "send",
                "channel": {"$ref": f"#/channels/{_esc(address)}"},
            }
    for service, groups in consumers.items():
        for group, topics in groups:
            for topic in topics:
                if topic not in channels:
                    continue
                operations[f"{group}.receive.{topic}"] = {
                    "action": "receive",
                    "channel": {"$ref": f"#/channels/{_esc(topic)}"},
                    "x-consumer-group": group,
                    "x-service": service,
                    "x-dead-letter-topic": topic + DLQ_SUFFIX,
                }
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "ccm-platform events", "version": "0.1.0", "description": DESCRIPTION},
        "defaultContentType": "application/cloudevents+json",
        "servers": {
            "local": {
                "host": "127.0.0.1:9092",
                "protocol": "kafka",
                "description": "deploy/local/kafka.sh (its port is chosen at first start)",
            }
        },
        "channels": dict(sorted(channels.items())),
        "operations": dict(sorted(operations.items())),
        "components": {"messages": dict(sorted(messages.items()))},
    }


def _message(event_type: str) -> dict:
    return {
        "name": event_type,
        "contentType": "application/cloudevents+json",
        "payload": {
            "allOf": [
                {"$ref": "./events/envelope.schema.json"},
                {
                    "properties": {
                        "type": {"const": event_type},
                        "data": {"$ref": f"./events/{event_type}.schema.json"},
                    }
                },
            ]
        },
    }


def _esc(topic: str) -> str:
    return topic.replace("~", "~0").replace("/", "~1")
