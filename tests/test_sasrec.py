"""The SASRec-style model end to end with real parts: the real litert-torch + ai-edge-quantizer
export keeps the dual encoder's serving signature and serves through the device SDK unchanged;
a device trains the federated subset with the numpy twin, and that subset learns; one
federated round runs through the real sync server over loopback HTTP with real DeviceClients."""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from device_sdk import DeviceClient, EventLog, HistoryPolicy, Recommender
from device_sdk.bundle import load_bundle
from device_sdk.local_trainer import LocalTrainer, LocalTrainingConfig
from model_zoo.serving import INPUT_NAME, OUTPUT_IDS, OUTPUT_SCORES
from tests.support.bundles import zip_bundle
from tests.support.server import ADMIN, ServerProcess, signing_key_of
from trainer.metrics import topk_agreement
from trainer.train import torch_topk


def test_export_keeps_the_serving_signature_and_agrees_with_torch(
    tiny_sasrec_checkpoint, tiny_sasrec_export
):
    ckpt, prepared = tiny_sasrec_checkpoint
    config = ckpt.model_config()
    bundle = load_bundle(tiny_sasrec_export.bundle_dir)
    assert bundle.architecture == "sasrec"
    assert bundle.manifest["architecture"]["federated"] == list(config.federated_params())
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=bundle.read("model.tflite")).get_signature_runner()
    inputs, outputs = runner.get_input_details(), runner.get_output_details()
    del runner
    assert list(inputs[INPUT_NAME]["shape"]) == [1, config.max_len]
    assert inputs[INPUT_NAME]["dtype"] == np.int32
    assert list(outputs[OUTPUT_IDS]["shape"]) == [1, config.top_k]
    assert outputs[OUTPUT_IDS]["dtype"] == np.int32
    assert outputs[OUTPUT_SCORES]["dtype"] == np.float32
    assert tiny_sasrec_export.int8_bytes < tiny_sasrec_export.float_bytes

    history = prepared.split.test.history
    int8_ids, int8_scores = bundle.model().topk_many(history)
    torch_ids = torch_topk(ckpt.torch_module(), history, config.top_k)
    twin_ids, _ = ckpt.numpy_model().topk(history, config.top_k)
    assert topk_agreement(int8_ids, torch_ids, 10) >= 0.9
    assert topk_agreement(twin_ids, torch_ids, 10) >= 0.99
    assert (int8_ids > 0).all() and (np.diff(int8_scores, axis=1) <= 1e-6).all()


def _shopper_log(path, prepared, user: int) -> tuple[EventLog, np.ndarray]:
    """A real SQLite log of one synthetic shopper's purchases (their test history)."""
    ids = prepared.split.test.history[user]
    ids = ids[ids > 0]
    log = EventLog(path)
    log.log_many([(prepared.vocab.keys[i], "purchase", 1000.0 + n) for n, i in enumerate(ids)])
    return log, ids


def test_the_device_sdk_serves_a_sasrec_bundle_unchanged(
    tiny_sasrec_checkpoint, tiny_sasrec_export, tmp_path
):
    ckpt, prepared = tiny_sasrec_checkpoint
    bundle = load_bundle(tiny_sasrec_export.bundle_dir)
    recommender = Recommender(bundle, policy=HistoryPolicy(exclude_kinds=("dismiss",)))
    assert recommender.golden_overlap >= 0.8
    row = int(np.argmax((prepared.split.test.history > 0).sum(axis=1)))
    log, ids = _shopper_log(tmp_path / "events.db", prepared, row)
    with log:
        history = recommender.history(log)
        recs = recommender.recommend(log, 10)
    last_seen = {int(item): n for n, item in enumerate(ids)}  # purchases: distinct items,
    np.testing.assert_array_equal(history[history > 0], sorted(last_seen, key=last_seen.get))
    assert len(recs) == 10 and all(r.source == "model" for r in recs)
    torch_ids = torch_topk(ckpt.torch_module(), history[None, :], 10)[0]
    got = {ckpt.vocab.id_of(r.item) for r in recs}
    assert len(got & set(torch_ids.tolist())) >= 8


def test_the_device_trains_the_federated_subset_and_it_learns(
    tiny_sasrec_checkpoint, tiny_sasrec_export, tmp_path
):
    ckpt, prepared = tiny_sasrec_checkpoint
    bundle = load_bundle(tiny_sasrec_export.bundle_dir)
    federated = tuple(bundle.manifest["architecture"]["federated"])
    trainer = LocalTrainer(bundle)
    row = int(np.argmax((prepared.split.test.history > 0).sum(axis=1)))
    log, _ = _shopper_log(tmp_path / "events.db", prepared, row)
    with log:
        config = LocalTrainingConfig(local_epochs=5, learning_rate=0.1, batch_size=4,
                                     clip_norm=1e6, trainable=federated)
        update = trainer.train(log.events(), config, base_version=1, seed=0)
        histories, targets = trainer.examples(log.events(), config.max_examples)
    assert set(update.delta) == set(federated)
    assert update.num_values == sum(trainer.base[k].size for k in federated)
    assert update.num_values < 0.7 * sum(v.size for v in trainer.base.values())
    trained = {**trainer.base, **{k: trainer.base[k] + update.delta[k] for k in federated}}
    before = trainer.evaluate_loss(trainer.base, histories, targets)
    after = trainer.evaluate_loss(trained, histories, targets)
    assert update.num_examples == len(targets) >= 5
    assert after < 0.9 * before, (before, after)


def test_a_sasrec_bundle_takes_part_in_a_federated_round(
    tiny_sasrec_checkpoint, tiny_sasrec_export, tmp_path
):
    """Three devices holding real logs sync the SASRec bundle, train the manifest's federated
    tensors on a round task and upload through the public DeviceClient API; the server
    aggregates, publishes version 2 with its default publisher (the new weights written into
    the base's LiteRT file), and the devices install and serve it."""
    _, prepared = tiny_sasrec_checkpoint
    settings = {"ADMIN_TOKEN": ADMIN, "RATE_LIMIT": 1000}
    base = load_bundle(tiny_sasrec_export.bundle_dir)
    federated = base.manifest["architecture"]["federated"]
    with ServerProcess(tmp_path / "server", **settings) as server:
        published = server.admin("POST", "/v1/admin/models",
                                 body=zip_bundle(tiny_sasrec_export.bundle_dir),
                                 headers={"Content-Type": "application/zip"})
        assert published.status == 201
        devices = []
        for n in range(3):
            device = DeviceClient(tmp_path / f"device{n}", server_key=signing_key_of(server),
                                  server_url=server.url)
            keys = [prepared.vocab.keys[i] for i in prepared.split.test.history[n] if i]
            device.log_many([(key, "purchase", 1000.0 + t) for t, key in enumerate(keys)])
            assert device.sync(train=False).model_version == 1
            devices.append(device)
        try:
            round_config = {"target_clients": 3, "strategy": "fedavg", "server_lr": 1.0,
                            "clip_norm": 10.0, "local_epochs": 3, "learning_rate": 0.1,
                            "batch_size": 8, "max_examples": 100, "secagg_poll_s": 0.1}
            opened = server.admin("POST", "/v1/admin/rounds", json=round_config)
            assert opened.status == 201, opened.data
            opened = json.loads(opened.data)
            round_id = opened["round_id"]
            # No trainable in the config: the round trains the manifest's federated tensors.
            assert opened["config"]["trainable"] == federated
            # SecAgg+ (the default) has synchronous stages: the devices sync concurrently.
            with ThreadPoolExecutor(3) as pool:
                reports = list(pool.map(lambda d: d.sync(), devices))
            assert [(r.round_id, r.uploaded) for r in reports] == [(round_id, True)] * 3
            view = server.round(round_id)
            assert (view["state"], view["secagg"]["masked"], view["published_version"]) == (
                "published", 3, 2)
            for device in devices:
                assert device.sync().installed == 2
                assert len(device.recommend(5)) == 5
            new = devices[0].models.bundle(2)
            assert new.architecture == "sasrec"
            old_w, new_w = base.weights(), new.weights()
            changed = {k for k in old_w if not np.array_equal(old_w[k], new_w[k])}
            assert changed and changed <= set(federated)  # nothing outside the subset moved
            assert new.manifest["quantization"]["written_by"] == "tensor_map"
            assert new.read("model.tflite") != base.read("model.tflite")
            losses = []
            for device in devices:
                trainer = LocalTrainer(device.models.bundle(1), device.policy)
                histories, targets = trainer.examples(device.events.events(), 100)
                losses.append((trainer.evaluate_loss(old_w, histories, targets),
                               trainer.evaluate_loss(new_w, histories, targets)))
            old_mean, new_mean = np.mean(losses, axis=0)
            assert new_mean < old_mean, losses
        finally:
            for device in devices:
                device.close()


@pytest.mark.parametrize("blocks,federated_blocks", [(2, 1), (3, 2), (2, 0)])
def test_the_federated_subset_follows_the_config(blocks, federated_blocks):
    import model_zoo

    config = model_zoo.get("sasrec").config(n_items=50, dim=8, hidden=8, blocks=blocks,
                                            federated_blocks=federated_blocks)
    names = config.federated_params()
    trained_blocks = {int(n.split(".")[1]) for n in names if n.startswith("blocks.")}
    assert trained_blocks == set(range(blocks - federated_blocks, blocks))
    assert {"out.weight", "out.bias", "ln_final.weight", "ln_final.bias"} <= set(names)
    assert not any(n.startswith(("item_emb", "pos_emb")) for n in names)


def test_the_real_publisher_reexports_round_weights_of_a_sasrec_bundle(tiny_sasrec_export):
    """The server's default publisher (trainer.publish) is architecture-generic: new weights
    for the federated tensors -> a real litert-torch export that passes its golden check."""
    from device_sdk.bundle import run_golden_check
    from trainer.publish import export_weights

    base = load_bundle(tiny_sasrec_export.bundle_dir)
    federated = base.manifest["architecture"]["federated"]
    weights = {k: base.weights()[k] + np.float32(1e-3) for k in federated}
    bundle = load_bundle(export_weights(weights, tiny_sasrec_export.bundle_dir, 2, {}))
    assert (bundle.version, bundle.architecture) == (2, "sasrec")
    assert bundle.manifest["architecture"]["federated"] == federated
    new = bundle.weights()
    assert all(np.array_equal(new[k], weights[k]) for k in federated)
    assert run_golden_check(bundle.model(), bundle.manifest["golden"]) >= 0.8
