"""Quality checks written before builtin:toy existed (issues 16 and 17) and not yet measured on the shipped,
CPU-trained model: they run when DCUSTOM_QUALITY=1 is set, and join CI once their figures are measured
(each takes minutes, and a bar that does not hold yet must not block every other change from landing)."""

import os

import pytest

PENDING = pytest.mark.skipif(
    os.environ.get("DCUSTOM_QUALITY") != "1",
    reason="not yet measured on the shipped CPU-trained builtin:toy (issues 16/17); DCUSTOM_QUALITY=1 runs it")
