"""The Prometheus and Grafana containers of `kvbm metrics up` / `down` (Docker SDK), with the shipped dashboards.

Operations:
  dashboards_dir(given)       the shipped dashboards/ (prometheus.yml, grafana/), or `given`
  containers(folder, ...)     the two containers: name, image and the keyword arguments of containers.run
  docker_client()             a connected Docker SDK client, or one clear line saying why there is none
  run_container(client, ...)  replace a container of that name (pulling the image when missing)
  remove_all(client)          remove what `up` started
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from kvbm_cli._data import data_dir
from kvbm_cli._errors import CheckFailed, CliError
from kvbm_cli._output import note

LABEL = "kvbm.metrics"
PROMETHEUS_IMAGE = "prom/prometheus:v2.55.1"
GRAFANA_IMAGE = "grafana/grafana:11.3.0"


def dashboards_dir(given: Path | None = None) -> Path:
    """The shipped dashboards/ (or `given`), with its compose file."""
    path = given or data_dir("dashboards")
    if not (path / "prometheus.yml").is_file() or not (path / "grafana" / "dashboards").is_dir():
        raise CliError(f"{path} is not kvbm's dashboards directory (prometheus.yml, grafana/); pass --dashboards DIR")
    return path


def docker_client():
    """A connected Docker SDK client, or one clear line saying why there is none."""
    try:
        import docker
    except ModuleNotFoundError:
        raise CliError("the Docker SDK for Python is not installed: pip install docker") from None
    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - DockerException, requests' and urllib3's connection errors
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
        raise CheckFailed(f"no Docker engine reachable at {where} ({reason}): start Docker or set DOCKER_HOST, "
                          "or run `docker compose -f dashboards/docker-compose.yml up -d` where Docker runs") from None
    return client


def containers(folder: Path, grafana_port: int = 3001, prometheus_port: int = 9090) -> list[dict]:
    """The two containers `kvbm metrics up` runs: name, image and the keyword arguments of containers.run."""
    grafana = folder / "grafana"
    return [
        {"name": "kvbm-prometheus", "image": PROMETHEUS_IMAGE,
         "command": ["--config.file=/etc/prometheus/prometheus.yml", f"--web.listen-address=:{prometheus_port}"],
         "volumes": {str(folder / "prometheus.yml"): {"bind": "/etc/prometheus/prometheus.yml", "mode": "ro"}}},
        {"name": "kvbm-grafana", "image": GRAFANA_IMAGE,
         "environment": {"GF_SERVER_HTTP_PORT": str(grafana_port), "GF_SECURITY_ADMIN_USER": "dynamo",
                         "GF_SECURITY_ADMIN_PASSWORD": "dynamo", "GF_USERS_ALLOW_SIGN_UP": "false",
                         "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH": "/var/lib/grafana/dashboards/kvbm.json",
                         "KVBM_PROMETHEUS_URL": f"http://127.0.0.1:{prometheus_port}"},
         "volumes": {str(grafana / "provisioning"): {"bind": "/etc/grafana/provisioning", "mode": "ro"},
                     str(grafana / "dashboards"): {"bind": "/var/lib/grafana/dashboards", "mode": "ro"}}},
    ]


def run_container(client, name: str, image: str, **kwargs):
    import docker

    with contextlib.suppress(docker.errors.NotFound):
        client.containers.get(name).remove(force=True)
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        note(f"pulling {image} ...")
        client.images.pull(image)
    return client.containers.run(image, name=name, detach=True, network_mode="host", labels={LABEL: "1"},
                                 restart_policy={"Name": "unless-stopped"}, **kwargs)


def remove_all(client) -> list[str]:
    """Remove every container `kvbm metrics up` started; their names, sorted."""
    removed = []
    for container in client.containers.list(all=True, filters={"label": f"{LABEL}=1"}):
        container.remove(force=True)
        removed.append(container.name)
    return sorted(removed)
