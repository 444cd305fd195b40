"""Looking at an eta table: its size over time, heat maps, and the loss decrease it predicts.

Calibration with eta_k = E[eps_theta(x_t, k)] lowers the denoising score-matching loss at every
time (Pang et al., "On Calibrating Diffusion Probabilistic Models", NeurIPS 2023). With the
per-image loss L_k(eta) = (1/2) E ||eps_theta(x_t, k) - eta - e||^2 (summed over pixels, in eps
units), the exact identity is

    L_k(0) - L_k(eta) = eta . m_k - (1/2) ||eta||^2,    m_k = E[eps_theta(x_t, k) - e],

which equals (1/2) ||eta_k||^2 when eta = m_k. In the score parameterisation s = -eps / sigma_t
the decrease is (1/2) ||eta_k||^2 / sigma_t^2, and its integral against g(t)^2 is the decrease
of the likelihood bound of the diffusion SDE:

    int g(t)^2 / (2 sigma_t^2) ||eta_t||^2 dt,
    g(t)^2 = d sigma_t^2/dt - 2 (d log alpha_t/dt) sigma_t^2.

For a VP schedule (alpha_t^2 + sigma_t^2 = 1) this is g(t)^2 = -2 d log alpha_t / dt, the
beta(t) of the SDE. ``likelihood_weight`` differentiates the schedule's ``log_alpha``
numerically by a central difference; on the piecewise-linear log_alpha of a discrete schedule
that is the mean of the two neighbouring segments' slopes, about N (beta_k + beta_{k+1}) / 2
for the DDPM betas.

An estimated table ê = eta + delta, with independent errors of standard error SE_p per pixel,
has E[(1/2)||ê||^2] = (1/2)||eta||^2 + (1/2)||SE||^2, while the expected decrease on fresh data
is (1/2)||eta||^2 - (1/2)||SE||^2. ``check_identity`` therefore predicts the decrease as
(1/2)||ê||^2 - ||SE||^2 when the table's standard errors are known. A noisy row can raise the
loss: the decrease is negative when ||SE_k|| exceeds ||eta_k||.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calibexport.errors import CalibexportError
from calibexport.runtime.schedule import VPSchedule

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: Step of the central difference of log_alpha(t), in solver time.
DERIVATIVE_STEP = 1e-6
#: Number of table rows shown as heat maps when none are requested.
HEATMAP_COUNT = 6
HALF_NORM_LABEL = r"$\frac{1}{2}\Vert\eta_t\Vert^2$"
#: A check passes when the measured and predicted decreases differ by at most this many
#: combined standard errors.
IDENTITY_Z_LIMIT = 3.0


@dataclass
class IdentityRow:
    """The measured and predicted loss decrease of calibration at one model input time.

    Losses are (1/2) E||eps_theta - eta - e||^2 per image, summed over pixels, in eps units.
    ``decrease_se`` treats the held-out images as the sample (noise averaged per image first).
    ``noise_correction`` is ||SE_k||^2 of the table, None when the table has no standard errors.
    """

    timestep: int
    loss_uncalibrated: float
    loss_calibrated: float
    decrease: float
    decrease_se: float
    half_squared_norm: float
    noise_correction: float | None
    predicted: float
    predicted_se: float
    z: float


def half_squared_norm(eta: np.ndarray) -> np.ndarray:
    """Return (1/2) ||eta_k||^2 of each row [T], summed over pixels, in float64."""
    rows = np.asarray(eta, dtype=np.float64).reshape(len(eta), -1)
    return 0.5 * (rows**2).sum(axis=1)


def row_times(schedule: VPSchedule, num_rows: int) -> np.ndarray:
    """Return the solver time t in (0, 1] of each table row (model input time 0..T-1)."""
    return schedule.timestep_to_t(np.arange(num_rows, dtype=np.float64))


def likelihood_weight(schedule: VPSchedule, t: np.ndarray) -> np.ndarray:
    """Return g(t)^2 / (2 sigma_t^2) with g(t)^2 = -2 d log alpha_t / dt (VP schedules)."""
    t = np.asarray(t, dtype=np.float64)
    step = DERIVATIVE_STEP
    slope = (schedule.log_alpha(t + step) - schedule.log_alpha(t - step)) / (2 * step)
    g_squared = -2.0 * slope
    return g_squared / (2.0 * schedule.sigma(t) ** 2)


def table_summary(
    eta: np.ndarray, schedule: VPSchedule, row_rms_se: np.ndarray | None = None
) -> dict[str, Any]:
    """Per-row (1/2)||eta||^2, its likelihood-weighted form and the bound decrease (integral)."""
    t = row_times(schedule, len(eta))
    half_norm = half_squared_norm(eta)
    weighted = likelihood_weight(schedule, t) * 2.0 * half_norm
    summary: dict[str, Any] = {
        "num_timesteps": int(len(eta)),
        "image_shape": [int(dim) for dim in eta.shape[1:]],
        "t": t.tolist(),
        "half_squared_norm": half_norm.tolist(),
        "likelihood_weighted": weighted.tolist(),
        "likelihood_bound_decrease": float(np.sum(0.5 * (weighted[1:] + weighted[:-1])
                                                  * np.diff(t))),
    }
    if row_rms_se is not None:
        pixels = int(np.prod(eta.shape[1:]))
        summary["half_squared_se_norm"] = (0.5 * pixels * row_rms_se**2).tolist()
    return summary


def check_identity(
    model: torch.nn.Module,
    schedule: VPSchedule,
    eta: np.ndarray,
    images: np.ndarray,
    *,
    timesteps: np.ndarray,
    repeats: int = 2,
    seed: int = 0,
    batch_size: int = 256,
    row_rms_se: np.ndarray | None = None,
) -> list[IdentityRow]:
    """Measure the loss decrease of calibration on held-out ``images`` at each of ``timesteps``.

    Every image is noised ``repeats`` times per timestep (noise seeded by (seed, timestep)).
    The decrease per sample is eta . (eps - e) - (1/2)||eta||^2, the paired difference of the
    two losses; its standard error comes from the spread of the per-image means. The prediction
    is (1/2)||eta_k||^2, less ||SE_k||^2 when ``row_rms_se`` gives the table's RMS standard
    error per row; its standard error is sqrt(||eta||^2 s^2 + 2 D s^4) for RMS error s.
    """
    import torch

    from calibexport.calibration_tables.estimate import table_coefficients

    alpha, sigma = table_coefficients(schedule)
    if len(alpha) != len(eta):
        raise CalibexportError(
            f"the eta table has {len(eta)} rows but the schedule has {len(alpha)} model input "
            "times; inspect the table with the model it was estimated for."
        )
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise CalibexportError(f"repeats must be a positive integer, got {repeats!r}.")
    if len(images) < 2:
        raise CalibexportError(
            f"the identity check needs at least 2 held-out images for a standard error, got "
            f"{len(images)}."
        )
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            rows = [_identity_row(model, alpha, sigma, eta, images, int(k), repeats, seed,
                                  batch_size, row_rms_se) for k in timesteps]
    finally:
        model.train(was_training)
    return rows


def _identity_row(
    model: torch.nn.Module,
    alpha: np.ndarray,
    sigma: np.ndarray,
    eta: np.ndarray,
    images: np.ndarray,
    k: int,
    repeats: int,
    seed: int,
    batch_size: int,
    row_rms_se: np.ndarray | None,
) -> IdentityRow:
    import torch

    # Draw e for every (image, repeat) pair, then x_t = alpha_k x0 + sigma_k e.
    generator = torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, k]).generate_state(1, dtype=np.uint64)[0]) >> 1)
    x0 = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).repeat(repeats, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=generator)
    x_t = float(alpha[k]) * x0 + float(sigma[k]) * noise
    eps = torch.cat([
        model(x_t[i:i + batch_size], torch.full((len(x_t[i:i + batch_size]),), float(k)))
        for i in range(0, len(x_t), batch_size)
    ])

    # Per-sample losses (1/2)||eps - e||^2 and (1/2)||eps - eta - e||^2 and their difference.
    residual = (eps.double() - noise.double()).flatten(1).numpy()
    row = np.asarray(eta[k], dtype=np.float64).reshape(-1)
    uncalibrated = 0.5 * (residual**2).sum(axis=1)
    calibrated = 0.5 * ((residual - row) ** 2).sum(axis=1)
    per_image = (uncalibrated - calibrated).reshape(repeats, len(images)).mean(axis=0)
    decrease_se = float(per_image.std(ddof=1) / np.sqrt(len(images)))

    # Prediction (1/2)||eta||^2, corrected for the table's own noise when it is known.
    half_norm = 0.5 * float(row @ row)
    correction, predicted_se = None, 0.0
    if row_rms_se is not None:
        # NOTE: predicted_se treats the table's pixel errors as independent. Errors that are
        # correlated across pixels spread the decrease more, so |z| then runs larger.
        spread = float(row_rms_se[k])
        correction = row.size * spread**2
        predicted_se = float(np.sqrt(2 * half_norm * spread**2 + 2 * row.size * spread**4))
    predicted = half_norm - (correction or 0.0)
    combined = np.hypot(decrease_se, predicted_se)
    decrease = float(per_image.mean())
    return IdentityRow(
        timestep=k,
        loss_uncalibrated=float(uncalibrated.mean()),
        loss_calibrated=float(calibrated.mean()),
        decrease=decrease,
        decrease_se=decrease_se,
        half_squared_norm=half_norm,
        noise_correction=correction,
        predicted=predicted,
        predicted_se=predicted_se,
        z=float((decrease - predicted) / combined) if combined > 0 else 0.0,
    )


def default_heatmap_rows(num_rows: int, count: int = HEATMAP_COUNT) -> list[int]:
    """Return ``count`` rows spread over the table, first and last included."""
    return sorted({int(round(value)) for value in np.linspace(0, num_rows - 1, count)})


def identity_timesteps(num_rows: int, count: int) -> np.ndarray:
    """Return ``count`` model input times evenly spread over 0..T-1."""
    if count < 1:
        raise CalibexportError(f"the identity check needs at least 1 timestep, got {count}.")
    return np.unique(np.round(np.linspace(0, num_rows - 1, count)).astype(np.int64))


def write_summary(out: Path, summary: dict[str, Any], identity: list[IdentityRow] | None) -> None:
    """Write ``summary.json`` and a Markdown ``summary.md`` into ``out``."""
    record = dict(summary)
    if identity is not None:
        record["identity"] = [asdict(row) for row in identity]
    (out / "summary.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(summary_markdown(record), encoding="utf-8")


def summary_markdown(record: dict[str, Any]) -> str:
    """Render the summary as Markdown: table facts, then the identity check if it ran."""
    half_norm = np.asarray(record["half_squared_norm"])
    lines = [
        f"# eta table {record.get('table', '')}",
        "",
        f"- rows: {record['num_timesteps']}, image shape {record['image_shape']}",
        f"- (1/2)||eta_k||^2: max {half_norm.max():.4g} at row {int(half_norm.argmax())}, "
        f"min {half_norm.min():.4g} at row {int(half_norm.argmin())}",
        f"- likelihood-bound decrease int g^2 / (2 sigma^2) ||eta||^2 dt: "
        f"{record['likelihood_bound_decrease']:.4g}",
    ]
    if "half_squared_se_norm" in record:
        noise = np.asarray(record["half_squared_se_norm"])
        noisy = int((noise >= half_norm).sum())
        lines.append(f"- rows where (1/2)||SE||^2 >= (1/2)||eta||^2 (noise as large as eta): "
                     f"{noisy} of {len(noise)}")
    identity = record.get("identity")
    if identity:
        lines += ["", "## Loss decrease of calibration on held-out data", "",
                  "Losses are (1/2) E||eps - eta - e||^2 per image (sum over pixels).", "",
                  "| timestep | loss, uncalibrated | loss, calibrated | decrease (measured) "
                  "| (1/2)\\|\\|eta\\|\\|^2 | predicted | z |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for row in identity:
            lines.append(
                f"| {row['timestep']} | {row['loss_uncalibrated']:.4f} | "
                f"{row['loss_calibrated']:.4f} | {row['decrease']:.4g} ± {row['decrease_se']:.2g}"
                f" | {row['half_squared_norm']:.4g} | {row['predicted']:.4g} ± "
                f"{row['predicted_se']:.2g} | {row['z']:+.1f} |"
            )
        worst = max(abs(row["z"]) for row in identity)
        verdict = "within" if worst <= IDENTITY_Z_LIMIT else "outside"
        lines += ["", f"Largest |z|: {worst:.1f} ({verdict} {IDENTITY_Z_LIMIT:g} combined "
                  "standard errors)."]
    return "\n".join(lines) + "\n"


def inspect_table(
    table: str | Path,
    out: str | Path,
    *,
    model: str | Path | None = None,
    data: str = "digits:test",
    config: str | None = None,
    weights: str = "ema",
    heatmap_rows: list[int] | None = None,
    identity_points: int = 20,
    repeats: int = 2,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Plot ``table`` into ``out`` and, given a ``model``, check the loss identity on ``data``.

    Writes ``eta_norm.png``, ``eta_heatmaps.png``, ``summary.json`` and ``summary.md``, and with
    a model also ``identity.png``. The schedule comes from the table's sidecar, else from the
    model. Returns the summary record.
    """
    from calibexport.runtime.eta_table import load_eta_table

    start = time.perf_counter()
    loaded_table = load_eta_table(table)
    eta = loaded_table.values
    metadata = loaded_table.metadata or {}
    loaded = _load_network(model, config, weights) if model is not None else None
    schedule = _table_schedule(metadata, loaded, table)
    row_rms_se = _row_rms_se(metadata, len(eta))

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = table_summary(eta, schedule, row_rms_se)
    summary["table"] = str(loaded_table.path)
    rows = default_heatmap_rows(len(eta)) if heatmap_rows is None else heatmap_rows
    plot_norms(out / "eta_norm.png", summary)
    plot_heatmaps(out / "eta_heatmaps.png", eta, rows, row_times(schedule, len(eta)))

    identity = None
    if loaded is not None:
        identity = _run_identity(loaded, schedule, eta, data, identity_points, repeats, seed,
                                 batch_size, row_rms_se)
        plot_identity(out / "identity.png", identity)
    write_summary(out, summary, identity)
    logger.info("Inspected %s in %.1fs; wrote plots and summary.md to %s.",
                loaded_table.path, time.perf_counter() - start, out)
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def _load_network(model: str | Path, config: str | None, weights: str) -> Any:
    from calibexport.models.loaders import load_model

    return load_model(model, config=config, weights=weights)


def _table_schedule(metadata: dict[str, Any], loaded: Any, table: str | Path) -> VPSchedule:
    from calibexport.runtime.schedule import schedule_from_spec

    if "schedule" in metadata:
        return schedule_from_spec(metadata["schedule"])
    if loaded is not None:
        return schedule_from_spec(loaded.spec.schedule)
    raise CalibexportError(
        f"eta table {table} has no sidecar with its schedule; pass --model with the model it was "
        "estimated for."
    )


def _row_rms_se(metadata: dict[str, Any], num_rows: int) -> np.ndarray | None:
    """Return the per-row RMS standard error from the sidecar, or None if it is not recorded."""
    values = (metadata.get("standard_error") or {}).get("row_rms")
    if values is None:
        if metadata:
            logger.warning("The sidecar records no per-row RMS standard error (row_rms); the "
                           "identity prediction is not corrected for the table's noise.")
        return None
    values = np.asarray(values, dtype=np.float64)
    return values if values.shape == (num_rows,) else None


def _run_identity(
    loaded: Any,
    schedule: VPSchedule,
    eta: np.ndarray,
    data: str,
    points: int,
    repeats: int,
    seed: int,
    batch_size: int,
    row_rms_se: np.ndarray | None,
) -> list[IdentityRow]:
    from calibexport.calibration_tables.data import load_data
    from calibexport.models.eps_adapter import as_eps_network
    from calibexport.runtime.eta_table import EtaTable, check_compatible

    channels, resolution, _ = loaded.spec.image_shape
    check_compatible(EtaTable(values=eta), loaded.spec.image_shape, len(eta))
    images = load_data(data, channels=channels, resolution=resolution)
    network = as_eps_network(loaded.module, loaded.spec.prediction_type, schedule)
    timesteps = identity_timesteps(len(eta), points)
    logger.info("Checking the loss identity at %d timesteps on %d held-out images x %d noise "
                "draws.", len(timesteps), len(images), repeats)
    return check_identity(network, schedule, eta, images, timesteps=timesteps, repeats=repeats,
                          seed=seed, batch_size=batch_size, row_rms_se=row_rms_se)


def plot_norms(path: Path, summary: dict[str, Any]) -> None:
    """Plot (1/2)||eta_t||^2 and g(t)^2 / (2 sigma_t^2) ||eta_t||^2 against t (log scale)."""
    t = np.asarray(summary["t"])
    figure = _figure(figsize=(10, 3.8))
    left, right = figure.subplots(1, 2)
    left.plot(t, summary["half_squared_norm"], color="C0", label=HALF_NORM_LABEL)
    if "half_squared_se_norm" in summary:
        left.plot(t, summary["half_squared_se_norm"], color="C3", linestyle="--",
                  label=r"$\frac{1}{2}\Vert SE_t\Vert^2$ (Monte Carlo noise)")
    left.set(yscale="log", xlabel="t", ylabel="eps units, sum over pixels",
             title=HALF_NORM_LABEL)
    left.legend(fontsize=8)
    right.plot(t, summary["likelihood_weighted"], color="C1")
    right.set(yscale="log", xlabel="t",
              title=r"$\frac{g(t)^2}{2\sigma_t^2}\Vert\eta_t\Vert^2$ (likelihood weighting)")
    right.text(0.98, 0.95, f"integral over t: {summary['likelihood_bound_decrease']:.3g}",
               transform=right.transAxes, ha="right", va="top", fontsize=8)
    for axes in (left, right):
        axes.grid(True, which="major", alpha=0.3)
    figure.savefig(path, dpi=120)


def plot_heatmaps(path: Path, eta: np.ndarray, rows: list[int], t: np.ndarray) -> None:
    """Draw eta_k of each channel at ``rows`` as heat maps, each with its own symmetric scale."""
    for row in rows:
        if not 0 <= row < len(eta):
            raise CalibexportError(
                f"heat map row {row} is outside the table's rows 0..{len(eta) - 1}."
            )
    channels = eta.shape[1]
    figure = _figure(figsize=(2.3 * len(rows), 2.2 * channels + 0.4))
    axes = figure.subplots(channels, len(rows), squeeze=False)
    for column, row in enumerate(rows):
        for channel in range(channels):
            image = eta[row, channel]
            limit = float(np.abs(image).max()) or 1.0
            panel = axes[channel, column]
            mappable = panel.imshow(image, cmap="RdBu_r", vmin=-limit, vmax=limit)
            panel.set_xticks([])
            panel.set_yticks([])
            if channel == 0:
                panel.set_title(f"k = {row} (t = {t[row]:.3f})", fontsize=9)
            if column == 0 and channels > 1:
                panel.set_ylabel(f"channel {channel}")
            figure.colorbar(mappable, ax=panel, shrink=0.8)
    figure.savefig(path, dpi=120)


def plot_identity(path: Path, identity: list[IdentityRow]) -> None:
    """Plot the measured loss decrease with 2-SE bars against the predicted decrease."""
    timesteps = np.array([row.timestep for row in identity])
    figure = _figure(figsize=(6.5, 3.8))
    axes = figure.subplots()
    axes.errorbar(timesteps, [row.decrease for row in identity],
                  yerr=[2 * row.decrease_se for row in identity], fmt="o", markersize=4,
                  capsize=2, label="measured decrease (2 SE)")
    axes.plot(timesteps, [row.half_squared_norm for row in identity], color="C2",
              label=HALF_NORM_LABEL)
    if identity[0].noise_correction is not None:
        predicted = np.array([row.predicted for row in identity])
        spread = np.array([2 * row.predicted_se for row in identity])
        axes.plot(timesteps, predicted, color="C1", linestyle="--",
                  label=r"$\frac{1}{2}\Vert\eta_t\Vert^2 - \Vert SE_t\Vert^2$")
        axes.fill_between(timesteps, predicted - spread, predicted + spread, color="C1",
                          alpha=0.2)
    axes.axhline(0.0, color="black", linewidth=0.6)
    axes.set(xlabel="model input time k", ylabel="loss decrease per image (eps units)",
             title="Calibration: held-out loss decrease")
    axes.set_yscale("symlog", linthresh=1e-3)
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=120)


def _figure(figsize: tuple[float, float]) -> Any:
    """Return a matplotlib Figure drawn by the Agg canvas, without pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(figure)
    return figure
