"""Peak resident memory of one step, for benchmarks that run each measurement in a fresh subprocess."""

import ctypes
import gc
import resource
from contextlib import contextmanager


def status_kib(field: str) -> int | None:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so that the RSS baseline holds no reusable slack."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


@contextmanager
def peak_rss_above_baseline():
    """Measure the peak RSS reached inside the block above the RSS at its start.

    Yields a dict that is filled on exit with ``peak_delta_mb``, ``baseline_mb`` and ``method``.
    """
    result: dict = {}
    gc.collect()
    release_free_heap()
    reset = reset_peak_rss()
    baseline_kib = status_kib("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield result
    peak_kib = status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result["peak_delta_mb"] = (peak_kib - baseline_kib) * 1024 / 1e6
    result["baseline_mb"] = baseline_kib * 1024 / 1e6
    result["method"] = "VmHWM reset via /proc/self/clear_refs" if reset else "ru_maxrss after build (lower bound)"
