"""The model a run trains: a fresh one, PyTorch/converted weights with the head resized, or the workdir's own."""

from __future__ import annotations

from flax import nnx

import resnet_flax
from resnet_flax.layers import COMPUTE_DTYPES
from resnet_flax.model import ResNet, ResNetConfig
from train.config import TrainConfig
from train.progress import log
from train.run_file import read_run_file
from train.storage import local_copy


def initial_model(cfg: TrainConfig, num_classes: int) -> ResNet:
    """A fresh model of ``cfg.arch``, or ``--init-from`` weights with the head resized to ``num_classes``; with
    ``--drop-path-rate``'s stochastic depth."""
    dtype = COMPUTE_DTYPES[cfg.dtype]
    if cfg.init_from is None:
        return resnet_flax.create_model(cfg.resolved_arch, num_classes=num_classes, dtype=dtype,
                                        zero_init_residual=cfg.zero_init_residual,
                                        drop_path_rate=cfg.drop_path_rate, seed=cfg.seed)
    from resnet_flax.loading import describe, load_model

    with local_copy(cfg.init_from) as path:
        model = load_model(path, arch=cfg.arch, dtype=dtype)
    log(f"loaded weights from {cfg.init_from}: {describe(model.config)}")
    if model.config.num_classes != num_classes:
        log(f"re-initialised the head (fc): the checkpoint has {model.config.num_classes} classes, "
            f"the data has {num_classes}")
        model.reset_classifier(num_classes, seed=cfg.seed)
    model.set_drop_path_rate(cfg.drop_path_rate)
    return model


def recorded_model(cfg: TrainConfig) -> ResNet:
    """The structure recorded in the workdir's run.json (its weights come from the checkpoint)."""
    config = ResNetConfig.from_dict(read_run_file(cfg.workdir)["model"])
    return ResNet(config, drop_path_rate=cfg.drop_path_rate, dtype=COMPUTE_DTYPES[cfg.dtype], rngs=nnx.Rngs(cfg.seed))
