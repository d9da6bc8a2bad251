"""SASRec-style sequential model: item + learned position embeddings -> causal
self-attention blocks -> the last position's state, scored against a separate (untied)
output item table."""

from model_zoo.registry import Architecture, register
from model_zoo.sasrec.config import SasRecConfig
from model_zoo.sasrec.numpy_twin import SasRecNumpy, serving_constants

ARCHITECTURE = register(
    Architecture(
        name="sasrec",
        config_cls=SasRecConfig,
        numpy_cls=SasRecNumpy,
        serving_constants=serving_constants,
        torch_path="model_zoo.sasrec.torch_module:SasRec",
    )
)

__all__ = ["ARCHITECTURE", "SasRecConfig", "SasRecNumpy"]
