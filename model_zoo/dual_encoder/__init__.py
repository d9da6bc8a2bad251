"""Dual encoder: mean-pooled history embedding -> residual MLP -> user vector, scored
against a separate (untied) output item table."""

from model_zoo.dual_encoder.config import DualEncoderConfig
from model_zoo.dual_encoder.numpy_twin import DualEncoderNumpy, serving_constants
from model_zoo.registry import Architecture, register

ARCHITECTURE = register(
    Architecture(
        name="dual_encoder",
        config_cls=DualEncoderConfig,
        numpy_cls=DualEncoderNumpy,
        serving_constants=serving_constants,
        torch_path="model_zoo.dual_encoder.torch_module:DualEncoder",
    )
)

__all__ = ["ARCHITECTURE", "DualEncoderConfig", "DualEncoderNumpy"]
