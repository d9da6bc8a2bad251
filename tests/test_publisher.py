"""The tensor-map publisher against the real export: new weights written into the base's LiteRT
file must give what re-running litert-torch + ai-edge-quantizer gives, for both architectures."""

import numpy as np
import pytest

import model_zoo
from device_sdk.bundle import MODEL, load_bundle, run_golden_check
from model_zoo import tensor_map
from model_zoo.tensor_map import FLOAT32, Unpatchable
from sync_server.publisher import patch_bundle, patch_or_export, served_average


def round_weights(base, names, seed=3):
    """What a round might send: every named tensor moved by a few percent of its spread."""
    rng = np.random.default_rng(seed)
    params = base.weights()
    return {k: (params[k] + rng.normal(size=params[k].shape).astype(np.float32)
                * np.float32(0.05 * (params[k].std() + 1e-3))).astype(np.float32)
            for k in names}


def located(bundle):
    arch = model_zoo.get(bundle.architecture)
    constants = arch.serving_constants(arch.config_from_dict(bundle.config), bundle.weights())
    return tensor_map.locate(bundle.read(MODEL), constants)


def random_histories(bundle, n=64, seed=5):
    config = bundle.config
    rng = np.random.default_rng(seed)
    rows = rng.integers(1, len(bundle.items()), size=(n, config["max_len"])).astype(np.int32)
    rows[: n // 4, : config["max_len"] // 2] = 0  # some short histories (left padding)
    return rows


@pytest.mark.slow
def test_patched_dual_encoder_file_is_byte_identical_to_the_full_export(tiny_export, tmp_path):
    from trainer.publish import export_weights

    base = load_bundle(tiny_export.bundle_dir)
    weights = round_weights(base, base.weights())
    full = load_bundle(export_weights(weights, tiny_export.bundle_dir, 2, {}))
    patched = load_bundle(patch_bundle(weights, tiny_export.bundle_dir, 2, {}))
    assert patched.read(MODEL) != base.read(MODEL)
    assert patched.read(MODEL) == full.read(MODEL)
    assert patched.manifest["golden"]["ids"] == full.manifest["golden"]["ids"]
    assert run_golden_check(patched.model(), patched.manifest["golden"]) == 1.0
    assert all(np.array_equal(patched.weights()[k], weights[k]) for k in weights)


@pytest.mark.slow
def test_patched_sasrec_matches_the_full_export_within_float_folding(tiny_sasrec_export):
    """SASRec's converter folds LayerNorm into the next projection in float32 with its own
    summation order, so folded biases may differ in the last bits: every byte outside the
    located tensors is identical, located tensors agree within 1e-5 (float) or one step
    (int8), and the models rank identically."""
    from trainer.publish import export_weights

    base = load_bundle(tiny_sasrec_export.bundle_dir)
    weights = round_weights(base, base.manifest["architecture"]["federated"])
    full = load_bundle(export_weights(weights, tiny_sasrec_export.bundle_dir, 2, {}))
    patched = load_bundle(patch_bundle(weights, tiny_sasrec_export.bundle_dir, 2, {}))
    a = np.frombuffer(patched.read(MODEL), np.uint8)
    b = np.frombuffer(full.read(MODEL), np.uint8)
    assert a.shape == b.shape
    slots = located(base)
    inside = np.zeros(a.shape, bool)
    for s in slots:
        inside[s.data_start:s.data_start + s.nbytes] = True
        if s.scale_start >= 0:
            inside[s.scale_start:s.scale_start + 4 * s.n_scales] = True
    assert np.array_equal(a[~inside], b[~inside])
    for s in slots:
        dtype = "<f4" if s.dtype == FLOAT32 else np.int8
        x = np.frombuffer(a[s.data_start:s.data_start + s.nbytes].tobytes(), dtype)
        y = np.frombuffer(b[s.data_start:s.data_start + s.nbytes].tobytes(), dtype)
        if s.dtype == FLOAT32:
            assert np.abs(x - y).max() <= 1e-5 * max(np.abs(y).max(), 1e-12), s.label
        else:
            assert np.abs(x.astype(int) - y.astype(int)).max() <= 1, s.label
    histories = random_histories(base)
    ids_p, scores_p = patched.model().topk_many(histories)
    ids_f, scores_f = full.model().topk_many(histories)
    assert np.array_equal(ids_p, ids_f)
    assert np.allclose(scores_p, scores_f, rtol=1e-4, atol=1e-5)
    assert run_golden_check(patched.model(), patched.manifest["golden"]) == 1.0


def test_every_parameter_of_both_architectures_is_located(tiny_export, tiny_sasrec_export):
    for export in (tiny_export, tiny_sasrec_export):
        base = load_bundle(export.bundle_dir)
        slots = located(base)
        arch = model_zoo.get(base.architecture)
        constants = arch.serving_constants(arch.config_from_dict(base.config), base.weights())
        tensor_map.check_coverage(slots, constants, base.weights())
        assert len({s.tensor for s in slots}) == len(slots)


def test_a_parameter_the_map_does_not_know_refuses_to_patch(tiny_export):
    base = load_bundle(tiny_export.bundle_dir)
    arch = model_zoo.get("dual_encoder")
    config = arch.config_from_dict(base.config)

    def without_pad_fold(config, params):
        constants = arch.serving_constants(config, params)
        del constants["out.bias+pad_logit"]
        return constants

    with pytest.raises(Unpatchable, match="out.bias"):
        tensor_map.patch_weights(base.read(MODEL), without_pad_fold, config,
                                 base.weights(), base.weights())


def test_a_tensor_that_matches_two_different_constants_is_refused(tiny_export):
    """If a fold and the plain weight coincide on the base (e.g. a LayerNorm gain still 1),
    the file alone cannot say which one it holds: refuse, never guess."""
    base = load_bundle(tiny_export.bundle_dir)
    arch = model_zoo.get("dual_encoder")
    config = arch.config_from_dict(base.config)

    def with_a_twin(config, params):
        constants = arch.serving_constants(config, params)
        constants["mlp.0.weight*gain"] = (params["mlp.0.weight"] * 1, ("mlp.0.weight", "gain"))
        return constants

    with pytest.raises(Unpatchable, match="several serving constants"):
        tensor_map.patch_weights(base.read(MODEL), with_a_twin, config,
                                 base.weights(), base.weights())


def test_a_changed_shape_is_refused(tiny_export):
    base = load_bundle(tiny_export.bundle_dir)
    wrong = {"out.bias": np.zeros(base.weights()["out.bias"].shape[0] + 1, np.float32)}
    with pytest.raises(Unpatchable, match="out.bias"):
        patch_bundle(wrong, tiny_export.bundle_dir, 2, {})


@pytest.mark.slow
def test_a_base_file_the_map_cannot_read_falls_back_to_the_full_export(tiny_export, tmp_path):
    """A base whose weights cannot be found in its model file (here: wiped) is never patched
    blindly; ``patch_or_export`` re-runs the real export instead."""
    from device_sdk.bundle import write_bundle

    base = load_bundle(tiny_export.bundle_dir)
    model = bytearray(base.read(MODEL))
    for s in located(base):
        model[s.data_start:s.data_start + s.nbytes] = bytes(s.nbytes)
    files = {name: base.read(name) for name in base.manifest["files"]}
    files[MODEL] = bytes(model)
    manifest = {k: v for k, v in base.manifest.items() if k not in ("files", "format_version")}
    wiped = write_bundle(tmp_path / "wiped" / "bundle", files, manifest)
    arch = model_zoo.get("dual_encoder")
    with pytest.raises(Unpatchable, match="no tensor of the file is known to hold"):
        tensor_map.patch_weights(bytes(model), arch.serving_constants,
                                 arch.config_from_dict(base.config), base.weights(),
                                 base.weights())
    weights = round_weights(base, ["out.weight"])
    published = load_bundle(patch_or_export(weights, wiped, 2, {}))
    assert "written_by" not in published.manifest["quantization"]
    assert published.read(MODEL) == load_bundle(
        patch_bundle(weights, tiny_export.bundle_dir, 2, {})).read(MODEL)
    assert run_golden_check(published.model(), published.manifest["golden"]) == 1.0


@pytest.mark.slow
def test_a_served_average_is_what_the_model_file_serves_and_weights_npz_keeps_the_weights(
        tiny_export):
    """serve_ema: the model file serves the average, weights.npz keeps the round's weights
    (what the next round's devices train from); the next version's patch finds the base's
    slots by the base's served tensors, and the full export, where the patch cannot run,
    writes the same two files."""
    from device_sdk.bundle import WEIGHTS

    start = tiny_export.bundle_dir
    base = load_bundle(start)
    weights = round_weights(base, base.weights())
    served = served_average(0.5, base.weights(), weights)
    first = load_bundle(patch_bundle(weights, start, 2, {}, served=served))
    assert first.read(MODEL) == load_bundle(patch_bundle(served, start, 2, {})).read(MODEL)
    assert first.read(MODEL) != load_bundle(patch_bundle(weights, start, 2, {})).read(MODEL)
    assert all(np.array_equal(first.weights()[k], weights[k]) for k in weights)

    later = round_weights(first, first.weights(), seed=4)
    served_later = served_average(0.5, served, later)
    with pytest.raises(Unpatchable):  # the base's file does not hold its weights.npz
        patch_bundle(later, first.directory, 3, {}, served=served_later)
    second = load_bundle(patch_bundle(later, first.directory, 3, {}, served=served_later,
                                      base_served=served))
    assert second.read(MODEL) == load_bundle(
        patch_bundle(served_later, start, 3, {})).read(MODEL)
    assert all(np.array_equal(second.weights()[k], later[k]) for k in later)

    exported = load_bundle(patch_or_export(later, first.directory, 3, {}, served=served_later))
    assert "written_by" not in exported.manifest["quantization"]  # the full export ran
    assert exported.read(MODEL) == second.read(MODEL)
    assert exported.read(WEIGHTS) == second.read(WEIGHTS)
    assert run_golden_check(exported.model(), exported.manifest["golden"]) == 1.0
