"""Build hook: the event contracts go into ccm-shared's wheel as ``ccm_shared/contracts/events``
(consumers check events against them, ``ccm_shared.event_contracts``). They come from the
repository (``contracts/events`` beside ``shared/``) or, when the wheel is built from the sdist,
from the sdist, which carries them (``[tool.hatch.build.targets.sdist.force-include]``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class ContractsBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        root = Path(self.root)
        for source in (root.parent / "contracts" / "events", root / "contracts" / "events"):
            if source.is_dir():
                build_data["force_include"][str(source)] = "ccm_shared/contracts/events"
                return
        raise FileNotFoundError(f"contracts/events: neither beside nor inside {root}")
