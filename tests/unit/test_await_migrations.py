"""The init container's check (deploy/docker/ccm-await-migrations): a pod starts when the
schemas are at its image's migration heads or past them (a later release's revisions, which
its image does not ship), and waits while they are behind. It once took a schema ahead of the
image as behind: after `kubectl rollout undo`, or when an old pod restarted during an upgrade,
the pods waited 900 s, failed and restarted forever."""

from __future__ import annotations

import importlib.util
from importlib.machinery import SourceFileLoader
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "docker" / "ccm-await-migrations"


def _load():  # noqa: ANN202 - the script has no .py suffix
    loader = SourceFileLoader("ccm_await_migrations", str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


await_migrations = _load()

# The image ships p0001 → p0002 → p0003 (its head).
HEADS = {"platform": {"p0003"}}
SHIPPED = {"platform": {"p0001", "p0002", "p0003"}}


@pytest.mark.parametrize(("current", "ready"), [
    ({"p0003"}, True),          # at the image's head
    ({"p0004"}, True),          # past it: a later release migrated (rollback, old pod restart)
    ({"p0009"}, True),
    ({"p0002"}, False),         # behind: the migration Job has not run yet
    ({"p0001"}, False),
    (set(), False),             # not migrated at all
])
def test_a_schema_at_or_past_the_images_heads_is_ready(current, ready):
    behind = await_migrations.not_ready(HEADS, SHIPPED, {"platform": current})
    assert (behind == {}) is ready, behind


def test_with_two_heads_both_are_needed():
    heads = {"billing": {"b7", "b9"}}
    shipped = {"billing": {"b1", "b7", "b8", "b9"}}
    assert await_migrations.not_ready(heads, shipped, {"billing": {"b7", "b9"}}) == {}
    assert await_migrations.not_ready(heads, shipped, {"billing": {"b7"}}) == {"billing": ["b9"]}
    assert await_migrations.not_ready(heads, shipped, {"billing": {"b8", "b9"}}) == {
        "billing": ["b7"]}


def test_a_schema_the_image_has_no_migrations_for_is_not_waited_for():
    assert await_migrations.not_ready({"x": set()}, {"x": set()}, {"x": set()}) == {}


def test_every_schema_is_checked():
    heads = {"platform": {"p0003"}, "ingest": {"i5"}}
    shipped = {"platform": {"p0003"}, "ingest": {"i4", "i5"}}
    found = {"platform": {"p0004"}, "ingest": {"i4"}}
    assert await_migrations.not_ready(heads, shipped, found) == {"ingest": ["i5"]}
