"""docker-compose.observability.yml and the configs it mounts agree with each other.

No Docker engine runs the tests: the compose file is parsed and every
address, path and port is cross-checked against the config files.
"""

from __future__ import annotations

import re
from typing import Any, Final

import pytest
import yaml

from tests.observability.tools import REPO_ROOT, output_of, run_tool

COMPOSE_PATH: Final = REPO_ROOT / "docker-compose.observability.yml"
OBSERVABILITY: Final = REPO_ROOT / "observability"
SERVICES: Final = {"prometheus", "alertmanager-config", "alertmanager", "loki", "promtail",
                   "grafana", "mailpit"}


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load(COMPOSE_PATH.read_text())
    return compose


def _service(name: str) -> dict[str, Any]:
    service: dict[str, Any] = _compose()["services"][name]
    return service


def _yaml(relative: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((OBSERVABILITY / relative).read_text())
    return loaded


_VOLUME_RE: Final = re.compile(r"^(?P<source>.+?):(?P<target>/[^:]*)(?::(?P<mode>ro|rw))?$")


def _binds(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(source, target, mode) of each bind mount, i.e. each volume from ./path or ${VAR}."""
    binds = []
    for volume in service.get("volumes", []):
        match = _VOLUME_RE.match(volume)
        assert match, f"unparsable volume {volume!r}"
        if match["source"].startswith(("./", "${")):
            binds.append((match["source"], match["target"], match["mode"] or ""))
    return binds


def test_stack_has_every_service() -> None:
    assert set(_compose()["services"]) == SERVICES


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_images_are_pinned(name: str) -> None:
    image = _service(name)["image"]

    assert re.match(r"^[\w./-]+:[\w.-]+$", image) and not image.endswith(":latest"), image


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_mounted_config_exists_and_is_read_only(name: str) -> None:
    for source, target, mode in _binds(_service(name)):
        if source.startswith("${"):
            continue  # the server's data directory, checked below
        assert (REPO_ROOT / source).exists(), f"{name} mounts missing {source}"
        assert mode == "ro", f"{name} mounts {source} writable at {target}"


def test_promtail_reads_the_audit_directory_read_only() -> None:
    (data,) = [b for b in _binds(_service("promtail")) if b[0].startswith("${")]
    glob = _yaml("promtail/promtail.yml")["scrape_configs"][0]["static_configs"][0]["labels"]

    assert data == ("${PQMSG_DATA_DIR:-./pqmsg-data}/audit", "/var/log/pqmsg/audit", "ro")
    assert glob["__path__"] == "/var/log/pqmsg/audit/audit-*.jsonl"


@pytest.mark.parametrize("name", sorted(SERVICES - {"alertmanager-config"}))
def test_services_share_the_host_network_without_published_ports(name: str) -> None:
    service = _service(name)

    assert service["network_mode"] == "host"
    assert "ports" not in service


def test_every_listener_is_on_loopback() -> None:
    loki = _yaml("loki/loki.yml")["server"]
    promtail = _yaml("promtail/promtail.yml")["server"]
    grafana = _service("grafana")["environment"]
    mailpit = _service("mailpit")["environment"]

    assert "--web.listen-address=127.0.0.1:9090" in _service("prometheus")["command"]
    assert "--web.listen-address=127.0.0.1:9093" in _service("alertmanager")["command"]
    assert "--cluster.listen-address=" in _service("alertmanager")["command"]
    assert (loki["http_listen_address"], loki["grpc_listen_address"]) == ("127.0.0.1", "127.0.0.1")
    assert (loki["http_listen_port"], promtail["http_listen_address"]) == (3100, "127.0.0.1")
    assert grafana["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"
    assert (mailpit["MP_SMTP_BIND_ADDR"], mailpit["MP_UI_BIND_ADDR"]) == (
        "127.0.0.1:1025", "127.0.0.1:8025")


def test_prometheus_scrapes_the_server_and_alerts_the_alertmanager() -> None:
    config = _yaml("prometheus/prometheus.yml")
    (pqmsg,) = [job for job in config["scrape_configs"] if job["job_name"] == "pqmsg"]
    (alertmanagers,) = config["alerting"]["alertmanagers"]

    assert pqmsg["metrics_path"] == "/metrics"
    assert pqmsg["static_configs"][0]["targets"] == ["127.0.0.1:8080"]
    assert alertmanagers["static_configs"][0]["targets"] == ["127.0.0.1:9093"]


def test_promtool_check_config_passes() -> None:
    result = run_tool("promtool", ["check", "config", str(OBSERVABILITY / "prometheus" / "prometheus.yml")])

    assert result.returncode == 0, output_of(result)


def test_alertmanager_reads_what_the_render_step_writes() -> None:
    render = _service("alertmanager-config")
    command = render["command"]
    out = command[command.index("--out") + 1]
    config_flag = next(a for a in _service("alertmanager")["command"] if a.startswith("--config.file="))

    assert config_flag == f"--config.file={out}"
    assert _service("alertmanager")["depends_on"]["alertmanager-config"]["condition"] == (
        "service_completed_successfully")
    assert "alertmanager-config:/config:ro" in _service("alertmanager")["volumes"]
    assert render["environment"]["ALERT_EMAIL_SMARTHOST"] == "${ALERT_EMAIL_SMARTHOST:-127.0.0.1:1025}"


def test_promtail_ships_to_loki_and_grafana_reads_both() -> None:
    promtail = _yaml("promtail/promtail.yml")
    datasources = {d["uid"]: d for d in _yaml("grafana/provisioning/datasources/pqmsg.yml")["datasources"]}

    assert promtail["clients"][0]["url"] == "http://127.0.0.1:3100/loki/api/v1/push"
    assert datasources["pqmsg-prometheus"]["url"] == "http://127.0.0.1:9090"
    assert datasources["pqmsg-loki"]["url"] == "http://127.0.0.1:3100"


def test_grafana_provisions_the_mounted_dashboards() -> None:
    provider = _yaml("grafana/provisioning/dashboards/pqmsg.yml")["providers"][0]
    targets = {source: target for source, target, _ in _binds(_service("grafana"))}

    assert targets["./observability/grafana/dashboards"] == provider["options"]["path"]
    assert targets["./observability/grafana/provisioning"] == "/etc/grafana/provisioning"
