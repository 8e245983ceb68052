"""Configuration: defaults file, strict validation with located errors, env overrides, secrets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

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
    for section in ("mqtt", "redis", "models", "compression", "retrieval"):
        section_model = type(getattr(Settings(), section))
        assert set(raw[section]) == _fields(section_model), section


def test_default_yaml_documents_every_camera_key() -> None:
    text = DEFAULT_YAML.read_text()
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
