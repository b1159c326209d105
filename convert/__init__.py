"""PyTorch <-> Flax weights for resnet_flax: ``python -m convert resnet18.pth``."""

from convert.core import (
    Checkpoint,
    build_model,
    compare_outputs,
    describe,
    eval_settings,
    from_state_dict,
    load_model,
    load_with_info,
    read_checkpoint,
    save_torch,
    to_torch_state_dict,
)
from resnet_flax.errors import WeightsError

__all__ = ["Checkpoint", "WeightsError", "build_model", "compare_outputs", "describe", "eval_settings",
           "from_state_dict", "load_model", "load_with_info", "read_checkpoint", "save_torch", "to_torch_state_dict"]
