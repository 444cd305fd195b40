"""validate on real artifacts: the unperturbed build passes, perturbed ones fail and name where."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from calibexport.errors import CalibexportError
from calibexport.validate.parity import FULL_RUNS
from calibexport.validate.perturb import shift_eta_row, shift_weight
from calibexport.validate.run import ValidateOptions, validate_directory

# One short sampling run keeps the perturbation tests fast; the full set runs once below.
SHORT = "singlestep:2:4"


def shift_eta_row_37(artifact: Path) -> None:
    shift_eta_row(artifact, 37, 1e-3)


def nudge_conv_out_bias(artifact: Path) -> None:
    shift_weight(artifact, "conv_out.bias", 0.01)


def read_reports(directory: Path) -> tuple[dict, str, ET.Element]:
    return (json.loads((directory / "parity.json").read_text()),
            (directory / "parity.md").read_text(),
            ET.parse(directory / "parity.xml").getroot())


def junit_failures(root: ET.Element) -> dict[str, str]:
    return {case.get("name"): case.find("failure").get("message")
            for case in root.iter("testcase") if case.find("failure") is not None}


@pytest.fixture()
def artifact_copy(tmp_path, tiny_artifact) -> Path:
    return Path(shutil.copytree(tiny_artifact, tmp_path / "artifact"))


def test_unperturbed_artifact_passes(artifact_copy):
    report = validate_directory(artifact_copy)
    assert report["status"] == "PASSED"
    assert report["tolerances"]["preset"] == "fp32-cpu"
    assert report["tolerances"]["levels"]["evaluation"] == {"atol": 1e-4, "rtol": 1e-4}
    assert report["environment"]["tf32"] is False
    assert report["environment"]["onnxruntime_providers"] == ["CPUExecutionProvider"]
    levels = report["summary"]["levels"]
    assert levels["evaluation"] == {"checks": 4, "failed": 0}
    assert levels["trajectory"] == {"checks": len(FULL_RUNS), "failed": 0}
    assert levels["samples"] == {"checks": len(FULL_RUNS), "failed": 0}
    for check in report["checks"]:
        assert check["stats"]["smallest_passing_atol"] < check["tolerance"]["atol"], check["name"]
        assert check["stats"]["cosine_similarity"] > 0.999999, check["name"]
        assert check["failure_message"] is None
    _, markdown, root = read_reports(artifact_copy)
    assert markdown.startswith("## calibexport parity: PASSED")
    assert junit_failures(root) == {}


def test_eta_shift_at_one_timestep_is_named(artifact_copy):
    shift_eta_row_37(artifact_copy)
    report = validate_directory(artifact_copy, options=ValidateOptions(runs=SHORT))
    assert report["status"] == "FAILED"
    integer = next(c for c in report["checks"] if c["name"] == "evaluation/integer_timesteps")
    assert not integer["passed"]
    assert integer["worst_timestep"] == 37.0
    assert integer["stats"]["max_abs"] == pytest.approx(1e-3, rel=0.01)
    assert integer["details"]["largest_errors"][0]["timestep"] == 37.0

    _, markdown, root = read_reports(artifact_copy)
    assert "FAILED" in markdown
    assert "max abs error 0.001 at timestep 37" in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| `integer_timesteps`"))
    assert "| 37 |" in row
    message = junit_failures(root)["evaluation/integer_timesteps"]
    assert "max abs error 0.001 at timestep 37" in message


def test_changed_weight_fails_in_all_formats(artifact_copy):
    nudge_conv_out_bias(artifact_copy)
    report = validate_directory(artifact_copy, options=ValidateOptions(runs=SHORT))
    assert report["status"] == "FAILED"
    failed = {c["name"]: c for c in report["checks"] if not c["passed"]}
    assert set(failed) >= {"evaluation/integer_timesteps", "evaluation/batch_1"}
    integer = failed["evaluation/integer_timesteps"]
    assert integer["stats"]["max_abs"] == pytest.approx(0.01, rel=0.01)
    assert integer["worst_timestep"] is not None

    where = f"at timestep {integer['worst_timestep']:g}"
    _, markdown, root = read_reports(artifact_copy)
    assert where in markdown
    assert where in junit_failures(root)["evaluation/integer_timesteps"]
    assert "max abs error 0.01" in junit_failures(root)["evaluation/integer_timesteps"]


def test_tolerance_override_is_applied_and_reported(artifact_copy):
    shift_eta_row_37(artifact_copy)
    options = ValidateOptions(runs=SHORT, atol=["evaluation=2e-3"], rtol=["0"])
    report = validate_directory(artifact_copy, options=options)
    assert report["status"] == "PASSED"
    assert report["tolerances"]["levels"]["evaluation"] == {"atol": 2e-3, "rtol": 0.0}
    assert report["tolerances"]["overrides"]["evaluation"] == {"atol": 2e-3, "rtol": 0.0}
    integer = next(c for c in report["checks"] if c["name"] == "evaluation/integer_timesteps")
    assert integer["stats"]["smallest_passing_atol"] == pytest.approx(1e-3, rel=0.01)


def test_report_dir_receives_reports(artifact_copy, tmp_path):
    report_dir = tmp_path / "reports"
    validate_directory(artifact_copy, report_dir=report_dir,
                       options=ValidateOptions(runs=SHORT, max_rows=10))
    for name in ("parity.json", "parity.md", "parity.xml"):
        assert (report_dir / name).is_file(), name
    integer = json.loads((report_dir / "parity.json").read_text())["checks"][0]
    assert len(integer["details"]["largest_errors"]) == 5
    assert "10 evenly spaced rows" in integer["description"]


def test_tampered_file_is_rejected_before_checks(artifact_copy):
    table = np.load(artifact_copy / "eta.npy")
    np.save(artifact_copy / "eta.npy", table + 1.0)
    with pytest.raises(CalibexportError, match="eta.npy"):
        validate_directory(artifact_copy)


@pytest.mark.parametrize("options, match", [
    (ValidateOptions(tolerance_preset="fp64"), "unknown tolerance preset 'fp64'"),
    (ValidateOptions(provider="tpu"), "unknown provider 'tpu'"),
    (ValidateOptions(tf32=True), "--tf32 applies to --provider cuda only"),
    (ValidateOptions(num_samples=0), "--num-samples must be >= 1, got 0"),
    (ValidateOptions(runs="ddim:3:10"), "method 'ddim' is first order"),
    (ValidateOptions(atol=["x=1"]), "unknown level 'x'"),
    (ValidateOptions(reference=Path("ref.json"), runs="quick"), "--runs cannot be combined"),
])
def test_invalid_options_are_rejected(tiny_artifact, options, match):
    with pytest.raises(CalibexportError, match=match):
        validate_directory(tiny_artifact, options=options)


def test_saved_reference_catches_perturbed_artifact(tiny_artifact, tmp_path):
    reference = tmp_path / "reference.json"
    clean = validate_directory(tiny_artifact, report_dir=tmp_path / "clean",
                               options=ValidateOptions(runs=SHORT, save_reference=reference))
    assert clean["status"] == "PASSED"
    document = json.loads(reference.read_text())
    assert document["format"] == "calibexport.parity-reference"
    assert document["source"]["backend"] == "pytorch"

    same = validate_directory(tiny_artifact, report_dir=tmp_path / "same",
                              options=ValidateOptions(reference=reference))
    assert same["status"] == "PASSED"
    assert same["subject"]["reference_file"] == str(reference)
    assert [c["name"] for c in same["checks"]] == [c["name"] for c in clean["checks"]]
    # The same engine on the saved inputs reproduces the errors against PyTorch.
    for saved, direct in zip(same["checks"], clean["checks"]):
        assert saved["stats"]["max_abs"] == pytest.approx(direct["stats"]["max_abs"]), saved["name"]

    perturbed = Path(shutil.copytree(tiny_artifact, tmp_path / "perturbed"))
    shift_eta_row_37(perturbed)
    report = validate_directory(perturbed, options=ValidateOptions(reference=reference))
    assert report["status"] == "FAILED"
    integer = next(c for c in report["checks"] if c["name"] == "evaluation/integer_timesteps")
    assert integer["worst_timestep"] == 37.0
    assert integer["stats"]["max_abs"] == pytest.approx(1e-3, rel=0.01)
    assert "at timestep 37" in junit_failures(read_reports(perturbed)[2])[integer["name"]]


def test_reference_for_other_weights_is_rejected(tiny_artifact, tmp_path):
    reference = tmp_path / "reference.json"
    validate_directory(tiny_artifact, report_dir=tmp_path,
                       options=ValidateOptions(runs=SHORT, max_rows=4, save_reference=reference))
    document = json.loads(reference.read_text())
    document["artifact"]["weights_sha256"] = "0" * 64
    reference.write_text(json.dumps(document))
    with pytest.raises(CalibexportError, match="belongs to another model .*weights_sha256"):
        validate_directory(tiny_artifact, report_dir=tmp_path,
                           options=ValidateOptions(reference=reference))


def test_reference_run_reports_saved_settings(tiny_artifact, tmp_path):
    reference = tmp_path / "reference.json"
    options = ValidateOptions(runs="ddim:1:3", max_rows=4, seed=3, save_reference=reference)
    validate_directory(tiny_artifact, report_dir=tmp_path / "saved", options=options)
    report = validate_directory(tiny_artifact, report_dir=tmp_path / "compared",
                                options=ValidateOptions(reference=reference))
    assert report["config"]["max_rows"] == 4
    assert report["config"]["seed"] == 3
    assert report["config"]["runs"] == ["ddim_order1_nfe3"]
    integer = report["checks"][0]
    assert "4 evenly spaced rows" in integer["description"]


def test_preset_argument_leaves_options_unchanged(tiny_artifact, tmp_path):
    options = ValidateOptions(runs="ddim:1:3", max_rows=4)
    report = validate_directory(tiny_artifact, report_dir=tmp_path, tolerance_preset="fp16",
                                options=options)
    assert report["tolerances"]["preset"] == "fp16"
    assert options.tolerance_preset == "auto"


def test_damaged_reference_is_rejected(tiny_artifact, tmp_path):
    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps({"format": "calibexport.parity-reference", "version": 1}))
    with pytest.raises(CalibexportError, match="incomplete or damaged"):
        validate_directory(tiny_artifact, report_dir=tmp_path,
                           options=ValidateOptions(reference=reference))
    reference.write_text("[1, 2]")
    with pytest.raises(CalibexportError, match="not a calibexport reference file"):
        validate_directory(tiny_artifact, report_dir=tmp_path,
                           options=ValidateOptions(reference=reference))


def test_saved_reference_comparison_needs_no_torch(tiny_artifact, tmp_path):
    reference = tmp_path / "reference.json"
    validate_directory(tiny_artifact, report_dir=tmp_path,
                       options=ValidateOptions(runs=SHORT, max_rows=4, save_reference=reference))
    script = (
        "import sys\n"
        "from calibexport.validate.run import ValidateOptions, validate_directory\n"
        f"report = validate_directory({str(tiny_artifact)!r}, report_dir={str(tmp_path)!r}, "
        f"options=ValidateOptions(reference={str(reference)!r}))\n"
        "assert report['status'] == 'PASSED', report['summary']\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
