"""The repeat-aware SASRec: the numpy twin (what devices train) matches the torch module in
logits and every gradient; the training path (every position) matches the serving path; the
real litert-torch + ai-edge-quantizer export keeps the serving signature, ranks like torch
and passes its golden check; the tensor-map publisher writes round weights into that file
(or refuses, and the full export stands in); the bundle carries the history policy the data
called for, and the device SDK follows it unless the app overrides it."""

import json

import numpy as np
import pytest
import torch

import model_zoo
from device_sdk import EventLog, HistoryPolicy, Recommender
from device_sdk.bundle import MODEL, load_bundle, run_golden_check
from device_sdk.recommender import history_ids
from device_sdk.topk_model import TopKModel
from model_zoo.serving import INPUT_NAME, OUTPUT_IDS, OUTPUT_SCORES
from trainer.export import REPEAT_KEEP, history_policy
from trainer.metrics import topk_agreement
from trainer.train import torch_topk

ARCH = model_zoo.get("repeat_sasrec")


def _pair(seed: int, **cfg):
    config = ARCH.config(**cfg)
    torch.manual_seed(seed)
    module = ARCH.torch_module(config).eval()
    # The repeat head starts at zero; give it (and every bias and LN gain) real values.
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("repeat.") or name.endswith("bias"):
                p.normal_(std=0.5)
            elif ".ln" in name or name.startswith("ln_final"):
                p.uniform_(0.5, 1.5)
    params = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
    return config, module, ARCH.numpy_model(config, params)


def _repeating_histories(rng, config, batch):
    """Histories drawn from a few items each, so ids repeat (at various ages)."""
    h = np.zeros((batch, config.max_len), dtype=np.int64)
    for row in range(batch):
        own = rng.integers(1, config.n_items, size=4)
        length = rng.integers(0, config.max_len + 1)
        h[row, config.max_len - length:] = rng.choice(own, size=length)
    h[0] = 0  # an empty history
    h[1] = rng.integers(1, config.n_items, size=config.max_len)  # a full one
    return h


def test_logits_and_every_gradient_match_torch():
    config, module, twin = _pair(0, n_items=61, dim=16, hidden=24, max_len=10, blocks=2,
                                 heads=2, dropout=0.0)
    rng = np.random.default_rng(1)
    history = _repeating_histories(rng, config, 24)
    targets = history[:, -1].copy()
    targets[targets == 0] = 5
    targets[::3] = rng.integers(1, config.n_items, size=len(targets[::3]))

    logits_t = module(torch.from_numpy(history))
    loss_t = torch.nn.functional.cross_entropy(logits_t, torch.from_numpy(targets))
    loss_t.backward()
    logits_n = twin.logits(history)
    np.testing.assert_allclose(logits_n[:, 1:], logits_t.detach().numpy()[:, 1:], rtol=1e-5,
                               atol=1e-5)
    assert (logits_n[:, 0] < -1e8).all()
    loss_n, grads = twin.loss_and_grads(history, targets)
    assert loss_n == pytest.approx(loss_t.item(), rel=1e-5)
    torch_grads = {k: p.grad.numpy() for k, p in module.named_parameters()}
    assert set(grads) == set(torch_grads) == set(config.param_shapes())
    for name, g in grads.items():
        np.testing.assert_allclose(g, torch_grads[name], rtol=1e-4, atol=1e-6, err_msg=name)
    for name in ("repeat.age", "repeat.gate.weight", "repeat.item_bias"):
        assert np.abs(grads[name]).max() > 1e-4, name  # the repeat head really learns


def test_repeat_head_gradients_match_finite_differences():
    """Independent of torch, on the tensors devices federate."""
    config, _, twin = _pair(3, n_items=23, dim=6, hidden=5, max_len=6, blocks=1, dropout=0.0)
    twin.params = {k: v.astype(np.float64) for k, v in twin.params.items()}
    rng = np.random.default_rng(4)
    history = _repeating_histories(rng, config, 8)
    targets = rng.integers(1, config.n_items, size=8)
    _, grads = twin.loss_and_grads(history, targets)
    for name in config.federated_params():
        flat = twin.params[name].reshape(-1)
        for i in rng.choice(flat.size, size=min(4, flat.size), replace=False):
            old = flat[i]
            flat[i] = old + 1e-5
            up, _ = twin.loss_and_grads(history, targets)
            flat[i] = old - 1e-5
            down, _ = twin.loss_and_grads(history, targets)
            flat[i] = old
            assert grads[name].reshape(-1)[i] == pytest.approx((up - down) / 2e-5, abs=1e-5), name


def test_training_positions_score_repeats_like_serving():
    """The repeat score ``sequence_logits`` adds at position t (what central training fits)
    equals the one ``forward`` adds for the history cut at t: ages count from that position.
    (SASRec's own state at t differs from serving's by its absolute positions, so the gate
    is held at its bias here.)"""
    config, module, _ = _pair(5, n_items=31, dim=8, hidden=8, max_len=8, dropout=0.0)
    rng = np.random.default_rng(6)
    history = torch.from_numpy(_repeating_histories(rng, config, 6))
    last = history[:, -1] > 0  # the last position is serving's, gate and all
    np.testing.assert_allclose(module.sequence_logits(history)[last, -1, 1:].detach().numpy(),
                               module(history)[last, 1:].detach().numpy(), rtol=1e-5,
                               atol=1e-5)
    with torch.no_grad():
        module.repeat.gate.weight.zero_()
    every = module.sequence_logits(history) - module.out(module.sequence_states(history))
    for t in (0, 2, 5, config.max_len - 1):
        cut = torch.zeros_like(history)
        cut[:, config.max_len - 1 - t:] = history[:, : t + 1]
        served = module(cut) - module.out(module.user_vectors(cut))
        real = history[:, t] > 0  # a padding query is never trained
        np.testing.assert_allclose(every[real, t, 1:].detach().numpy(),
                                   served[real, 1:].detach().numpy(), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def repeat_export(tmp_path_factory):
    """A small repeat-aware SASRec trained three epochs on the synthetic shop, exported."""
    from trainer.checkpoint import Checkpoint
    from trainer.data.dataset import DataSpec, prepare
    from trainer.export import export_bundle
    from trainer.train import TrainConfig, train

    spec = DataSpec(synthetic_users=300, synthetic_items=120, seed=7)
    prepared = prepare(spec, max_len=12)
    config = ARCH.config(n_items=len(prepared.vocab), dim=16, hidden=32, blocks=2, heads=2,
                         max_len=12, top_k=20, dropout=0.1)
    module = ARCH.torch_module(config)
    result = train(module, prepared.split, TrainConfig(epochs=3, batch_size=32, lr=1e-2),
                   progress=False)
    meta = {"data": {**spec.to_dict(), "repeat_rate": 0.4}}
    ckpt = Checkpoint("repeat_sasrec", config.to_dict(), result.params, prepared.vocab, meta)
    out = tmp_path_factory.mktemp("export-repeat")
    return ckpt, prepared, export_bundle(ckpt, out, histories=prepared.split.test.history[:3])


@pytest.mark.slow
def test_export_keeps_the_signature_and_ranks_like_torch(repeat_export):
    ckpt, prepared, export = repeat_export
    config = ckpt.model_config()
    bundle = load_bundle(export.bundle_dir)
    assert bundle.architecture == "repeat_sasrec"
    assert bundle.manifest["architecture"]["federated"] == list(config.federated_params())
    assert bundle.manifest["history_policy"]["distinct"] is False
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=bundle.read(MODEL)).get_signature_runner()
    inputs, outputs = runner.get_input_details(), runner.get_output_details()
    del runner
    assert list(inputs[INPUT_NAME]["shape"]) == [1, config.max_len]
    assert inputs[INPUT_NAME]["dtype"] == np.int32
    assert list(outputs[OUTPUT_IDS]["shape"]) == [1, config.top_k]
    assert outputs[OUTPUT_SCORES]["dtype"] == np.float32

    rng = np.random.default_rng(8)
    history = np.concatenate([prepared.split.test.history,
                              _repeating_histories(rng, config, 64).astype(np.int32)])
    torch_ids = torch_topk(ckpt.torch_module(), history, config.top_k)
    float_ids, _ = TopKModel(export.float_path.read_bytes()).topk_many(history)
    int8_ids, int8_scores = bundle.model().topk_many(history)
    twin_ids, _ = ckpt.numpy_model().topk(history, config.top_k)
    assert topk_agreement(float_ids, torch_ids, 10) >= 0.99
    assert topk_agreement(twin_ids, torch_ids, 10) >= 0.99
    assert topk_agreement(int8_ids, torch_ids, 10) >= 0.9
    assert (int8_ids > 0).all() and (np.diff(int8_scores, axis=1) <= 1e-6).all()
    assert run_golden_check(bundle.model(), bundle.manifest["golden"]) == 1.0


@pytest.mark.slow
def test_round_weights_are_patched_into_the_file_or_exported(repeat_export):
    """The publisher writes a round's federated tensors into the base file: the result ranks
    like the full export of the same weights and passes its golden check."""
    from sync_server.publisher import patch_bundle
    from trainer.publish import export_weights

    _, prepared, export = repeat_export
    base = load_bundle(export.bundle_dir)
    rng = np.random.default_rng(3)
    params = base.weights()
    weights = {k: (params[k] + rng.normal(size=params[k].shape).astype(np.float32)
                   * np.float32(0.05 * (params[k].std() + 1e-3))).astype(np.float32)
               for k in base.manifest["architecture"]["federated"]}
    patched = load_bundle(patch_bundle(weights, export.bundle_dir, 2, {}))
    full = load_bundle(export_weights(weights, export.bundle_dir, 2, {}))
    assert patched.manifest["quantization"]["written_by"] == "tensor_map"
    assert patched.manifest["history_policy"] == base.manifest["history_policy"]
    assert patched.read(MODEL) != base.read(MODEL)
    history = prepared.split.test.history
    a, _ = patched.model().topk_many(history)
    b, _ = full.model().topk_many(history)
    assert topk_agreement(a, b, 10) >= 0.99
    assert run_golden_check(patched.model(), patched.manifest["golden"]) == 1.0


def test_history_policy_follows_the_measured_repeat_rate():
    assert history_policy({}) is None  # older runs: the SDK's defaults
    keep = history_policy({"repeat_rate": REPEAT_KEEP + 0.2})
    drop = history_policy({"repeat_rate": REPEAT_KEEP / 2})
    assert keep["exclude_kinds"] == ["dismiss"] and keep["distinct"] is False
    assert drop["exclude_kinds"] == ["purchase", "dismiss"] and drop["distinct"] is True
    assert HistoryPolicy.from_manifest({}) == HistoryPolicy()
    policy = HistoryPolicy.from_manifest({"history_policy": keep})
    assert policy.exclude_kinds == ("dismiss",) and policy.distinct is False
    for bad in ({"history_policy": "keep"}, {"history_policy": {"exclude_kinds": "purchase"}},
                {"history_policy": {"distinct": "no"}}):
        with pytest.raises(ValueError, match="history_policy"):
            HistoryPolicy.from_manifest(bad)


def test_raw_history_keeps_repeats_and_drops_dismissed_items():
    ids = {"a": 1, "b": 2, "c": 3}
    events = [("a", "purchase"), ("b", "purchase"), ("a", "purchase"), ("c", "view"),
              ("c", "dismiss"), ("b", "purchase"), ("x", "purchase")]
    raw = history_ids(events, lambda k: ids.get(k, 0), 5, HistoryPolicy(distinct=False))
    assert raw.tolist() == [0, 1, 2, 1, 2]
    distinct = history_ids(events, lambda k: ids.get(k, 0), 5, HistoryPolicy())
    assert distinct.tolist() == [0, 0, 0, 1, 2]


@pytest.mark.slow
def test_recommender_follows_the_bundle_policy_unless_the_app_overrides(repeat_export,
                                                                         tmp_path):
    ckpt, prepared, export = repeat_export
    bundle = load_bundle(export.bundle_dir)
    history = prepared.split.test.history[0]
    bought = [ckpt.vocab.keys[i] for i in history[history > 0]]
    log = EventLog(tmp_path / "events.db")
    log.log_many([(key, "purchase", 1000.0 + n) for n, key in enumerate(bought)])
    served = Recommender(bundle)
    assert served.policy == HistoryPolicy.from_manifest(bundle.manifest)
    assert served.history(log).tolist() == history.tolist()  # repeats and all, as trained
    ids, _ = bundle.model().topk(history)
    expected = [ckpt.vocab.keys[i] for i in ids.tolist()[:10]]
    assert [r.item for r in served.recommend(log, 10)] == expected
    app = Recommender(bundle, policy=HistoryPolicy())  # the app drops what was bought
    assert not {r.item for r in app.recommend(log, 10)} & set(bought)
    assert json.loads(bundle.manifest_bytes)["history_policy"]["repeat_rate"] == 0.4


def test_train_without_model_trains_the_repeat_family_and_says_so(tmp_path, capsys):
    from trainer.checkpoint import Checkpoint
    from trainer.cli import main

    run = tmp_path / "run"
    assert main(["train", "--run", str(run), "--synthetic-users", "80", "--synthetic-items",
                 "80", "--epochs", "1", "--dim", "8", "--hidden", "8", "--max-len", "6",
                 "--no-progress"]) == 0
    assert "model: repeat_sasrec (the default" in capsys.readouterr().out
    ckpt = Checkpoint.load(run / "checkpoint")
    assert ckpt.architecture == "repeat_sasrec"
    assert 0.0 <= ckpt.meta["data"]["repeat_rate"] <= 1.0


def test_central_dp_refuses_the_repeat_head_by_name(tmp_path, capsys):
    from trainer.cli import main

    args = ["train", "--synthetic-users", "60", "--synthetic-items", "80", "--epochs", "1",
            "--dim", "8", "--hidden", "8", "--max-len", "6", "--dp", "--no-progress"]
    assert main([*args, "--run", str(tmp_path / "a"), "--model", "repeat_sasrec"]) == 2
    assert "central DP-SGD does not support RepeatSasRec" in capsys.readouterr().err
    assert main([*args, "--run", str(tmp_path / "b")]) == 0  # the default falls back
    assert "model: sasrec (the default: the default family has no central DP-SGD" in \
        capsys.readouterr().out


def test_central_training_steps_the_repeat_head_faster():
    from trainer.train import param_groups

    config = ARCH.config(n_items=20, dim=8, hidden=8, max_len=5)
    module = ARCH.torch_module(config)
    groups = {round(g["lr"], 9): g["params"] for g in param_groups(module, 1e-3)}
    head = {id(p) for n, p in module.named_parameters() if n.startswith("repeat.")}
    assert set(groups) == {1e-3, 1e-2}
    assert {id(p) for p in groups[1e-2]} == head
    assert len(groups[1e-3]) == len(list(module.parameters())) - len(head)
    plain = model_zoo.get("sasrec").torch_module(model_zoo.get("sasrec").config(n_items=20))
    assert [g["lr"] for g in param_groups(plain, 1e-3)] == [1e-3]
