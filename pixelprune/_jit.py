"""Optional numba compilation for the few plain loops of the core library.

The selectors' tau > 0 scan, the one-axis bicubic resize and the block hash are
written as plain Python loops over numpy arrays. With numba installed they are
compiled on first use; without it, the callers take their vectorised numpy paths,
which give the same results, slower.
"""

from __future__ import annotations

import threading


class Kernels:
    """Named functions of one module, compiled with numba on first use (once, even with
    concurrent callers). `helpers` are functions the kernels call through the module's
    globals: they are compiled first and rebound there, so the kernels find them compiled."""

    def __init__(self, namespace: dict, kernels: dict[str, str], helpers: tuple[str, ...] = ()):
        self._namespace = namespace  # the owning module's globals()
        self._names = dict(kernels)  # public kernel name -> function name in the module
        self._helpers = tuple(helpers)
        self._compiled: dict[str, object] | None = None  # None until the first load()
        self._lock = threading.Lock()
        self.disabled = False  # True: behave as if numba were missing (benchmarks compare paths)

    def load(self) -> dict[str, object] | None:
        """The compiled kernels by name, or None when numba is not installed (or disabled)."""
        if self.disabled:
            return None
        with self._lock:
            if self._compiled is None:
                self._compiled = self._compile()
        return self._compiled or None

    def __getitem__(self, name: str):
        compiled = self.load()
        if compiled is None:
            raise RuntimeError("numba kernels are not available")
        return compiled[name]

    def _compile(self) -> dict[str, object]:
        try:
            import numba
        except ImportError:
            return {}
        jit = numba.njit(cache=True, nogil=True, boundscheck=False)
        for helper in self._helpers:
            self._namespace[helper] = jit(self._namespace[helper])
        return {name: jit(self._namespace[func]) for name, func in self._names.items()}
