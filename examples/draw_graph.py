"""Draw the VAE's computation graph, forward and backward, with the shape on every edge.

The shapes are not typed in: the script runs one ``VAE.loss`` and one ``VAE.backward`` of a
real model (the starting configuration, 784-512-512 encoder, latent 64, batch 32, with S = 3
samples so that the sample axis shows) and records the shape of every array that passes
between the functions the figure names. Each node names the function that computes it, as an
importable ``vae_np.`` name (``FUNCTIONS`` lists them; tests/test_learning.py imports each
one), so the figure follows the code.

    python examples/draw_graph.py                    # writes docs/images/vae_graph.png
    python examples/draw_graph.py --out graph.png

Only matplotlib is needed (boxes and arrows are matplotlib patches; no graphviz).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np

try:
    import vae_np  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae_np import VAE, use_fast_paths
from vae_np import objectives as objectives_module

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "images" / "vae_graph.png"

# The configuration whose shapes the figure shows.
CONFIG = dict(input_dim=784, hidden=(512, 512), latent_dim=64, samples=3, decoder="bernoulli")
BATCH = 32

# Every function the figure names, in the order a training step calls them.
FUNCTIONS = (
    "vae_np.model.VAE.loss",
    "vae_np.layers.MLP.forward",
    "vae_np.model.VAE._encoder_output",
    "vae_np.objectives.ELBO.forward",
    "vae_np.objectives.reparameterize",
    "vae_np.likelihoods.Bernoulli.nll",
    "vae_np.losses.bernoulli_nll",
    "vae_np.losses.kl_standard_normal",
    "vae_np.model.VAE.backward",
    "vae_np.objectives.ELBO.backward",
    "vae_np.layers.MLP.backward",
    "vae_np.objectives.reparameterize_backward",
    "vae_np.parameters.Parameters",
    "vae_np.optim.Adam.step",
)


# --------------------------------------------------------------------------------------
# The shapes, from a real training step


def _shape(a) -> tuple:
    return tuple(int(n) for n in a.shape)


@contextlib.contextmanager
def _traced(calls: dict):
    """Record the argument and result shapes of the functions VAE.loss and VAE.backward
    call: module functions are swapped for recording wrappers inside this block only."""
    originals = {name: getattr(objectives_module, name)
                 for name in ("reparameterize", "kl_standard_normal", "reparameterize_backward")}

    def recorder(name, function):
        def wrapper(*args, **kwargs):
            result = function(*args, **kwargs)
            calls.setdefault(name, []).append((args, result))
            return result
        return wrapper

    for name, function in originals.items():
        setattr(objectives_module, name, recorder(name, function))
    try:
        yield recorder
    finally:
        for name, function in originals.items():
            setattr(objectives_module, name, function)


def trace_shapes(model: VAE | None = None, n: int = BATCH, seed: int = 0) -> dict[str, tuple]:
    """Run one loss and backward of ``model`` (default: ``CONFIG``) on a random batch of
    ``n`` and return the shape of every array the figure labels, by name."""
    model = model or VAE(**CONFIG, seed=seed)
    x = np.random.default_rng(seed).random((n, model.input_dim))
    calls: dict = {}
    with _traced(calls) as recorder, use_fast_paths(False):
        # the methods, on this model only (instance attributes shadow the class's)
        model.encoder.forward = recorder("encoder.forward", model.encoder.forward)
        model.decoder.forward = recorder("decoder.forward", model.decoder.forward)
        model.encoder.backward = recorder("encoder.backward", model.encoder.backward)
        model.decoder.backward = recorder("decoder.backward", model.decoder.backward)
        model.likelihood.nll = recorder("nll", model.likelihood.nll)
        try:
            model.loss(x, rng=model.backend.rng(seed))
            model.backward()
        finally:
            for obj, name in ((model.encoder, "forward"), (model.decoder, "forward"),
                              (model.encoder, "backward"), (model.decoder, "backward"),
                              (model.likelihood, "nll")):
                del obj.__dict__[name]
    missing = {"encoder.forward", "decoder.forward", "encoder.backward", "decoder.backward",
               "nll", "reparameterize", "kl_standard_normal",
               "reparameterize_backward"} - set(calls)
    if missing:
        raise RuntimeError(f"VAE.loss/backward no longer call {sorted(missing)}: update "
                           f"examples/draw_graph.py to the code")
    (enc_in,), h = calls["encoder.forward"][0][0], calls["encoder.forward"][0][1]
    (mu, logvar, eps), z = calls["reparameterize"][0]
    (dec_in,), logits = calls["decoder.forward"][0][0], calls["decoder.forward"][0][1]
    (targets, _), (nll, dlogits) = calls["nll"][0][0][:2], calls["nll"][0][1]
    _, (kl, dkl_dmu, dkl_dlogvar) = calls["kl_standard_normal"][0]
    (dlogits_in,), dz = calls["decoder.backward"][0][0], calls["decoder.backward"][0][1]
    (dz_snd, _, _), (dmu, dlogvar) = calls["reparameterize_backward"][0]
    (dh,), _ = calls["encoder.backward"][0][0], None
    shapes = {
        "x - 0.5": enc_in, "h": h, "mu": mu, "logvar": logvar, "eps": eps, "z": z,
        "z rows": dec_in, "logits": logits, "targets": targets, "nll": nll,
        "dL/dlogits": dlogits, "kl": kl, "dKL/dmu": dkl_dmu, "dKL/dlogvar": dkl_dlogvar,
        "dL/dlogits in": dlogits_in, "dL/dz rows": dz, "dL/dz": dz_snd, "dL/dmu": dmu,
        "dL/dlogvar": dlogvar, "dL/dh": dh,
    }
    shapes = {name: _shape(a) for name, a in shapes.items()}
    shapes["parameters"] = (model.num_parameters,)
    last = len(model.hidden)            # the output layers' weight gradients
    shapes["dL/dW decoder output"] = _shape(model.parameters.grads[f"decoder.linear{last}.W"])
    shapes["dL/dW encoder output"] = _shape(model.parameters.grads[f"encoder.linear{last}.W"])
    shapes["S"], shapes["N"], shapes["d"] = shapes["eps"]
    shapes["c"] = model.input_dim
    return shapes


def fmt(shape) -> str:
    """(32, 784) -> '32×784'; (2, 32, 64) -> '(2, 32, 64)'; (64,) -> '(64,)'."""
    if len(shape) == 2:
        return f"{shape[0]}×{shape[1]}"
    return str(tuple(shape))


# --------------------------------------------------------------------------------------
# The drawing


FORWARD, BACKWARD, MUTED = "#1f1f1f", "#c0392b", "#6f6f6f"
FILL = {"data": "#eaf1fb", "op": "#ffffff", "value": "#f2f2f2", "back": "#fdf0ee",
        "loss": "#fff4d6"}


def draw(shapes: dict, out: Path) -> list[str]:
    """Draw the figure into ``out`` (PNG). Returns the function names it drew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
    from matplotlib.path import Path as MPath

    drawn: list[str] = []
    width, height = 15.0, 12.6
    fig = plt.figure(figsize=(width, height), dpi=110)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")
    mono = "DejaVu Sans Mono"
    boxes: dict[str, tuple[float, float, float, float]] = {}

    def box(key, x, y, title, function=None, kind="op", w=2.6, h=0.9, extra=None,
            edge=FORWARD):
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h,
                                    boxstyle="round,pad=0.02,rounding_size=0.1",
                                    facecolor=FILL[kind], edgecolor=edge, linewidth=1.5))
        lines = [(title, dict(fontsize=11.5, fontweight="bold"))]
        if extra:
            lines.append((extra, dict(fontsize=9.5)))
        if function:
            drawn.append(function)
            lines.append((function, dict(fontsize=8.6, family=mono, color="#303030")))
        step = 0.25
        top = y + step * (len(lines) - 1) / 2
        for i, (text, style) in enumerate(lines):
            ax.text(x, top - i * step, text, ha="center", va="center", **style)
        boxes[key] = (x, y, w, h)

    def at(key, side, shift=0.0):
        """A point on a box's side: l, r, t, b; ``shift`` moves along that side."""
        x, y, w, h = boxes[key]
        return {"l": (x - w / 2, y + shift), "r": (x + w / 2, y + shift),
                "t": (x + shift, y + h / 2), "b": (x + shift, y - h / 2)}[side]

    def arrow(p, q, color=FORWARD, style="-", rad=0.0):
        ax.add_patch(FancyArrowPatch(p, q, arrowstyle="-|>", mutation_scale=15, color=color,
                                     linewidth=1.6, linestyle=style,
                                     connectionstyle=f"arc3,rad={rad}", shrinkA=1, shrinkB=1))

    def polyline(points, color=FORWARD, style="-"):
        """Straight segments through ``points``, with an arrow head at the end."""
        ax.add_patch(FancyArrowPatch(path=MPath(points), arrowstyle="-|>", mutation_scale=15,
                                     color=color, linewidth=1.6, linestyle=style))

    def label(x, y, text, color=FORWARD, ha="left", size=9.5, **kw):
        ax.text(x, y, text, ha=ha, va="center", fontsize=size, color=color,
                bbox=dict(boxstyle="round,pad=0.12", facecolor="white", edgecolor="none",
                          alpha=0.92), **kw)

    s = shapes
    S, N, d, c = s["S"], s["N"], s["d"], s["c"]
    ax.text(width / 2, 12.25, "One training step of vae_np.VAE: forward down the left (black), "
            "backward up the right (red)", ha="center", va="center", fontsize=16,
            fontweight="bold")
    ax.text(width / 2, 11.85, f"shapes recorded from VAE(784, hidden=(512, 512), latent_dim={d}, "
            f"samples={S}) on a batch of N = {N}:   c = {c} pixels, d = {d} latent dimensions, "
            f"S = {S} samples", ha="center", va="center", fontsize=10.5, color="#404040")

    xl, xm, xr = 3.75, 7.4, 11.45
    rows = dict(x=11.0, enc=9.75, split=8.5, mulv=7.3, rep=5.95, dec=4.6, nll=3.25, loss=1.55)

    # ---- forward, down the left
    box("x", xl, rows["x"], "x", kind="data", extra="a batch of images, pixels in [0, 1]",
        w=2.9, h=0.75)
    box("enc", xl, rows["enc"], "encoder MLP", "vae_np.layers.MLP.forward",
        extra="784 → 512 → 512 → 2d, ReLU")
    box("split", xl, rows["split"], "split", "vae_np.model.VAE._encoder_output",
        extra="μ = h[:, :d],  logvar = h[:, d:]")
    box("mu", xl - 0.8, rows["mulv"], "μ", kind="value", w=0.9, h=0.55)
    box("lv", xl + 0.8, rows["mulv"], "logvar", kind="value", w=1.15, h=0.55)
    box("rep", xl, rows["rep"], "reparameterise (path 1)", "vae_np.objectives.reparameterize",
        extra="z = μ + exp(logvar / 2) ε", w=2.8)
    box("eps", 6.25, 5.45, "ε ~ N(0, I)", kind="data", w=2.0, h=0.62,
        extra=f"(S, N, d) = {fmt(s['eps'])}")
    box("kl", xm, 6.62, "KL term (path 2)", "vae_np.losses.kl_standard_normal",
        extra="½ Σ (e^logvar − logvar − 1 + μ²)", w=3.1, h=0.95)
    box("dec", xl, rows["dec"], "decoder MLP", "vae_np.layers.MLP.forward",
        extra="d → 512 → 512 → 784, ReLU")
    box("nll", xl, rows["nll"], "reconstruction", "vae_np.likelihoods.Bernoulli.nll",
        extra="Σ softplus(l) − x l  (Bernoulli)", w=3.1)
    ax.text(xl, rows["nll"] - 0.6, "reference: vae_np.losses.bernoulli_nll", ha="center",
            va="center", fontsize=8.2, family=mono, color=MUTED)
    drawn.append("vae_np.losses.bernoulli_nll")
    box("loss", xm, rows["loss"], "loss L  (nats per image)", "vae_np.objectives.ELBO.forward",
        kind="loss", extra="mean(nll) + β mean(kl)", w=3.1, h=0.95)

    lx = xl - 0.15
    arrow(at("x", "b"), at("enc", "t"))
    label(lx, (rows["x"] + rows["enc"]) / 2, f"x − 0.5:  N×c = {fmt(s['x - 0.5'])}", ha="right")
    arrow(at("enc", "b"), at("split", "t"))
    label(lx, (rows["enc"] + rows["split"]) / 2, f"h:  N×2d = {fmt(s['h'])}", ha="right")
    arrow(at("split", "b", -0.8), at("mu", "t"))
    arrow(at("split", "b", 0.8), at("lv", "t"))
    label(xl - 1.35, rows["mulv"], f"N×d = {fmt(s['mu'])}", ha="right")
    label(xl + 1.48, rows["mulv"] + 0.45, f"N×d = {fmt(s['logvar'])}", ha="left")
    # path 1: into the sample; path 2: into the KL term
    arrow(at("mu", "b"), at("rep", "t", -0.8))
    arrow(at("lv", "b"), at("rep", "t", 0.8))
    arrow(at("lv", "r"), at("kl", "l", 0.2))
    polyline([at("mu", "b", -0.3), (xl - 1.1, 6.55), (xl + 1.6, 6.55), at("kl", "l", -0.07)])
    arrow(at("eps", "l"), at("rep", "r", -0.1))
    arrow(at("rep", "b"), at("dec", "t"))
    label(lx, (rows["rep"] + rows["dec"]) / 2,
          f"z:  (S, N, d) = {fmt(s['z'])}\nreshaped:  SN×d = {fmt(s['z rows'])}", ha="right")
    arrow(at("dec", "b"), at("nll", "t"))
    label(lx, (rows["dec"] + rows["nll"]) / 2, f"logits l:  SN×c = {fmt(s['logits'])}",
          ha="right")
    # the targets: x, repeated S times, down the left edge
    polyline([at("x", "l"), (0.45, rows["x"]), (0.45, rows["nll"]), at("nll", "l")])
    label(0.45, (rows["enc"] + rows["split"]) / 2 - 0.5,
          f"targets: x repeated S times,  SN×c = {fmt(s['targets'])}", ha="center",
          rotation=90, size=9)
    polyline([at("nll", "b", 0.6), (xl + 0.6, rows["loss"]), at("loss", "l")])
    label(xl + 0.75, 2.15, f"nll:  (SN,) = {fmt(s['nll'])}")
    arrow(at("kl", "b"), at("loss", "t"))
    label(xm + 0.12, 4.55, f"kl:  (N,) = {fmt(s['kl'])}")

    # ---- backward, up the right
    box("dl", xr, rows["nll"], "∂L/∂l", kind="back", edge=BACKWARD, w=2.9,
        extra="(σ(l) − x) / (SN)")
    box("bdec", xr, rows["dec"], "decoder backward", "vae_np.layers.MLP.backward",
        kind="back", edge=BACKWARD)
    box("rbwd", xr, rows["rep"], "through the sample", "vae_np.objectives.reparameterize_backward",
        kind="back", edge=BACKWARD, w=3.6, extra="Σ_s dz,   ½ e^(logvar/2) Σ_s dz ε")
    box("add", xr, rows["mulv"], "add the two paths", "vae_np.objectives.ELBO.backward",
        kind="back", edge=BACKWARD, extra="+ (β/N) ∂KL/∂μ,  + (β/N) ∂KL/∂logvar", w=3.4)
    box("cat", xr, rows["split"], "concatenate", kind="back", edge=BACKWARD, w=2.6, h=0.7,
        extra="[∂L/∂μ, ∂L/∂logvar]")
    box("benc", xr, rows["enc"], "encoder backward", "vae_np.layers.MLP.backward",
        kind="back", edge=BACKWARD, extra="input_grad=False: no ∂L/∂x")
    box("grad", xr, rows["x"], "∂L/∂θ, one flat vector", "vae_np.parameters.Parameters",
        kind="back", edge=BACKWARD, w=3.4,
        extra=f"model.parameters.grad: {s['parameters'][0]:,} entries")
    box("adam", xm, rows["x"], "update θ", "vae_np.optim.Adam.step", w=2.5, h=0.75)

    rx = xr + 0.15
    polyline([at("loss", "r"), (xr, rows["loss"]), at("dl", "b")], color=BACKWARD)
    label(xr + 0.15, 2.15, "∂L/∂L = 1", color=BACKWARD)
    arrow(at("nll", "r"), at("dl", "l"), color=MUTED, style="--")
    label(xm + 0.2, rows["nll"] + 0.22, "computed with the nll, kept by VAE.loss", color=MUTED,
          ha="center", size=8.8)
    arrow(at("dl", "t"), at("bdec", "b"), color=BACKWARD)
    label(rx, (rows["nll"] + rows["dec"]) / 2, f"SN×c = {fmt(s['dL/dlogits in'])}",
          color=BACKWARD)
    arrow(at("bdec", "t"), at("rbwd", "b"), color=BACKWARD)
    label(rx, (rows["dec"] + rows["rep"]) / 2,
          f"∂L/∂z:  SN×d = {fmt(s['dL/dz rows'])}\nreshaped:  (S, N, d) = {fmt(s['dL/dz'])}",
          color=BACKWARD)
    arrow(at("rbwd", "t"), at("add", "b"), color=BACKWARD)
    label(rx, (rows["rep"] + rows["mulv"]) / 2 - 0.05,
          f"∂L/∂μ, ∂L/∂logvar (path 1)\nN×d each = {fmt(s['dL/dmu'])}", color=BACKWARD)
    arrow(at("kl", "r"), at("add", "l", -0.15), color=BACKWARD, style="--")
    label(8.25, 7.98, "path 2:  ∂KL/∂μ = μ,\n∂KL/∂logvar = ½(e^logvar − 1),\n"
          f"N×d each = {fmt(s['dKL/dmu'])}", color=BACKWARD, ha="center", size=8.8)
    arrow(at("add", "t"), at("cat", "b"), color=BACKWARD)
    label(rx, (rows["mulv"] + rows["split"]) / 2 + 0.05, "N×d, N×d", color=BACKWARD)
    arrow(at("cat", "t"), at("benc", "b"), color=BACKWARD)
    label(rx, (rows["split"] + rows["enc"]) / 2 + 0.05, f"∂L/∂h:  N×2d = {fmt(s['dL/dh'])}",
          color=BACKWARD)
    arrow(at("benc", "t"), at("grad", "b"), color=BACKWARD)
    label(rx, (rows["enc"] + rows["x"]) / 2, "encoder.linear0-2 .W, .b", color=BACKWARD)
    polyline([at("bdec", "r"), (14.55, rows["dec"]), (14.55, rows["x"]), at("grad", "r")],
             color=BACKWARD)
    label(14.55, 7.4, "decoder.linear0-2 .W, .b", color=BACKWARD, ha="center", rotation=90)
    arrow(at("grad", "l"), at("adam", "r"))

    ax.text(width / 2, 0.45, "vae_np.model.VAE.loss keeps what its objective returns: logvar, "
            "ε, ∂L/∂l and the KL gradients; each MLP keeps its layers' inputs; "
            "vae_np.model.VAE.backward runs the red chain once per loss.", ha="center",
            va="center", fontsize=9.5, color=MUTED, style="italic")
    drawn.extend(["vae_np.model.VAE.loss", "vae_np.model.VAE.backward"])

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return list(dict.fromkeys(drawn))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write")
    args = parser.parse_args(argv)
    shapes = trace_shapes()
    drawn = draw(shapes, args.out)
    print(f"wrote {args.out} ({len(drawn)} functions named)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
