"""Home Assistant MQTT discovery: payloads against the documented required keys (pure), and the
retained device config on a real Mosquitto: published on connect, again on Home Assistant's
birth message, components removed with their watch (at runtime and across a restart), cleared
when discovery is turned off."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import jinja2
import pytest

from streamer.discovery import CAMERA_STATES, EVENT_TYPES, components, device_config, event_value_template
from streamer.events import event_payload
from streamer.mqtt_api import MqttApi
from streamer.settings import DiscoverySettings, Settings
from streamer.topics import Topics
from tests.plugins.brokers import retained
from tests.test_events import TZ, _event
from tests.test_mqtt_api import echo_answer, running, settings_for

WAIT_S = 10.0

# What Home Assistant requires, from its documentation (read 2026-12; home-assistant.io sources
# source/_integrations/*.markdown):
# - integrations/mqtt/#device-discovery-payload: the root must have the `device` and `origin`
#   mappings; each component needs `platform`, entity components a `unique_id`, and at least one
#   option of their own; the device needs `identifiers` (or `connections`); origin needs `name`.
# - integrations/binary_sensor.mqtt/: `state_topic` is required.
# - integrations/event.mqtt/: `state_topic` and `event_types` are required; the payload (after
#   `value_template`) must be JSON with an `event_type` listed in `event_types`; `{}` is ignored.
# - integrations/sensor.mqtt/: `state_topic` is required; `options` needs device_class `enum`
#   and may not be empty.
ROOT_REQUIRED = {"device", "origin", "components"}
DEVICE_REQUIRED_ONE_OF = {"identifiers", "connections"}
ORIGIN_REQUIRED = {"name"}
COMPONENT_REQUIRED = {"platform", "unique_id"}
PLATFORM_REQUIRED = {
    "binary_sensor": {"state_topic"},
    "event": {"state_topic", "event_types"},
    "sensor": {"state_topic"},
}


def check_payload(config: dict[str, Any]) -> None:
    """Assert ``config`` has every key Home Assistant requires of a device discovery payload."""
    assert set(config) >= ROOT_REQUIRED, set(config)
    assert DEVICE_REQUIRED_ONE_OF & set(config["device"])
    assert set(config["origin"]) >= ORIGIN_REQUIRED
    unique_ids = []
    for cid, comp in config["components"].items():
        if set(comp) == {"platform"}:
            continue  # a removal
        platform = comp["platform"]
        missing = (COMPONENT_REQUIRED | PLATFORM_REQUIRED[platform]) - set(comp)
        assert not missing, f"{cid} ({platform}) lacks {missing}"
        assert set(comp) - {"platform"}, f"{cid} has no option of its own"
        unique_ids.append(comp["unique_id"])
        if "options" in comp:
            assert comp.get("device_class") == "enum"
            assert comp["options"]
        if platform == "event":
            assert set(comp["event_types"]) == set(EVENT_TYPES)
    assert len(unique_ids) == len(set(unique_ids))


def test_payload_has_every_required_key_per_platform() -> None:
    topics = Topics("vigil")
    config = device_config(
        topics, "vigil", cameras=["front", "garage"], watches={"person": ["front"], "car": []}, sw_version="9.9"
    )
    check_payload(config)
    comps = config["components"]
    assert sorted(comps) == ["camera_front", "camera_garage", "event_car", "event_person", "watch_car", "watch_person"]
    assert comps["watch_person"]["state_topic"] == "vigil/watches/person/state"
    assert comps["watch_person"]["json_attributes_topic"] == "vigil/watches/person/attributes"
    assert (comps["watch_person"]["payload_on"], comps["watch_person"]["payload_off"]) == ("ON", "OFF")
    assert comps["event_person"]["state_topic"] == "vigil/events"
    assert comps["camera_front"]["state_topic"] == "vigil/cameras/front/state"
    assert comps["camera_front"]["options"] == list(CAMERA_STATES)
    assert config["availability_topic"] == "vigil/available"
    assert config["device"]["sw_version"] == config["origin"]["sw_version"] == "9.9"
    # The check can fail: a component without its state topic is caught.
    del comps["watch_car"]["state_topic"]
    with pytest.raises(AssertionError, match="watch_car"):
        check_payload(config)


def test_removed_components_are_platform_only_unless_current() -> None:
    topics = Topics("vigil")
    removed = {"watch_old": "binary_sensor", "event_old": "event", "watch_person": "binary_sensor"}
    config = device_config(topics, "n1", cameras=[], watches={"person": []}, removed=removed)
    check_payload(config)
    comps = config["components"]
    assert comps["watch_old"] == {"platform": "binary_sensor"}
    assert comps["event_old"] == {"platform": "event"}
    assert set(comps["watch_person"]) > {"platform"}  # current again: announced, not removed
    assert comps["watch_person"]["unique_id"] == "n1_watch_person"


def test_names_outside_the_camera_rule_are_refused() -> None:
    for bad in ("Door", "a b", "x'}}", "a/b", ""):
        with pytest.raises(ValueError, match="camera-name rule"):
            components(Topics("vigil"), "vigil", [], {bad: []})
        with pytest.raises(ValueError, match="camera-name rule"):
            components(Topics("vigil"), "vigil", [bad], {})


def test_event_template_keeps_its_watch_and_gives_event_type() -> None:
    """The value template rendered by Jinja2 with Home Assistant's ``to_json`` filter."""
    env = jinja2.Environment(autoescape=False)
    env.filters["to_json"] = json.dumps
    template = env.from_string(event_value_template("person"))
    mine = event_payload(_event("front", 1_700_000_000.0, None, watch="person"), TZ, "new")
    other = event_payload(_event("front", 1_700_000_000.0, None, watch="person_2"), TZ, "new")
    rendered = json.loads(template.render(value_json=mine))
    assert rendered["event_type"] == "new"
    assert rendered["event_type"] in EVENT_TYPES
    assert rendered["camera"] == "front"
    assert rendered["citation"] == mine["citation"]
    assert rendered["end"] is None
    assert json.loads(template.render(value_json=other)) == {}


def test_node_id_defaults_to_the_client_id() -> None:
    settings = Settings.model_validate({"mqtt": {"client_id": "vigil-2.lan"}})
    assert settings.discovery.node_id_for(settings.mqtt.client_id) == "vigil-2_lan"
    assert DiscoverySettings(node_id="garage").node_id_for("x") == "garage"
    assert Settings().discovery.node_id_for(Settings().mqtt.client_id) == "vigil"
    with pytest.raises(ValueError, match="discovery ids"):
        DiscoverySettings(node_id="a/b")


# --------------------------------------------------------------------------- on the broker


class ConfigWatcher:
    """Every message on the device config topic, in order (retained replay first)."""

    def __init__(self, host: str, port: int, topic: str) -> None:
        self.topic = topic
        self.client = aiomqtt.Client(host, port, identifier=f"ha-{uuid.uuid4().hex[:8]}")
        self.seen: asyncio.Queue[tuple[bool, bytes]] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ConfigWatcher:
        await self.client.__aenter__()
        await self.client.subscribe(self.topic, qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._reader is not None
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await self._reader
        with contextlib.suppress(aiomqtt.MqttError):
            await self.client.__aexit__(None, None, None)

    async def _read(self) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for message in self.client.messages:
                assert isinstance(message.payload, bytes)
                self.seen.put_nowait((message.retain, message.payload))

    async def next_config(self) -> dict[str, Any]:
        _, payload = await asyncio.wait_for(self.seen.get(), WAIT_S)
        return json.loads(payload)

    async def quiet(self, wait_s: float = 0.5) -> bool:
        """Whether nothing arrives within ``wait_s``."""
        try:
            await asyncio.wait_for(self.seen.get(), wait_s)
        except TimeoutError:
            return True
        return False


def _api(broker: tuple[str, int], prefix: str, watches: dict[str, list[str]], *, enabled: bool = True) -> MqttApi:
    # The discovery prefix lies under the test's prefix, so the broker fixture clears it afterwards.
    discovery = DiscoverySettings(enabled=enabled, prefix=f"{prefix}/ha", node_id=f"n{uuid.uuid4().hex[:6]}")
    return _api_for(broker, prefix, watches, discovery)


def _api_for(
    broker: tuple[str, int], prefix: str, watches: dict[str, list[str]], discovery: DiscoverySettings
) -> MqttApi:
    return MqttApi(
        settings_for(*broker, prefix),
        tz=TZ,
        cameras=["front", "garage"],
        answer=echo_answer,
        discovery=discovery,
        watches=lambda: watches,
        discovery_jitter_s=0.05,
    )


@contextlib.asynccontextmanager
async def watching(broker: tuple[str, int], api: MqttApi) -> AsyncIterator[ConfigWatcher]:
    assert api._discovery is not None
    topic = api.topics.discovery_config(api._discovery.node_id_for(api._settings.client_id))
    async with ConfigWatcher(*broker, topic) as watcher:
        yield watcher


async def test_config_is_retained_on_connect_and_republished_on_birth(broker, prefix) -> None:
    api = _api(broker, prefix, {"person": ["front"]})
    async with watching(broker, api) as watcher, running(api):
        config = await watcher.next_config()
        check_payload(config)
        assert sorted(config["components"]) == ["camera_front", "camera_garage", "event_person", "watch_person"]
        assert config["availability_topic"] == f"{prefix}/available"
        topic = watcher.topic
        assert json.loads((await retained(*broker, topic))[topic]) == config
        assert (await retained(*broker, f"{prefix}/available"))[f"{prefix}/available"] == b"online"

        async with aiomqtt.Client(*broker) as ha:
            await ha.publish(f"{prefix}/ha/status", b"offline", qos=1)
            assert await watcher.quiet()  # only "online" asks for discovery
            before = api.counters["discovery_published"]
            for _ in range(5):  # a burst of births costs one publish
                await ha.publish(f"{prefix}/ha/status", b"online", qos=1)
            assert await watcher.next_config() == config
            assert await watcher.quiet()
            assert api.counters["discovery_published"] == before + 1


async def test_removed_watch_components_are_removed(broker, prefix) -> None:
    watches = {"person": ["front"], "car": []}
    api = _api(broker, prefix, watches)
    async with watching(broker, api) as watcher, running(api):
        assert "watch_car" in (await watcher.next_config())["components"]
        del watches["car"]
        await api.publish_discovery()
        removal = await watcher.next_config()
        check_payload(removal)
        assert removal["components"]["watch_car"] == {"platform": "binary_sensor"}
        assert removal["components"]["event_car"] == {"platform": "event"}
        final = await watcher.next_config()
        check_payload(final)
        assert sorted(final["components"]) == ["camera_front", "camera_garage", "event_person", "watch_person"]
        assert await watcher.quiet()  # reading its own config back does not start a loop


async def test_watch_removed_while_down_is_removed_after_restart(broker, prefix) -> None:
    discovery = DiscoverySettings(prefix=f"{prefix}/ha", node_id=f"n{uuid.uuid4().hex[:6]}")
    first = _api_for(broker, prefix, {"person": [], "car": []}, discovery)
    async with running(first):
        pass
    again = _api_for(broker, prefix, {"person": []}, discovery)  # "car" left the config meanwhile
    async with watching(broker, again) as watcher:
        assert "watch_car" in (await watcher.next_config())["components"]  # the retained one
        async with running(again):
            configs = [await watcher.next_config() for _ in range(3)]
    connect, removal, final = configs
    assert "watch_car" not in connect["components"]
    assert removal["components"]["watch_car"] == {"platform": "binary_sensor"}
    assert removal["components"]["event_car"] == {"platform": "event"}
    assert "watch_car" not in final["components"]
    check_payload(final)


async def test_turning_discovery_off_clears_the_config(broker, prefix) -> None:
    discovery = DiscoverySettings(prefix=f"{prefix}/ha", node_id=f"n{uuid.uuid4().hex[:6]}")
    async with running(_api_for(broker, prefix, {"person": []}, discovery)):
        pass
    topic = f"{prefix}/ha/device/{discovery.node_id}/config"
    assert topic in await retained(*broker, topic)
    off = discovery.model_copy(update={"enabled": False})
    async with running(_api_for(broker, prefix, {"person": []}, off)):
        pass
    assert await retained(*broker, topic) == {}


async def test_discovery_prefix_is_reserved_for_replies(broker, prefix) -> None:
    api = _api(broker, prefix, {})
    reserved = api.topics.reserved_filters()
    assert f"{prefix}/ha/#" in reserved
    assert "homeassistant/#" in reserved
