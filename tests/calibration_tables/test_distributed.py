"""calibrate --shard with merge, and torchrun ranks, against a single-process calibrate."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from calibexport.calibration_tables.calibrate import calibrate_to_file
from calibexport.calibration_tables.distributed import (
    ProcessGroupEnv,
    estimate_eta_torchrun,
    torchrun_env,
)
from calibexport.calibration_tables.estimate import estimate_eta
from calibexport.cli import calibrate as _calibrate_command  # noqa: F401
from calibexport.cli import merge as _merge_command  # noqa: F401
from calibexport.cli.app import app
from calibexport.errors import CalibexportError
from calibexport.models import DDPMUNet, UNetConfig
from calibexport.runtime.schedule import DiscreteVPSchedule

torch.set_num_threads(1)

TORCHRUN_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def images_npy(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "images.npy"
    np.save(path, np.random.default_rng(0).uniform(-1, 1, (16, 1, 8, 8)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def single_table(tmp_path_factory, tiny_model, images_npy) -> Path:
    out = tmp_path_factory.mktemp("single") / "eta.npy"
    calibrate_to_file(model=tiny_model, data=str(images_npy), out=out, num_samples=4,
                      batch_size=48, progress=False)
    return out


def calibrate_args(model: Path, data: Path, out: Path) -> list[str]:
    return ["calibrate", "--model", str(model), "--data", str(data), "--out", str(out),
            "--num-samples", "4", "--batch-size", "48"]


def test_cli_shards_merge_to_single_table(tmp_path, tiny_model, images_npy, single_table):
    runner = CliRunner()
    out = tmp_path / "eta.npy"
    for shard in ("1/3", "2/3", "3/3"):
        result = runner.invoke(app, [*calibrate_args(tiny_model, images_npy, out), "--shard",
                                     shard])
        assert result.exit_code == 0, result.output
    shards = sorted(tmp_path.glob("eta.shard-*-of-3.npz"))
    merged = tmp_path / "merged" / "eta.npy"
    result = runner.invoke(app, ["merge", *map(str, shards), "--out", str(merged)])
    sidecar = json.loads(merged.with_suffix(".json").read_text())
    expected = json.loads(single_table.with_suffix(".json").read_text())

    assert result.exit_code == 0, result.output
    assert len(shards) == 3
    assert np.array_equal(np.load(merged), np.load(single_table))
    assert sidecar["eta_sha256"] == expected["eta_sha256"]
    assert sidecar["standard_error"] == expected["standard_error"]
    assert sidecar["model_weights_sha256"] == expected["model_weights_sha256"]
    assert sidecar["data"] == expected["data"]
    assert sidecar["extra"]["num_shards"] == 3


def test_cli_merge_names_missing_shard(tmp_path, tiny_model, images_npy):
    runner = CliRunner()
    out = tmp_path / "eta.npy"
    runner.invoke(app, [*calibrate_args(tiny_model, images_npy, out), "--shard", "1/2"])
    result = runner.invoke(app, ["merge", str(tmp_path / "eta.shard-1-of-2.npz"), "--out",
                                 str(tmp_path / "merged.npy")])

    assert result.exit_code == 2
    assert "shards 2/2 are missing" in result.output


def test_torchrun_env(monkeypatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_env() is None

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert torchrun_env() is None

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert torchrun_env() == ProcessGroupEnv(rank=3, world_size=4, local_rank=1)

    monkeypatch.setenv("RANK", "x")
    with pytest.raises(CalibexportError, match="RANK or LOCAL_RANK is missing or invalid"):
        torchrun_env()


def test_shard_rejected_under_torchrun(monkeypatch, tmp_path, tiny_model, images_npy):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")

    with pytest.raises(CalibexportError, match="--shard cannot run under torchrun"):
        calibrate_to_file(model=tiny_model, data=str(images_npy), out=tmp_path / "eta.npy",
                          num_samples=4, shard="1/2", progress=False)


@pytest.mark.parametrize("target_se", [None, 0.5])
def test_one_rank_group_matches_estimate(monkeypatch, target_se) -> None:
    # A process group of one rank runs the whole all-reduce path in this process.
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    torch.manual_seed(0)
    config = UNetConfig(resolution=8, in_channels=1, out_ch=1, ch=32, ch_mult=(1, 2),
                        num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
    unet = DDPMUNet(config).eval()
    schedule = DiscreteVPSchedule.linear(beta_start=1e-3, beta_end=0.3, num_timesteps=8)
    images = np.random.default_rng(0).uniform(-1, 1, (16, 1, 8, 8)).astype(np.float32)
    options = {"num_samples": 4, "batch_size": 12, "progress": False, "target_se": target_se,
               "max_samples": 16}

    single = estimate_eta(unet, schedule, images, **options)
    ranked = estimate_eta_torchrun(unet, schedule, images,
                                   env=ProcessGroupEnv(rank=0, world_size=1, local_rank=0),
                                   **options)

    assert np.array_equal(ranked.eta, single.eta)
    assert np.array_equal(ranked.standard_error, single.standard_error)
    assert np.array_equal(ranked.row_samples, single.row_samples)


@pytest.mark.slow
def test_torchrun_two_ranks_match_single(tmp_path, tiny_model, images_npy, single_table):
    out = tmp_path / "eta.npy"
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
               "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
               str(port), "-m", "calibexport", *calibrate_args(tiny_model, images_npy, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    result = subprocess.run(command, capture_output=True, text=True, env=env,
                            timeout=TORCHRUN_TIMEOUT_S)
    sidecar = json.loads(out.with_suffix(".json").read_text())

    assert result.returncode == 0, result.stderr[-3000:]
    assert np.array_equal(np.load(out), np.load(single_table))
    assert sidecar["eta_sha256"] == json.loads(single_table.with_suffix(".json").read_text())[
        "eta_sha256"]
    assert "Rank 1 of 2 joined the gloo process group" in result.stderr
