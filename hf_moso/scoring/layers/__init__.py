"""Per-layer gradient rules, one module per layer family, registered by layer type in `LAYER_RULES`."""

from . import batch_norm, convolution, embedding, group_norm, layer_norm, linear, transformers_conv1d
from .registry import (
    LAYER_RULES,
    LayerRule,
    ModuleCall,
    find_layer_rule,
    register_layer_rule,
    supported_layers,
)
