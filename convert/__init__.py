"""PyTorch <-> Flax weights for resnet_flax: ``python -m convert resnet18.pth``.

Reading any checkpoint is :mod:`resnet_flax.loading` (torch-free, re-exported here); this package adds the
torch side: writing PyTorch state dicts and verifying a conversion against torchvision or timm."""

from convert.verify import compare_outputs, save_torch, to_torch_state_dict
from resnet_flax.errors import WeightsError
from resnet_flax.loading import (
    Checkpoint,
    build_model,
    convert_file,
    describe,
    eval_settings,
    from_state_dict,
    load_model,
    load_with_info,
    read_checkpoint,
)

__all__ = ["Checkpoint", "WeightsError", "build_model", "compare_outputs", "convert_file", "describe",
           "eval_settings", "from_state_dict", "load_model", "load_with_info", "read_checkpoint", "save_torch",
           "to_torch_state_dict"]
