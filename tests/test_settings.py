"""Configuration: defaults file, strict validation with located errors, env overrides, secrets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from memory.keys import RedisKeys
from streamer.cli import main
from streamer.settings import CameraSettings, ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_YAML = ROOT / "configs" / "default.yaml"


def _fields(model: type) -> set[str]:
    return set(model.model_fields)


def test_default_yaml_equals_model_defaults() -> None:
    raw = yaml.safe_load(DEFAULT_YAML.read_text())
    assert Settings.model_validate(raw) == Settings()
    # Complete: every top-level key and every key of each section is written out.
    assert set(raw) == _fields(Settings)
    for section in ("mqtt", "redis", "models", "compression", "retrieval", "memory"):
        section_model = type(getattr(Settings(), section))
        assert set(raw[section]) == _fields(section_model), section


def test_default_yaml_documents_every_camera_key() -> None:
    text = DEFAULT_YAML.read_text().split("\ncameras:")[0]  # the watch example comes after
    documented = set(re.findall(r"^#\s{5}(\w+):", text, flags=re.MULTILINE))
    assert documented == _fields(CameraSettings)
    # The documented defaults are the model's defaults.
    example = "\n".join(line[1:] for line in text.splitlines() if re.match(r"^#\s{3}", line))
    cam = yaml.safe_load(example)["front_door"]
    defaults = CameraSettings(url=cam["url"]).model_dump()
    assert {k: v for k, v in cam.items()} == {k: defaults[k] for k in cam}


def test_check_config_default_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(DEFAULT_YAML)]) == 0
    assert "OK" in capsys.readouterr().out


def test_unknown_key_is_rejected_with_its_path_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("mqtt:\n  host: 127.0.0.1\n  hots: typo\ncameras:\n  door: {url: rtsp://x/y, fps: 3}\n")
    assert main(["check-config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "line 3: mqtt.hots: unknown key" in err
    assert "line 5: cameras.door.fps: unknown key" in err


def test_every_error_is_listed_with_location(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "timezone: Mars/Olympus\n"
        "mqtt:\n  port: 70000\n  topic_prefix: 'a/#'\n"
        "cameras:\n  'Front Door': {url: rtsp://x}\n  yard: {url: rtsp://y, sample_fps: 0}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    where = {issue.path: issue.line for issue in info.value.issues}
    assert where["timezone"] == 1
    assert where["mqtt.port"] == 3
    assert where["mqtt.topic_prefix"] == 4
    assert where["cameras.yard.sample_fps"] == 7
    assert any(path.startswith("cameras.Front Door") for path in where)


def test_yaml_syntax_error_is_located(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("mqtt:\n  host: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    assert info.value.issues[0].line is not None
    assert "not valid YAML" in info.value.issues[0].message


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_settings(tmp_path / "absent.yaml", environ={})


def test_camera_url_is_required(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cameras:\n  door: {sample_fps: 2}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    assert [i.path for i in info.value.issues] == ["cameras.door.url"]


def test_environment_overrides_nested_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cameras:\n  door: {url: rtsp://x/y}\n")
    env = {"VIGIL_MQTT__PORT": "8883", "VIGIL_CAMERAS__DOOR__SAMPLE_FPS": "2.5", "VIGIL_MQTT__TLS": "true"}
    settings = load_settings(cfg, environ=env)
    assert settings.mqtt.port == 8883
    assert settings.mqtt.tls is True
    assert settings.cameras["door"].sample_fps == 2.5


def test_environment_override_errors_are_reported() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, environ={"VIGIL_MQTT__PORTT": "1"})
    assert info.value.issues[0].path == "mqtt.portt"


def test_secrets_from_environment_and_credentials(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt_password").write_text("from-credential\n")
    settings = load_settings(None, environ={"CREDENTIALS_DIRECTORY": str(creds), "VIGIL_REDIS__PASSWORD": "from-env"})
    assert settings.mqtt.password is not None
    assert settings.mqtt.password.get_secret_value() == "from-credential"
    assert settings.redis.password is not None
    assert settings.redis.password.get_secret_value() == "from-env"
    # Secrets never show up when settings are printed or logged.
    assert "from-credential" not in repr(settings)


def test_backoff_cap_must_not_be_below_initial_delay() -> None:
    with pytest.raises(ValueError, match="reconnect_max_s"):
        CameraSettings(url="rtsp://x", reconnect_initial_s=10, reconnect_max_s=1)


# --------------------------------------------------------------------------- environment values, secrets


@pytest.mark.parametrize(
    "secret",
    [
        *("abc #def", "null", "~", "'quoted'", '"dq"', "0123", "yes", "off", "@hunter2"),
        *("%x", "*star", "[a", "{b", ": c", " pad "),
    ],
)
def test_environment_secrets_and_urls_are_taken_verbatim(secret: str) -> None:
    env = {
        "VIGIL_MQTT__PASSWORD": secret,
        "VIGIL_REDIS__PASSWORD": secret,
        "VIGIL_MQTT__USERNAME": secret,
        "VIGIL_MQTT__CLIENT_ID": secret,
    }
    settings = load_settings(None, environ=env)
    assert settings.mqtt.password is not None
    assert settings.mqtt.password.get_secret_value() == secret
    assert settings.redis.password is not None
    assert settings.redis.password.get_secret_value() == secret
    assert settings.mqtt.username == secret
    assert settings.mqtt.client_id == secret


def test_environment_urls_are_verbatim_and_typed_fields_still_parse(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cameras:\n  door: {url: rtsp://x/y}\n")
    url = "rtsp://admin:p#ss@cam/x?token=0123"
    env = {
        "VIGIL_CAMERAS__DOOR__URL": url,
        "VIGIL_REDIS__URL": "redis://:a #b@127.0.0.1:6379/0",
        "VIGIL_CAMERAS__DOOR__REALTIME": "off",  # bool | None: YAML, so off is false
        "VIGIL_CAMERAS__DOOR__RTSP_TRANSPORT": "udp",
        "VIGIL_MQTT__TLS_CA_FILE": "/etc/ssl/my ca #1.pem",
        "VIGIL_COMPRESSION__TAU_STATIC": "",  # empty unsets an optional field
        "VIGIL_MQTT__USERNAME": "",
    }
    settings = load_settings(cfg, environ=env)
    assert settings.cameras["door"].url == url
    assert settings.redis.url == "redis://:a #b@127.0.0.1:6379/0"
    assert settings.cameras["door"].realtime is False
    assert settings.cameras["door"].rtsp_transport == "udp"
    assert str(settings.mqtt.tls_ca_file) == "/etc/ssl/my ca #1.pem"
    assert settings.compression.tau_static is None
    assert settings.mqtt.username is None


def test_credential_files_keep_spaces_and_lose_only_the_line_end(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt_password").write_text(" two words \n")
    settings = load_settings(None, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert settings.mqtt.password is not None
    assert settings.mqtt.password.get_secret_value() == " two words "


def test_bad_typed_environment_values_are_located_errors_without_the_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("mqtt:\n  host: 127.0.0.1\n")
    monkeypatch.setenv("VIGIL_MQTT__PORT", "@hunter2")  # not YAML at all
    monkeypatch.setenv("VIGIL_MQTT__KEEPALIVE_S", "s3cret-keepalive")  # YAML, but not an int
    assert main(["check-config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "mqtt.port: environment variable VIGIL_MQTT__PORT" in err
    assert "hunter2" not in err
    monkeypatch.delenv("VIGIL_MQTT__PORT")
    assert main(["check-config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "mqtt.keepalive_s" in err
    assert "s3cret-keepalive" not in err
    assert "input_value" not in err


def test_config_errors_never_print_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "mqtt:\n  port: s3cret-port\n  topic_prefix: 's3cret/#'\n  keepalive_s: [s3cret-list]\n"
        "redis:\n  url: 'http://:s3cret-redis@host'\n"
        "timezone: S3cret/Zone\n"
        "cameras:\n  door: {url: 'ftp://u:s3cret-cam@host/x', sample_fps: s3cret-fps}\n"
    )
    assert main(["check-config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") >= 7, err  # every problem is listed
    assert "s3cret" not in err.lower(), err
    assert "input_value" not in err
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    # No ValidationError chained: a traceback would print its input values.
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


@pytest.mark.parametrize(
    "text",
    ["cameras:\n  door:\n    url: rtsp://u:s3cret@cam/x: y\n", 'cameras:\n  door: {url: "rtsp://u:s3cret@cam/x\\q"}\n'],
)
def test_yaml_syntax_errors_do_not_quote_the_line(tmp_path: Path, text: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    assert "s3cret" not in str(info.value)
    assert info.value.issues[0].line in (2, 3)


# --------------------------------------------------------------------------- names and URLs


@pytest.mark.parametrize(
    ("yaml_text", "path"),
    [
        ('cameras:\n  "cam\\n": {url: rtsp://x/y}\n', "cameras.cam\n"),
        ('mqtt:\n  topic_prefix: "vigil\\n"\n', "mqtt.topic_prefix"),
        ('redis:\n  key_prefix: "k\\n"\n', "redis.key_prefix"),
        ('redis:\n  key_prefix: "a{b}"\n', "redis.key_prefix"),
        ('redis:\n  key_prefix: "a b"\n', "redis.key_prefix"),
    ],
)
def test_names_with_a_trailing_newline_or_bad_characters_are_refused(
    tmp_path: Path, yaml_text: str, path: str
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    assert any(issue.path.startswith(path) for issue in info.value.issues), info.value.issues


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://host/video.mp4", "unsupported scheme 'ftp'"),
        ("smb://nas/cam.mp4", "unsupported scheme 'smb'"),
        ("rtsp:///nohost", "needs a host"),
        ("http://[::1/x", "not a valid address"),
        ("", "must not be empty"),
    ],
)
def test_check_config_refuses_unsupported_camera_urls_with_a_located_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str, message: str
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"timezone: UTC\ncameras:\n  door:\n    url: '{url}'\n")
    assert main(["check-config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "line 4: cameras.door.url:" in err
    assert message in err


@pytest.mark.parametrize(
    "url",
    [
        "rtsp://cam/x",
        "rtsps://cam/x",
        "rtmp://host/live",
        "rtmps://host/live",
        "http://cam/video.mjpg",
        "https://cam/live.m3u8",
        "RTSP://cam/x",
        "rtsp://[::1]:554/x",
        "/srv/clip.mp4",
        "clips/relative.mp4",
        "file:///srv/clip.mp4",
        "/dev/video0",
        "lavfi:testsrc2=rate=10",
    ],
)
def test_supported_camera_urls_are_accepted(url: str) -> None:
    assert CameraSettings(url=url).url == url


def test_the_stores_own_key_guard_refuses_a_trailing_newline() -> None:
    with pytest.raises(ValueError, match="key prefix"):
        RedisKeys("k\n")
    with pytest.raises(ValueError, match="cannot be used"):
        RedisKeys("k").timeline("cam\n")


# --------------------------------------------------------------------------- memory tiers and budgets


def test_memory_defaults_are_the_issue_tiers_and_a_2gb_camera_budget() -> None:
    memory = Settings().memory
    assert [(t.after, t.merge, t.keep_ratio) for t in memory.tiers] == [(86400.0, 8, 0.125), (604800.0, 8, 0.125)]
    assert memory.max_bytes_per_camera == 2 * 10**9
    assert memory.max_bytes is None


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90.0), ("30m", 1800.0), ("12h", 43200.0), ("1.5d", 129600.0), ("2w", 1209600.0)]
)
def test_tier_durations_take_units(text: str, seconds: float) -> None:
    tier = Settings.model_validate({"memory": {"tiers": [{"after": text, "merge": 4, "keep_ratio": 0.5}]}}).memory
    assert tier.tiers[0].after == seconds


@pytest.mark.parametrize(("text", "size"), [("2GB", 2 * 10**9), ("512MiB", 512 * 2**20), ("100 MB", 10**8)])
def test_budget_sizes_take_units(text: str, size: int) -> None:
    memory = Settings.model_validate({"memory": {"max_bytes_per_camera": text, "max_bytes": text}}).memory
    assert memory.max_bytes_per_camera == size
    assert memory.max_bytes == size


@pytest.mark.parametrize(
    ("memory", "message"),
    [
        ({"tiers": [{"after": "1d", "merge": 8}]}, "memory.tiers.0.keep_ratio: Field required"),
        ({"tiers": [{"after": "1d", "merge": 8, "keep_ratio": 0.1, "mrege": 2}]}, "memory.tiers.0.mrege: unknown key"),
        ({"tiers": [{"after": 86400, "merge": 8, "keep_ratio": 0.1}]}, None),  # seconds, as dumped: accepted
        ({"tiers": [{"after": "1 day", "merge": 8, "keep_ratio": 0.1}]}, "memory.tiers.0.after: "),
        ({"tiers": [{"after": "0d", "merge": 8, "keep_ratio": 0.1}]}, "memory.tiers.0.after: "),
        ({"tiers": [{"after": "1d", "merge": 1, "keep_ratio": 0.1}]}, "memory.tiers.0.merge: "),
        ({"tiers": [{"after": "1d", "merge": 8, "keep_ratio": 0}]}, "memory.tiers.0.keep_ratio: "),
        ({"tiers": [{"after": "1d", "merge": 8, "keep_ratio": 1.5}]}, "memory.tiers.0.keep_ratio: "),
        (
            {"tiers": [{"after": "7d", "merge": 8, "keep_ratio": 0.1}, {"after": "1d", "merge": 8, "keep_ratio": 0.1}]},
            "increasing",
        ),
        ({"max_bytes_per_camera": "2"}, "memory.max_bytes_per_camera: "),
        ({"max_bytes_per_camera": "2 gigabytes"}, "memory.max_bytes_per_camera: "),
        ({"max_bytes": "0GB"}, "memory.max_bytes: "),
        ({"max_bytes": True}, "memory.max_bytes: "),
    ],
)
def test_memory_settings_are_validated_strictly(tmp_path: Path, memory: dict, message: str | None) -> None:
    cfg = tmp_path / "memory.yaml"
    cfg.write_text(yaml.safe_dump({"memory": memory}))
    if message is None:
        load_settings(cfg, environ={})
        return
    with pytest.raises(ConfigError) as caught:
        load_settings(cfg, environ={})
    assert message in str(caught.value)


def test_a_camera_may_set_its_own_tiers() -> None:
    settings = Settings.model_validate(
        {
            "cameras": {
                "gate": {"url": "rtsp://x/y", "tiers": [{"after": "2d", "merge": 4, "keep_ratio": 0.25}]},
                "door": {"url": "rtsp://x/z"},
                "yard": {"url": "rtsp://x/w", "tiers": []},
            }
        }
    )
    assert [(t.after, t.merge) for t in settings.tiers_for("gate")] == [(172800.0, 4)]
    assert settings.tiers_for("door") == settings.memory.tiers
    assert settings.tiers_for("yard") == []


def test_memory_settings_from_the_environment() -> None:
    env = {
        "VIGIL_MEMORY__MAX_BYTES": "16GB",
        "VIGIL_MEMORY__TIERS": "[{after: 2d, merge: 4, keep_ratio: 0.25}]",
        "VIGIL_MEMORY__MAX_BYTES_PER_CAMERA": "",  # empty: no per-camera budget
    }
    memory = load_settings(None, environ=env).memory
    assert memory.max_bytes == 16 * 10**9
    assert memory.max_bytes_per_camera is None
    assert [(t.after, t.merge, t.keep_ratio) for t in memory.tiers] == [(172800.0, 4, 0.25)]
