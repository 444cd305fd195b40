"""eta estimation (torch), the eta table file format, and the data sources for estimation."""

from calibexport.calibration_tables.data import describe_data, load_data, load_digits
from calibexport.calibration_tables.estimate import (
    DEFAULT_ESTIMATOR,
    ESTIMATORS,
    EtaEstimate,
    estimate_eta,
    row_standard_error_summary,
)
from calibexport.calibration_tables.table_io import build_sidecar, save_eta_table

__all__ = [
    "DEFAULT_ESTIMATOR",
    "ESTIMATORS",
    "EtaEstimate",
    "build_sidecar",
    "describe_data",
    "estimate_eta",
    "load_data",
    "load_digits",
    "row_standard_error_summary",
    "save_eta_table",
]
