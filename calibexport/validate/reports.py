"""parity.json, parity.md and parity.xml (JUnit) from a ParityResult."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from calibexport.validate.parity import ParityResult

PARITY_SCHEMA_VERSION = 1
REPORT_FILES = ("parity.json", "parity.md", "parity.xml")


def parity_to_dict(result: ParityResult, subject: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema_version": PARITY_SCHEMA_VERSION,
        "status": "PASSED" if result.passed else "FAILED",
        "subject": subject,
        "config": result.config,
        "environment": result.environment,
        "seconds": round(result.seconds, 3),
        "checks": [check.to_dict() for check in result.checks],
    }


def render_markdown(report: dict[str, Any]) -> str:
    """A summary table suitable for a CI job summary."""
    subject = report["subject"]
    lines = [
        f"## calibexport parity: {report['status']}",
        "",
        f"Deployed `{subject.get('deployed')}` against `{subject.get('reference')}`, "
        f"tolerance preset `{report['config']['tolerance_preset']}`, {report['seconds']:.1f}s.",
        "",
        "| check | result | max abs | p99 abs | max rel | cosine | NaN/Inf | worst timestep "
        "| smallest passing atol | atol / rtol |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for check in report["checks"]:
        s, tol = check["stats"], check["tolerance"]
        worst = "" if check["worst_timestep"] is None else f"{check['worst_timestep']:g}"
        lines.append(
            f"| {check['name']} | {'PASSED' if check['passed'] else '**FAILED**'} | {s['max_abs']:.3g} "
            f"| {s['p99_abs']:.3g} | {s['max_rel']:.3g} | {s['cosine_similarity']:.9f} "
            f"| {s['nan_count']}/{s['inf_count']} | {worst} | {s['smallest_passing_atol']:.3g} "
            f"| {tol['atol']:g} / {tol['rtol']:g} |"
        )
    psnr = [(c["name"], c["details"]["psnr_db"]) for c in report["checks"] if "psnr_db" in c["details"]]
    if psnr:
        lines += ["", "Final-sample PSNR (data range 2): "
                  + ", ".join(f"{name} {value:.1f} dB" for name, value in psnr) + "."]
    return "\n".join(lines) + "\n"


def render_junit(report: dict[str, Any]) -> str:
    """One test case per check; a failure message names the worst timestep and the error."""
    checks = report["checks"]
    failures = sum(not c["passed"] for c in checks)
    suite = ET.Element("testsuite", name="calibexport.parity", tests=str(len(checks)),
                       failures=str(failures), errors="0", time=f"{report['seconds']:.3f}")
    for check in checks:
        case = ET.SubElement(suite, "testcase", classname=f"parity.{check['level']}", name=check["name"])
        if not check["passed"]:
            s = check["stats"]
            where = "" if check["worst_timestep"] is None else f" at timestep {check['worst_timestep']:g}"
            message = (f"max abs error {s['max_abs']:.3g}{where}; smallest passing atol "
                       f"{s['smallest_passing_atol']:.3g} > atol {check['tolerance']['atol']:g}; "
                       f"NaN {s['nan_count']}, Inf {s['inf_count']}")
            failure = ET.SubElement(case, "failure", message=message, type="ParityFailure")
            failure.text = json.dumps(check["stats"], indent=2)
    suites = ET.Element("testsuites")
    suites.append(suite)
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


def write_reports(result: ParityResult, directory: Path, subject: dict[str, Any]) -> dict[str, Any]:
    """Write the three report files into ``directory``; return the JSON report."""
    from calibexport.exporter.atomic import atomic_write_text

    report = parity_to_dict(result, subject)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / "parity.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(directory / "parity.md", render_markdown(report))
    atomic_write_text(directory / "parity.xml", render_junit(report))
    return report
