"""Tables and plots of evaluation results: the layout of the calibration paper's Tables 1 and 2.

Each table has one row per solver order and variant (``DPM-Solver-k`` and ``DPM-Solver-k +
calibration``) and one column per requested NFE. A cell shows the mean Frechet distance over
seeds and its standard error. A dagger marks a cell whose real NFE, ``order * floor(NFE /
order)`` for the fixed allocation, differs from the column's, and the real NFE follows it.
The paired table gives calibrated minus uncalibrated per seed (both start from the same
noise), averaged over seeds, and marks in bold the differences larger than twice their
standard error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SPACE_TITLES = {
    "classifier": "Frechet distance, digits-classifier features (64-d)",
    "pixel": "Frechet distance, pixel space",
}
SETTING_TITLES = {
    "fixed": "fixed order (NFE // order steps of one order, as in the paper)",
    "fast": "fast allocation (exactly NFE evaluations)",
}


def mean_and_se(values: Sequence[float]) -> tuple[float, float | None]:
    """Return the mean and its standard error (sample std / sqrt(n)); None for one value."""
    array = np.asarray(values, dtype=np.float64)
    if len(array) < 2:
        return float(array.mean()), None
    return float(array.mean()), float(array.std(ddof=1) / math.sqrt(len(array)))


def _format(mean: float, se: float | None, digits: int = 3) -> str:
    if se is None:
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} ± {se:.2g}"


def _rows_by_key(results: dict[str, Any]) -> dict[tuple[str, int, int, bool], dict[str, Any]]:
    return {
        (row["setting"], row["order"], row["nfe"], row["calibrated"]): row
        for row in results["rows"]
    }


def _variants(results: dict[str, Any]) -> list[bool]:
    return sorted({row["calibrated"] for row in results["rows"]})


def _grid(results: dict[str, Any]) -> tuple[list[str], list[int], list[int]]:
    rows = results["rows"]
    settings = list(dict.fromkeys(row["setting"] for row in rows))
    orders = sorted({row["order"] for row in rows})
    nfes = sorted({row["nfe"] for row in rows})
    return settings, orders, nfes


def paired_differences(results: dict[str, Any], space: str, setting: str, order: int,
                       nfe: int, metric: str = "fd") -> list[float]:
    """Return calibrated minus uncalibrated ``metric`` (fd or mean_term), one value per seed."""
    rows = _rows_by_key(results)
    calibrated = rows[(setting, order, nfe, True)]["metrics"][space][metric]
    uncalibrated = rows[(setting, order, nfe, False)]["metrics"][space][metric]
    return [c - u for c, u in zip(calibrated, uncalibrated)]


def distance_table(results: dict[str, Any], space: str, setting: str) -> str:
    """Return the markdown table of mean Frechet distances for one feature space and setting."""
    _, orders, nfes = _grid(results)
    rows = _rows_by_key(results)
    lines = ["| method | " + " | ".join(f"NFE {nfe}" for nfe in nfes) + " |",
             "|---|" + "---:|" * len(nfes)]
    for order in orders:
        for calibrated in _variants(results):
            label = f"DPM-Solver-{order}" + (" + calibration" if calibrated else "")
            cells = []
            for nfe in nfes:
                row = rows[(setting, order, nfe, calibrated)]
                cell = _format(*mean_and_se(row["metrics"][space]["fd"]))
                if row["actual_nfe"] != nfe:
                    cell += f" †{row['actual_nfe']}"
                cells.append(cell)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def difference_table(results: dict[str, Any], space: str, setting: str,
                     metric: str = "fd") -> str:
    """Return the markdown table of paired differences, calibrated minus uncalibrated."""
    _, orders, nfes = _grid(results)
    lines = ["| order | " + " | ".join(f"NFE {nfe}" for nfe in nfes) + " |",
             "|---|" + "---:|" * len(nfes)]
    for order in orders:
        cells = []
        for nfe in nfes:
            differences = paired_differences(results, space, setting, order, nfe, metric)
            mean, se = mean_and_se(differences)
            cell = _format(mean, se, digits=2)
            if se is not None and abs(mean) > 2 * se:
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append(f"| {order} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(results: dict[str, Any]) -> str:
    """Return every distance and difference table of ``results`` as one markdown document."""
    settings, _, _ = _grid(results)
    seeds = results["seeds_completed"]
    options = results["options"]
    parts = [
        f"Seeds {', '.join(map(str, seeds))}; {options['num_samples']} samples per seed and "
        f"config; reference: {results['num_reference']} images. Cells: mean ± standard error "
        "over seeds; † real NFE where it differs.",
    ]
    for space in results["feature_spaces"]:
        for setting in settings:
            title = f"{SPACE_TITLES.get(space, space)}; {SETTING_TITLES.get(setting, setting)}"
            parts.append(f"### {title}\n\n{distance_table(results, space, setting)}")
            if len(_variants(results)) < 2:
                continue
            parts.append(
                "Calibrated minus uncalibrated (paired by seed; bold: more than 2 standard "
                f"errors from zero):\n\n{difference_table(results, space, setting)}"
            )
            parts.append(
                "Mean term ||m_samples - m_data||^2 of the distance, calibrated minus "
                f"uncalibrated:\n\n{difference_table(results, space, setting, 'mean_term')}"
            )
    if results.get("eta_noise"):
        parts.append(f"### eta table against its standard error\n\n{eta_noise_table(results)}")
    return "\n\n".join(parts) + "\n"


def eta_noise_rows(values: np.ndarray, row_se: Sequence[float] | None,
                   timesteps: Sequence[int] = (0, 10, 50, 100, 250, 500, 750, 999)
                   ) -> list[dict[str, float]]:
    """Return, at some table rows, the RMS of eta over pixels against the row's standard error.

    ``row_se`` is the RMS over pixels of the per-pixel standard error. An estimated row has
    expected mean square eta^2 + SE^2, so ``noise_share`` = SE^2 / RMS^2 estimates the fraction
    of the row's power that is Monte Carlo noise (near 1: mostly noise), and ``signal`` =
    sqrt(max(RMS^2 - SE^2, 0)) estimates the RMS of the true eta.
    """
    rows = []
    for timestep in timesteps:
        if timestep >= len(values):
            continue
        rms = float(np.sqrt(np.mean(np.asarray(values[timestep], dtype=np.float64) ** 2)))
        row = {"timestep": int(timestep), "rms": rms}
        if row_se is not None:
            se = float(row_se[timestep])
            row.update(se=se, noise_share=se**2 / rms**2 if rms > 0 else float("inf"),
                       signal=math.sqrt(max(rms**2 - se**2, 0.0)))
        rows.append(row)
    return rows


def eta_noise_table(results: dict[str, Any]) -> str:
    """Return the markdown table of ``results["eta_noise"]``."""
    lines = ["| timestep | RMS of eta | SE (RMS over pixels) | SE^2 / RMS^2 | signal RMS |",
             "|---:|---:|---:|---:|---:|"]
    for row in results["eta_noise"]:
        se = f"{row['se']:.3g}" if "se" in row else "-"
        share = f"{row['noise_share']:.2f}" if "noise_share" in row else "-"
        signal = f"{row['signal']:.3g}" if "signal" in row else "-"
        lines.append(f"| {row['timestep']} | {row['rms']:.3g} | {se} | {share} | {signal} |")
    return "\n".join(lines)


def plot_results(results: dict[str, Any], path: str | Path) -> None:
    """Plot Frechet distance against real NFE: one panel per feature space and setting.

    Colours are orders; solid lines are calibrated, dashed uncalibrated; bars are one SE.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings, orders, nfes = _grid(results)
    spaces = results["feature_spaces"]
    rows = _rows_by_key(results)
    figure, axes = plt.subplots(len(spaces), len(settings), squeeze=False,
                                figsize=(5.5 * len(settings), 3.8 * len(spaces)))
    for i, space in enumerate(spaces):
        for j, setting in enumerate(settings):
            axis = axes[i][j]
            for order, colour in zip(orders, ("tab:blue", "tab:orange", "tab:green")):
                for calibrated in _variants(results):
                    selected = [rows[(setting, order, nfe, calibrated)] for nfe in nfes]
                    stats = [mean_and_se(row["metrics"][space]["fd"]) for row in selected]
                    axis.errorbar(
                        [row["actual_nfe"] for row in selected], [m for m, _ in stats],
                        yerr=[se or 0.0 for _, se in stats], color=colour, capsize=2,
                        linestyle="-" if calibrated else "--", marker="o" if calibrated else "x",
                        label=f"order {order}" + (" + calibration" if calibrated else ""),
                    )
            axis.set_yscale("log")
            axis.set_xlabel("NFE (real)")
            axis.set_ylabel("Frechet distance")
            axis.set_title(f"{space}, {setting}", fontsize=10)
            axis.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_outputs(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write results.json, results.md and fd_vs_nfe.png into ``out_dir``; return the paths."""
    from calibexport.exporter.atomic import atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json", out_dir / "results.md", out_dir / "fd_vs_nfe.png"]
    atomic_write_text(paths[0], json.dumps(results, indent=1) + "\n")
    atomic_write_text(paths[1], markdown_report(results))
    plot_results(results, paths[2])
    return paths
