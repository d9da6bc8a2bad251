"""Model architectures, each defined once: a torch module for training, a numpy twin for
devices, and the export contract they share. Look one up by name with ``get``."""

from model_zoo.registry import Architecture, get, names, register

__all__ = ["Architecture", "get", "names", "register"]

# Registering imports only numpy code; torch modules load lazily on first use.
import model_zoo.dual_encoder  # noqa: E402,F401
import model_zoo.repeat_sasrec  # noqa: E402,F401
import model_zoo.sasrec  # noqa: E402,F401
