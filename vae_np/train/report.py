"""What a run prints: messages that do not tear progress bars apart, the bars, the lines."""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["NoProgressBar", "default_log", "epoch_line", "final_lines", "header_lines",
           "log_likelihood_line", "progress_bar"]


def default_log(message: str) -> None:
    """Print without tearing a progress bar apart (tqdm.write when tqdm is installed)."""
    try:
        from tqdm import tqdm
    except ImportError:
        print(message, flush=True)
    else:
        tqdm.write(message)


class NoProgressBar:
    """Stands in for a tqdm bar when bars are off or tqdm is not installed."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, total: int, initial: int, desc: str):
    """A tqdm bar over ``total`` batches starting at ``initial``, or a NoProgressBar when
    bars are off, tqdm is missing or the output is not a terminal (logs, pipes, CI)."""
    if not enabled:
        return NoProgressBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return NoProgressBar()
    return tqdm(total=total, initial=initial, desc=desc, unit="batch", leave=False,
                dynamic_ncols=True, disable=None)


def epoch_line(entry: Mapping[str, Any], epochs: int, loss_name: str = "-ELBO",
               lr: float | None = None) -> str:
    """One line for a finished epoch's metrics (keys ``EPOCH_METRICS``) of ``epochs``.
    ``loss_name``: what the loss is (``TrainConfig.loss_name``: ``-ELBO``, ``-IWAE k=5
    bound``); ``lr``: the epoch's learning rate, shown when given (a schedule)."""
    speed = entry["images_per_second"]
    return (f"epoch {entry['epoch']:>3}/{epochs}  "
            f"train {loss_name} {entry['train_loss']:8.2f} (KL {entry['train_kl']:6.2f}, "
            f"recon {entry['train_recon']:7.2f})  "
            f"test {loss_name} {entry['test_loss']:8.2f} (KL {entry['test_kl']:6.2f}, "
            f"recon {entry['test_recon']:7.2f}) nats/image  "
            + (f"lr {lr:.3g}  " if lr is not None else "")
            + f"{entry['train_seconds']:6.1f} s  "
            + (f"{speed:,.0f} images/s" if speed is not None else "-"))


def log_likelihood_line(log_likelihood: Mapping[str, Any]) -> str:
    """The line for ``Trainer.test_log_likelihood``'s result: mean +- standard error."""
    spread = (f" +- {log_likelihood['stderr']:.2f}"
              if log_likelihood["stderr"] is not None else "")
    return (f"test ln p(x) = {log_likelihood['mean']:.2f}{spread} nats/image "
            f"(importance sampling, K = {log_likelihood['num_samples']}, "
            f"{log_likelihood['n_images']:,} test images, "
            f"{log_likelihood['seconds']:.0f} s)")


def header_lines(config, model, backend, dataset, data, position: tuple[int, int],
                 checkpoint, out_dir) -> list[str]:
    """What a run says before it trains: the model and backend, what differs from the
    defaults, the data (``dataset``, and ``data``: the run's RunData), where a resumed
    run starts (``position``: epochs and batches done, from ``checkpoint``) and where it
    writes."""
    n_train, n_test = data.n_train, data.n_test
    layers = "-".join(str(w) for w in (model.input_dim, *config.hidden, config.latent_dim))
    if model.architecture == "conv":  # e.g. 28x28 conv 32,64-512-64
        layers = (f"{'x'.join(map(str, model.image_shape))} conv "
                  f"{','.join(map(str, model.channels))}-"
                  + "-".join(str(w) for w in (*config.hidden, config.latent_dim)))
    lines = [f"VAE {layers} ({config.decoder} decoder, {model.num_parameters:,} parameters) "
             f"on {backend.name}/{backend.dtype_name}, seed {config.seed}"]
    details = []
    if config.objective != "vae":
        details.append(f"objective {config.loss_name[1:]}")
    if config.conditional:
        details.append(f"conditional on {model.num_classes} classes")
    if config.activation != "relu":
        details.append(f"{config.activation} hidden units")
    if config.output_bias != "zero":
        details.append(f"output bias {config.output_bias}")
    if config.schedule != "constant":
        details.append(f"{config.schedule} learning-rate schedule from {config.lr:g}")
    if config.adam_eps != 1e-8:
        details.append(f"Adam eps {config.adam_eps:g}")
    if config.input_shift != 0.5:
        details.append(f"input shift {config.input_shift:g}")
    if details:
        lines.append("; ".join(details))
    limited = (n_train, n_test) != (dataset.n_train, dataset.n_test)
    lines.append(f"data: {dataset.description}"
                 + (f"; using {n_train:,} train / {n_test:,} test images of them"
                    if limited else "")
                 + f"; {config.binarize_mode} binarization; batch {config.batch_size} "
                   f"({data.batches_per_epoch} updates per epoch)")
    epochs, batches = position
    if epochs or batches:
        lines.append(f"resuming {checkpoint} after {epochs} epochs"
                     + (f" and {batches} batches" if batches else ""))
    lines.append(f"writing to {out_dir}/")
    return lines


def final_lines(config, epochs_done: int, last: Mapping[str, Any],
                log_likelihood: Mapping[str, Any] | None) -> list[str]:
    """What a run says when it has finished: the last test loss (an upper bound on
    -ln p(x)), and the importance-sampled ln p(x) (``log_likelihood``; None: not run)."""
    bound = "-ln p(x | y), the labels given" if config.conditional else "-ln p(x)"
    lines = [f"test {config.loss_name} after {epochs_done} epochs: {last['test_loss']:.2f} "
             f"nats/image (an upper bound on {bound})"]
    if log_likelihood is not None:
        lines.append(log_likelihood_line(log_likelihood))
    return lines
