"""The integration tests' real server on loopback is the simulator's (one implementation)."""

from trainer.simulation.server import ServerProcess

__all__ = ["ServerProcess"]
