"""LocalTrainer: examples from a real event log, learning, clipping, determinism, FedProx."""

import numpy as np
import pytest

from device_sdk.bundle import load_bundle
from device_sdk.event_log import EventLog
from device_sdk.local_trainer import LocalTrainer, LocalTrainingConfig
from trainer.data.split import windows


@pytest.fixture
def trainer(tiny_export):
    return LocalTrainer(load_bundle(tiny_export.bundle_dir))


@pytest.fixture
def shopper(tmp_path, tiny_checkpoint):
    """A real SQLite log with one synthetic user's train sequence, funnel events included."""
    _, prepared = tiny_checkpoint
    seq = max(prepared.split.train.values(), key=len)
    log = EventLog(tmp_path / "events.db")
    events, t = [], 1000.0
    for item in seq:
        key = prepared.vocab.keys[item]
        for kind in ("view", "add_to_cart", "purchase"):  # one interest, three events
            events.append((key, kind, t))
            t += 1
    events.append((prepared.vocab.keys[seq[0]], "dismiss", t))
    log.log_many(events)
    yield log, np.asarray(seq, dtype=np.int32)
    log.close()


def test_examples_match_the_central_trainers_windows(trainer, shopper):
    log, seq = shopper
    histories, targets = trainer.examples(log.events(), max_examples=10_000)
    np.testing.assert_array_equal(histories, windows(seq, trainer.config.max_len))
    np.testing.assert_array_equal(targets, seq[1:])
    recent, recent_targets = trainer.examples(log.events(), max_examples=3)
    np.testing.assert_array_equal(recent, histories[-3:])
    np.testing.assert_array_equal(recent_targets, targets[-3:])


def test_local_training_lowers_the_loss_on_the_devices_data(trainer, shopper):
    log, _ = shopper
    config = LocalTrainingConfig(local_epochs=5, learning_rate=0.5, clip_norm=1e6)
    update = trainer.train(log.events(), config, base_version=1, seed=0)
    histories, targets = trainer.examples(log.events(), config.max_examples)
    assert update.num_examples == len(targets) > 5
    trained = {k: trainer.base[k] + update.delta[k] for k in trainer.base}
    before = trainer.evaluate_loss(trainer.base, histories, targets)
    after = trainer.evaluate_loss(trained, histories, targets)
    assert after < 0.9 * before


def test_delta_is_clipped_as_one_vector(trainer, shopper):
    log, _ = shopper
    free = trainer.train(log.events(), LocalTrainingConfig(learning_rate=0.5, clip_norm=1e6),
                         base_version=1)
    clipped = trainer.train(log.events(), LocalTrainingConfig(learning_rate=0.5, clip_norm=0.1),
                            base_version=1)
    assert free.norm_before_clip > 0.1
    assert clipped.norm == pytest.approx(0.1, rel=1e-5)
    measured = np.sqrt(sum(np.sum(d.astype(np.float64) ** 2) for d in clipped.delta.values()))
    assert measured == pytest.approx(0.1, rel=1e-5)
    scale = 0.1 / free.norm_before_clip
    for name in free.delta:  # same direction, only shorter
        np.testing.assert_allclose(clipped.delta[name], free.delta[name] * scale, atol=1e-7)


def test_same_seed_same_delta_other_seed_other_delta(trainer, shopper):
    log, _ = shopper
    config = LocalTrainingConfig(local_epochs=2, batch_size=4)
    a = trainer.train(log.events(), config, base_version=1, seed=11)
    b = trainer.train(log.events(), config, base_version=1, seed=11)
    c = trainer.train(log.events(), config, base_version=1, seed=12)
    assert all(np.array_equal(a.delta[k], b.delta[k]) for k in a.delta)
    assert any(not np.array_equal(a.delta[k], c.delta[k]) for k in a.delta)


def test_fedprox_keeps_the_update_closer_to_the_base(trainer, shopper):
    log, _ = shopper
    base = LocalTrainingConfig(local_epochs=5, learning_rate=0.5, clip_norm=1e6)
    prox = LocalTrainingConfig(local_epochs=5, learning_rate=0.5, clip_norm=1e6, proximal_mu=1.0)
    plain = trainer.train(log.events(), base, base_version=1)
    held = trainer.train(log.events(), prox, base_version=1)
    assert held.norm < 0.8 * plain.norm


def test_trainable_subset_and_config_validation(trainer, shopper):
    log, _ = shopper
    subset = ("out.weight", "out.bias")
    update = trainer.train(log.events(), LocalTrainingConfig(trainable=subset), base_version=4)
    assert set(update.delta) == set(subset) and update.base_version == 4
    assert update.num_values == sum(trainer.base[k].size for k in subset)
    with pytest.raises(ValueError, match="not parameters"):
        trainer.train(log.events(), LocalTrainingConfig(trainable=("nope",)), base_version=4)
    with pytest.raises(ValueError, match="clip_norm"):
        LocalTrainingConfig(clip_norm=0)
    with pytest.raises(ValueError, match="local_epochs"):
        LocalTrainingConfig(local_epochs=0)


def test_too_little_history_gives_an_empty_update(trainer, tmp_path, tiny_checkpoint):
    _, prepared = tiny_checkpoint
    with EventLog(tmp_path / "one.db") as log:
        log.log(prepared.vocab.keys[1], "purchase")
        update = trainer.train(log.events(), LocalTrainingConfig(), base_version=1)
    assert update.num_examples == 0 and update.norm == 0.0
    assert all(not d.any() for d in update.delta.values())
