"""The package's version: one definition, read by ``vae_np.__version__`` and written into
every file the package saves (model files, trainer checkpoints). A leaf: imports nothing,
so any module can import it without the import cycle through ``vae_np/__init__``."""

__version__ = "0.1.0"
