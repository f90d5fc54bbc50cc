"""`orch validate`, `orch plan`, `orch tiny-model`: output and exit codes (0 ok, 2 bad input, 1 runtime)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import main
from tests.fixtures.model_shapes import LLAMA31, write_shape_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of configs/ next to models/tiny-llama made by `orch tiny-model`, laid out like the repo."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(REPO / "configs", root / "configs")
    assert main(["tiny-model", str(root / "models" / "tiny-llama"), "--seed", "3"]) == 0
    return root


def test_orch_help_runs_as_a_command() -> None:
    out = subprocess.run([sys.executable, "-m", "orchestrator", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    for cmd in ("validate", "plan", "tiny-model"):
        assert cmd in out.stdout


@pytest.mark.parametrize("cmd", ["validate", "plan", "tiny-model"])
def test_subcommand_help(cmd: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as ei:
        main([cmd, "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: orch {cmd}" in out
    if cmd != "tiny-model":
        assert "--shape-only" in out and "config.json" in out
    if cmd == "validate":
        assert "serve.metrics_port" in out and "Exit codes" in out
    if cmd == "plan":
        assert "--json" in out


def test_no_command_and_bad_usage_exit_2(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 2
    with pytest.raises(SystemExit) as ei:
        main(["validate"])
    assert ei.value.code == 2


def test_validate_and_plan_local_tiny(tiny_repo: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = str(tiny_repo / "configs" / "local-tiny.yaml")
    assert main(["validate", cfg]) == 0
    assert "ok: local-tiny" in capsys.readouterr().out
    assert main(["plan", cfg]) == 0
    out = capsys.readouterr().out
    assert "local-tiny" in out and "tensor 1 x pipeline 1" in out and "cpu" in out
    assert main(["plan", "--json", cfg]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["device"] == "cpu" and plan["dtype"] == "float32" and plan["port"] == 50051
    assert plan["model_path"] == str((tiny_repo / "models" / "tiny-llama").resolve())
    assert len(plan["content_hash"]) == 64 and len(plan["ranks"]) == 1
    # the same files give the same plan
    assert main(["plan", "--json", cfg]) == 0
    assert json.loads(capsys.readouterr().out)["content_hash"] == plan["content_hash"]


def test_bad_topology_exits_2_with_one_line(tiny_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = (tiny_repo / "configs" / "local-tiny.yaml").read_text()
    bad = tmp_path / "cluster.yaml"
    bad.write_text(text.replace("  tensor: 1", "  tensor: two"))
    for cmd in ("validate", "plan"):
        assert main([cmd, str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {bad}:8: parallelism.tensor: must be a positive integer") and "Traceback" not in err
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_shape_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = write_shape_dir(tmp_path / "m8", LLAMA31["8b"])
    text = (REPO / "configs" / "single-gpu.yaml").read_text().replace("../models/llama-3.1-8b", str(model))
    cfg = tmp_path / "single-gpu.yaml"
    cfg.write_text(text)
    assert main(["validate", str(cfg)]) == 2
    assert "*.safetensors" in capsys.readouterr().err
    assert main(["validate", "--shape-only", str(cfg)]) == 0
    assert main(["plan", "--shape-only", "--json", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["num_kv_blocks"] == 29_015


def test_tiny_model_refuses_foreign_directory_and_reports_write_failure(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert main(["tiny-model", str(foreign)]) == 2
    assert (foreign / "keep.txt").read_text() == "mine"
    assert "refusing" in capsys.readouterr().err
    assert main(["tiny-model", "/proc/orch-cannot-write-here"]) == 1
    assert "cannot write the checkpoint" in capsys.readouterr().err
