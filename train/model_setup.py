"""The model a run trains: a fresh one, PyTorch/converted weights with the head resized, or the workdir's own."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

import resnet_flax
from resnet_flax.layers import linear
from resnet_flax.model import ResNet, ResNetConfig
from train.config import TrainConfig
from train.progress import log
from train.run_file import read_run_file


def compute_dtype(cfg: TrainConfig):
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def initial_model(cfg: TrainConfig, num_classes: int) -> ResNet:
    """A fresh model of ``cfg.arch``, or ``--init-from`` weights with the head resized to ``num_classes``."""
    dtype = compute_dtype(cfg)
    if cfg.init_from is None:
        return resnet_flax.create_model(cfg.resolved_arch, num_classes=num_classes, dtype=dtype,
                                        zero_init_residual=cfg.zero_init_residual, seed=cfg.seed)
    import convert

    model = convert.load_model(cfg.init_from, arch=cfg.arch, dtype=dtype)
    log(f"loaded weights from {cfg.init_from}: {convert.describe(model.config)}")
    if model.config.num_classes != num_classes:
        log(f"re-initialised the head (fc): the checkpoint has {model.config.num_classes} classes, "
            f"the data has {num_classes}")
        model.fc = linear(model.config.num_features, num_classes, dtype=dtype, rngs=nnx.Rngs(cfg.seed))
        model.config = dataclasses.replace(model.config, num_classes=num_classes)
    return model


def recorded_model(cfg: TrainConfig) -> ResNet:
    """The structure recorded in the workdir's run.json (its weights come from the checkpoint)."""
    config = ResNetConfig.from_dict(read_run_file(cfg.workdir)["model"])
    return ResNet(config, dtype=compute_dtype(cfg), rngs=nnx.Rngs(cfg.seed))
