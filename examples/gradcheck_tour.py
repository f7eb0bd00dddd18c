"""A tour of vae_np.gradcheck: every hand-written gradient against central differences.

Runs, in float64 on small sizes:

1. every layer (``check_layer``): Linear, ReLU, LeakyReLU, Tanh, Sigmoid, Softplus, MLP;
2. every loss (``check_loss``): both KL terms, the three negative log-likelihoods;
3. the whole VAE for each decoder and S in {1, 3}: element-wise (``check_vae``) and
   directional (``check_vae_directional``);
4. the step size h: the truncation / round-off trade-off, in float64 and float32;
5. two gradients broken on purpose, and the check catching them;
6. the importance-weighted bound (``VAE(objective="iwae", samples=k)``) for each decoder and
   k in {1, 5}: its weights, the k = 1 identity with the sampled-KL ELBO, and the same
   element-wise and directional checks (docs/09-iwae.md).

Each table shows, per checked array, the norm-wise relative error
||analytic - numerical|| / (||analytic|| + ||numerical||) and the analytic and numerical
values at the entry where they differ most. The derivations are in docs/ (start at
docs/README.md); the measure and the tolerance are explained in
docs/08-gradient-checking.md.

    python examples/gradcheck_tour.py            # everything, every entry (a few seconds)
    python examples/gradcheck_tour.py --quick    # fewer entries of the VAE, no h sweep

Exit status 0 when every correct gradient passes and every deliberate break is caught.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np

try:
    import vae_np
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import vae_np

from vae_np import VAE, get_backend, losses
from vae_np import objectives
from vae_np.gradcheck import (DEFAULT_STEP, DEFAULT_TOLERANCE, check_directional,
                              check_layer, check_loss, check_vae, check_vae_directional,
                              numerical_partial)
from vae_np.layers import MLP, LeakyReLU, Linear, ReLU, Sigmoid, Softplus, Tanh

DECODERS = ("bernoulli", "gaussian", "gaussian-fixed")


class Tally:
    """Collects pass/fail of every check so the summary (and the exit status) is honest."""

    def __init__(self):
        self.correct: list[tuple[str, float, bool]] = []
        self.breaks: list[tuple[str, float, bool]] = []

    def report(self, report, label: str | None = None) -> None:
        print(report.table())
        print()
        self.correct.append((label or report.title, report.max_rel_error, report.passed))

    def directional(self, result, label: str) -> None:
        ok = "yes" if result.passed else "NO"
        print(f"{label}: <grad, r> = {result.analytic:.10e}, "
              f"(f(x+hr) - f(x-hr))/2h = {result.numerical:.10e}, "
              f"rel. error {result.rel_error:.2e}  ok {ok}")
        self.correct.append((label, result.rel_error, result.passed))


def heading(text: str) -> None:
    print()
    print("=" * len(text))
    print(text)
    print("=" * len(text))
    print()


# --------------------------------------------------------------------------------------
# 1. Layers


def tour_layers(tally: Tally, seed: int) -> None:
    heading("1. Layers: check_layer(layer, x) with f = sum(forward(x) * dout)")
    backend = get_backend("numpy", "float64")
    rng = np.random.default_rng(seed)
    # Standard-normal inputs: none lands within h of ReLU's kink at 0 (where the
    # derivative does not exist and a central difference straddles it).
    x = backend.asarray(rng.standard_normal((4, 5)))
    layers = [
        Linear(5, 3, backend, rng),
        ReLU(backend),
        LeakyReLU(backend, slope=0.1),
        Tanh(backend),
        Sigmoid(backend),
        Softplus(backend),
    ]
    for layer in layers:
        tally.report(check_layer(layer, x, seed=seed))
    for activation in ("relu", "tanh"):
        mlp = MLP((5, 4, 4, 3), backend, rng, activation=activation)
        # Biases start at zero. If one example's first hidden layer is all zeros (all its
        # units dead), the next Linear outputs exactly b = 0 for it: right on ReLU's kink,
        # where the one-sided slopes are 0 and 1 and the central difference reports their
        # mean. Random biases move every pre-activation off the kink (docs/08).
        for linear in mlp.linears:
            linear.params["b"][...] = backend.asarray(0.1 * rng.standard_normal(linear.out_features))
        report = check_layer(mlp, x, seed=seed)
        report.title = f"MLP 5-4-4-3 ({activation}) gradient check"
        tally.report(report)


# --------------------------------------------------------------------------------------
# 2. Losses


def tour_losses(tally: Tally, seed: int) -> None:
    heading("2. Losses: check_loss(loss_fn, inputs, wrt=...) on the summed loss")
    backend = get_backend("numpy", "float64")
    rng = np.random.default_rng(seed)

    def normal(shape, scale=1.0):
        return backend.asarray(scale * rng.standard_normal(shape))

    n, d, c = 4, 3, 6
    mu, logvar = normal((n, d)), normal((n, d))
    tally.report(check_loss(losses.kl_standard_normal, {"mu": mu, "logvar": logvar},
                            wrt=("mu", "logvar")))
    four = {"mu_q": mu, "logvar_q": logvar, "mu_p": normal((n, d)), "logvar_p": normal((n, d))}
    tally.report(check_loss(losses.kl_diagonal_gaussians, four, wrt=tuple(four)))
    # KL(N(0, I) || N(mu, Sigma)): the same function with q fixed at the standard normal.
    reverse = {"mu_q": backend.zeros((n, d)), "logvar_q": backend.zeros((n, d)),
               "mu_p": normal((n, d)), "logvar_p": normal((n, d))}
    report = check_loss(losses.kl_diagonal_gaussians, reverse, wrt=tuple(reverse))
    report.title = "KL(N(0,I) || N(mu_p, Sigma_p)) gradient check"
    tally.report(report)

    x = backend.asarray(rng.uniform(size=(n, c)))
    tally.report(check_loss(losses.gaussian_nll,
                            {"x": x, "mu": normal((n, c)), "logvar": normal((n, c))},
                            wrt=("mu", "logvar")))
    tally.report(check_loss(losses.gaussian_fixed_nll, {"x": x, "mu": normal((n, c))},
                            wrt=("mu",), variance=0.00025 * 784 / 2))
    tally.report(check_loss(losses.bernoulli_nll, {"x": x, "logits": normal((n, c), 3.0)},
                            wrt=("logits",)))
    # Logits of +-40 to +-60: a naive -x ln s - (1-x) ln(1-s) gives inf/nan here.
    big = backend.asarray(rng.choice([-1.0, 1.0], size=(n, c)) * rng.uniform(40, 60, (n, c)))
    binary = backend.asarray((rng.uniform(size=(n, c)) < 0.5).astype(np.float64))
    report = check_loss(losses.bernoulli_nll, {"x": binary, "logits": big}, wrt=("logits",))
    report.title = "bernoulli_nll, logits of size 40-60"
    tally.report(report)


# --------------------------------------------------------------------------------------
# 3. The whole model


def tour_vae(tally: Tally, seed: int, max_entries: int | None) -> None:
    what = "every entry" if max_entries is None else f"{max_entries} random entries per array"
    heading(f"3. The whole VAE: check_vae ({what}) and check_vae_directional")
    for decoder in DECODERS:
        for samples in (1, 3):
            model = VAE(input_dim=6, hidden=(5,), latent_dim=2, decoder=decoder,
                        samples=samples, dtype="float64", seed=seed)
            data_rng = np.random.default_rng(seed)
            x = model.backend.asarray(data_rng.uniform(size=(3, 6)))
            eps = model.backend.rng(seed).normal((samples, 3, 2))  # fixed noise: f is deterministic
            tally.report(check_vae(model, x, eps, max_entries=max_entries, seed=seed))
            tally.directional(check_vae_directional(model, x, eps, seed=seed),
                              f"VAE ({decoder}, S={samples}) directional check")
            print()


# --------------------------------------------------------------------------------------
# 4. Choosing h


def tour_step_size(seed: int) -> None:
    heading("4. The step h: truncation error O(h^2) against round-off error ~ eps_mach |f| / h")
    print("One partial derivative of the summed Bernoulli NLL, d/dl_0 = sigmoid(l_0) - x_0,")
    print("by central differences, relative error against the closed form:\n")
    print(f"{'h':>8} {'float64':>12} {'float32':>12}")
    rng = np.random.default_rng(seed)
    x_host = rng.uniform(size=(4, 6))
    l_host = 3.0 * rng.standard_normal((4, 6))
    exact = 1.0 / (1.0 + np.exp(-l_host[0, 0])) - x_host[0, 0]
    for h in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-10, 1e-12):
        row = []
        for dtype in ("float64", "float32"):
            backend = get_backend("numpy", dtype)
            x, logits = backend.asarray(x_host), backend.asarray(l_host)

            def f() -> float:
                return float(losses.bernoulli_nll(x, logits, reduction="sum")[0])

            numerical = numerical_partial(f, logits, (0, 0), h)
            row.append(abs(numerical - exact) / abs(exact))
        print(f"{h:>8.0e} {row[0]:>12.1e} {row[1]:>12.1e}")
    print(f"\nvae_np uses h = {DEFAULT_STEP:.0e} in float64 and tolerance {DEFAULT_TOLERANCE:.0e}.")
    print("float32 never gets near 1e-6 at any h: that is why the checks require float64.")


# --------------------------------------------------------------------------------------
# 5. Breaking a gradient on purpose


class ForgetfulSigmoid(Sigmoid):
    """A classic slip: dy/dx = y instead of y (1 - y)."""

    def backward(self, dout):
        return dout * self._cached()


def reparameterize_backward_without_half(dz, logvar, eps):
    """A second classic slip: dz/dlogvar = exp(logvar/2) eps, the chain rule's 1/2 lost."""
    xp = vae_np.backend.namespace_of(dz)
    return xp.sum(dz, axis=0), xp.sum(dz * eps, axis=0) * xp.exp(0.5 * logvar)


@contextlib.contextmanager
def patched_reparameterize_backward(replacement):
    """Swap the function VAE.backward's objective calls, only inside this block (the ELBO's
    backward is one method on every path, so the patch is seen exactly where
    docs/05-whole-model.md shows it)."""
    original = objectives.reparameterize_backward
    objectives.reparameterize_backward = replacement
    try:
        yield
    finally:
        objectives.reparameterize_backward = original


def tour_breaks(tally: Tally, seed: int) -> None:
    heading("5. Broken on purpose: the check must say NO")
    backend = get_backend("numpy", "float64")
    x = backend.asarray(np.random.default_rng(seed).standard_normal((4, 5)))
    report = check_layer(ForgetfulSigmoid(backend), x, seed=seed)
    report.title = "Sigmoid whose backward forgot the (1 - y) factor"
    print(report.table())
    print()
    tally.breaks.append((report.title, report.max_rel_error, not report.passed))

    model = VAE(input_dim=6, hidden=(5,), latent_dim=2, decoder="bernoulli", dtype="float64",
                seed=seed)
    xb = model.backend.asarray(np.random.default_rng(seed).uniform(size=(3, 6)))
    eps = model.backend.rng(seed).normal((1, 3, 2))
    with patched_reparameterize_backward(reparameterize_backward_without_half):
        report = check_vae(model, xb, eps, max_entries=None, seed=seed)
        direction = check_vae_directional(model, xb, eps, seed=seed)
    report.title = "VAE whose reparameterisation backward lost the 1/2 in dz/dlogvar"
    print(report.table())
    print("Only the encoder's arrays fail: the decoder never sees d/dlogvar, so the check")
    print("points at the part of the chain that is wrong.")
    print(f"The directional check catches it too: rel. error {direction.rel_error:.2e}, "
          f"ok {'yes' if direction.passed else 'NO'}")
    print()
    tally.breaks.append((report.title, report.max_rel_error,
                         not report.passed and not direction.passed))


# --------------------------------------------------------------------------------------
# 6. The importance-weighted bound


def tour_iwae(tally: Tally, seed: int, max_entries: int | None) -> None:
    heading("6. The importance-weighted bound: VAE(objective='iwae', samples=k)")
    print("loss = -1/N sum_n [logsumexp_s ln w_{s,n} - ln k]; backward sends the normalised")
    print("weight w~_{s,n} / N into each ln w_{s,n} (docs/09-iwae.md).\n")
    for decoder in DECODERS:
        for k in (1, 5):
            # (the fixed-variance decoder with lambda = 0.5: its default lambda of 0.098
            # puts almost all the weight on one sample of this untrained model)
            model = VAE(input_dim=6, hidden=(5,), latent_dim=2, decoder=decoder, samples=k,
                        variance=0.5 if decoder == "gaussian-fixed" else None,
                        objective="iwae", dtype="float64", seed=seed)
            # Random biases: off ReLU's kink (section 1), and weights w~ far from uniform.
            bias_rng = np.random.default_rng(seed + 1)
            for linear in (*model.encoder.linears, *model.decoder.linears):
                linear.params["b"][...] = 0.5 * bias_rng.standard_normal(linear.out_features)
            x = model.backend.asarray(np.random.default_rng(seed).uniform(size=(3, 6)))
            eps = model.backend.rng(seed).normal((k, 3, 2))
            log_w = model.log_importance_weights(x, eps)           # (k, N), scipy-free
            weights = np.exp(log_w - log_w.max(axis=0))
            weights /= weights.sum(axis=0)
            terms = model.loss(x, eps=eps)
            if k == 1:
                print(f"{decoder}, k = 1: -loss = {-float(terms.loss):.10f} = mean ln w "
                      f"= {float(log_w.mean()):.10f} (the ELBO with a sampled KL term)")
            else:
                print(f"{decoder}, k = {k}: weights w~ of the first example: "
                      + " ".join(f"{w:.3f}" for w in weights[:, 0]))
            report = check_vae(model, x, eps, max_entries=max_entries, seed=seed)
            report.title = f"IWAE ({decoder}, k={k}, {report.path} path) gradient check"
            tally.report(report)
            tally.directional(check_vae_directional(model, x, eps, seed=seed),
                              f"IWAE ({decoder}, k={k}) directional check")
            print()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="check 10 random entries per VAE parameter array and skip the h sweep")
    parser.add_argument("--seed", type=int, default=0, help="seed for inputs, weights and noise")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    tally = Tally()
    tour_layers(tally, args.seed)
    tour_losses(tally, args.seed)
    tour_vae(tally, args.seed, max_entries=10 if args.quick else None)
    if not args.quick:
        tour_step_size(args.seed)
    tour_breaks(tally, args.seed)
    tour_iwae(tally, args.seed, max_entries=10 if args.quick else None)

    heading("Summary")
    passed = sum(ok for _, _, ok in tally.correct)
    worst_name, worst, _ = max(tally.correct, key=lambda item: item[1])
    caught = sum(ok for _, _, ok in tally.breaks)
    print(f"correct gradients: {passed} of {len(tally.correct)} checks passed "
          f"(worst relative error {worst:.1e}, {worst_name}; tolerance {DEFAULT_TOLERANCE:.0e})")
    print(f"deliberate breaks: {caught} of {len(tally.breaks)} caught "
          f"(smallest relative error {min(err for _, err, _ in tally.breaks):.1e})")
    print(f"time: {time.perf_counter() - start:.1f} s")
    return 0 if passed == len(tally.correct) and caught == len(tally.breaks) else 1


if __name__ == "__main__":
    sys.exit(main())
