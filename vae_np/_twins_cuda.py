"""The CUDA twins of the ops (CuPy kernels), keyed by op name: see ``backend.fast_twin``.

A leaf: it imports nothing from the package; CuPy is imported by the twins themselves,
so this module loads (and its sources compile with NVRTC in the tests) without a GPU.
"""

from __future__ import annotations

#: op name ("module.qualname") -> twin taking the reference's arguments.
TWINS: dict = {}
