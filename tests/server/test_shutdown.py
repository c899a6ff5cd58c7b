"""SIGTERM on `python -m server`: stop taking requests, finish the running ones, exit 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_drains_running_streams_and_exits_0(tiny_model_dir: Path) -> None:
    port = _free_port()
    env = {**os.environ, "SCHEINFER_API_KEY": "", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "server", "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32",
           "--port", str(port), "--max-model-len", "256", "--drain-timeout-s", "90", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.1)

        events: list[str] = []
        first_event = threading.Event()

        def stream() -> None:
            body = {"prompt": "Once upon a time", "max_tokens": 240, "n": 2, "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[len("data: "):])
                        first_event.set()

        streamer = threading.Thread(target=stream)
        streamer.start()
        assert first_event.wait(30)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        health = httpx.get(f"{url}/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "draining"
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=5)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        streamer.join(timeout=120)
        assert proc.wait(timeout=120) == 0, proc.stdout.read().decode() if proc.stdout else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert events[-1] == "[DONE]", events[-3:]
    usage = json.loads(events[-2]).get("usage")
    assert usage is not None, events[-3:]
    assert usage["completion_tokens"] == 2 * 240  # the running request finished, not cut
