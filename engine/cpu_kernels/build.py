"""Compile the C++ kernels on first use (torch.utils.cpp_extension.load) into a cache directory.

The library is built with -march=native for the CPU it runs on, so the cache key holds the CPU
model and flags besides the sources, flags and torch version: another CPU gets its own build.
The library has no torch headers (a plain C ABI, loaded with ctypes), so it builds in seconds.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.cpu_kernels.cpu_info import cpu_info

logger = logging.getLogger(__name__)

CSRC_DIR = Path(__file__).parent / "csrc"
SOURCES = ("api.cpp", "driver.cpp", "thread_pool.cpp", "kernels_avx2.cpp", "kernels_avx512.cpp", "kernels_amx.cpp", "compact.cpp")
HEADERS = ("driver.h", "gate_copies.h", "slice_ffn.h", "thread_pool.h", "vec_math.h")
CFLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-pthread", "-Wno-uninitialized",
          "-Wno-maybe-uninitialized")
STALE_LOCK_S = 600.0  # a build lock older than this was left by a killed build


class KernelBuildError(RuntimeError):
    """The C++ kernels could not be built or loaded (no compiler, a compile error, ...)."""


@dataclass(frozen=True)
class BuiltLibrary:
    lib: ctypes.CDLL
    path: Path
    seconds: float  # time to build (or find in the cache) and load


def cache_root() -> Path:
    configured = os.environ.get("SCHEINFER_KERNEL_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "scheinfer" / "kernels"


def build_key() -> str:
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update(name.encode())
        digest.update((CSRC_DIR / name).read_bytes())
    info = cpu_info()
    for part in (" ".join(CFLAGS), torch.__version__, platform.machine(), info.model_name,
                 " ".join(sorted(info.flags)), os.environ.get("CXX", "c++")):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _declare(lib: ctypes.CDLL) -> None:
    i64, i32 = ctypes.c_int64, ctypes.c_int
    lib.scheinfer_available_paths.restype = i32
    lib.scheinfer_last_error.restype = ctypes.c_char_p
    lib.scheinfer_set_tuning.argtypes = [ctypes.c_char_p, i64]
    lib.scheinfer_set_tuning.restype = i32
    lib.scheinfer_get_tuning.argtypes = [ctypes.c_char_p]
    lib.scheinfer_get_tuning.restype = i64
    lib.scheinfer_run.argtypes = [ctypes.c_void_p, i32, i32, i32]
    lib.scheinfer_run.restype = i32
    lib.scheinfer_submit.argtypes = [ctypes.c_void_p, i32, i32, i32, ctypes.c_void_p, i64]
    lib.scheinfer_submit.restype = i64
    lib.scheinfer_submit_routed.argtypes = [ctypes.c_void_p, ctypes.c_void_p, i32, ctypes.c_void_p, i32, i64,
                                            ctypes.c_void_p, ctypes.c_void_p, i64, i64, i64, i64, i32, i32,
                                            ctypes.c_void_p, i64, ctypes.c_void_p]
    lib.scheinfer_submit_routed.restype = i64
    lib.scheinfer_wait.argtypes = [i64, ctypes.c_void_p]
    lib.scheinfer_wait.restype = i32
    lib.scheinfer_job_path.argtypes = [ctypes.c_void_p, i32]
    lib.scheinfer_job_path.restype = i32
    lib.scheinfer_stream_read.argtypes = [ctypes.c_void_p, i64, i32]
    lib.scheinfer_stream_read.restype = i64
    lib.scheinfer_phase_ns.argtypes = [ctypes.c_void_p, i32]
    lib.scheinfer_phase_ns.restype = None
    lib.scheinfer_amx_probe.argtypes = [i64, i32, i32]
    lib.scheinfer_amx_probe.restype = ctypes.c_double
    ptr = ctypes.c_void_p
    lib.scheinfer_exponent_histogram.argtypes = [ptr, i64, i64, i64, ptr, i32]
    lib.scheinfer_exponent_histogram.restype = None
    lib.scheinfer_pack_exponents.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, i32]
    lib.scheinfer_pack_exponents.restype = None
    lib.scheinfer_pack_exceptions.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, i32]
    lib.scheinfer_pack_exceptions.restype = None
    lib.scheinfer_unpack_rows.argtypes = [ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i64, i64, ptr, i32]
    lib.scheinfer_unpack_rows.restype = None


def build_library() -> BuiltLibrary:
    """Build (or reuse from the cache) and load the kernels; raises KernelBuildError."""
    from torch.utils import cpp_extension

    start = time.perf_counter()
    key = build_key()
    build_dir = cache_root() / key
    name = f"scheinfer_cpu_kernels_{key}"
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        lock = build_dir / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink(missing_ok=True)
        path = cpp_extension.load(
            name=name,
            sources=[str(CSRC_DIR / s) for s in SOURCES],
            extra_cflags=list(CFLAGS),
            extra_ldflags=["-pthread"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
        lib = ctypes.CDLL(str(path))
        _declare(lib)
    except Exception as exc:  # compiler missing, compile error, ninja missing, load error
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KernelBuildError(f"{type(exc).__name__}: {first_line}") from exc
    return BuiltLibrary(lib, Path(path), time.perf_counter() - start)
