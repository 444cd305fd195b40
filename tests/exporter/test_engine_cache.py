"""engine.json, engine keys, host facts and the rejection of mismatched engines, without TensorRT.

The "current host" is given as HostFacts values or as a stand-in nvidia-smi script on PATH.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from calibexport.errors import CalibexportError
from calibexport.exporter import engine_cache
from calibexport.exporter.engine_cache import (
    DEFAULT_BATCH_SIZES,
    ENGINE_FILENAME,
    ENGINE_METADATA_FILENAME,
    BatchProfile,
    EngineCache,
    EngineKey,
    EngineMetadata,
    EngineMismatch,
    HostFacts,
    check_batch_in_profile,
    check_engine_usable,
    detect_gpu,
    format_compute_capability,
    key_differences,
    parse_compute_capability,
    parse_nvidia_smi_gpus,
    read_engine_metadata,
    write_engine_metadata,
)
from calibexport.hashing import sha256_file

H200 = HostFacts(tensorrt_version="10.3.0", gpu_name="NVIDIA H200", compute_capability="9.0")
ONNX_SHA = "a" * 64
ETA_SHA = "b" * 64


def make_key(**changes: object) -> EngineKey:
    fields = dict(tensorrt_version=H200.tensorrt_version, gpu_name=H200.gpu_name,
                  compute_capability=H200.compute_capability, profile=BatchProfile(1, 8, 64),
                  precision="float32", tf32=False, onnx_sha256=ONNX_SHA, eta_sha256=ETA_SHA)
    fields.update(changes)
    return EngineKey(**fields)


def write_engine(directory: Path, key: EngineKey,
                 plan: bytes = b"serialized engine") -> EngineMetadata:
    """Write a plan file and its engine.json as a build would."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ENGINE_FILENAME).write_bytes(plan)
    metadata = EngineMetadata(
        key=key, plan_sha256=sha256_file(directory / ENGINE_FILENAME), plan_bytes=len(plan),
        io={"x": {"mode": "input", "dtype": "float32", "shape": [-1, 3, 64, 64]},
            "t": {"mode": "input", "dtype": "int64", "shape": [-1]},
            "eps": {"mode": "output", "dtype": "float32", "shape": [-1, 3, 64, 64]}},
        build_seconds=12.5)
    write_engine_metadata(directory, metadata)
    return metadata


@pytest.mark.parametrize("text, expected", [
    ("1,8,64", (1, 8, 64)),
    (" 2 , 4 ,16 ", (2, 4, 16)),
    ("8", (8, 8, 8)),
    ("4,4,4", (4, 4, 4)),
])
def test_batch_profile_parses(text, expected):
    profile = BatchProfile.parse(text)
    assert (profile.min, profile.opt, profile.max) == expected


@pytest.mark.parametrize("text, message", [
    ("1,8", "expected three comma-separated integers"),
    ("1,8,16,32", "expected three comma-separated integers"),
    ("1,,16", "expected three comma-separated integers"),
    ("", "expected three comma-separated integers"),
    ("a,b,c", "are not all integers"),
    ("1.5,2,4", "are not all integers"),
    ("0,1,2", "must be positive integers"),
    ("-1,2,4", "must be positive integers"),
    ("8,4,16", r"MIN <= OPT <= MAX, got 8,4,16"),
    ("1,32,16", r"MIN <= OPT <= MAX, got 1,32,16"),
])
def test_batch_profile_rejects(text, message):
    with pytest.raises(CalibexportError, match=message):
        BatchProfile.parse(text)


def test_default_batch_sizes_parse():
    assert BatchProfile.parse(DEFAULT_BATCH_SIZES) == BatchProfile(1, 8, 64)


def test_batch_profile_shapes_and_contains():
    profile = BatchProfile(2, 8, 32)
    assert profile.shapes((-1, 3, 64, 64)) == ((2, 3, 64, 64), (8, 3, 64, 64), (32, 3, 64, 64))
    assert profile.shapes((-1,)) == ((2,), (8,), (32,))
    assert profile.contains(2)
    assert profile.contains(32)
    assert not profile.contains(1)
    assert not profile.contains(33)


def test_batch_profile_round_trips_through_dict():
    profile = BatchProfile(1, 4, 16)
    assert BatchProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile


def test_batch_outside_profile_is_rejected_with_fix():
    profile = BatchProfile(4, 8, 16)
    check_batch_in_profile(4, profile, "build/model.plan")
    check_batch_in_profile(16, profile, "build/model.plan")
    with pytest.raises(CalibexportError, match=r"batch size 64 is outside .*4\.\.16.*"
                       r"--batch-sizes 4,8,64"):
        check_batch_in_profile(64, profile, "build/model.plan")
    with pytest.raises(CalibexportError, match=r"batch size 2 .*--batch-sizes 2,8,16"):
        check_batch_in_profile(2, profile, "build/model.plan")


@pytest.mark.parametrize("text, expected", [
    ("8.6", "8.6"), ("sm_86", "8.6"), ("86", "8.6"), ("9.0", "9.0"), ("sm_90", "9.0"),
    ("12.0", "12.0"), ("120", "12.0"), (" 7.5 ", "7.5"),
])
def test_compute_capability_normalized(text, expected):
    assert parse_compute_capability(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "8", "sm_", "8.x"])
def test_compute_capability_invalid(text):
    with pytest.raises(CalibexportError, match="invalid CUDA compute capability"):
        parse_compute_capability(text)


def test_format_compute_capability():
    assert format_compute_capability(8, 6) == "8.6"
    assert format_compute_capability(10, 0) == "10.0"
    with pytest.raises(CalibexportError, match="invalid CUDA compute capability 0.5"):
        format_compute_capability(0, 5)


def test_nvidia_smi_output_parsed():
    output = "NVIDIA H200, 9.0\nNVIDIA A100-SXM4-80GB, 8.0\n\n"
    assert parse_nvidia_smi_gpus(output) == [("NVIDIA H200", "9.0"),
                                             ("NVIDIA A100-SXM4-80GB", "8.0")]
    # A name that contains a comma keeps it: the capability is the last field.
    assert parse_nvidia_smi_gpus("Acme, Inc. GPU, 8.6") == [("Acme, Inc. GPU", "8.6")]
    with pytest.raises(CalibexportError, match="unexpected nvidia-smi output line"):
        parse_nvidia_smi_gpus("no separator here")


def _fake_nvidia_smi(directory: Path, output: str) -> None:
    """Put an executable nvidia-smi on PATH that prints ``output`` for the GPU query."""
    script = directory / "nvidia-smi"
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\n")
    script.chmod(0o755)


def test_detect_gpu_reads_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_cache, "import_cuda_runtime", lambda: None)
    _fake_nvidia_smi(tmp_path, "NVIDIA H200, 9.0\nNVIDIA L4, 8.9")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert detect_gpu(0) == ("NVIDIA H200", "9.0")
    assert detect_gpu(1) == ("NVIDIA L4", "8.9")
    with pytest.raises(CalibexportError, match="CUDA device 2 not found; nvidia-smi lists 2 GPUs"):
        detect_gpu(2)
    host = engine_cache.current_host_facts("10.3.0", 1)
    assert host == HostFacts("10.3.0", "NVIDIA L4", "8.9")


def test_detect_gpu_without_driver_names_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_cache, "import_cuda_runtime", lambda: None)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert "nvidia-smi is not on PATH" in engine_cache.nvidia_gpu_missing_reason()
    with pytest.raises(CalibexportError, match="cannot identify CUDA device 0: .*nvidia-smi"):
        detect_gpu(0)


def test_key_digest_is_stable_and_covers_every_field():
    key = make_key()
    assert key.digest() == make_key().digest()
    changes = {"tensorrt_version": "10.4.0", "gpu_name": "NVIDIA L4", "compute_capability": "8.9",
               "profile": BatchProfile(1, 8, 32), "precision": "float16+float32", "tf32": True,
               "onnx_sha256": "c" * 64, "eta_sha256": "d" * 64}
    assert set(changes) == {f.name for f in dataclasses.fields(EngineKey)}
    digests = {make_key(**{name: value}).digest() for name, value in changes.items()}
    assert len(digests) == len(changes)
    assert key.digest() not in digests


def test_key_differences_name_each_field():
    recorded = make_key(gpu_name="NVIDIA A100-SXM4-80GB", compute_capability="8.0")
    expected = {f.name: getattr(make_key(), f.name) for f in dataclasses.fields(EngineKey)}
    differences = key_differences(recorded, expected)
    assert differences == [
        "GPU: engine has 'NVIDIA A100-SXM4-80GB', expected 'NVIDIA H200'",
        "compute capability: engine has '8.0', expected '9.0'",
    ]
    differences = key_differences(make_key(tensorrt_version="10.0.1", eta_sha256="e" * 64),
                                  {"tensorrt_version": "10.3.0", "eta_sha256": ETA_SHA})
    assert differences[0] == "TensorRT version: engine has '10.0.1', expected '10.3.0'"
    assert differences[1] == ("eta table sha256: engine has eeeeeeeeeeee..., "
                              "expected bbbbbbbbbbbb...")
    assert key_differences(make_key(), {"profile": BatchProfile(1, 8, 32), "tf32": True}) == [
        "batch sizes MIN,OPT,MAX: engine has 1,8,64, expected 1,8,32",
        "TF32: engine has off, expected on",
    ]
    assert key_differences(make_key(), {"gpu_name": "NVIDIA H200"}) == []


def test_metadata_round_trips_through_engine_json(tmp_path):
    metadata = write_engine(tmp_path, make_key(precision="float16+float32"))
    document = json.loads((tmp_path / ENGINE_METADATA_FILENAME).read_text())
    assert document["tensorrt_version"] == "10.3.0"
    assert document["gpu"] == {"name": "NVIDIA H200", "compute_capability": "9.0"}
    assert document["profile"]["batch_sizes"] == {"min": 1, "opt": 8, "max": 64}
    assert document["profile"]["shapes"]["x"] == {"min": [1, 3, 64, 64], "opt": [8, 3, 64, 64],
                                                  "max": [64, 3, 64, 64]}
    assert document["profile"]["shapes"]["t"] == {"min": [1], "opt": [8], "max": [64]}
    assert "eps" not in document["profile"]["shapes"]
    assert document["precision"] == "float16+float32"
    assert document["tf32"] is False
    assert document["onnx"]["sha256"] == ONNX_SHA
    assert document["eta"]["sha256"] == ETA_SHA
    assert document["plan"]["sha256"] == sha256_file(tmp_path / ENGINE_FILENAME)
    assert document["timing_cache"] == "timing.cache"
    assert document["key_sha256"] == metadata.key.digest()
    loaded = read_engine_metadata(tmp_path)
    assert loaded == metadata
    assert loaded.inputs().keys() == {"x", "t"}
    assert loaded.outputs().keys() == {"eps"}


def test_missing_engine_json_says_how_to_build(tmp_path):
    with pytest.raises(CalibexportError, match=r"engine.json not found: .* has no TensorRT engine. "
                       r"Build one on a GPU host"):
        read_engine_metadata(tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format_version=99), "is not a version 1 calibexport.tensorrt_engine"),
    (lambda d: d.pop("gpu"), "is malformed"),
    (lambda d: d["profile"]["batch_sizes"].update(min=0), "must be positive integers"),
    (lambda d: d["gpu"].update(compute_capability="x"), "invalid CUDA compute capability"),
])
def test_malformed_engine_json_rejected(tmp_path, edit, message):
    write_engine(tmp_path, make_key())
    path = tmp_path / ENGINE_METADATA_FILENAME
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))
    with pytest.raises(CalibexportError, match=message):
        read_engine_metadata(tmp_path)


def test_engine_json_not_json_rejected(tmp_path):
    (tmp_path / ENGINE_METADATA_FILENAME).write_text("{not json")
    with pytest.raises(CalibexportError, match="is unreadable or not JSON"):
        read_engine_metadata(tmp_path)


def test_matching_engine_is_usable(tmp_path):
    metadata = write_engine(tmp_path, make_key())
    check_engine_usable(tmp_path, metadata, H200, onnx_sha256=ONNX_SHA, eta_sha256=ETA_SHA)


@pytest.mark.parametrize("host, onnx_sha, eta_sha, message", [
    (dataclasses.replace(H200, gpu_name="NVIDIA A100-SXM4-80GB", compute_capability="8.0"),
     ONNX_SHA, ETA_SHA,
     r"GPU: engine has 'NVIDIA H200', expected 'NVIDIA A100-SXM4-80GB'; compute capability: "
     r"engine has '9.0', expected '8.0'"),
    (dataclasses.replace(H200, tensorrt_version="10.7.0"), ONNX_SHA, ETA_SHA,
     r"TensorRT version: engine has '10.3.0', expected '10.7.0'"),
    (H200, "f" * 64, ETA_SHA, r"ONNX file sha256: engine has aaaaaaaaaaaa\.\.\., expected ffff"),
    (H200, ONNX_SHA, "0" * 64, r"eta table sha256: engine has bbbbbbbbbbbb\.\.\., expected 0000"),
])
def test_mismatched_engine_is_rejected(tmp_path, host, onnx_sha, eta_sha, message):
    metadata = write_engine(tmp_path, make_key())
    with pytest.raises(EngineMismatch, match=message) as error:
        check_engine_usable(tmp_path, metadata, host, onnx_sha256=onnx_sha, eta_sha256=eta_sha)
    assert "it was not used" in str(error.value)
    assert "rebuild the engine on this host" in str(error.value)
    assert "calibexport build" in str(error.value)


def test_changed_or_missing_plan_is_rejected(tmp_path):
    metadata = write_engine(tmp_path, make_key())
    (tmp_path / ENGINE_FILENAME).write_bytes(b"another engine")
    with pytest.raises(EngineMismatch,
                       match=r"model.plan sha256: file has .*, engine.json records"):
        check_engine_usable(tmp_path, metadata, H200, onnx_sha256=ONNX_SHA, eta_sha256=ETA_SHA)
    (tmp_path / ENGINE_FILENAME).unlink()
    with pytest.raises(EngineMismatch, match=r"model.plan: missing"):
        check_engine_usable(tmp_path, metadata, H200, onnx_sha256=ONNX_SHA, eta_sha256=ETA_SHA)


def test_cache_miss_then_store_then_hit(tmp_path):
    cache = EngineCache(tmp_path / "cache")
    key = make_key()
    assert cache.lookup(key) is None
    write_engine(tmp_path / "build", key)
    entry = cache.store(key, tmp_path / "build")
    assert cache.lookup(key) == entry
    assert (entry / ENGINE_FILENAME).read_bytes() == b"serialized engine"
    assert read_engine_metadata(entry).key == key


def test_cache_keeps_one_entry_per_key(tmp_path):
    cache = EngineCache(tmp_path / "cache")
    key = make_key()
    write_engine(tmp_path / "build", key)
    cache.store(key, tmp_path / "build")
    for other in (make_key(profile=BatchProfile(1, 8, 32)), make_key(eta_sha256="9" * 64),
                  make_key(gpu_name="NVIDIA L4"), make_key(tf32=True)):
        assert cache.entry_dir(other) != cache.entry_dir(key)
        assert cache.lookup(other) is None


def test_cache_entry_changed_after_store_is_rejected(tmp_path):
    cache = EngineCache(tmp_path / "cache")
    key = make_key()
    write_engine(tmp_path / "build", key)
    entry = cache.store(key, tmp_path / "build")
    # An engine.json edited to claim another GPU no longer matches the key of its entry.
    path = entry / ENGINE_METADATA_FILENAME
    document = json.loads(path.read_text())
    document["gpu"]["name"] = "NVIDIA L4"
    path.write_text(json.dumps(document))
    with pytest.raises(EngineMismatch, match=r"GPU: engine has 'NVIDIA L4', expected 'NVIDIA H200'"
                       r".*delete the cache entry"):
        cache.lookup(key)

    cache.store(key, tmp_path / "build")
    (entry / ENGINE_FILENAME).write_bytes(b"truncated")
    with pytest.raises(EngineMismatch, match="model.plan sha256 differs from engine.json"):
        cache.lookup(key)


def test_timing_cache_path_per_tensorrt_and_gpu(tmp_path):
    cache = EngineCache(tmp_path)
    path = cache.timing_cache_path(make_key())
    assert path.parent == tmp_path / "timing"
    assert path.name == "trt10.3.0_NVIDIA-H200_sm9.0.cache"
    assert cache.timing_cache_path(make_key(profile=BatchProfile(1, 1, 1))) == path
    assert cache.timing_cache_path(make_key(gpu_name="NVIDIA L4")) != path
    assert cache.timing_cache_path(make_key(tensorrt_version="10.4.0")) != path


@pytest.mark.parametrize("name", [b"NVIDIA H200\x00\x00\x00", "NVIDIA H200 "])
def test_detect_gpu_reads_cuda_properties(monkeypatch, name):
    from types import SimpleNamespace

    properties = SimpleNamespace(name=name, major=9, minor=0)
    cudart = SimpleNamespace(cudaGetDeviceProperties=lambda device: (0, properties))
    monkeypatch.setattr(engine_cache, "import_cuda_runtime", lambda: cudart)
    assert detect_gpu(0) == ("NVIDIA H200", "9.0")


def test_detect_gpu_falls_back_to_nvidia_smi(tmp_path, monkeypatch):
    from types import SimpleNamespace

    # Error 100 is cudaErrorNoDevice; nvidia-smi is asked next.
    cudart = SimpleNamespace(cudaGetDeviceProperties=lambda device: (100, None))
    monkeypatch.setattr(engine_cache, "import_cuda_runtime", lambda: cudart)
    _fake_nvidia_smi(tmp_path, "NVIDIA L4, 8.9")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert detect_gpu(0) == ("NVIDIA L4", "8.9")
