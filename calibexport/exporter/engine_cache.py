"""TensorRT engine metadata (``engine.json``), cache keys and the checks that reject stale engines.

A serialized TensorRT engine (``model.plan``) only runs with the TensorRT version and on the GPU
model it was built for, and it computes exactly the ONNX file and eta table it was built from.
``engine.json`` records all of these, and an engine is reused only when every recorded field
matches. Otherwise it is rejected with a message that names each differing field and tells how
to rebuild it, before TensorRT ever sees the plan.

This module imports the standard library and numpy only (no torch, no TensorRT), because the
torch-free runtime's TensorRT backend uses it to check an engine before deserializing it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import calibexport
from calibexport.errors import CalibexportError
from calibexport.exporter.atomic import atomic_write_bytes, atomic_write_text
from calibexport.hashing import sha256_file

logger = logging.getLogger(__name__)

ENGINE_FILENAME = "model.plan"
ENGINE_METADATA_FILENAME = "engine.json"
TIMING_CACHE_FILENAME = "timing.cache"
ENGINE_FORMAT = "calibexport.tensorrt_engine"
ENGINE_FORMAT_VERSION = 1
#: The optimization profile used when ``--batch-sizes`` is not given.
DEFAULT_BATCH_SIZES = "1,8,64"
REBUILD_HINT = (
    "rebuild the engine on this host: run `calibexport build` again with --overwrite (and "
    "--batch-sizes MIN,OPT,MAX for another batch range)"
)


@dataclass(frozen=True)
class BatchProfile:
    """The batch sizes of a TensorRT optimization profile: the engine accepts min..max."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        values = (self.min, self.opt, self.max)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
            raise CalibexportError(
                f"batch sizes must be positive integers, got {list(values)}; pass "
                "--batch-sizes MIN,OPT,MAX, for example 1,8,64."
            )
        if not self.min <= self.opt <= self.max:
            raise CalibexportError(
                f"batch sizes must satisfy MIN <= OPT <= MAX, got {self.text()}; pass "
                "--batch-sizes MIN,OPT,MAX, for example 1,8,64."
            )

    @classmethod
    def parse(cls, text: str) -> BatchProfile:
        """Parse ``MIN,OPT,MAX`` such as ``1,8,64``; a single ``N`` means ``N,N,N``."""
        parts = [part.strip() for part in str(text).split(",")]
        if len(parts) == 1 and parts[0]:
            parts = parts * 3
        if len(parts) != 3 or not all(parts):
            raise CalibexportError(
                f"invalid --batch-sizes {text!r}: expected three comma-separated integers "
                "MIN,OPT,MAX such as 1,8,64 (or one integer N for N,N,N)."
            )
        try:
            values = [int(part) for part in parts]
        except ValueError:
            raise CalibexportError(
                f"invalid --batch-sizes {text!r}: {', '.join(parts)} are not all integers; "
                "pass MIN,OPT,MAX such as 1,8,64."
            ) from None
        return cls(*values)

    def text(self) -> str:
        return f"{self.min},{self.opt},{self.max}"

    def contains(self, batch: int) -> bool:
        return self.min <= batch <= self.max

    def shapes(self, batch_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        """Return the (min, opt, max) shapes of an input whose axis 0 is the batch."""
        rest = tuple(int(d) for d in batch_shape[1:])
        return tuple((batch, *rest) for batch in (self.min, self.opt, self.max))

    def to_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BatchProfile:
        return cls(int(data["min"]), int(data["opt"]), int(data["max"]))


def check_batch_in_profile(batch: int, profile: BatchProfile, engine: str | Path) -> None:
    """Raise CalibexportError when ``batch`` is outside the engine's optimization profile."""
    if profile.contains(batch):
        return
    wider = BatchProfile(min(profile.min, batch), profile.opt, max(profile.max, batch))
    raise CalibexportError(
        f"batch size {batch} is outside the optimization profile of {engine} (batch sizes "
        f"{profile.min}..{profile.max}, optimized for {profile.opt}); use a batch size in "
        f"{profile.min}..{profile.max}, or rebuild the engine with --batch-sizes {wider.text()}."
    )


def format_compute_capability(major: int, minor: int) -> str:
    """Return the CUDA compute capability as ``MAJOR.MINOR``, e.g. ``8.6``."""
    if int(major) < 1 or int(minor) < 0:
        raise CalibexportError(f"invalid CUDA compute capability {major}.{minor}.")
    return f"{int(major)}.{int(minor)}"


def parse_compute_capability(text: str) -> str:
    """Normalize ``8.6``, ``sm_86`` or ``86`` to ``8.6``."""
    value = str(text).strip().lower().removeprefix("sm_").removeprefix("sm")
    if "." in value:
        major, _, minor = value.partition(".")
    elif value.isdigit() and len(value) >= 2:
        major, minor = value[:-1], value[-1]
    else:
        major, minor = "", ""
    if not (major.isdigit() and minor.isdigit()):
        raise CalibexportError(
            f"invalid CUDA compute capability {text!r}; expected MAJOR.MINOR such as 8.6."
        )
    return format_compute_capability(int(major), int(minor))


@dataclass(frozen=True)
class HostFacts:
    """The TensorRT version and GPU of this host, which an engine must match."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str


def nvidia_gpu_missing_reason() -> str | None:
    """Return why no NVIDIA GPU is usable here (nvidia-smi is not on PATH), or None."""
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU driver was found (nvidia-smi is not on PATH)"
    return None


def import_cuda_runtime() -> Any | None:
    """Return the CUDA runtime module of cuda-python, or None when cuda-python is not installed."""
    try:
        from cuda.bindings import runtime  # cuda-python 12.6 and newer

        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart  # cuda-python before 12.6

        return cudart
    except ImportError:
        return None


def parse_nvidia_smi_gpus(output: str) -> list[tuple[str, str]]:
    """Parse ``nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader`` output.

    Returns one (name, compute capability) pair per GPU, in device order.
    """
    gpus = []
    for line in output.strip().splitlines():
        if not line.strip():
            continue
        name, separator, capability = line.rpartition(",")
        if not separator or not name.strip():
            raise CalibexportError(f"unexpected nvidia-smi output line {line!r}.")
        gpus.append((name.strip(), parse_compute_capability(capability)))
    return gpus


def detect_gpu(device: int = 0) -> tuple[str, str]:
    """Return (name, compute capability) of CUDA device ``device``.

    Uses cuda-python when it is installed, else ``nvidia-smi``.
    """
    cudart = import_cuda_runtime()
    if cudart is not None:
        error, properties = cudart.cudaGetDeviceProperties(device)
        if int(error) == 0:
            name = properties.name
            if isinstance(name, (bytes, bytearray)):
                name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
            name = str(name).strip()
            return name, format_compute_capability(properties.major, properties.minor)
        logger.debug("cudaGetDeviceProperties(%d) failed (%s); asking nvidia-smi.", device, error)
    missing = nvidia_gpu_missing_reason()
    if missing:
        raise CalibexportError(f"cannot identify CUDA device {device}: {missing}.")
    command = ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"]
    try:
        output = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as error:
        raise CalibexportError(
            f"`{' '.join(command)}` failed ({error}); check the NVIDIA driver."
        ) from error
    gpus = parse_nvidia_smi_gpus(output.stdout)
    if not 0 <= device < len(gpus):
        raise CalibexportError(
            f"CUDA device {device} not found; nvidia-smi lists {len(gpus)} GPUs."
        )
    return gpus[device]


def current_host_facts(tensorrt_version: str, device: int = 0) -> HostFacts:
    """Return the facts of this host that an engine must match."""
    name, capability = detect_gpu(device)
    return HostFacts(tensorrt_version=str(tensorrt_version), gpu_name=name,
                     compute_capability=capability)


@dataclass(frozen=True)
class EngineKey:
    """Every input that determines an engine; two builds with equal keys are interchangeable."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    profile: BatchProfile
    #: Floating-point types of the ONNX graph, e.g. ``float32`` or ``float16+float32``.
    precision: str
    tf32: bool
    onnx_sha256: str
    eta_sha256: str

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["profile"] = self.profile.to_dict()
        return data

    def digest(self) -> str:
        """Return the sha256 of the key's canonical JSON, which names its engine cache entry."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


# EngineKey field -> its name in messages.
_KEY_LABELS = {
    "tensorrt_version": "TensorRT version",
    "gpu_name": "GPU",
    "compute_capability": "compute capability",
    "profile": "batch sizes MIN,OPT,MAX",
    "precision": "precision",
    "tf32": "TF32",
    "onnx_sha256": "ONNX file sha256",
    "eta_sha256": "eta table sha256",
}


def _show(name: str, value: Any) -> str:
    if isinstance(value, BatchProfile):
        return value.text()
    if name.endswith("sha256"):
        return f"{str(value)[:12]}..."
    if isinstance(value, bool):
        return "on" if value else "off"
    return repr(value) if isinstance(value, str) else str(value)


def key_differences(recorded: EngineKey, expected: dict[str, Any]) -> list[str]:
    """Name each field of ``expected`` (some of EngineKey's fields) where ``recorded`` differs.

    Each entry reads ``<field>: engine has <recorded>, expected <expected>``.
    """
    unknown = set(expected) - {f.name for f in fields(EngineKey)}
    assert not unknown, f"not EngineKey fields: {sorted(unknown)}"
    differences = []
    for name, label in _KEY_LABELS.items():
        if name not in expected:
            continue
        have, want = getattr(recorded, name), expected[name]
        if have != want:
            differences.append(f"{label}: engine has {_show(name, have)}, expected "
                               f"{_show(name, want)}")
    return differences


class EngineMismatch(CalibexportError):
    """An engine was built for another host, TensorRT version, ONNX file, eta table or profile."""

    def __init__(self, engine: str | Path, differences: list[str], hint: str = REBUILD_HINT):
        super().__init__(
            f"the TensorRT engine {engine} does not match ({'; '.join(differences)}); it was "
            f"not used. To fix this, {hint}."
        )
        self.differences = differences


@dataclass
class EngineMetadata:
    """The contents of ``engine.json``: the key, the plan's digest and its I/O tensors."""

    key: EngineKey
    plan_sha256: str
    plan_bytes: int
    #: Tensor name -> {"mode": "input"|"output", "dtype": numpy name, "shape": [-1, C, H, W]}.
    io: dict[str, dict[str, Any]]
    build_seconds: float
    timing_cache: str | None = TIMING_CACHE_FILENAME
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(
        timespec="seconds"))
    calibexport_version: str = calibexport.__version__

    def to_dict(self) -> dict[str, Any]:
        key = self.key
        return {
            "format": ENGINE_FORMAT,
            "format_version": ENGINE_FORMAT_VERSION,
            "tensorrt_version": key.tensorrt_version,
            "gpu": {"name": key.gpu_name, "compute_capability": key.compute_capability},
            "profile": {"batch_sizes": key.profile.to_dict(), "shapes": self.profile_shapes()},
            "precision": key.precision,
            "tf32": key.tf32,
            "onnx": {"file": "model.onnx", "sha256": key.onnx_sha256},
            "eta": {"sha256": key.eta_sha256},
            "plan": {"file": ENGINE_FILENAME, "sha256": self.plan_sha256, "bytes": self.plan_bytes},
            "io": self.io,
            "timing_cache": self.timing_cache,
            "key_sha256": key.digest(),
            "build_seconds": round(self.build_seconds, 3),
            "created": self.created,
            "calibexport_version": self.calibexport_version,
        }

    def profile_shapes(self) -> dict[str, dict[str, list[int]]]:
        """Return the min/opt/max shape of each input, derived from the batch profile."""
        shapes = {}
        for name, tensor in self.io.items():
            if tensor["mode"] == "input":
                profile_shapes = self.key.profile.shapes(tuple(tensor["shape"]))
                shapes[name] = {bound: list(shape)
                                for bound, shape in zip(("min", "opt", "max"), profile_shapes)}
        return shapes

    def inputs(self) -> dict[str, dict[str, Any]]:
        return {name: t for name, t in self.io.items() if t["mode"] == "input"}

    def outputs(self) -> dict[str, dict[str, Any]]:
        return {name: t for name, t in self.io.items() if t["mode"] == "output"}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = ENGINE_METADATA_FILENAME
                  ) -> EngineMetadata:
        """Parse an ``engine.json`` document; ``where`` names it in error messages."""
        version = data.get("format_version")
        if data.get("format") != ENGINE_FORMAT or version != ENGINE_FORMAT_VERSION:
            raise CalibexportError(
                f"{where} is not a version {ENGINE_FORMAT_VERSION} {ENGINE_FORMAT} document "
                f"(format {data.get('format')!r}, version {version!r}); "
                f"{REBUILD_HINT}."
            )
        try:
            key = EngineKey(
                tensorrt_version=str(data["tensorrt_version"]),
                gpu_name=str(data["gpu"]["name"]),
                compute_capability=parse_compute_capability(data["gpu"]["compute_capability"]),
                profile=BatchProfile.from_dict(data["profile"]["batch_sizes"]),
                precision=str(data["precision"]),
                tf32=bool(data["tf32"]),
                onnx_sha256=str(data["onnx"]["sha256"]),
                eta_sha256=str(data["eta"]["sha256"]),
            )
            io = {str(name): {"mode": str(t["mode"]), "dtype": str(t["dtype"]),
                              "shape": [int(d) for d in t["shape"]]}
                  for name, t in data["io"].items()}
            return cls(key=key, plan_sha256=str(data["plan"]["sha256"]),
                       plan_bytes=int(data["plan"]["bytes"]), io=io,
                       build_seconds=float(data.get("build_seconds", 0.0)),
                       timing_cache=data.get("timing_cache"), created=str(data.get("created", "")),
                       calibexport_version=str(data.get("calibexport_version", "")))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise CalibexportError(f"{where} is malformed ({error!r}); {REBUILD_HINT}.") from error


def write_engine_metadata(directory: str | Path, metadata: EngineMetadata) -> Path:
    """Write ``directory/engine.json`` through a temporary file and a rename."""
    path = Path(directory) / ENGINE_METADATA_FILENAME
    text = json.dumps(metadata.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_text(path, text)
    return path


def read_engine_metadata(directory: str | Path) -> EngineMetadata:
    """Read ``directory/engine.json``; raise CalibexportError naming the file when it is invalid."""
    path = Path(directory) / ENGINE_METADATA_FILENAME
    if not path.is_file():
        raise CalibexportError(
            f"{path} not found: {directory} has no TensorRT engine. Build one on a GPU host with "
            "`calibexport build` (TensorRT 10+ and an NVIDIA GPU are needed)."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CalibexportError(
            f"{path} is unreadable or not JSON ({error}); {REBUILD_HINT}."
        ) from error
    if not isinstance(data, dict):
        raise CalibexportError(f"{path} contains a JSON {type(data).__name__}, expected an object.")
    return EngineMetadata.from_dict(data, where=str(path))


def check_engine_usable(directory: str | Path, metadata: EngineMetadata, host: HostFacts, *,
                        onnx_sha256: str, eta_sha256: str) -> None:
    """Raise EngineMismatch unless the engine in ``directory`` fits this host and artifact.

    Compares the TensorRT version, GPU name and compute capability with ``host``, the ONNX and
    eta digests with the artifact's, and the plan file with its recorded sha256.
    """
    directory = Path(directory)
    expected = {"tensorrt_version": host.tensorrt_version, "gpu_name": host.gpu_name,
                "compute_capability": host.compute_capability, "onnx_sha256": onnx_sha256,
                "eta_sha256": eta_sha256}
    differences = key_differences(metadata.key, expected)
    plan = directory / ENGINE_FILENAME
    if not plan.is_file():
        differences.append(f"{ENGINE_FILENAME}: missing")
    else:
        actual = sha256_file(plan)
        if actual != metadata.plan_sha256:
            differences.append(f"{ENGINE_FILENAME} sha256: file has {actual[:12]}..., "
                               f"{ENGINE_METADATA_FILENAME} records {metadata.plan_sha256[:12]}...")
    if differences:
        raise EngineMismatch(plan, differences)


class EngineCache:
    """Built engines keyed by EngineKey, one entry directory per key under ``root``.

    An entry is named by the first 24 hex digits of the key digest and contains ``model.plan`` and
    ``engine.json``. ``root/timing/`` contains one timing cache per TensorRT version and GPU,
    shared by every build on that setup.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def entry_dir(self, key: EngineKey) -> Path:
        return self.root / key.digest()[:24]

    def timing_cache_path(self, key: EngineKey) -> Path:
        gpu = "".join(c if c.isalnum() else "-" for c in key.gpu_name)
        name = f"trt{key.tensorrt_version}_{gpu}_sm{key.compute_capability}.cache"
        return self.root / "timing" / name

    def lookup(self, key: EngineKey) -> Path | None:
        """Return the entry directory holding an engine for ``key``, or None when there is none.

        An entry whose ``engine.json`` or plan does not match ``key`` raises EngineMismatch: it
        was changed after it was stored, and it is never reused.
        """
        entry = self.entry_dir(key)
        if not (entry / ENGINE_METADATA_FILENAME).is_file():
            return None
        metadata = read_engine_metadata(entry)
        expected = {f.name: getattr(key, f.name) for f in fields(EngineKey)}
        differences = key_differences(metadata.key, expected)
        plan = entry / ENGINE_FILENAME
        if plan.is_file() and sha256_file(plan) != metadata.plan_sha256:
            differences.append(f"{ENGINE_FILENAME} sha256 differs from {ENGINE_METADATA_FILENAME}")
        elif not plan.is_file():
            differences.append(f"{ENGINE_FILENAME}: missing")
        if differences:
            raise EngineMismatch(entry, differences, hint=f"delete the cache entry {entry}")
        logger.info("Reusing the cached TensorRT engine %s (key %s).", entry, key.digest()[:12])
        return entry

    def store(self, key: EngineKey, source_dir: str | Path) -> Path:
        """Copy ``model.plan`` and ``engine.json`` of ``source_dir`` into the entry for ``key``."""
        entry = self.entry_dir(key)
        entry.mkdir(parents=True, exist_ok=True)
        # The plan goes first, so a reader never finds engine.json without its plan.
        for name in (ENGINE_FILENAME, ENGINE_METADATA_FILENAME):
            atomic_write_bytes(entry / name, (Path(source_dir) / name).read_bytes())
        logger.info("Stored the TensorRT engine in the cache entry %s.", entry)
        return entry

