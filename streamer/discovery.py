"""Home Assistant MQTT discovery payloads: vigil as one device with its watches and cameras.

Pure functions (no I/O); streamer/mqtt_api.py publishes the result, retained, on connect, when
Home Assistant's birth message (``{discovery_prefix}/status`` = ``online``) arrives, and when the
watches change (docs/homeassistant.md).

The format is Home Assistant's device-based discovery (2024.11+), as documented at
https://www.home-assistant.io/integrations/mqtt/#device-discovery-payload : one JSON object on
``{discovery_prefix}/device/{node_id}/config`` with the shared ``device`` and ``origin`` mappings
(both required), shared options (availability, qos) at the root, and one mapping per entity under
``components``, each with its ``platform`` and a ``unique_id``. Full key names are used, not the
abbreviations (``dev``, ``o``, ``cmps``, ``p``), which the documentation makes optional.

Per watch ``W``:

* ``watch_W``, a ``binary_sensor`` on ``{prefix}/watches/W/state`` (``ON``/``OFF``), attributes
  from ``{prefix}/watches/W/attributes``;
* ``event_W``, an ``event`` entity fed by ``{prefix}/events``. The event platform wants JSON with
  an ``event_type`` from its ``event_types`` (https://www.home-assistant.io/integrations/event.mqtt/);
  every watch's events share that topic, so a value template keeps this watch's events, maps
  ``type`` to ``event_type`` and renders ``{}`` for the others, which the platform ignores.

Per camera ``C``: ``camera_C``, a ``sensor`` (device class ``enum``) whose state is the camera's
``state`` from ``{prefix}/cameras/C/state``, with the rest of that JSON (fps, frames dropped,
reconnects, last frame age, error) as attributes.

Component ids start with their kind and ``_``; names (``[a-z0-9_-]``) cannot make the kinds collide.
A component that must go (a removed watch) is sent once as ``{"platform": P}`` alone, which is how
the documentation removes one component of a device; the next config leaves it out.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping, Sequence
from typing import Any, get_args

from streamer.camera import CameraState
from streamer.settings import CAMERA_NAME_RE
from streamer.topics import Topics

BINARY_SENSOR, EVENT, SENSOR = "binary_sensor", "event", "sensor"
# The event types on {prefix}/events (streamer/events.py event_payload's "type").
EVENT_TYPES = ("new", "update", "end")
# What a watch's state topic carries (Home Assistant's binary_sensor defaults, written out).
PAYLOAD_ON, PAYLOAD_OFF = "ON", "OFF"
# The values of a camera state's "state" field, the options of its enum sensor.
CAMERA_STATES: tuple[str, ...] = get_args(CameraState)
QOS = 1  # as every other topic of vigil (streamer/mqtt_api.py)
MANUFACTURER = "vigil"
MODEL = "video memory daemon"
ORIGIN_NAME = "vigil"
# Attributes of an event entity: the event's own fields (event_payload), minus watch and type.
EVENT_ATTRIBUTES = ("id", "camera", "start", "end", "score", "peak_score", "description", "citation")


def software_version() -> str:
    """vigil's installed version (package metadata), or ``unknown`` when run from a bare tree."""
    try:
        return importlib.metadata.version("vigil")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _check_name(kind: str, name: str) -> str:
    # Names become topic levels, unique ids and a literal inside a template: the camera-name rule
    # (streamer/settings.py) makes all three safe. Config and runtime watches already follow it.
    if not isinstance(name, str) or not CAMERA_NAME_RE.fullmatch(name):
        raise ValueError(f"{kind} name {name!r} does not follow the camera-name rule ([a-z0-9][a-z0-9_-]{{0,63}})")
    return name


def event_value_template(watch: str) -> str:
    """Home Assistant template: an event of ``watch`` → ``{"event_type": type, ...}``; others → ``{}``."""
    _check_name("watch", watch)
    fields = ", ".join(f'"{key}": {{{{ value_json.{key} | to_json }}}}' for key in EVENT_ATTRIBUTES)
    return (
        f"{{% if value_json.watch == '{watch}' %}}"
        f'{{"event_type": {{{{ value_json.type | to_json }}}}, {fields}}}'
        "{% else %}{}{% endif %}"
    )


def components(
    topics: Topics, node_id: str, cameras: Sequence[str], watches: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, Any]]:
    """Component id → component config, for every watch and camera (sorted, so payloads are stable).

    A watch's cameras are not part of its entities: its attributes topic says which camera fired.
    """
    out: dict[str, dict[str, Any]] = {}
    for watch in sorted(watches):
        _check_name("watch", watch)
        out[f"watch_{watch}"] = {
            "platform": BINARY_SENSOR,
            "name": watch,
            "unique_id": f"{node_id}_watch_{watch}",
            "state_topic": topics.watch_state(watch),
            "payload_on": PAYLOAD_ON,
            "payload_off": PAYLOAD_OFF,
            "json_attributes_topic": topics.watch_attributes(watch),
        }
        out[f"event_{watch}"] = {
            "platform": EVENT,
            "name": f"{watch} events",
            "unique_id": f"{node_id}_event_{watch}",
            "state_topic": topics.events,
            "event_types": list(EVENT_TYPES),
            "value_template": event_value_template(watch),
        }
    for camera in sorted(set(cameras)):
        _check_name("camera", camera)
        out[f"camera_{camera}"] = {
            "platform": SENSOR,
            "name": camera,
            "unique_id": f"{node_id}_camera_{camera}",
            "state_topic": topics.camera_state(camera),
            "value_template": "{{ value_json.state }}",
            "device_class": "enum",
            "options": list(CAMERA_STATES),
            "json_attributes_topic": topics.camera_state(camera),
            "icon": "mdi:cctv",
        }
    return out


def device_config(
    topics: Topics,
    node_id: str,
    *,
    cameras: Sequence[str],
    watches: Mapping[str, Sequence[str]],
    removed: Mapping[str, str] | None = None,
    sw_version: str | None = None,
) -> dict[str, Any]:
    """The device discovery payload for ``{discovery_prefix}/device/{node_id}/config``.

    ``removed``: component id → platform of components announced before and gone now; each is
    sent as ``{"platform": P}`` only, which removes it (unless it is current again).
    """
    version = software_version() if sw_version is None else sw_version
    current = components(topics, node_id, cameras, watches)
    gone = {cid: {"platform": platform} for cid, platform in (removed or {}).items() if cid not in current}
    return {
        "device": {
            "identifiers": [f"vigil_{node_id}"],
            "name": node_id,
            "manufacturer": MANUFACTURER,
            "model": MODEL,
            "sw_version": version,
        },
        # The project has no support URL yet, so origin has no support_url.
        "origin": {"name": ORIGIN_NAME, "sw_version": version},
        "availability_topic": topics.available,  # online / offline: Home Assistant's defaults
        "qos": QOS,
        "components": {**current, **gone},
    }


def announced(config: object) -> dict[str, str]:
    """Component id → platform of the entities a retained device config announces.

    ``config`` is whatever JSON was found on the topic (it is read back from the broker, so
    anything may be there); removal entries (platform only) and malformed entries are skipped.
    """
    if not isinstance(config, dict):
        return {}
    comps = config.get("components", config.get("cmps"))
    if not isinstance(comps, dict):
        return {}
    found: dict[str, str] = {}
    for cid, comp in comps.items():
        if not isinstance(cid, str) or not isinstance(comp, dict):
            continue
        platform = comp.get("platform", comp.get("p"))
        if isinstance(platform, str) and set(comp) - {"platform", "p"}:
            found[cid] = platform
    return found
