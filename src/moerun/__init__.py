"""moerun: run Mixture-of-Experts language models fast on the hardware you have.

Importing moerun registers ``"moerun"`` as a transformers experts implementation, so that
``AutoModelForCausalLM.from_pretrained(path, experts_implementation="moerun")`` works; it patches nothing.
"""

from .experts import Experts, ResidentExperts
from .kernels.activation import GLU_ACTIVATIONS, GluSpec
from .kernels.experts import BACKENDS, ExpertWeights, experts_forward
from .layer import MoELayer
from .models.hf import layer_from_hf_block, patch, register_experts_implementation
from .models.loader import CheckpointError, LoadedModel, LoadStats, load
from .models.quantized import QuantConfig, quantize
from .quant.formats import QuantFormat, QuantizedWeight
from .routing import ROUTING_MODES, RoutingConfig, RoutingPlan, make_plan, route
from .runtime.eval import EvalResult, evaluate
from .runtime.generate import GeneratedToken, GenerationResult, HFRunner, Runner, generate, generate_stream
from .version import __version__ as __version__

__all__ = [
    "BACKENDS",
    "GLU_ACTIVATIONS",
    "ROUTING_MODES",
    "CheckpointError",
    "EvalResult",
    "ExpertWeights",
    "GeneratedToken",
    "GenerationResult",
    "GluSpec",
    "HFRunner",
    "LoadStats",
    "LoadedModel",
    "MoELayer",
    "QuantConfig",
    "QuantFormat",
    "QuantizedWeight",
    "RoutingConfig",
    "RoutingPlan",
    "Runner",
    "evaluate",
    "experts_forward",
    "Experts",
    "ResidentExperts",
    "generate",
    "generate_stream",
    "layer_from_hf_block",
    "load",
    "make_plan",
    "patch",
    "quantize",
    "register_experts_implementation",
    "route",
]

register_experts_implementation()
