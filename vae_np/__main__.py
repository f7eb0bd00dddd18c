"""``python -m vae_np``: the ``vae-np`` command (:mod:`vae_np.cli`)."""

import sys

from .cli import main

sys.exit(main())
