"""The exported bundle: real litert-torch conversion, real int8 quantization, real LiteRT
interpreter; integrity, signature seam, golden check and tampering."""

import json

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from device_sdk.bundle import (
    MANIFEST,
    MODEL,
    SIGNATURE,
    BundleError,
    BundleIntegrityError,
    GoldenCheckError,
    encode_manifest,
    file_entry,
    load_bundle,
    run_golden_check,
    write_bundle,
)
from device_sdk.topk_model import ModelLoadError, TopKModel
from tests.support.bundles import copy_bundle
from trainer.export import FLOAT_MODEL
from trainer.metrics import topk_agreement


def test_bundle_loads_and_serves_the_contract(tiny_export, tiny_checkpoint):
    ckpt, prepared = tiny_checkpoint
    bundle = load_bundle(tiny_export.bundle_dir)
    config = ckpt.model_config()
    assert bundle.version == 1 and bundle.architecture == "dual_encoder"
    assert bundle.manifest["items_digest"] == ckpt.vocab.digest()
    model = bundle.model()
    assert (model.max_len, model.k) == (config.max_len, config.top_k)
    ids, scores = model.topk(prepared.split.test.history[0])
    assert ids.dtype == np.int32 and scores.dtype == np.float32
    assert (ids > 0).all() and (np.diff(scores) <= 0).all()
    assert run_golden_check(model, bundle.manifest["golden"]) >= 0.8
    weights = bundle.weights()
    assert set(weights) == set(config.param_shapes())
    np.testing.assert_array_equal(weights["out.weight"], ckpt.params["out.weight"])
    assert tiny_export.int8_bytes < tiny_export.float_bytes


def test_int8_litert_agrees_with_numpy_twin(tiny_export, tiny_checkpoint):
    ckpt, prepared = tiny_checkpoint
    histories = prepared.split.test.history[:50]
    twin_ids, _ = ckpt.numpy_model().topk(histories, 10)
    lite_ids, _ = load_bundle(tiny_export.bundle_dir).model().topk_many(histories)
    float_ids, _ = TopKModel(tiny_export.float_path.read_bytes()).topk_many(histories)
    assert topk_agreement(lite_ids, twin_ids, 10) >= 0.9
    assert topk_agreement(float_ids, twin_ids, 10) >= 0.99


@pytest.mark.parametrize("name", ["model.tflite", "weights.npz", "items.json"])
def test_flipped_byte_in_any_file_is_refused(tiny_export, tmp_path, name):
    bundle_dir = copy_bundle(tiny_export.bundle_dir, tmp_path / "b")
    data = bytearray((bundle_dir / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle_dir / name).write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=name):
        load_bundle(bundle_dir)


def test_missing_file_and_bad_manifest_are_refused(tiny_export, tmp_path):
    bundle_dir = copy_bundle(tiny_export.bundle_dir, tmp_path / "b")
    (bundle_dir / "weights.npz").unlink()
    with pytest.raises(BundleIntegrityError, match="missing"):
        load_bundle(bundle_dir)
    (bundle_dir / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="not JSON"):
        load_bundle(bundle_dir)
    (bundle_dir / MANIFEST).write_text(json.dumps({"format_version": 1}))
    with pytest.raises(BundleError, match="model_version"):
        load_bundle(bundle_dir)
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tmp_path / "nowhere")


def test_path_traversal_in_file_names_is_refused(tiny_export, tmp_path):
    bundle_dir = copy_bundle(tiny_export.bundle_dir, tmp_path / "b")
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    manifest["files"]["../evil"] = file_entry(b"x")
    (bundle_dir / MANIFEST).write_bytes(encode_manifest(manifest))
    with pytest.raises(BundleError, match="bad bundle file name"):
        load_bundle(bundle_dir)


def test_signature_seam(tiny_export, tmp_path):
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    src = load_bundle(tiny_export.bundle_dir)
    files = {n: src.read(n) for n in src.manifest["files"]}
    manifest = {k: v for k, v in src.manifest.items() if k not in ("files", "format_version")}
    signed = write_bundle(tmp_path / "signed", files, manifest, signer=key.sign)
    assert load_bundle(signed, public_key=public).signature == (signed / SIGNATURE).read_bytes()

    other = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    with pytest.raises(BundleIntegrityError, match="does not verify"):
        load_bundle(signed, public_key=other)
    unsigned = copy_bundle(tiny_export.bundle_dir, tmp_path / "unsigned")
    with pytest.raises(BundleIntegrityError, match="unsigned"):
        load_bundle(unsigned, public_key=public)
    # A manifest edited after signing (e.g. a bumped version) no longer verifies.
    raw = (signed / MANIFEST).read_bytes().replace(b'"model_version": 1', b'"model_version": 9')
    (signed / MANIFEST).write_bytes(raw)
    with pytest.raises(BundleIntegrityError, match="does not verify"):
        load_bundle(signed, public_key=public)


def test_golden_check_catches_a_model_that_computes_something_else(tiny_export, tmp_path):
    """A runtime that loads a model but computes garbage looks like a different model."""
    bundle = load_bundle(tiny_export.bundle_dir)
    golden = bundle.manifest["golden"]
    n_items = bundle.config["n_items"]
    unlikely = list(range(n_items - golden["k"], n_items))  # the least popular ids
    wrong = dict(golden, ids=[unlikely] * len(golden["ids"]))
    with pytest.raises(GoldenCheckError, match="overlap"):
        run_golden_check(bundle.model(), wrong)
    shifted = dict(golden, scores=[[s + 1.0 for s in row] for row in golden["scores"]])
    with pytest.raises(GoldenCheckError, match="score gap"):
        run_golden_check(bundle.model(), shifted)
    with pytest.raises(GoldenCheckError, match="malformed"):
        run_golden_check(bundle.model(), {"k": 10})


def test_float_model_passes_the_int8_golden_check(tiny_export):
    """Float and int8 differ by quantization noise only: within the golden tolerance."""
    golden = load_bundle(tiny_export.bundle_dir).manifest["golden"]
    float_model = TopKModel((tiny_export.float_path.parent / FLOAT_MODEL).read_bytes())
    assert run_golden_check(float_model, golden) >= 0.8


def test_litert_refuses_garbage_and_wrong_shapes(tiny_export):
    with pytest.raises(ModelLoadError):
        TopKModel(b"definitely not a flatbuffer")
    model = load_bundle(tiny_export.bundle_dir).model()
    with pytest.raises(ValueError, match="shape"):
        model.topk(np.zeros(model.max_len + 1, dtype=np.int32))


def test_model_file_swapped_between_versions_is_refused(tiny_export, tmp_path):
    bundle_dir = copy_bundle(tiny_export.bundle_dir, tmp_path / "b")
    (bundle_dir / MODEL).write_bytes(tiny_export.float_path.read_bytes())
    with pytest.raises(BundleIntegrityError, match="model.tflite"):
        load_bundle(bundle_dir)
