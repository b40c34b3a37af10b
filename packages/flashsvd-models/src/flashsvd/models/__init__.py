"""flashsvd.models — convert Hugging Face models to low-rank form, run them, save and reload them.

Public API (see docs/architecture.md): :func:`compress`, :class:`CompressionReport`,
:func:`set_backend`, :func:`save_compressed`, :func:`load`, :func:`merge_to_dense`,
:class:`LowRankLinear`, the adapters registry, the measurement helpers in
:mod:`flashsvd.models.measure` and CUDA-graph runners in :mod:`flashsvd.models.graphs`
(:class:`GraphedForward`, :func:`generate_greedy`).

Importing this package registers the ``flashsvd`` quantization method with ``transformers`` so that
``AutoModel*.from_pretrained(folder)`` rebuilds compressed checkpoints.
"""

from flashsvd.models.__about__ import __version__
from flashsvd.models.adapters import ADAPTERS, Adapter, Target, get_adapter
from flashsvd.models.backend import get_backend, set_backend
from flashsvd.models.cache import RankSpaceCacheLayer
from flashsvd.models.checkpoint import CheckpointError, load, merge_to_dense, save_compressed
from flashsvd.models.compress import CompressionReport, compress, count_parameters, is_compressed
from flashsvd.models.graphs import GraphedForward, generate_greedy
from flashsvd.models.hf_integration import register as _register_with_transformers
from flashsvd.models.lowrank import FusedLinear, LowRankLinear

_register_with_transformers()

__all__ = [
    "ADAPTERS",
    "Adapter",
    "CheckpointError",
    "CompressionReport",
    "FusedLinear",
    "GraphedForward",
    "LowRankLinear",
    "RankSpaceCacheLayer",
    "Target",
    "__version__",
    "compress",
    "count_parameters",
    "generate_greedy",
    "get_adapter",
    "get_backend",
    "is_compressed",
    "load",
    "merge_to_dense",
    "save_compressed",
    "set_backend",
]
