"""Process-level settings that cost time on every training step if left alone.

Importing Lightning sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1``, so that
``torch.cuda.is_available()`` asks NVML (the driver's management library) instead of
initialising CUDA, which would make later ``fork``s unsafe. On a machine without NVML's library
(a CPU-only machine with a CUDA build of torch, as in CI), torch then tries to load
``libnvidia-ml.so.1`` on every call, fails, and falls back to ``cudaGetDeviceCount``, the very
call the check was meant to avoid. ``torch.optim.Adam.step`` makes that call on every step
(``_accelerator_graph_capture_health_check``): 0.3 ms a step here, 3% of a ``vae_fashion``
training step, spent searching the library path for a file that is not there.
"""

from __future__ import annotations

import ctypes
import os

NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"
NVML_LIBRARY = "libnvidia-ml.so.1"


def skip_failing_nvml_probe() -> bool:
    """Turn the NVML-based CUDA check off where NVML cannot be loaded; True if it did.

    The answers of ``torch.cuda.is_available()`` and ``device_count()`` do not change: without
    the library torch already falls back to ``cudaGetDeviceCount`` on every call. Where the
    library loads, nothing is touched.
    """
    if os.environ.get(NVML_CHECK) != "1":
        return False
    try:
        ctypes.CDLL(NVML_LIBRARY)
    except OSError:
        os.environ[NVML_CHECK] = "0"
        return True
    return False
