"""Train the vae_np VAE on MNIST (or your own data) and keep the model, the numbers and the
pictures: the same command as ``vae-np train`` (``vae_np.train_cli``), kept so that

    python examples/train_mnist.py                     # CPU, the starting configuration
    python examples/train_mnist.py --backend cupy      # NVIDIA GPU: pip install -e ".[gpu]"
    python examples/train_mnist.py --latent-dim 2 --out results/2d   # adds the 2-D maps
    python examples/train_mnist.py --resume            # continue the run in --out
    python examples/train_mnist.py --dataset my_data.npz --decoder gaussian   # your data
    python examples/train_mnist.py --architecture conv   # the starting example's conv net
    mpiexec -n 4 python examples/train_mnist.py --distributed          # 4 data-parallel ranks

keep working. ``--help`` lists every flag; the exit statuses are ``vae_np.train_cli``'s.
"""

from __future__ import annotations

import sys

from vae_np.train_cli import *  # noqa: F401,F403  (build_parser, CONFIG_FLAGS, ... for tests)
from vae_np.train_cli import main

if __name__ == "__main__":
    sys.exit(main())
