"""Settings: environment variables, TOML file, validation messages, masking."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from retinagate.settings import Destination, SettingsError, load_settings


def test_defaults_put_everything_under_the_data_directory(tmp_path: Path) -> None:
    settings = load_settings(environ={"RETINAGATE_DATA_DIR": str(tmp_path)})
    assert settings.resolved_database_url == f"sqlite:///{(tmp_path / 'retinagate.db').resolve()}"
    assert settings.resolved_storage_dir == tmp_path / "storage"
    assert settings.gateway_ae_title == "RETINAGATE"
    assert settings.gateway_port == 11112
    assert settings.providers == "auto"


def test_documented_environment_variables_are_read() -> None:
    env = {
        "RETINAGATE_DATABASE_URL": "postgresql://rg@db/rg",
        "RETINAGATE_BROKER_URL": "redis://redis:6379/0",
        "RETINAGATE_STORAGE_DIR": "/srv/rg",
        "RETINAGATE_MODEL_PATH": "/models/m.onnx",
        "RETINAGATE_PROVIDERS": "cuda",
        "RETINAGATE_GATEWAY_AE_TITLE": "FUNDUS_AI",
        "RETINAGATE_GATEWAY_HOST": "127.0.0.1",
        "RETINAGATE_GATEWAY_PORT": "4242",
        "RETINAGATE_GATEWAY_ALLOWED_AE_TITLES": "CAMERA1, CAMERA2",
        "RETINAGATE_GATEWAY_ALLOWED_NETWORKS": "10.0.0.0/8,192.168.1.0/24",
        "RETINAGATE_GATEWAY_TLS_CERT": "/tls/cert.pem",
        "RETINAGATE_GATEWAY_TLS_KEY": "/tls/key.pem",
        "RETINAGATE_GATEWAY_TLS_CA": "/tls/ca.pem",
        "RETINAGATE_DESTINATIONS": "PACS@pacs.local:104,VIEWER@[::1]:11113",
        "RETINAGATE_OUTPUTS": "sc,sr,pm",
        "RETINAGATE_RESCORE_CRON": "30 1 * * *",
        "RETINAGATE_METRICS_PORT": "9100",
    }
    s = load_settings(environ=env)
    assert s.database_url == "postgresql://rg@db/rg"
    assert s.storage_dir == Path("/srv/rg")
    assert s.model_path == Path("/models/m.onnx")
    assert s.providers == "cuda"
    assert s.gateway_allowed_ae_titles == ["CAMERA1", "CAMERA2"]
    assert s.gateway_allowed_networks == [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.168.1.0/24")]
    assert s.tls_enabled
    assert s.destinations == [
        Destination(ae_title="PACS", host="pacs.local", port=104),
        Destination(ae_title="VIEWER", host="::1", port=11113),
    ]
    assert s.outputs == ["sc", "sr", "pm"]
    assert s.rescore_cron == "30 1 * * *"
    assert s.metrics_port == 9100


def test_toml_file_is_read_and_environment_wins(tmp_path: Path) -> None:
    config = tmp_path / "retinagate.toml"
    config.write_text('gateway_port = 2000\ngateway_ae_title = "FROMFILE"\ndestinations = ["A@h:1"]\n')
    s = load_settings(config, environ={"RETINAGATE_GATEWAY_PORT": "3000"})
    assert s.gateway_port == 3000
    assert s.gateway_ae_title == "FROMFILE"
    assert s.destinations == [Destination(ae_title="A", host="h", port=1)]
    assert s.config == config


def test_toml_file_may_use_a_retinagate_table(tmp_path: Path) -> None:
    config = tmp_path / "rg.toml"
    config.write_text("[retinagate]\ngateway_port = 2001\n")
    assert load_settings(environ={"RETINAGATE_CONFIG": str(config)}).gateway_port == 2001


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("RETINAGATE_GATEWAY_PORT", "70000", "RETINAGATE_GATEWAY_PORT"),
        ("RETINAGATE_PROVIDERS", "gpu", "RETINAGATE_PROVIDERS"),
        ("RETINAGATE_OUTPUTS", "sc,xray", "RETINAGATE_OUTPUTS"),
        ("RETINAGATE_DESTINATIONS", "pacs.local:104", "AE@host:port"),
        ("RETINAGATE_GATEWAY_ALLOWED_NETWORKS", "10.0.0.0/33", "CIDR"),
        ("RETINAGATE_GATEWAY_AE_TITLE", "A_TITLE_THAT_IS_TOO_LONG", "AE title"),
        ("RETINAGATE_RESCORE_CRON", "every night", "cron"),
        ("RETINAGATE_RETENTION_DAYS", "-1", "RETINAGATE_RETENTION_DAYS"),
        ("RETINAGATE_GATEWAY_TLS_CERT", "/tls/cert.pem", "gateway_tls_key"),
        ("RETINAGATE_NO_SUCH_THING", "1", "RETINAGATE_NO_SUCH_THING"),
    ],
)
def test_invalid_values_fail_with_a_message_naming_the_setting(name: str, value: str, expected: str) -> None:
    with pytest.raises(SettingsError, match=expected):
        load_settings(environ={name: value})


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_task_time_limit_must_stay_below_the_visibility_timeout() -> None:
    with pytest.raises(SettingsError, match="visibility_timeout"):
        load_settings(environ={"RETINAGATE_TASK_TIME_LIMIT": "4000", "RETINAGATE_VISIBILITY_TIMEOUT": "3600"})


def test_retry_delays_must_fit_below_the_visibility_timeout_and_stuck_after() -> None:
    # A retry's message waits unacknowledged in its worker for its countdown: Redis must not hand it out again.
    with pytest.raises(SettingsError, match=r"visibility_timeout \(900 s\) must exceed .* 1000 s"):
        load_settings(environ={"RETINAGATE_VISIBILITY_TIMEOUT": "900", "RETINAGATE_DELIVERY_BACKOFF_MAX": "880"})
    # The defect: STUCK_AFTER=5 let the sweeper re-send instances waiting out a 300 s retry delay.
    with pytest.raises(SettingsError, match=r"stuck_after \(5 s\) must exceed .*score_backoff_max \(420 s\)"):
        load_settings(environ={"RETINAGATE_STUCK_AFTER": "5"})
    fast = load_settings(
        environ={
            "RETINAGATE_STUCK_AFTER": "30",
            "RETINAGATE_TASK_TIME_LIMIT": "20",
            "RETINAGATE_SCORE_BACKOFF_MAX": "5",
        }
    )
    assert fast.stuck_after == 30
    with pytest.raises(SettingsError, match="score_backoff must not exceed score_backoff_max"):
        load_settings(environ={"RETINAGATE_SCORE_BACKOFF": "400"})


def test_settings_are_frozen() -> None:
    s = load_settings(environ={})
    with pytest.raises(ValueError, match="frozen"):
        s.gateway_port = 1  # type: ignore[misc]


def test_masked_settings_hide_passwords() -> None:
    s = load_settings(
        environ={
            "RETINAGATE_DATABASE_URL": "postgresql://rg:hunter2@db/rg",
            "RETINAGATE_BROKER_URL": "redis://:s3cret@redis:6379/0",
            "RETINAGATE_DATABASE_PASSWORD": "topsecret",
        }
    )
    text = repr(s.masked())
    for secret in ("hunter2", "s3cret", "topsecret"):
        assert secret not in text
    assert s.masked()["database_url"] == "postgresql://rg:*****@db/rg"
