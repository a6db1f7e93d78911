"""Machine and process facts recorded next to every benchmark figure (shared by bench/*.py).

Benchmarks run as scripts (``python bench/attention.py``), so their folder is on ``sys.path``
and they import this module as ``machine``.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import os
import platform
import subprocess


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def llc_mib() -> float | None:
    """Largest cache level sysfs reports for cpu0, in MiB (a VM may see less than the host)."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    best = None
    try:
        entries = [e for e in os.listdir(base) if e.startswith("index")]
    except OSError:
        return None
    for entry in entries:
        try:
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
            size = float(text.rstrip("KMG")) * {"K": 1 / 1024, "M": 1, "G": 1024}[text[-1]]
        except (OSError, ValueError, KeyError, IndexError):
            continue
        best = size if best is None else max(best, size)
    return best


def proc_kib(path: str, key: str) -> int | None:
    """A ``key: N kB`` field of a /proc file (``/proc/meminfo``, ``/proc/self/status``)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def git_commit() -> str:
    """HEAD of the checkout the benchmark ran from, ``-dirty`` with uncommitted changes."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def extension_build() -> str:
    """File name and modification time of the compiled torchkvq extension that ran."""
    import importlib.util

    try:
        origin = importlib.util.find_spec("torchkvq._C").origin
        mtime = _dt.datetime.fromtimestamp(os.path.getmtime(origin), _dt.timezone.utc)
        return f"{os.path.basename(origin)} built {mtime.isoformat(timespec='seconds')}"
    except (ImportError, AttributeError, OSError, TypeError):
        return "unknown"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


_libc = None


def free_memory() -> None:
    """Collect garbage and give free malloc memory back to the OS, so that RSS is what is held."""
    global _libc
    gc.collect()
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
