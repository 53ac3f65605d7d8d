"""The MAC and parameter counter, under the name the package has always given it.

It lives in `sslcompress.finetune.counting`, beside the channel analysis it reads, so the training side
depends on nothing outside itself for its counts; this module only points there.
"""

from __future__ import annotations

from .finetune.counting import Counter, LayerCount, ModelCount, count

__all__ = ["Counter", "LayerCount", "ModelCount", "count"]
