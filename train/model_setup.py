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
        return _fresh(resnet_flax.arch_config(cfg.resolved_arch, num_classes=num_classes), cfg)
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
    return _fresh(ResNetConfig.from_dict(read_run_file(cfg.workdir)["model"]), cfg)


def _fresh(config: ResNetConfig, cfg: TrainConfig) -> ResNet:
    """A new ``config`` model, initialised by one compiled program as the Flax examples do (op by op, each
    initialiser of each shape is a program of its own: about a hundred to compile, or load from the cache, before
    the first step). A run and its resume build the same program, so a resume compiles nothing new."""
    return nnx.jit(lambda: ResNet(config, zero_init_residual=cfg.zero_init_residual, drop_path_rate=cfg.drop_path_rate,
                                  dtype=COMPUTE_DTYPES[cfg.dtype], rngs=nnx.Rngs(cfg.seed)))()
