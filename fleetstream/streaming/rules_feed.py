"""Alert rules for every worker: the compacted ``fleet.rules`` topic (key rule id) read in full into a RuleSet.

A rule that does not parse is refused with its reason in the log and counted; the previous version of that rule
(if any) stays in force, so a typo pushed to the topic never silently disables monitoring.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import orjson

from fleetstream.config import Settings
from fleetstream.domain.rules import RuleError, RuleSet, parse_rule
from fleetstream.streaming.geofence_feed import CompactedFeed, read_compacted, send_records
from fleetstream.streaming.output import OutRecord

log = logging.getLogger("fleetstream.rules")


class RulesFeed(CompactedFeed):
    """Holds the current :class:`RuleSet`; swapped whole when the topic changes."""

    name = "rules-feed"

    def __init__(self, settings: Settings, *, debounce_s: float = 0.2) -> None:
        super().__init__(settings, settings.rules_topic, debounce_s=debounce_s)
        self.ruleset = RuleSet()
        self.rejected = 0
        self.updates = 0

    def current(self) -> RuleSet:
        return self.ruleset

    async def apply(self, changes: Mapping[str, bytes | None]) -> None:
        ruleset = self.ruleset
        for rule_id, value in changes.items():
            if value is None:
                ruleset = ruleset.without_rule(rule_id)
                continue
            try:
                rule = parse_rule(orjson.loads(value), rule_id=rule_id)
                ruleset = ruleset.with_rule(rule)
            except (RuleError, orjson.JSONDecodeError) as exc:
                self.rejected += 1
                log.error("rule %r refused (the previous version, if any, stays): %s", rule_id, exc)
        self.ruleset = ruleset
        self.updates += 1
        log.info("rules updated: %d rules", len(ruleset))


async def publish_rules(settings: Settings, ruleset: RuleSet) -> int:
    """Publish every rule of a validated set, keyed by rule id (groups resolved into each rule)."""
    records = [OutRecord(settings.rules_topic, rule_id.encode(), orjson.dumps(value))
               for rule_id, value in ruleset.to_records()]
    return await send_records(settings, records)


async def delete_rules(settings: Settings, ids: list[str]) -> int:
    return await send_records(settings, [OutRecord(settings.rules_topic, i.encode(), None) for i in ids])


async def read_rules(settings: Settings) -> dict[str, dict]:
    return await read_compacted(settings, settings.rules_topic)
