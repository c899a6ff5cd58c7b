"""`scheinfer plan` and `scheinfer profile` through typer, on an app they are registered on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from engine.cli_placement import register
from engine.placement.hardware import HardwareProfile

H100_PROFILE = Path(__file__).parents[3] / "configs" / "hardware" / "h100-16core.json"


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()

    @app.command()
    def version() -> None:  # a second command, as in the real app: subcommands keep their names
        typer.echo("0")

    register(app)
    return app


def test_committed_h100_profile_loads() -> None:
    profile = HardwareProfile.from_file(H100_PROFILE)
    assert profile.has_gpu and "H100" in profile.fingerprint.gpu_name and profile.source


def test_plan_for_the_gpu_machine_prints_predictions(app) -> None:
    result = CliRunner().invoke(app, ["plan", "--profile", str(H100_PROFILE), "--model", "mixtral-8x7b",
                                      "--gpu-memory-budget", "24GiB"])
    assert result.exit_code == 0, result.output
    out = result.output
    for text in ("policy adaptive", "GG GiB", "decode", "prefill-512", "prefill-2048", "tok/s", "floor", "all"):
        assert text in out


def test_plan_json_and_fixed_policy(app) -> None:
    result = CliRunner().invoke(app, ["plan", "--profile", str(H100_PROFILE), "--model", "mixtral-8x7b",
                                      "--gpu-memory-budget", "12GiB", "--policy", "cpu-experts", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["policy"] == "cpu-experts" and data["gpu_memory"]["total"] <= 12 << 30
    assert len(data["bytes_by_kind_per_layer"]) == 32 and sum(r["CG"] for r in data["bytes_by_kind_per_layer"]) == 0
    prediction = data["prediction"]
    assert 0 < prediction["decode_tok_s"] <= prediction["floor_decode_tok_s"]
    assert [p["prompt_len"] for p in prediction["prefill"]] == [512, 2048]


def test_plan_errors_are_short(app) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["plan", "--profile", str(H100_PROFILE), "--model", "no-such-model"])
    assert result.exit_code == 2 and "error:" in result.output
    result = runner.invoke(app, ["plan", "--profile", str(H100_PROFILE), "--model", "mixtral-8x7b",
                                 "--gpu-memory-budget", "2GiB"])
    assert result.exit_code == 2 and "budget" in result.output


def test_profile_command_quick(app, tmp_path) -> None:
    out = tmp_path / "p.json"
    result = CliRunner().invoke(app, ["profile", "--quick", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "CPU FFN" in result.output and HardwareProfile.from_file(out).cpu_ffn.s_per_byte[0] > 0
    assert not (tmp_path / "cache").exists()  # a quick profile is never cached


def test_plan_with_everything_resident(app) -> None:
    result = CliRunner().invoke(app, ["plan", "--profile", str(H100_PROFILE), "--model", "llama-2-7b",
                                      "--gpu-memory-budget", "40GiB"])
    assert result.exit_code == 0, result.output
    assert "floor: none" in result.output



def test_plan_stores_host_pieces_as_the_engine_would_on_the_profiled_machine(app, tmp_path) -> None:
    """The H100 profile's CPU path decodes compact rows in registers: compact by default there; a
    profile of an AVX2 machine plans bf16 host pieces; the flag overrides either."""
    def plan(profile: Path, *flags: str) -> dict:
        result = CliRunner().invoke(app, ["plan", "--profile", str(profile), "--model", "mixtral-8x7b",
                                          "--gpu-memory-budget", "24GiB", "--json", *flags])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    compact, forced_bf16 = plan(H100_PROFILE), plan(H100_PROFILE, "--no-compact-host-weights")
    assert compact["host_bytes_ratio"] < 0.8 and forced_bf16["host_bytes_ratio"] == 1.0
    # fewer bytes over PCIe and through the CPU: faster decode and a higher floor
    assert compact["prediction"]["decode_tok_s"] > 1.15 * forced_bf16["prediction"]["decode_tok_s"]
    assert compact["prediction"]["floor_decode_tok_s"] > 1.15 * forced_bf16["prediction"]["floor_decode_tok_s"]
    assert compact["gpu_memory"]["total"] <= 24 << 30 and forced_bf16["gpu_memory"]["total"] <= 24 << 30
    avx2 = tmp_path / "avx2.json"
    avx2.write_text(json.dumps({**json.loads(H100_PROFILE.read_text()), "cpu_path": "avx2"}))
    assert plan(avx2)["host_bytes_ratio"] == 1.0
    assert plan(avx2, "--compact-host-weights")["host_bytes_ratio"] < 0.8
