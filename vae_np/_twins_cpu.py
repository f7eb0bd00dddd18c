"""The compiled CPU twins of the ops (numba), keyed by op name: see ``backend.fast_twin``.

A leaf: it imports nothing from the package. Loaded by ``backend`` on the first op called
on a NumPy array; importing it fails with ImportError(name="numba") when numba is missing,
and the references run.
"""

from __future__ import annotations

import numba  # noqa: F401  (the twins below are compiled with it)

#: op name ("module.qualname") -> twin taking the reference's arguments.
TWINS: dict = {}
