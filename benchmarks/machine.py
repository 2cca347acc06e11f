"""The ``machine`` entry of a benchmark's JSON report: platform, CPU count and the load around the run.

Free of torch and faiss, so that a benchmark measuring its own memory does not pay for them here.
"""

from __future__ import annotations

import os
import platform
from typing import Any


def machine_info(load_before: float) -> dict[str, Any]:
    """Platform, processor, CPU count and the 1-minute load average before (given) and now (after the run)."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
