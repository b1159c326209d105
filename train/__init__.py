"""Training CLI, input pipeline and loops for resnet-flax."""
