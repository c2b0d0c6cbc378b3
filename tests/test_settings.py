"""Settings: environment variables, TOML file, validation messages, masking."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from retinagate.destinations import TlsFiles
from retinagate.destinations.dimse import DimseDestination
from retinagate.settings import SettingsError, load_settings


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
        DimseDestination(ae_title="PACS", host="pacs.local", port=104),
        DimseDestination(ae_title="VIEWER", host="::1", port=11113),
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
    assert s.destinations == [DimseDestination(ae_title="A", host="h", port=1)]
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
        ("RETINAGATE_DESTINATIONS", "pacs.local:104", r"neither AE@host:port \(C-STORE\) nor http\(s\)://"),
        ("RETINAGATE_DESTINATIONS", "PACS@pacs.local", "not of the form AE@host:port"),
        ("RETINAGATE_DESTINATIONS", "ftp://pacs.local/dicom-web", "an http:// or https:// URL"),
        ("RETINAGATE_DESTINATIONS", "https://pacs.local/dicom-web?x=1", "no query or fragment"),
        ("RETINAGATE_DESTINATIONS", "A@h:1,B@h:2,A@h:1", "A@h:1 named more than once"),
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


def test_destinations_of_both_protocols_are_typed_values_named_as_they_parse_back() -> None:
    from retinagate.destinations import parse
    from retinagate.destinations.stow import StowDestination

    s = load_settings(environ={"RETINAGATE_DESTINATIONS": "PACS@[::1]:104, HTTPS://pacs.local:8443/dicom-web/"})
    pacs, web = s.destinations
    assert pacs == DimseDestination(ae_title="PACS", host="::1", port=104) and pacs.protocol == "C-STORE"
    assert web == StowDestination(url="https://pacs.local:8443/dicom-web") and web.protocol == "STOW-RS"
    assert [d.name for d in s.destinations] == ["PACS@[::1]:104", "https://pacs.local:8443/dicom-web"]
    assert [parse(d.name) for d in s.destinations] == s.destinations  # what the deliveries table stores
    assert s.destination("https://pacs.local:8443/dicom-web") is web and s.destination("PACS@h:1") is None
    assert s.masked()["destinations"] == ["PACS@[::1]:104", "https://pacs.local:8443/dicom-web"]


def test_a_destination_may_be_a_table_with_a_name_and_tls_and_auth_of_its_own(tmp_path: Path) -> None:
    from retinagate.destinations.stow import StowDestination

    config = tmp_path / "rg.toml"
    config.write_text(
        'delivery_tls = true\ndelivery_tls_ca = "/etc/rg/ca.pem"\n'
        'destinations = ["PACS@pacs:104", {address = "LOCAL@10.0.0.5:11112", tls = false}, '
        '{address = "https://cloud.example/dicom-web", name = "cloud", tls_ca = "/etc/rg/cloud-ca.pem", '
        'token_file = "/run/secrets/cloud"}]\n'
    )
    s = load_settings(config, environ={})
    pacs, local, cloud = s.destinations
    assert [d.name for d in s.destinations] == ["PACS@pacs:104", "LOCAL@10.0.0.5:11112", "cloud"]
    assert isinstance(cloud, StowDestination) and cloud.token_file == Path("/run/secrets/cloud")
    assert s.destination("cloud") is cloud and cloud.address == "https://cloud.example/dicom-web"
    # Each tls* setting a destination leaves out follows delivery_tls*.
    assert s.tls_for(pacs) == TlsFiles(Path("/etc/rg/ca.pem"), None, None, "delivery_tls")
    assert s.tls_for(local) is None
    assert s.tls_for(cloud) == TlsFiles(Path("/etc/rg/cloud-ca.pem"), None, None, "destination cloud tls")
    assert s.masked()["destinations"] == [
        "PACS@pacs:104",
        {"address": "LOCAL@10.0.0.5:11112", "tls": False},
        {"address": "https://cloud.example/dicom-web", "name": "cloud", "tls_ca": "/etc/rg/cloud-ca.pem",
         "token_file": "/run/secrets/cloud"},
    ]  # fmt: skip
    from_env = load_settings(environ={"RETINAGATE_DESTINATIONS": '[{"address": "A@h:1", "name": "a", "tls": true}]'})
    assert [(d.name, from_env.tls_for(d)) for d in from_env.destinations] == [("a", TlsFiles(None, None, None))]
    # A CA or certificate of its own turns a destination's TLS on without delivery_tls (the README's example).
    readme = tmp_path / "readme.toml"
    readme.write_text(_readme_block("[[destinations]]"))
    ward, archive = load_settings(readme, environ={}).destinations
    assert (ward.name, archive.name, archive.options["token_file"]) == (
        "PACS@pacs.ward.example:104", "archive", "/run/secrets/archive-token"
    )  # fmt: skip
    assert load_settings(readme, environ={}).tls_for(ward) is None
    assert load_settings(readme, environ={}).tls_for(archive) == TlsFiles(
        Path("/etc/retinagate/archive-ca.pem"), None, None, "destination archive tls"
    )


def _readme_block(first_line: str) -> str:
    """The README's fenced TOML block that starts with ``first_line``."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start = readme.index(f"```toml\n{first_line}") + len("```toml\n")
    return readme[start : readme.index("```", start)]


def test_an_operator_finds_a_destination_by_its_name_or_by_its_address_in_any_spelling() -> None:
    s = load_settings(
        environ={"RETINAGATE_DESTINATIONS": '["PACS@[::1]:104", {"address": "https://h/dicom-web", "name": "archive"}]'}
    )
    pacs, archive = s.destinations
    assert s.find_destination("archive") is archive and s.find_destination(" archive ") is archive
    assert s.find_destination("HTTPS://h/dicom-web/") is archive  # its address, spelt otherwise
    assert s.find_destination("PACS@[::1]:104") is pacs and s.find_destination("PACS@::1:104") is None
    assert s.find_destination("https://h/other") is None and s.find_destination("nonsense") is None


@pytest.mark.parametrize(
    ("destinations", "expected"),
    [
        ('[{"address": "A@h:1", "token_file": "/t"}]', r"token_file is not a setting of a C-STORE destination"),
        ('[{"name": "x"}]', r"a table needs an 'address'"),
        ('[{"address": "https://h/dw", "username": "rg"}]', r"username and password_file must be set together"),
        ('[{"address": "https://h/dw", "token_file": "/t", "username": "rg", "password_file": "/p"}]', r"not both"),
        ('[{"address": "A@h:1", "tls": true, "tls_cert": "/c.pem"}]', r"tls_cert and tls_key must be set together"),
        ('[{"address": "A@h:1", "tls": false, "tls_ca": "/ca.pem"}]', r"A@h:1: tls = false, but tls_ca, _cert or _key"),
        ('[{"address": "http://h/dw", "tls_ca": "/ca.pem"}]', r"its tls is on, but http://h/dw would be sent"),
        ('[{"address": "http://h/dw", "tls": true}]', r"its tls is on, but http://h/dw would be sent in the clear"),
        ('[{"address": "A@h:1", "name": "x"}, {"address": "B@h:2", "name": "x"}]', r"x named more than once"),
        ('[{"address": "A@h:1", "tls": "maybe"}]', r"destination A@h:1: tls: Input should be a valid boolean"),
        ("[not json", r"not a JSON list of destinations"),
    ],
)  # fmt: skip
def test_a_destination_table_that_contradicts_itself_is_refused_naming_the_problem(
    destinations: str, expected: str
) -> None:
    with pytest.raises(SettingsError, match=expected):
        load_settings(environ={"RETINAGATE_DESTINATIONS": destinations})


def test_a_destination_url_with_credentials_is_refused_without_repeating_the_password() -> None:
    with pytest.raises(SettingsError, match="credentials do not go in the URL") as caught:
        load_settings(environ={"RETINAGATE_DESTINATIONS": "https://rg:s3cret@pacs.local/dicom-web"})
    assert "s3cret" not in str(caught.value)


def test_delivery_tls_refuses_a_plain_http_destination() -> None:
    with pytest.raises(SettingsError, match=r"delivery_tls is on, but http://pacs.local/dicom-web would be sent in"):
        load_settings(
            environ={"RETINAGATE_DESTINATIONS": "http://pacs.local/dicom-web", "RETINAGATE_DELIVERY_TLS": "1"}
        )
    secure = load_settings(
        environ={"RETINAGATE_DESTINATIONS": "https://pacs.local/dicom-web,PACS@h:104", "RETINAGATE_DELIVERY_TLS": "1"}
    )
    assert not any(d.cleartext for d in secure.destinations)


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
