"""Where an exported LiteRT file keeps each weight, so new weights can be written into it.

A round changes an architecture's weights, never its graph. Re-running the export (litert-torch
and ai-edge-quantizer, seconds and gigabytes of torch) only to store new numbers in the same
buffers is the slow way; this module writes them in place, with numpy and the flatbuffer schema
that ships inside ai-edge-litert.

Each architecture declares its *serving constants* (``Architecture.serving_constants``): every
array its exported graph may store, computed from the float parameters with numpy, including
the forms the converter folds (the dual encoder's output bias with the padding logit added;
SASRec's LayerNorm gain and shift folded into the projection that follows it). ``locate``
finds, for each constant tensor of a base file, the one serving constant it holds, by content,
on the base bundle's own weights: floats equal to within float32 folding error, int8 weights
equal after the quantization below. ``patch`` then computes the constants from new weights and
writes them into copies of those buffers: float32 bytes as they are, int8 weights quantized as
ai-edge-quantizer's weight recipes do (symmetric, narrow range [-127, 127], one scale per
channel of the tensor's own quantized dimension, ``scale = max(|w|, 1e-9) / 127``,
``q = rint(w / scale)``), their scale vectors overwritten in place. Buffers stored outside the
flatbuffer (``offset``/``size``, as the converter does for large models) are written at their
file offset. Nothing else in the file changes.

``locate`` refuses (``Unpatchable``) rather than guess: a tensor that matches two different
serving constants (e.g. a LayerNorm gain still exactly 1, so ``W`` and ``W * g`` coincide), a
quantization it does not reproduce, or a parameter that no located tensor depends on (the
converter put it somewhere the map does not know). The caller then runs the full export."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

# Serving constants: label -> (array in the graph's layout up to a reshape, params it depends on)
ServingConstants = dict[str, tuple[np.ndarray, tuple[str, ...]]]
ConstantsFn = Callable[[object, Mapping[str, np.ndarray]], ServingConstants]

FLOAT32, INT8 = 0, 9  # tflite TensorType codes
QMAX = 127
MIN_BOUND = 1e-9  # ai-edge-quantizer's floor on a channel's bound (avoids a zero scale)
FLOAT_RTOL = 1e-5  # folded constants differ from numpy's by float32 summation order only
INT8_MISMATCH = 1e-3  # fraction of int8 values a folded weight may be off by one step


class Unpatchable(ValueError):
    """The base file cannot be patched safely; the caller falls back to the full export."""


@dataclass(frozen=True)
class Slot:
    """One constant tensor of the file and the serving constant it holds."""

    label: str
    tensor: int
    dtype: int  # FLOAT32 or INT8
    shape: tuple[int, ...]
    data_start: int  # byte offset of the tensor's data in the file
    nbytes: int
    quant_dim: int = 0
    scale_start: int = -1  # byte offset of the float32 scale vector (int8 only)
    n_scales: int = 0


def quantize_int8(w: np.ndarray, quant_dim: int, n_scales: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric narrow-range int8, one scale per index of ``quant_dim`` (or one in all)."""
    w = np.asarray(w, np.float32)
    if n_scales == 1:
        bound = np.maximum(np.abs(w.min()), np.abs(w.max())).reshape(1)
        scale = (np.maximum(bound, MIN_BOUND) / QMAX).astype(np.float32)
        q = np.clip(np.rint(w / scale[0]), -QMAX, QMAX).astype(np.int8)
        return q, scale
    axes = tuple(a for a in range(w.ndim) if a != quant_dim)
    bound = np.maximum(np.abs(w.min(axis=axes, keepdims=True)),
                       np.abs(w.max(axis=axes, keepdims=True)))
    scale = np.maximum(bound, MIN_BOUND) / QMAX
    q = np.clip(np.rint(w / scale), -QMAX, QMAX).astype(np.int8)
    return q, scale.reshape(-1).astype(np.float32)


def _vector(table, field: int) -> tuple[int, int]:
    """(byte start, element count) of a vector field of a flatbuffer table; (-1, 0) if absent."""
    o = table.Offset(field)
    if not o:
        return -1, 0
    return table.Vector(o), table.VectorLen(o)


def _constant_tensors(model_bytes: bytes) -> list[Slot]:
    """Every float32 / int8 tensor of subgraph 0 that has constant data, as label-less slots."""
    from ai_edge_litert import schema_py_generated as fb

    model = fb.Model.GetRootAs(model_bytes, 0)
    if model.SubgraphsLength() != 1:
        raise Unpatchable(f"the file has {model.SubgraphsLength()} subgraphs; expected 1")
    graph = model.Subgraphs(0)
    out = []
    for i in range(graph.TensorsLength()):
        t = graph.Tensors(i)
        if t.Type() not in (FLOAT32, INT8):
            continue
        buf = model.Buffers(t.Buffer())
        start, count = _vector(buf._tab, 4)  # Buffer.data
        if count == 0 and buf.Offset() > 1:
            start, count = int(buf.Offset()), int(buf.Size())
        if count == 0:
            continue
        shape = tuple(int(x) for x in t.ShapeAsNumpy()) if t.ShapeLength() else ()
        itemsize = 4 if t.Type() == FLOAT32 else 1
        if count != int(np.prod(shape, dtype=np.int64)) * itemsize:
            raise Unpatchable(f"tensor {i} holds {count} bytes for shape {shape}")
        quant_dim, scale_start, n_scales = 0, -1, 0
        if t.Type() == INT8:
            q = t.Quantization()
            if q is None or q.ScaleLength() == 0:
                raise Unpatchable(f"int8 tensor {i} has no quantization scales")
            zp = q.ZeroPointAsNumpy() if q.ZeroPointLength() else np.zeros(1)
            if np.any(zp != 0) or q.MinLength() or q.MaxLength() or q.DetailsType():
                raise Unpatchable(f"int8 tensor {i} is not symmetric per-channel int8")
            quant_dim, n_scales = int(q.QuantizedDimension()), int(q.ScaleLength())
            scale_start, _ = _vector(q._tab, 8)  # QuantizationParameters.scale
            if n_scales not in (1, shape[quant_dim] if shape else 1):
                raise Unpatchable(f"int8 tensor {i} has {n_scales} scales for shape {shape}")
        out.append(Slot("", i, int(t.Type()), shape, int(start), int(count), quant_dim,
                        int(scale_start), n_scales))
    return out


def _stored(model_bytes: bytes, slot: Slot) -> np.ndarray:
    dtype = "<f4" if slot.dtype == FLOAT32 else np.int8
    raw = model_bytes[slot.data_start:slot.data_start + slot.nbytes]
    return np.frombuffer(raw, dtype).reshape(slot.shape)


class _Candidates:
    """The serving constants by element count, each float32-reshaped and int8-quantized at
    most once per layout (a file has dozens of same-shaped tensors)."""

    def __init__(self, constants: ServingConstants) -> None:
        self.constants = constants
        self.by_size: dict[int, list[str]] = {}
        for label, (value, _) in constants.items():
            self.by_size.setdefault(int(np.size(value)), []).append(label)
        self._q: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def value(self, label: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.asarray(self.constants[label][0], np.float32).reshape(shape)

    def quantized(self, label: str, slot: Slot) -> tuple[np.ndarray, np.ndarray]:
        key = (label, slot.shape, slot.quant_dim, slot.n_scales)
        if key not in self._q:
            self._q[key] = quantize_int8(self.value(label, slot.shape), slot.quant_dim,
                                         slot.n_scales)
        return self._q[key]


def _holds(model_bytes: bytes, slot: Slot, label: str, candidates: _Candidates) -> bool:
    """Does ``slot`` store serving constant ``label`` as the export would?"""
    stored = _stored(model_bytes, slot)
    if slot.dtype == FLOAT32:
        value = candidates.value(label, slot.shape)
        spread = max(float(np.abs(value).max()) if value.size else 0.0, 1e-12)
        if abs(float(stored.flat[0]) - float(value.flat[0])) > FLOAT_RTOL * spread:
            return False  # the cheap test first: most candidates differ at once
        return bool(np.all(np.abs(stored - value) <= FLOAT_RTOL * spread))
    q, scale = candidates.quantized(label, slot)
    stored_scale = np.frombuffer(model_bytes, "<f4", slot.n_scales, slot.scale_start)
    if abs(float(scale[0]) - float(stored_scale[0])) > FLOAT_RTOL * float(scale[0]):
        return False
    if not np.all(np.abs(scale - stored_scale) <= FLOAT_RTOL * scale):
        return False
    diff = np.abs(q.astype(np.int16) - stored.astype(np.int16))
    return bool(diff.max(initial=0) <= 1 and np.mean(diff != 0) <= INT8_MISMATCH)


def locate(model_bytes: bytes, constants: ServingConstants) -> list[Slot]:
    """The slots of ``model_bytes`` that hold serving constants, found on the base weights
    (see the module docstring for what makes it refuse)."""
    candidates = _Candidates(constants)
    slots: list[Slot] = []
    for slot in _constant_tensors(model_bytes):
        size = int(np.prod(slot.shape, dtype=np.int64))
        hits = [label for label in candidates.by_size.get(size, ())
                if _holds(model_bytes, slot, label, candidates)]
        if len(hits) > 1:
            first = candidates.value(hits[0], slot.shape)
            if any(not np.array_equal(first, candidates.value(h, slot.shape)) for h in hits) \
                    or len({constants[h][1] for h in hits}) > 1:
                raise Unpatchable(f"tensor {slot.tensor} {slot.shape} matches several serving "
                                  f"constants {sorted(hits)}; cannot tell which it holds")
        if hits:
            slots.append(Slot(hits[0], *[getattr(slot, f) for f in (
                "tensor", "dtype", "shape", "data_start", "nbytes", "quant_dim",
                "scale_start", "n_scales")]))
    return slots


def check_coverage(slots: list[Slot], constants: ServingConstants,
                   params: Mapping[str, np.ndarray]) -> None:
    """Every parameter must reach the file through some located slot; else the converter
    stored it in a form the map does not know, and patching would leave it stale."""
    covered = {p for s in slots for p in constants[s.label][1]}
    missing = sorted(set(params) - covered)
    if missing:
        raise Unpatchable(f"no tensor of the file is known to hold {missing}")


def patch(model_bytes: bytes, slots: list[Slot], constants: ServingConstants) -> bytes:
    """A copy of ``model_bytes`` with every slot rewritten from ``constants`` (new weights)."""
    out = bytearray(model_bytes)
    for slot in slots:
        value = np.asarray(constants[slot.label][0], np.float32).reshape(slot.shape)
        if slot.dtype == FLOAT32:
            data = value.astype("<f4").tobytes()
        else:
            q, scale = quantize_int8(value, slot.quant_dim, slot.n_scales)
            data = q.tobytes()
            out[slot.scale_start:slot.scale_start + 4 * slot.n_scales] = \
                scale.astype("<f4").tobytes()
        out[slot.data_start:slot.data_start + slot.nbytes] = data
    return bytes(out)


def patch_weights(model_bytes: bytes, constants_fn: ConstantsFn, config: object,
                  base_params: Mapping[str, np.ndarray],
                  new_params: Mapping[str, np.ndarray]) -> bytes:
    """The base file with ``new_params`` written in place of ``base_params`` (all tensors of
    the architecture, float32). Raises ``Unpatchable`` when that cannot be done safely."""
    base = constants_fn(config, base_params)
    slots = locate(model_bytes, base)
    check_coverage(slots, base, base_params)
    return patch(model_bytes, slots, constants_fn(config, new_params))
