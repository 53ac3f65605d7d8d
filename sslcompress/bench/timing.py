"""The interleaved timing harness lives in `sslcompress.runtime.timing`; these names stay for older imports."""

from __future__ import annotations

from ..runtime.timing import (
                              BOOTSTRAP,
                              CI_LEVEL,
                              MAX_CALLS,
                              MIN_ROUNDS,
                              RoundProgress,
                              Timing,
                              bootstrap_ratio,
                              calibrate,
                              interleaved,
                              quantile,
                              rounds,
                              timings,
)

__all__ = ["BOOTSTRAP", "CI_LEVEL", "MAX_CALLS", "MIN_ROUNDS", "RoundProgress", "Timing", "bootstrap_ratio",
           "calibrate", "interleaved", "quantile", "rounds", "timings"]
