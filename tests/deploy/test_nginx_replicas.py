"""Two real server processes behind a real nginx on loopback (issue 6: replicas behind a load balancer).

nginx runs the shipped configs/nginx/nginx.conf with only what differs outside a container swapped
in: the upstream servers (two `python -m server` processes on free loopback ports), the listen
address, and pid/log/temp paths under a temporary prefix. The test checks that requests sent
through nginx reach both replicas and that each replica's /metrics counts exactly its own share.
Skipped only when nginx is not installed (.ci/run installs it from the Debian packages).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.tools.tiny_checkpoint import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
NGINX_CONF = REPO / "configs" / "nginx" / "nginx.conf"
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
NUM_REQUESTS = 20
MODEL_NAME = "tiny"

pytestmark = [
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (.ci/run installs it: apt-get install nginx-light)"),
    pytest.mark.timeout(120),
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """Terminate, wait, kill if it does not exit."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def wait_healthy(url: str, procs: dict[str, tuple[subprocess.Popen, Path]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        for name, (proc, log) in procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{tail(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {name}\n{tail(log)}" for name, (_, log) in procs.items())
            raise AssertionError(f"{url}/health not 200 after {timeout_s:.0f}s\n{logs}")
        time.sleep(0.1)


def nginx_temp_directives() -> list[str]:
    """Temp paths under the prefix for every proxy-like module this nginx has (defaults are under /var/lib)."""
    configure = subprocess.run([NGINX, "-V"], capture_output=True, text=True, check=True).stderr
    directives = ["client_body_temp_path temp/body;", "proxy_temp_path temp/proxy;"]
    for module in ("fastcgi", "uwsgi", "scgi"):
        if f"--without-http_{module}_module" not in configure:
            directives.append(f"{module}_temp_path temp/{module};")
    return directives


def loopback_nginx_config(shipped: str, listen_port: int, upstream_ports: list[int], prefix: Path) -> str:
    """The shipped nginx.conf with loopback upstreams/listen and every writable path under `prefix`."""
    upstream_servers = re.findall(r"^\s*server\s+scheinfer-\d+:8000\b[^;]*;", shipped, flags=re.M)
    assert len(upstream_servers) >= 2, "configs/nginx/nginx.conf: expected `server scheinfer-N:8000 ...;` lines"
    text = re.sub(r"^\s*server\s+scheinfer-\d+:8000\b[^;]*;\n", "", shipped, flags=re.M)
    servers = "".join(f"        server 127.0.0.1:{port} max_fails=3 fail_timeout=10s;\n" for port in upstream_ports)
    text, found = re.subn(r"(^\s*upstream\s+scheinfer\s*\{\n)", lambda m: m.group(1) + servers, text, flags=re.M)
    assert found == 1, "configs/nginx/nginx.conf: expected one `upstream scheinfer {` block"
    text, found = re.subn(r"^(\s*)listen\s+8000\s*;", rf"\g<1>listen 127.0.0.1:{listen_port};", text, flags=re.M)
    assert found == 1, "configs/nginx/nginx.conf: expected one `listen 8000;`"
    http_paths = "\n".join(["    access_log logs/access.log;", *(f"    {d}" for d in nginx_temp_directives())])
    text, found = re.subn(r"^http\s*\{\n", lambda m: m.group(0) + http_paths + "\n", text, flags=re.M)
    assert found == 1, "configs/nginx/nginx.conf: expected one `http {` block"
    main = f"daemon off;\npid {prefix / 'nginx.pid'};\nerror_log {prefix / 'logs' / 'error.log'} notice;\n"
    return main + text


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[str]]]:
    """(nginx URL, [replica URLs]) with two server processes and nginx running until the module ends."""
    root = tmp_path_factory.mktemp("replicas")
    model_dir = write_tiny_checkpoint(root / "model", arch="llama")
    env = {key: value for key, value in os.environ.items() if not key.startswith("SCHEINFER_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    ports = [free_port(), free_port()]
    while ports[1] == ports[0]:
        ports[1] = free_port()
    procs: dict[str, tuple[subprocess.Popen, Path]] = {}
    # nginx's prefix: not under pytest's 0700 tmp root, so nginx workers (user nobody under root) can use it.
    prefix = Path(tempfile.mkdtemp(prefix="scheinfer-nginx-"))
    try:
        for i, port in enumerate(ports):
            log = root / f"server-{i}.log"
            cmd = [sys.executable, "-m", "server", "--model", str(model_dir), "--host", "127.0.0.1",
                   "--port", str(port), "--served-model-name", MODEL_NAME, "--device", "cpu", "--dtype", "float32",
                   "--max-model-len", "256", "--kv-cache-tokens", "2048", "--cpu-threads", "1",
                   "--drain-timeout-s", "2", "--log-level", "warning"]
            with log.open("wb") as out:
                procs[f"server-{i}"] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out,
                                                         stderr=subprocess.STDOUT), log)
        replica_urls = [f"http://127.0.0.1:{port}" for port in ports]

        prefix.chmod(0o755)
        for sub in ("logs", "temp", "conf"):
            (prefix / sub).mkdir(mode=0o755)
        nginx_port = free_port()
        conf = prefix / "conf" / "nginx.conf"
        conf.write_text(loopback_nginx_config(NGINX_CONF.read_text(), nginx_port, ports, prefix))
        check = subprocess.run([NGINX, "-t", "-p", f"{prefix}/", "-c", str(conf), "-e", str(prefix / "logs" / "error.log")],
                               capture_output=True, text=True)
        assert check.returncode == 0, f"nginx -t failed:\n{check.stderr}\n{conf.read_text()}"
        nginx_log = prefix / "logs" / "nginx.out"
        with nginx_log.open("wb") as out:
            procs["nginx"] = (subprocess.Popen([NGINX, "-p", f"{prefix}/", "-c", str(conf),
                                                "-e", str(prefix / "logs" / "error.log")],
                                               stdout=out, stderr=subprocess.STDOUT), nginx_log)

        for url in replica_urls:
            wait_healthy(url, procs, timeout_s=45.0)
        nginx_url = f"http://127.0.0.1:{nginx_port}"
        wait_healthy(nginx_url, procs, timeout_s=10.0)
        yield nginx_url, replica_urls
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc, _ in procs.values():
            stop(proc)
        shutil.rmtree(prefix, ignore_errors=True)


def finished_requests(url: str) -> int:
    """Sum of `scheinfer:requests_total` samples (every finish_reason and status) on one replica."""
    text = httpx.get(f"{url}/metrics", timeout=5.0).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "scheinfer:requests_total":
                total += sample.value
    return int(total)


def test_requests_through_nginx_are_spread_and_counted_per_replica(replicas: tuple[str, list[str]]) -> None:
    nginx_url, replica_urls = replicas
    before = [finished_requests(url) for url in replica_urls]
    with httpx.Client(base_url=nginx_url, timeout=30.0) as client:
        models = client.get("/v1/models")
        assert models.status_code == 200, models.text
        assert [m["id"] for m in models.json()["data"]] == [MODEL_NAME]
        for i in range(NUM_REQUESTS):
            body = {"model": MODEL_NAME, "prompt": f"Request number {i}:", "max_tokens": 4, "temperature": 0.0}
            if i % 2:  # streamed through nginx: server-sent events must pass unbuffered and whole
                with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                    assert response.status_code == 200, response.read()
                    assert response.headers["content-type"].startswith("text/event-stream")
                    data = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
                assert data and data[-1] == "[DONE]", data
                assert all("choices" in json.loads(chunk) for chunk in data[:-1])
            else:
                response = client.post("/v1/completions", json=body)
                assert response.status_code == 200, response.text
                assert response.json()["usage"]["completion_tokens"] >= 1

    # Each replica's counter: its own share only, and the shares add up to what was sent.
    deadline = time.monotonic() + 10.0
    while True:
        shares = [finished_requests(url) - b for url, b in zip(replica_urls, before, strict=True)]
        if sum(shares) >= NUM_REQUESTS or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    print(f"replica shares: {shares}")
    assert sum(shares) == NUM_REQUESTS, f"replica shares {shares} do not add up to {NUM_REQUESTS}"
    assert all(share > 0 for share in shares), f"not spread over both replicas: {shares}"
    # Sequential requests and a shared upstream zone: least_conn ties go round robin, so the split is even.
    assert max(shares) - min(shares) <= NUM_REQUESTS // 2, f"badly unbalanced: {shares}"


def test_health_and_metrics_are_per_replica(replicas: tuple[str, list[str]]) -> None:
    nginx_url, replica_urls = replicas
    assert httpx.get(f"{nginx_url}/health", timeout=5.0).json() == {"status": "ready"}
    for url in replica_urls:
        text = httpx.get(f"{url}/metrics", timeout=5.0).text
        names = {family.name for family in text_string_to_metric_families(text)}
        assert {"scheinfer:requests", "scheinfer:time_to_first_token_seconds"} <= names
