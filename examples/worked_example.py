"""The whole VAE with every size 1: each forward and backward number, each one checked.

d = c = S = N = 1: one pixel, one latent dimension, one sample of one example, and one hidden
unit on each side (the encoder 1-1-(1 + 1), the decoder 1-1-1, ReLU, Bernoulli decoder). With
every array a single number, the backward pass of docs/05-whole-model.md becomes a list of
products you can redo on paper. This script

1. computes the forward pass in plain Python floats, node by node;
2. runs the chain rule backwards by hand, one line per node, and checks every number against
   a central difference of the loss with respect to that node (``vae_np.gradcheck``'s own
   ``numerical_partial``: the node is nudged by +-h and everything after it recomputed);
3. loads the same weights into a ``vae_np.VAE`` and shows that ``VAE.loss`` and
   ``VAE.backward`` give the same numbers, then gradient-checks that model.

    python examples/worked_example.py

docs/05-whole-model.md quotes the output (tests/test_learning.py checks that the quoted
numbers are what this script prints today). Exit status 0 when every check agrees.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

try:
    import vae_np  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae_np import VAE, use_fast_paths
from vae_np.gradcheck import DEFAULT_STEP, check_vae, numerical_partial

# The example: weights chosen so that both ReLUs are on and the numbers stay readable.
X, EPS, BETA = 1.0, 0.5, 1.0
PARAMS = {
    "encoder.linear0.W": [[2.0]], "encoder.linear0.b": [0.5],
    "encoder.linear1.W": [[0.4, -0.6]], "encoder.linear1.b": [0.1, -0.2],
    "decoder.linear0.W": [[1.5]], "decoder.linear0.b": [-0.5],
    "decoder.linear1.W": [[2.0]], "decoder.linear1.b": [0.3],
}
# Agreement required between the hand-written chain rule and a central difference.
AGREE = 1e-7


def softplus(t: float) -> float:
    return max(t, 0.0) + math.log1p(math.exp(-abs(t)))


def sigmoid(t: float) -> float:
    return 0.5 + 0.5 * math.tanh(0.5 * t)


def forward(nudge: dict | None = None) -> dict:
    """Every node of the forward pass as a Python float. ``nudge[name]`` is added to node
    ``name`` where it is computed, so everything downstream sees the nudged value: the loss
    then changes by about nudge * dL/d(node). "mu (z path)" and "mu (KL path)" nudge mu
    where only the sampling step, or only the KL term, reads it (likewise for logvar)."""
    nudge = nudge or {}
    v: dict = {}

    def node(name: str, value: float) -> float:
        v[name] = value + nudge.get(name, 0.0)
        return v[name]

    w = {name: node(name, value) for name, value in (
        ("We0", PARAMS["encoder.linear0.W"][0][0]), ("be0", PARAMS["encoder.linear0.b"][0]),
        ("We1[mu]", PARAMS["encoder.linear1.W"][0][0]), ("be1[mu]", PARAMS["encoder.linear1.b"][0]),
        ("We1[lv]", PARAMS["encoder.linear1.W"][0][1]), ("be1[lv]", PARAMS["encoder.linear1.b"][1]),
        ("Wd0", PARAMS["decoder.linear0.W"][0][0]), ("bd0", PARAMS["decoder.linear0.b"][0]),
        ("Wd1", PARAMS["decoder.linear1.W"][0][0]), ("bd1", PARAMS["decoder.linear1.b"][0]))}
    u = node("u", X - 0.5)
    a1 = node("a1", w["We0"] * u + w["be0"])
    h1 = node("h1", max(a1, 0.0))
    mu = node("mu", w["We1[mu]"] * h1 + w["be1[mu]"])
    lv = node("lv", w["We1[lv]"] * h1 + w["be1[lv]"])
    sigma = node("sigma", math.exp(0.5 * (lv + nudge.get("lv (z path)", 0.0))))
    z = node("z", mu + nudge.get("mu (z path)", 0.0) + sigma * EPS)
    a2 = node("a2", w["Wd0"] * z + w["bd0"])
    h2 = node("h2", max(a2, 0.0))
    logit = node("l", w["Wd1"] * h2 + w["bd1"])
    recon = node("recon", softplus(logit) - X * logit)
    mu_k, lv_k = mu + nudge.get("mu (KL path)", 0.0), lv + nudge.get("lv (KL path)", 0.0)
    kl = node("KL", 0.5 * (math.exp(lv_k) - lv_k - 1.0 + mu_k * mu_k))
    node("L", recon + BETA * kl)
    return v


def backward(v: dict) -> list[tuple[str, str, str, float]]:
    """The chain rule, node by node from the loss down: (node, rule, nudge key, value)."""
    rows = []

    def row(name, rule, key, value):
        rows.append((name, rule, key, value))
        return value

    dl = row("dL/dl", "sigmoid(l) - x", "l", sigmoid(v["l"]) - X)
    row("dL/dWd1", "h2 dL/dl", "Wd1", v["h2"] * dl)
    row("dL/dbd1", "dL/dl", "bd1", dl)
    dh2 = row("dL/dh2", "Wd1 dL/dl", "h2", v["Wd1"] * dl)
    da2 = row("dL/da2", "dL/dh2 [a2 > 0]", "a2", dh2 * (1.0 if v["a2"] > 0 else 0.0))
    row("dL/dWd0", "z dL/da2", "Wd0", v["z"] * da2)
    row("dL/dbd0", "dL/da2", "bd0", da2)
    dz = row("dL/dz", "Wd0 dL/da2", "z", v["Wd0"] * da2)
    dmu_z = row("dL/dmu, z path", "dL/dz", "mu (z path)", dz)
    dlv_z = row("dL/dlv, z path", "dL/dz eps sigma / 2", "lv (z path)", dz * EPS * v["sigma"] / 2)
    dmu_k = row("dL/dmu, KL path", "beta mu", "mu (KL path)", BETA * v["mu"])
    dlv_k = row("dL/dlv, KL path", "beta (exp(lv) - 1) / 2", "lv (KL path)",
                BETA * (math.exp(v["lv"]) - 1.0) / 2)
    dmu = row("dL/dmu", "z path + KL path", "mu", dmu_z + dmu_k)
    dlv = row("dL/dlv", "z path + KL path", "lv", dlv_z + dlv_k)
    row("dL/dWe1[mu]", "h1 dL/dmu", "We1[mu]", v["h1"] * dmu)
    row("dL/dWe1[lv]", "h1 dL/dlv", "We1[lv]", v["h1"] * dlv)
    row("dL/dbe1[mu]", "dL/dmu", "be1[mu]", dmu)
    row("dL/dbe1[lv]", "dL/dlv", "be1[lv]", dlv)
    dh1 = row("dL/dh1", "We1[mu] dL/dmu + We1[lv] dL/dlv", "h1",
              v["We1[mu]"] * dmu + v["We1[lv]"] * dlv)
    da1 = row("dL/da1", "dL/dh1 [a1 > 0]", "a1", dh1 * (1.0 if v["a1"] > 0 else 0.0))
    row("dL/dWe0", "u dL/da1", "We0", v["u"] * da1)
    row("dL/dbe0", "dL/da1", "be0", da1)
    return rows


FORWARD_ROWS = (
    ("u", "x - 0.5 (input_shift)"), ("a1", "We0 u + be0"), ("h1", "max(a1, 0)"),
    ("mu", "We1[mu] h1 + be1[mu]"), ("lv", "We1[lv] h1 + be1[lv]"), ("sigma", "exp(lv / 2)"),
    ("z", "mu + sigma eps"), ("a2", "Wd0 z + bd0"), ("h2", "max(a2, 0)"),
    ("l", "Wd1 h2 + bd1"), ("recon", "softplus(l) - x l"),
    ("KL", "(exp(lv) - lv - 1 + mu^2) / 2"), ("L", "recon + beta KL"),
)

# The hand-chain name of each entry of the library's parameter arrays.
LIBRARY_NAMES = {
    ("encoder.linear0.W", (0, 0)): "We0", ("encoder.linear0.b", (0,)): "be0",
    ("encoder.linear1.W", (0, 0)): "We1[mu]", ("encoder.linear1.W", (0, 1)): "We1[lv]",
    ("encoder.linear1.b", (0,)): "be1[mu]", ("encoder.linear1.b", (1,)): "be1[lv]",
    ("decoder.linear0.W", (0, 0)): "Wd0", ("decoder.linear0.b", (0,)): "bd0",
    ("decoder.linear1.W", (0, 0)): "Wd1", ("decoder.linear1.b", (0,)): "bd1",
}


def central_difference(key: str) -> float:
    """dL/d(node) by vae_np.gradcheck.numerical_partial: L(node + h) - L(node - h) over 2h."""
    nudge = np.zeros(1)
    return numerical_partial(lambda: forward({key: float(nudge[0])})["L"], nudge, (0,),
                             DEFAULT_STEP)


def library_model() -> VAE:
    model = VAE(input_dim=1, hidden=(1,), latent_dim=1, decoder="bernoulli", beta=BETA,
                dtype="float64")
    model.load_state_dict({name: np.array(value) for name, value in PARAMS.items()})
    return model


def main() -> int:
    ok = True
    print("A VAE with every size 1 (d = c = S = N = 1; encoder 1-1-(1+1), decoder 1-1-1, "
          "ReLU, Bernoulli)")
    print(f"input x = {X}, noise eps = {EPS}, beta = {BETA}; weights:")
    names = {"encoder.linear0": ("We0", "be0"), "encoder.linear1": ("We1", "be1"),
             "decoder.linear0": ("Wd0", "bd0"), "decoder.linear1": ("Wd1", "bd1")}
    for layer, (w, b) in names.items():
        print(f"  {layer:<16} {w} = {PARAMS[layer + '.W']}, {b} = {PARAMS[layer + '.b']}"
              + ("   ([mu, lv] columns)" if layer == "encoder.linear1" else ""))

    values = forward()
    print()
    print("forward")
    for name, rule in FORWARD_ROWS:
        print(f"  {name:<6} = {rule:<32} {values[name]:>12.8f}")

    print()
    print(f"backward: each value by the chain rule, then dL/d(node) by a central difference "
          f"(h = {DEFAULT_STEP:g})")
    print(f"  {'node':<17} {'rule':<33} {'chain rule':>12} {'central diff.':>13} {'|diff|':>8}")
    rows = backward(values)
    for name, rule, key, value in rows:
        numerical = central_difference(key)
        diff = abs(value - numerical)
        ok &= diff <= AGREE
        print(f"  {name:<17} {rule:<33} {value:>12.8f} {numerical:>13.8f} {diff:>8.1e}")

    # The library, with the same weights and noise: same loss, same gradients.
    hand = {key: value for _, _, key, value in rows}
    model = library_model()
    x = np.array([[X]])
    eps = np.array([[[EPS]]])
    print()
    print("the library, same weights and noise: vae_np.VAE(input_dim=1, hidden=(1,), latent_dim=1,")
    print("decoder='bernoulli', dtype='float64'), its weights set with load_state_dict")
    print(f"  {'path':<10} {'VAE.loss':>10} {'recon':>10} {'KL':>10}   "
          f"max |VAE.backward - chain rule| (10 weights)")
    for path in ("reference", "fast"):
        with use_fast_paths(path == "fast"):
            terms = model.loss(x, eps=eps)
            model.backward()
        worst = max(abs(float(model.parameters.grads[array][index]) - hand[key])
                    for (array, index), key in LIBRARY_NAMES.items())
        loss_diff = abs(float(terms.loss) - values["L"])
        ok &= loss_diff <= 1e-12 and worst <= 1e-12
        print(f"  {path:<10} {float(terms.loss):>10.8f} {float(terms.recon):>10.8f} "
              f"{float(terms.kl):>10.8f}   {worst:.1e}")
    report = check_vae(model, x, eps, max_entries=None, path="reference")
    ok &= report.passed
    print(f"  vae_np.gradcheck.check_vae, every entry: worst relative error "
          f"{report.max_rel_error:.1e} (tolerance {report.tolerance:.0e}): "
          f"{'passes' if report.passed else 'FAILS'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
