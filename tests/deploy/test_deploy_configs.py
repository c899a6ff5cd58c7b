"""The deployment files agree with the code and with each other (no Docker engine needed).

- every `scheinfer:*` series the Grafana dashboard queries is one that server/metrics.py exports;
- Grafana's datasource uid is the one the dashboard uses;
- Prometheus, nginx and the replicas override name the same replicas;
- Dockerfile and compose: non-root, /models volume, healthcheck on /health, GPU reservation;
- `docker compose config` (or docker-compose v1) accepts the compose files, where a client exists.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from server.metrics import ServerMetrics

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
DASHBOARD = CONFIGS / "grafana" / "dashboards" / "scheinfer.json"
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def exported_series() -> set[str]:
    """Every sample name the server's registry can export (labelled metrics included, even unobserved)."""
    names: set[str] = set()
    for family in ServerMetrics().registry.collect():
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return exprs


def test_dashboard_queries_only_exported_metrics() -> None:
    exported = exported_series()
    used = {name for expr in dashboard_exprs() for name in re.findall(r"scheinfer:[a-zA-Z0-9_:]+", expr)}
    assert used, "the dashboard queries no scheinfer: metric"
    assert used <= exported, f"not exported by server/metrics.py: {sorted(used - exported)}"
    # The panels: TTFT, ITL, throughput, queue, CPU/PCIe/GPU busy.
    for name in ("scheinfer:time_to_first_token_seconds_bucket", "scheinfer:inter_token_latency_seconds_bucket",
                 "scheinfer:generation_tokens_total", "scheinfer:num_requests_waiting",
                 "scheinfer:cpu_pool_busy_seconds_total", "scheinfer:pcie_busy_seconds_total",
                 "scheinfer:gpu_busy_seconds_total"):
        assert name in used, f"the dashboard has no panel on {name}"


def test_dashboard_is_consistent_with_its_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasources = yaml.safe_load((CONFIGS / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uids = {d["uid"] for d in datasources["datasources"]}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] in uids, panel["title"]
    provider = yaml.safe_load((CONFIGS / "grafana" / "provisioning" / "dashboards" / "scheinfer.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_replicas_are_named_alike_in_compose_nginx_and_prometheus() -> None:
    override = yaml.safe_load((REPO / "docker-compose.replicas.yml").read_text())
    replicas = sorted(name for name in override["services"] if re.fullmatch(r"scheinfer-\d+", name))
    assert len(replicas) >= 2
    nginx = (CONFIGS / "nginx" / "nginx.conf").read_text()
    assert sorted(re.findall(r"^\s*server\s+(scheinfer-\d+):8000\b", nginx, flags=re.M)) == replicas
    prometheus = yaml.safe_load((CONFIGS / "prometheus" / "prometheus.replicas.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] if job["job_name"] == "scheinfer"
               for group in job["static_configs"] for t in group["targets"]]
    assert sorted(targets) == [f"{name}:8000" for name in replicas]
    single = yaml.safe_load((CONFIGS / "prometheus" / "prometheus.yml").read_text())
    assert any("scheinfer:8000" in group["targets"] for job in single["scrape_configs"]
               for group in job["static_configs"])
    for name in replicas:
        devices = override["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_compose_mounts_existing_files_and_reserves_a_gpu() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    server = compose["services"]["scheinfer"]
    assert server["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert any(v.endswith(":/models:ro") for v in server["volumes"])
    assert "/health" in " ".join(server["healthcheck"]["test"])
    assert all(key.startswith("SCHEINFER_") for key in server["environment"])
    for path in (REPO / "docker-compose.yml", REPO / "docker-compose.replicas.yml"):
        for service in yaml.safe_load(path.read_text())["services"].values():
            for volume in service.get("volumes", []):
                source = volume.split(":")[0]
                if source.startswith("./"):
                    assert (REPO / source).exists(), f"{path.name}: {source} does not exist"


def test_dockerfile_runs_as_non_root_with_a_health_check() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, flags=re.M)
    assert re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:\S+cuda\S+", text, flags=re.M)
    user = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert user
    uid = user[-1].split(":")[0]
    assert uid not in ("root", "0")
    created = re.search(r"useradd .*--uid (\d+)", text)
    assert created and uid == created.group(1), "USER is the numeric id of the user the image creates"
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", text, flags=re.M)
    assert re.search(r'^VOLUME \["/models"\]', text, flags=re.M)
    assert re.search(r"^EXPOSE 8000", text, flags=re.M)
    assert re.search(r'^CMD \["scheinfer", "serve", "--host", "0.0.0.0"\]', text, flags=re.M)
    for copied in re.findall(r"^COPY (.+) \S+$", text, flags=re.M):
        for source in copied.split():
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"


def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.mark.parametrize("files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.replicas.yml"]])
def test_docker_compose_config_accepts_the_files(files: list[str]) -> None:
    command = compose_command()
    if command is None:
        pytest.skip("no `docker compose` plugin or docker-compose client installed")
    args = [arg for f in files for arg in ("-f", f)]
    result = subprocess.run([*command, *args, "config", "-q"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
