"""Every MQTT topic vigil publishes or subscribes to, in one place (like memory/keys.py for Redis).

Layout (``P`` is ``mqtt.topic_prefix``, ``C`` a camera name):

| topic | direction | retained |
|---|---|---|
| ``P/available`` | vigil → all | yes: ``online`` / ``offline`` (also the last will) |
| ``P/ask`` | client → vigil | no: questions |
| ``P/status`` | vigil → all | yes: health and counters |
| ``P/cameras/C/state`` | vigil → all | yes: a camera's state |
| ``P/replies/...`` | vigil → ``vigil ask`` | no: the CLI's reply topics (not reserved) |
| ``P/watches/W/set`` | client → vigil | no: add, change (JSON) or remove (empty) watch ``W`` |
| ``P/watches/W/state`` | vigil → all | yes: ``ON`` while an event of watch ``W`` is on, else ``OFF`` |
| ``P/watches/W/attributes`` | vigil → all | yes: watch ``W``'s latest score, camera, settings (JSON) |
| ``P/events`` | vigil → all | no: watch events (``new``, ``update``, ``end``; docs/watches.md) |
| ``P/events/query`` | client → vigil | no: event queries, answered like questions |
| ``P/nodes/...`` | reserved | for multi-node setups (not used yet) |
| ``homeassistant/...`` | reserved | Home Assistant MQTT discovery (streamer/discovery.py; the configured prefix too) |
| ``D/device/N/config`` | vigil → Home Assistant | yes: the device discovery config (``D`` discovery prefix) |
| ``D/status`` | Home Assistant → vigil | Home Assistant's birth (``online``): vigil announces again |

Replies go to the topic the requester names (v5 Response Topic or v3.1.1 ``reply_to``); that
topic must lie outside :meth:`Topics.reserved_filters` (streamer/requests.py checks it), so a
request can never make vigil publish onto its own state, questions or another system's discovery.
"""

from __future__ import annotations

from dataclasses import dataclass

# Home Assistant's default MQTT discovery prefix (its `discovery_prefix` option).
HOME_ASSISTANT_PREFIX = "homeassistant"
# Sub-trees under the prefix that vigil publishes on or keeps for later features; no reply may go there.
RESERVED_SUBTREES = ("watches", "events", "nodes")


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names under one prefix."""

    prefix: str
    # The configured Home Assistant discovery prefix: reserved like the default one.
    discovery_prefix: str = HOME_ASSISTANT_PREFIX

    @property
    def available(self) -> str:
        """Retained availability: ``online`` while connected, ``offline`` as last will and on stop."""
        return f"{self.prefix}/available"

    @property
    def ask(self) -> str:
        """Where questions arrive."""
        return f"{self.prefix}/ask"

    @property
    def status(self) -> str:
        """Retained health and counters of the daemon."""
        return f"{self.prefix}/status"

    @property
    def camera_states(self) -> str:
        """Filter matching every camera's state topic."""
        return f"{self.prefix}/cameras/+/state"

    def camera_state(self, camera: str) -> str:
        """Retained state of one camera."""
        return f"{self.prefix}/cameras/{camera}/state"

    def camera_of_state(self, topic: str) -> str | None:
        """The camera name of a state topic, or None when ``topic`` is not one."""
        head, tail = f"{self.prefix}/cameras/", "/state"
        if topic.startswith(head) and topic.endswith(tail) and len(topic) > len(head) + len(tail):
            name = topic[len(head) : -len(tail)]
            return name if "/" not in name else None
        return None

    @property
    def watch_sets(self) -> str:
        """Filter matching every watch's ``set`` topic (runtime add, change, remove)."""
        return f"{self.prefix}/watches/+/set"

    def watch_of_set(self, topic: str) -> str | None:
        """The watch name of a ``set`` topic, or None when ``topic`` is not one."""
        head, tail = f"{self.prefix}/watches/", "/set"
        if topic.startswith(head) and topic.endswith(tail) and len(topic) > len(head) + len(tail):
            name = topic[len(head) : -len(tail)]
            return name if "/" not in name else None
        return None

    def watch_state(self, watch: str) -> str:
        """Retained ``ON`` / ``OFF`` of one watch."""
        return f"{self.prefix}/watches/{watch}/state"

    def watch_attributes(self, watch: str) -> str:
        """Retained JSON attributes of one watch (latest score, camera, settings)."""
        return f"{self.prefix}/watches/{watch}/attributes"

    @property
    def events(self) -> str:
        """Where watch events are published (not retained)."""
        return f"{self.prefix}/events"

    @property
    def events_query(self) -> str:
        """Where event queries arrive (request/response like ``ask``)."""
        return f"{self.prefix}/events/query"

    def discovery_config(self, node_id: str) -> str:
        """Retained Home Assistant device discovery config of vigil's device ``node_id``."""
        return f"{self.discovery_prefix}/device/{node_id}/config"

    @property
    def discovery_status(self) -> str:
        """Home Assistant's birth and will (``online`` / ``offline``) under the discovery prefix."""
        return f"{self.discovery_prefix}/status"

    def cli_reply(self, token: str) -> str:
        """Where ``vigil ask`` waits for its reply (a requester's topic, so not reserved)."""
        return f"{self.prefix}/replies/{token}"

    def reserved_filters(self) -> tuple[str, ...]:
        """Topic filters of everything vigil publishes or subscribes to, now or in later features."""
        return (
            self.available,
            self.ask,
            self.status,
            f"{self.prefix}/cameras/#",
            *(f"{self.prefix}/{sub}/#" for sub in RESERVED_SUBTREES),  # P/events/# matches P/events too
            *dict.fromkeys((f"{HOME_ASSISTANT_PREFIX}/#", f"{self.discovery_prefix}/#")),
        )


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic filter matching (``+`` one level, ``#`` the rest, incl. the parent level)."""
    levels, parts = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(levels):
        if level == "#":
            return True
        if i >= len(parts):
            return False
        if level not in ("+", parts[i]):
            return False
    return len(levels) == len(parts)


def valid_topic_filter(topic_filter: str) -> bool:
    """A well-formed MQTT topic filter (``#`` only last and alone in its level, ``+`` alone)."""
    if not topic_filter or "\x00" in topic_filter:
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True
