"""Neural-collapse metrics (theory.md 5), as pure functions of class statistics (any object
following :class:`ClassStatistics`, e.g. ``ncfast.ClassStats``) and, where needed, the
classifier, plus the streaming second-pass states some of them need:

- :mod:`.core`: NC1-NC4, CDNV (with a distance exponent) and the bias quantity;
- :mod:`.pairwise`: GNC2 (hyperspherical uniformity) and the class interference grid, tiled;
- :mod:`.duality`: per-class similarity and distance vectors, UNC3 and NC5;
- :mod:`.samples`: :class:`PerSampleStats` (cosine margin, nearest-class-mean accuracy,
  nuclear/Frobenius ratio) and :class:`FeatureMean` (the OOD mean of NC5).

The conventions (float64 arithmetic, ``global_mean``, ``classes``, errors) are those of
:mod:`ncfast.metrics.core`.
"""

from . import core
from .core import (
    ClassStatistics, EmptyClassError, NCMetrics, all_metrics, bias_norm, cdnv, equiangularity,
    equinorm, etf_distance, max_angle, nc1, nc1_trace, nc2_classifier, nc2_means, nc3_dual,
    nc3_gram, nc4)
from .duality import class_distances, class_similarities, nc5, unc3
from .pairwise import KernelStats, gnc2, interference_grid, interference_tiles
from .samples import FeatureMean, PerSampleStats

__all__ = sorted(core.__all__ + [
    "FeatureMean", "KernelStats", "PerSampleStats", "class_distances", "class_similarities",
    "gnc2", "interference_grid", "interference_tiles", "nc5", "unc3"])
