"""A LiteRT top-K recommender model: the bundle's ``model.tflite`` behind one small class.

ai-edge-litert is the runtime; tflite_runtime is only a fallback import, and bundles carry a
golden check precisely because an old runtime can load a new model and compute garbage."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

INPUT_NAME = "history"
OUTPUT_IDS = "ids"
OUTPUT_SCORES = "scores"


class ModelLoadError(RuntimeError):
    """The model could not be loaded, or does not have the serving signature."""


def _interpreter_class() -> type:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise ModelLoadError(
                "no LiteRT runtime: install ai-edge-litert (pip install 'pocketrec[device]')"
            ) from None
    return Interpreter


class TopKModel:
    """``history`` int32[L] (0 = padding, most recent last) -> top-K ``ids`` int32[K] and
    ``scores`` float32[K], best first. One interpreter per model; calls are serialised
    because a TFLite interpreter is not re-entrant."""

    def __init__(self, model: bytes | str | Path, num_threads: int = 1) -> None:
        content = Path(model).read_bytes() if isinstance(model, str | Path) else bytes(model)
        try:
            self._interp = _interpreter_class()(model_content=content, num_threads=num_threads)
            self._interp.allocate_tensors()
            runner = self._interp.get_signature_runner()
            inputs, outputs = runner.get_input_details(), runner.get_output_details()
            del runner
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"LiteRT refused the model: {exc}") from exc
        if set(inputs) != {INPUT_NAME} or set(outputs) != {OUTPUT_IDS, OUTPUT_SCORES}:
            raise ModelLoadError(
                f"model signature is {sorted(inputs)} -> {sorted(outputs)}, expected "
                f"['{INPUT_NAME}'] -> ['{OUTPUT_IDS}', '{OUTPUT_SCORES}']"
            )
        spec = inputs[INPUT_NAME]
        if spec["dtype"] != np.int32 or len(spec["shape"]) != 2 or spec["shape"][0] != 1:
            raise ModelLoadError(f"input 'history' must be int32[1, L], got {spec}")
        self.max_len = int(spec["shape"][1])
        self.k = int(outputs[OUTPUT_IDS]["shape"][1])
        self.size_bytes = len(content)
        # Tensor indices, so a request is set_tensor + invoke + two reads, no signature lookup.
        self._in = spec["index"]
        self._ids = outputs[OUTPUT_IDS]["index"]
        self._scores = outputs[OUTPUT_SCORES]["index"]
        self._buf = np.zeros((1, self.max_len), dtype=np.int32)
        self._lock = threading.Lock()

    def topk(self, history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        history = np.asarray(history)
        if history.shape != (self.max_len,):
            raise ValueError(f"history must have shape [{self.max_len}], got {history.shape}")
        with self._lock:
            self._buf[0] = history
            self._interp.set_tensor(self._in, self._buf)
            self._interp.invoke()
            return self._interp.get_tensor(self._ids)[0].copy(), self._interp.get_tensor(
                self._scores
            )[0].copy()

    def topk_many(self, histories: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run ``topk`` for each row of [U, L] -> ([U, K], [U, K])."""
        ids = np.zeros((len(histories), self.k), dtype=np.int32)
        scores = np.zeros((len(histories), self.k), dtype=np.float32)
        for row, history in enumerate(histories):
            ids[row], scores[row] = self.topk(history)
        return ids, scores
