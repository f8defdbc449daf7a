"""BLAS thread counts inside the iterative eigensolvers.

The drivers interleave a few large products (``A @ Z`` and the triangular solves with the Cholesky
factor: ``d × d`` times ``d × b``) and mid-size ones (Gram-Schmidt and residual products ``(d, n) ×
(n, c)`` against a basis of a few hundred columns) with many small BLAS/LAPACK calls (QR and Gram
matrices of ``d × b`` blocks, ``eigh`` of the projected matrix). OpenBLAS splits every call over all
its threads; for the small calls the synchronization costs more than the work. So a driver runs its
own calls on one thread (:func:`driver_threads`) and gives the products the caller's thread count back
(:func:`wide`; :func:`rqcore._blas.gemm` does so for products of at least ``2·10⁷`` flops).

Every call that may run on several threads goes through SciPy's BLAS: NumPy and SciPy wheels bundle one
OpenBLAS each, and after a threaded call an OpenBLAS's workers busy-wait for 50-100 ms, during which a
threaded call into the other copy runs 2-5× slower (2 cores: a SciPy ``gemm`` of ``4096² × 4096 × 32``
took 95 ms 1-5 ms after a threaded NumPy product, 17-20 ms when both were quiet). Measured that way —
one library, no interference — two threads pay from ``d = 512`` on (2 cores, cold / warm solves,
1 → 2 threads allowed: d = 512, k = 32 16.7 → 15.1 / 12.0 → 10.9 ms; d = 1024, k = 128 (LAPACK)
165 → 123 / 151 → 113 ms; d = 1536, k = 32 158 → 124 / 118 → 87 ms) but not below (d = 128, k = 8:
1.8 → 2.1 ms). An earlier version measured two threads as slower up to d = 2048; those numbers were
taken with NumPy products in between and showed the interference, not the threads. With one BLAS
thread, or without threadpoolctl, both context managers are no-ops.

The thread count is process-wide: concurrent solves share it. The first solve to enter saves the
caller's counts and the last to leave restores them, so concurrent calls never leave the process with
a changed setting (they only see each other's count while both run).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

#: Matrices of this dimension or larger get the caller's thread count in :func:`wide`.
WIDE_MIN_DIM = 512

_lock = threading.Lock()
_local = threading.local()
_libraries: list[Any] | None = None
_saved: list[int] = []
_depth = 0


def _blas_libraries() -> list[Any]:
    global _libraries
    if _libraries is None:
        try:
            from threadpoolctl import ThreadpoolController

            controller = ThreadpoolController()
            _libraries = [lib for lib in controller.lib_controllers if lib.user_api == "blas"]
        except Exception:  # pragma: no cover - threadpoolctl missing or unable to inspect
            _libraries = []
    return _libraries


@contextlib.contextmanager
def driver_threads(dim: int) -> Iterator[None]:
    """Run the enclosed driver on a ``dim × dim`` problem with single-threaded BLAS (restored on exit);
    inside it, :func:`wide` restores the caller's count when ``dim ≥ WIDE_MIN_DIM``."""
    global _depth, _saved
    outer_widen = getattr(_local, "widen", False)
    _local.widen = dim >= WIDE_MIN_DIM
    libraries = _blas_libraries()
    with _lock:
        if _depth == 0:
            _saved = [int(lib.get_num_threads()) for lib in libraries]
        _depth += 1
        narrow = any(n > 1 for n in _saved)
        if narrow:
            for lib in libraries:
                lib.set_num_threads(1)
    try:
        yield
    finally:
        _local.widen = outer_widen
        with _lock:
            _depth -= 1
            if _depth == 0 and narrow:
                for lib, n in zip(libraries, _saved, strict=True):
                    lib.set_num_threads(n)


@contextlib.contextmanager
def wide() -> Iterator[None]:
    """Inside :func:`driver_threads`: the caller's thread count for one large product (re-entrant:
    only the outermost ``wide`` of a thread switches)."""
    nested = getattr(_local, "wide_depth", 0)
    if (
        nested
        or _depth == 0
        or not getattr(_local, "widen", False)
        or not any(n > 1 for n in _saved)
    ):
        _local.wide_depth = nested + 1
        try:
            yield
        finally:
            _local.wide_depth = nested
        return
    libraries = _blas_libraries()
    for lib, n in zip(libraries, _saved, strict=True):
        lib.set_num_threads(n)
    _local.wide_depth = 1
    try:
        yield
    finally:
        _local.wide_depth = 0
        if _depth > 0:
            for lib in libraries:
                lib.set_num_threads(1)


def widens() -> bool:
    """Whether :func:`wide` would change the thread count here (inside a driver on a large problem
    whose caller allows several threads). Hot loops test it once instead of entering ``wide`` per
    call (about 1.5 µs each, even as a no-op)."""
    return bool(
        getattr(_local, "wide_depth", 0) == 0
        and _depth > 0
        and getattr(_local, "widen", False)
        and any(n > 1 for n in _saved)
    )


def caller_threads() -> int:
    """The caller's BLAS thread count (outside any driver: the current setting)."""
    if _depth > 0:
        return max(_saved, default=1)
    return current_threads()


def current_threads() -> int:
    """The BLAS thread count in effect now (inside a driver: 1, or the caller's count within
    :func:`wide`)."""
    return max((int(lib.get_num_threads()) for lib in _blas_libraries()), default=1)
