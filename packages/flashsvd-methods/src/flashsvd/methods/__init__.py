"""flashsvd.methods — SVD-family factorization methods, calibration statistics and rank budgets.

See docs/architecture.md for the shared conventions (u/v layout, keep_ratio, per-head layout).
"""

from flashsvd.methods.__about__ import __version__
from flashsvd.methods.api import factorize
from flashsvd.methods.ars import ARSResult, ars_select_ranks, layer_spectrum
from flashsvd.methods.calibration import (
    CalibrationStats,
    LayerStatistics,
    StatisticsCollector,
    collect_fisher,
    collect_statistics,
)
from flashsvd.methods.errors import (
    CalibrationMissingError,
    FlashSVDMethodError,
    InvalidKeepRatioError,
    InvalidRankError,
    NonFiniteStatisticsError,
    ShapeError,
    UnknownMethodError,
)
from flashsvd.methods.factorization import Factorization
from flashsvd.methods.ranks import (
    LayerShape,
    RankAllocation,
    RankPolicy,
    allocate_by_curves,
    allocate_by_sensitivity,
    allocate_ranks,
    asvd_sensitivity,
    load_ranks,
    minimum_keep_fraction,
    per_module_ranks,
    per_type_ranks,
    round_ranks,
    save_ranks,
    search_keep_ratio_for_loss,
    spectrum_curves,
    unified_ranks,
    uniform_keep_ratio,
)
from flashsvd.methods.registry import METHODS, MethodSpec, get_method, register_method
from flashsvd.methods.reproducible import ReproducibleSum
from flashsvd.methods.sensitivity import loss_curve
from flashsvd.methods.sequential import calibrate_blockwise

__all__ = [
    "__version__",
    "ARSResult",
    "CalibrationMissingError",
    "CalibrationStats",
    "Factorization",
    "FlashSVDMethodError",
    "InvalidKeepRatioError",
    "InvalidRankError",
    "LayerShape",
    "LayerStatistics",
    "ReproducibleSum",
    "METHODS",
    "MethodSpec",
    "NonFiniteStatisticsError",
    "RankAllocation",
    "RankPolicy",
    "ShapeError",
    "StatisticsCollector",
    "UnknownMethodError",
    "allocate_by_curves",
    "allocate_by_sensitivity",
    "allocate_ranks",
    "ars_select_ranks",
    "asvd_sensitivity",
    "calibrate_blockwise",
    "collect_fisher",
    "collect_statistics",
    "factorize",
    "get_method",
    "layer_spectrum",
    "load_ranks",
    "minimum_keep_fraction",
    "loss_curve",
    "per_module_ranks",
    "per_type_ranks",
    "register_method",
    "round_ranks",
    "save_ranks",
    "search_keep_ratio_for_loss",
    "spectrum_curves",
    "uniform_keep_ratio",
    "unified_ranks",
]
