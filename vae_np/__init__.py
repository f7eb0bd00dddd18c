"""vae_np: a variational autoencoder with hand-written backprop on NumPy or CuPy.

The public API, by module (each named for the concept it implements):

- ``backend``: :func:`get_backend` -- NumPy, CuPy or array-api-strict, and a dtype;
- ``layers``: Linear, ReLU, LeakyReLU, Tanh, Sigmoid, Softplus, MLP;
- ``conv``: Conv2d, MaxPool2d, Upsample, Flatten, Unflatten; ``networks``: Sequential and
  the convolutional encoder and decoder of the starting example;
- ``losses``: KL terms and the Gaussian / Bernoulli negative log-likelihoods;
- ``model``: :class:`VAE`;
- ``objectives``: the negative ELBO and the importance-weighted bound, reparameterisation;
- ``optim``: :class:`Adam`, :class:`SGD`, :func:`clip_grad_norm`;
- ``gradcheck``: finite-difference checks of any layer, loss or the whole model;
- ``saving``: :func:`save_model` / :func:`load_model` (a model-only file or a trainer checkpoint);
- ``interop``: export to ONNX, safetensors and a PyTorch state_dict, and import back
  (``vae_np.interop.export_model``, ``import_model``; not imported here).
"""

from . import conv, gradcheck, layers, losses, networks
from .backend import Backend, BackendUnavailableError, get_backend, use_fast_paths
from .model import VAE, ELBOTerms
from .objectives import reparameterize, reparameterize_backward
from .optim import SGD, Adam, clip_grad_norm
from ._version import __version__
from .saving import load_model, save_model

__all__ = [
    "Adam", "Backend", "BackendUnavailableError", "ELBOTerms", "SGD", "VAE",
    "clip_grad_norm", "conv", "get_backend", "load_model", "save_model", "gradcheck", "layers",
    "losses", "networks",
    "reparameterize", "reparameterize_backward", "use_fast_paths", "__version__",
]
