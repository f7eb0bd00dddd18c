"""``vae-np export`` and ``vae-np import``: a model to and from the formats of
:mod:`vae_np.interop` (ONNX, safetensors, a PyTorch state_dict).

    vae-np export CHECKPOINT --format onnx|safetensors|torch --out PATH
    vae-np import STATE_DICT --out model.npz

:func:`add_interop_commands` adds both to the ``vae-np`` parser (:mod:`vae_np.cli`, which
reports their errors on one line). As every subcommand's, their outputs are checked
before any work (:func:`vae_np.outputs.check_output`): none may be (or resolve to) the
file read, and ``import`` writes a vae_np model file, so its ``--out`` ends in ``.npz``.
"""

from __future__ import annotations

from .cli_args import add_model_flags, positive_float
from .interop import FORMATS, export_model, import_model, onnx_paths
from .likelihoods import LIKELIHOOD_NAMES
from .outputs import check_output
from .saving import read_model, save_model

__all__ = ["add_interop_commands", "cmd_export", "cmd_import"]


def cmd_export(args) -> int:
    paths = onnx_paths(args.out) if args.format == "onnx" else (args.out,)
    for path in paths:
        check_output("--out", path, inputs=(("checkpoint", args.checkpoint),))
    saved = read_model(args.checkpoint, backend=args.backend, dtype=args.dtype)
    data = {**saved.data, "image_shape": None if saved.image_shape is None
            else list(saved.image_shape), "binarize": saved.binarize}
    paths = export_model(saved.model, args.out, args.format, data=data)
    print(f"wrote {', '.join(map(str, paths))} ({args.format})")
    return 0


def cmd_import(args) -> int:
    out = check_output("--out", args.out, suffixes=(".npz",),
                       inputs=(("state_dict", args.state_dict),))
    imported = import_model(args.state_dict, decoder=args.decoder, variance=args.variance,
                            input_shift=args.input_shift, dtype=args.dtype)
    model = imported.model
    save_model(model, out, image_shape=imported.image_shape,
               binarize=imported.data.get("binarize"),
               data={k: v for k, v in imported.data.items()
                     if k not in ("image_shape", "binarize")})
    print(f"wrote {out}: a {model.config['decoder']} VAE, {model.input_dim}-"
          f"{'-'.join(map(str, model.hidden))}-{model.latent_dim}, "
          f"{model.backend.dtype_name}, from a {imported.source} file")
    return 0


def add_interop_commands(subs, fmt) -> None:
    """The ``export`` and ``import`` subparsers, in ``subs`` (``add_subparsers``), with
    help formatter ``fmt``."""
    p = subs.add_parser("export", help="write a model as ONNX, safetensors or a PyTorch "
                                       "state_dict", formatter_class=fmt,
                        description="onnx: OUT.encoder.onnx and OUT.decoder.onnx; "
                                    "safetensors: the parameters and the configuration; "
                                    "torch: a torch.save state_dict in the starting "
                                    "example's layout (vae_np.interop documents each).")
    add_model_flags(p)
    p.add_argument("--format", choices=FORMATS, required=True, help="the file format")
    p.add_argument("--out", required=True, help="the file to write (onnx: a prefix)")
    p.set_defaults(run=cmd_export)

    p = subs.add_parser("import", help="a PyTorch or safetensors model as a vae_np model file",
                        formatter_class=fmt,
                        description="Read a torch.save state_dict or a safetensors file in "
                                    "the starting example's layout (or one vae-np export "
                                    "wrote) and write a vae_np model file that the other "
                                    "subcommands use. Sizes come from the tensors' shapes.")
    p.add_argument("state_dict", help="a .pt state_dict or a .safetensors file")
    p.add_argument("--out", required=True, help="the vae_np model file (.npz) to write")
    p.add_argument("--decoder", choices=LIKELIHOOD_NAMES, default=None,
                   help="the decoder's likelihood (default: gaussian for 2c outputs, else "
                        "bernoulli)")
    p.add_argument("--variance", type=positive_float, default=None,
                   help="gaussian-fixed: its variance (default: the starting example's)")
    p.add_argument("--input-shift", type=float, default=None,
                   help="subtracted from x before the encoder (default 0.5: x - 0.5)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="floating type (default: the tensors')")
    p.set_defaults(run=cmd_import)
