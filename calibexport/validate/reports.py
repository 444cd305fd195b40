"""parity.json, parity.md and parity.xml (JUnit) from a ParityResult.

docs/validation.md documents the parity.json schema; ``PARITY_SCHEMA_VERSION`` changes whenever a
field is renamed, removed or changes meaning.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from calibexport.validate.compare import LEVELS
from calibexport.validate.parity import ParityResult

PARITY_SCHEMA_VERSION = 2
PARITY_FORMAT = "calibexport.parity"
REPORT_FILES = ("parity.json", "parity.md", "parity.xml")

LEVEL_TITLES = {
    "evaluation": "Single evaluations",
    "trajectory": "Sampling trajectories (state after every step)",
    "samples": "Final samples",
}


def _json_safe(value: Any) -> Any:
    """Replace NaN and infinite floats by None, because strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def parity_to_dict(result: ParityResult, subject: dict[str, Any],
                   tolerances: dict[str, Any], reproduce: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """Build the parity.json document (schema version ``PARITY_SCHEMA_VERSION``)."""
    checks = [check.to_dict() for check in result.checks]
    levels = {
        level: {
            "checks": sum(c["level"] == level for c in checks),
            "failed": sum(c["level"] == level and not c["passed"] for c in checks),
        }
        for level in LEVELS
    }
    failed = [c["name"] for c in checks if not c["passed"]]
    return _json_safe({
        "format": PARITY_FORMAT,
        "schema_version": PARITY_SCHEMA_VERSION,
        "status": "PASSED" if result.passed else "FAILED",
        "summary": {"checks": len(checks), "failed": len(failed), "failed_checks": failed,
                    "levels": levels},
        "subject": subject,
        "tolerances": tolerances,
        "config": result.config,
        "environment": result.environment,
        "seconds": round(result.seconds, 3),
        "reproduce": reproduce,
        "checks": checks,
    })


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def _check_row(check: dict[str, Any]) -> str:
    s, tol = check["stats"], check["tolerance"]
    status = "pass" if check["passed"] else "**FAIL**"
    cells = [
        f"`{check['name'].split('/', 1)[1]}`", status,
        _number(s["max_abs"]), _number(s["mean_abs"]), _number(s["p99_abs"]),
        _number(s["max_rel"]), _number(s["mean_rel"]), _number(s["p99_rel"]),
        "n/a" if s["cosine_similarity"] is None else f"{s['cosine_similarity']:.9f}",
        f"{s['nan_count']}/{s['inf_count']}",
        _number(check["worst_timestep"], 6) if check["worst_timestep"] is not None else "",
        _number(s["smallest_passing_atol"]),
        f"{tol['atol']:g} / {tol['rtol']:g}",
    ]
    if check["level"] == "samples":
        cells.append(_number(check["details"].get("psnr_db"), 4))
    return "| " + " | ".join(cells) + " |"


def _level_table(report: dict[str, Any], level: str) -> list[str]:
    checks = [c for c in report["checks"] if c["level"] == level]
    if not checks:
        return []
    counts = report["summary"]["levels"][level]
    header = ("| check | result | max abs | mean abs | p99 abs | max rel | mean rel | p99 rel "
              "| cosine | NaN/Inf | worst timestep | smallest passing atol | atol / rtol |")
    rule = "|---" * 13 + "|"
    if level == "samples":
        header += " PSNR dB |"
        rule += "---|"
    passed = counts["checks"] - counts["failed"]
    return ["", f"### {LEVEL_TITLES[level]}: {passed}/{counts['checks']} passed", "", header,
            rule, *(_check_row(check) for check in checks)]


def render_markdown(report: dict[str, Any]) -> str:
    """Render a summary for a CI job summary: failures first, then one table per level."""
    subject, summary = report["subject"], report["summary"]
    tolerances = report["tolerances"]
    levels = ", ".join(f"{level} atol {tol['atol']:g} rtol {tol['rtol']:g}"
                       for level, tol in tolerances["levels"].items())
    overrides = " (overridden by flags)" if tolerances.get("overrides") else ""
    environment = report["environment"]
    lines = [
        f"## calibexport parity: {report['status']}",
        "",
        f"{summary['checks'] - summary['failed']}/{summary['checks']} checks passed in "
        f"{report['seconds']:.1f}s. Deployed: {subject.get('deployed')}. Reference: "
        f"{subject.get('reference')}.",
        "",
        f"Tolerance preset `{tolerances['preset']}`{overrides}: {levels}. TF32: "
        f"{'on' if environment.get('tf32') else 'off'}.",
    ]
    failures = [c for c in report["checks"] if not c["passed"]]
    if failures:
        lines += ["", "**Failed checks**", ""]
        lines += [f"- {c['failure_message']}" for c in failures]
    for level in LEVELS:
        lines += _level_table(report, level)
    reproduce = report.get("reproduce")
    if reproduce:
        lines += ["", f"Reproduce the {reproduce['num_iterations']} model calls with Polygraphy:",
                  "", "```", reproduce["command"], "```"]
    return "\n".join(lines) + "\n"


def render_junit(report: dict[str, Any]) -> str:
    """Render one test suite per level and one test case per check.

    A failure's message names the worst timestep, the error and the smallest passing tolerance.
    """
    suites = ET.Element("testsuites", name="calibexport parity",
                        tests=str(report["summary"]["checks"]),
                        failures=str(report["summary"]["failed"]), errors="0",
                        time=f"{report['seconds']:.3f}")
    for level in LEVELS:
        checks = [c for c in report["checks"] if c["level"] == level]
        if not checks:
            continue
        suite = ET.SubElement(suites, "testsuite", name=f"parity.{level}", tests=str(len(checks)),
                              failures=str(sum(not c["passed"] for c in checks)), errors="0")
        properties = ET.SubElement(suite, "properties")
        tolerance = report["tolerances"]["levels"][level]
        for name, value in (("tolerance_preset", report["tolerances"]["preset"]),
                            ("atol", f"{tolerance['atol']:g}"), ("rtol", f"{tolerance['rtol']:g}"),
                            ("tf32", str(bool(report["environment"].get("tf32"))).lower())):
            ET.SubElement(properties, "property", name=name, value=value)
        for check in checks:
            case = ET.SubElement(suite, "testcase", classname=f"parity.{level}",
                                 name=check["name"])
            if not check["passed"]:
                failure = ET.SubElement(case, "failure", message=check["failure_message"],
                                        type="ParityFailure")
                failure.text = json.dumps({"stats": check["stats"],
                                           "worst_timestep": check["worst_timestep"],
                                           "details": check["details"]}, indent=2)
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


def write_reports(report: dict[str, Any], directory: Path) -> None:
    """Write parity.json, parity.md and parity.xml for ``report`` into ``directory``."""
    from calibexport.exporter.atomic import atomic_write_text

    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / "parity.json",
                      json.dumps(report, indent=2, allow_nan=False) + "\n")
    atomic_write_text(directory / "parity.md", render_markdown(report))
    atomic_write_text(directory / "parity.xml", render_junit(report))
