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


def _with_separators(rng, config, history):
    """With a session separator (config.session_id): some in the middle of histories, and
    every other history ends with one (a request opening a new session)."""
    if not config.session_id:
        return history
    history = history.copy()
    real = history > 0
    middle = real & (rng.random(history.shape) < 0.15)
    history[middle] = config.session_id
    history[2::2, -1] = np.where(real[2::2, -1], config.session_id, 0)
    return history


# Without and with a session separator (the vocabulary's last id).
VARIANTS = pytest.mark.parametrize("session", [{}, {"session_id": -1, "session_gap": 1800}],
                                   ids=["plain", "sessions"])


def _session_cfg(session, n_items):
    return {k: (n_items - 1 if v == -1 else v) for k, v in session.items()}


@VARIANTS
def test_logits_and_every_gradient_match_torch(session):
    config, module, twin = _pair(0, n_items=61, dim=16, hidden=24, max_len=10, blocks=2,
                                 heads=2, dropout=0.0, **_session_cfg(session, 61))
    rng = np.random.default_rng(1)
    history = _with_separators(rng, config, _repeating_histories(rng, config, 24))
    targets = history[:, -2].copy()
    targets[(targets == 0) | (targets == config.session_id)] = 5
    targets[::3] = rng.integers(1, config.n_items - 1, size=len(targets[::3]))

    logits_t = module(torch.from_numpy(history))
    loss_t = torch.nn.functional.cross_entropy(logits_t, torch.from_numpy(targets))
    loss_t.backward()
    logits_n = twin.logits(history)
    ranked = [i for i in range(1, config.n_items) if i != config.session_id]
    np.testing.assert_allclose(logits_n[:, ranked], logits_t.detach().numpy()[:, ranked],
                               rtol=1e-5, atol=1e-5)
    for masked in {0, config.session_id}:  # padding and the separator are never ranked
        assert (logits_n[:, masked] < -1e8).all() and (logits_t[:, masked] < -1e8).all()
    loss_n, grads = twin.loss_and_grads(history, targets)
    assert loss_n == pytest.approx(loss_t.item(), rel=1e-5)
    torch_grads = {k: p.grad.numpy() for k, p in module.named_parameters()}
    assert set(grads) == set(torch_grads) == set(config.param_shapes())
    for name, g in grads.items():
        np.testing.assert_allclose(g, torch_grads[name], rtol=1e-4, atol=1e-6, err_msg=name)
    head = [n for n in config.param_shapes() if n.startswith("repeat.") and "bias" not in n]
    assert len(head) == (3 if session else 2)  # age(s) and the gate weight
    for name in (*head, "repeat.item_bias"):
        assert np.abs(grads[name]).max() > 1e-4, name  # the repeat head really learns


@VARIANTS
def test_repeat_head_gradients_match_finite_differences(session):
    """Independent of torch, on the tensors devices federate."""
    config, _, twin = _pair(3, n_items=23, dim=6, hidden=5, max_len=6, blocks=1, dropout=0.0,
                            **_session_cfg(session, 23))
    twin.params = {k: v.astype(np.float64) for k, v in twin.params.items()}
    rng = np.random.default_rng(4)
    history = _with_separators(rng, config, _repeating_histories(rng, config, 8))
    targets = rng.integers(1, 22, size=8)
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


@VARIANTS
def test_training_positions_score_repeats_like_serving(session):
    """The repeat score ``sequence_logits`` adds at position t (what central training fits)
    equals the one ``forward`` adds for the history cut at t: ages count from that position,
    and a separator at t picks the session ages there as at serving's last position.
    (SASRec's own state at t differs from serving's by its absolute positions, so the gate
    is held at its bias here.)"""
    config, module, _ = _pair(5, n_items=31, dim=8, hidden=8, max_len=8, dropout=0.0,
                              **_session_cfg(session, 31))
    rng = np.random.default_rng(6)
    history = torch.from_numpy(_with_separators(rng, config,
                                                _repeating_histories(rng, config, 6)))
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


@pytest.fixture(scope="module", params=["plain", "sessions"])
def repeat_export(request, tmp_path_factory):
    """A small repeat-aware SASRec trained three epochs on the synthetic shop, exported;
    without and with session separators (a gap of 30 minutes)."""
    from trainer.checkpoint import Checkpoint
    from trainer.data.dataset import DataSpec, prepare
    from trainer.export import export_bundle
    from trainer.train import TrainConfig, model_rows, train

    spec = DataSpec(synthetic_users=300, synthetic_items=120, seed=7)
    prepared = prepare(spec, max_len=12)
    session = {}
    if request.param == "sessions":
        prepared.vocab = prepared.vocab.with_session()
        session = {"session_id": prepared.vocab.session_id, "session_gap": 1800}
    config = ARCH.config(n_items=len(prepared.vocab), dim=16, hidden=32, blocks=2, heads=2,
                         max_len=12, top_k=20, dropout=0.1, **session)
    module = ARCH.torch_module(config)
    result = train(module, prepared.split, TrainConfig(epochs=3, batch_size=32, lr=1e-2),
                   progress=False)
    meta = {"data": {**spec.to_dict(), "repeat_rate": 0.4}}
    ckpt = Checkpoint("repeat_sasrec", config.to_dict(), result.params, prepared.vocab, meta)
    out = tmp_path_factory.mktemp("export-repeat")
    test = model_rows(prepared.split.test, config)  # the rows as this model sees them
    if session:  # the serving histories hold separators, some of them closing the history
        assert (test.history == config.session_id).any(axis=1).mean() > 0.5
        assert (test.history[:, -1] == config.session_id).any()
    return ckpt, prepared, export_bundle(ckpt, out, histories=test.history[:3]), test


@pytest.mark.slow
def test_export_keeps_the_signature_and_ranks_like_torch(repeat_export):
    ckpt, _, export, test = repeat_export
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
    history = np.concatenate([test.history,
                              _repeating_histories(rng, config, 64).astype(np.int32)])
    torch_ids = torch_topk(ckpt.torch_module(), history, config.top_k)
    float_ids, _ = TopKModel(export.float_path.read_bytes()).topk_many(history)
    int8_ids, int8_scores = bundle.model().topk_many(history)
    twin_ids, _ = ckpt.numpy_model().topk(history, config.top_k)
    assert topk_agreement(float_ids, torch_ids, 10) >= 0.99
    assert topk_agreement(twin_ids, torch_ids, 10) >= 0.99
    assert topk_agreement(int8_ids, torch_ids, 10) >= 0.9
    assert (int8_ids > 0).all() and (np.diff(int8_scores, axis=1) <= 1e-6).all()
    if config.session_id:  # the separator is never served
        assert not (int8_ids == config.session_id).any()
        assert not (float_ids == config.session_id).any()
    assert run_golden_check(bundle.model(), bundle.manifest["golden"]) == 1.0


@pytest.mark.slow
def test_round_weights_are_patched_into_the_file_or_exported(repeat_export):
    """The publisher writes a round's federated tensors into the base file: the result ranks
    like the full export of the same weights and passes its golden check."""
    from sync_server.publisher import patch_bundle
    from trainer.publish import export_weights

    _, _, export, test = repeat_export
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
    history = test.history
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
    """The device builds the history the evaluation fed the model (session separators
    included, as of the request's time) from a log of the same steps at the same times."""
    ckpt, prepared, export, test = repeat_export
    bundle = load_bundle(export.bundle_dir)
    raw, stamps = prepared.split.test.history[0], prepared.split.test.times[0]
    bought = [ckpt.vocab.keys[i] for i in raw[raw > 0]]
    log = EventLog(tmp_path / "events.db")
    log.log_many([(key, "purchase", float(t)) for key, t in zip(bought, stamps[raw > 0],
                                                                 strict=True)])
    served = Recommender(bundle)
    now = float(test.at[0])
    assert served.policy == HistoryPolicy.from_manifest(bundle.manifest)
    history = served.history(log, now)
    assert history.tolist() == test.history[0].tolist()  # repeats and all, as trained
    ids, _ = bundle.model().topk(history)
    expected = [ckpt.vocab.keys[i] for i in ids.tolist()[:10]]
    assert [r.item for r in served.recommend(log, 10, now=now)] == expected
    app = Recommender(bundle, policy=HistoryPolicy())  # the app drops what was bought
    assert not {r.item for r in app.recommend(log, 10, now=now)} & set(bought)
    assert json.loads(bundle.manifest_bytes)["history_policy"]["repeat_rate"] == 0.4
    separator = ckpt.model_config().session_id
    last = float(stamps[-1])
    soon, later = served.history(log, last + 60), served.history(log, last + 86400)
    if separator:  # a request a day later opens a session; a minute later does not
        assert soon[-1] == raw[-1] and later[-1] == separator
        assert later[:-1].tolist() == soon[1:].tolist()
        assert (soon == separator).sum() == (later == separator).sum() - 1
    else:  # a model without separators sees the log alone
        assert soon.tolist() == later.tolist() == raw.tolist()


def test_train_without_model_trains_the_repeat_family_and_says_so(tmp_path, capsys):
    from trainer.checkpoint import Checkpoint
    from trainer.cli import main

    run = tmp_path / "run"
    assert main(["train", "--run", str(run), "--synthetic-users", "80", "--synthetic-items",
                 "80", "--epochs", "1", "--dim", "8", "--hidden", "8", "--max-len", "6",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "model: repeat_sasrec (the default" in out
    assert "a gap over 1,800 s starts a new session" in out
    ckpt = Checkpoint.load(run / "checkpoint")
    assert ckpt.architecture == "repeat_sasrec"
    assert 0.0 <= ckpt.meta["data"]["repeat_rate"] <= 1.0
    config = ckpt.model_config()
    assert config.session_id == ckpt.vocab.session_id == len(ckpt.vocab) - 1
    assert config.session_gap == 1800


def test_session_gap_flag_turns_separators_off_and_is_refused_elsewhere(tmp_path, capsys):
    from trainer.checkpoint import Checkpoint
    from trainer.cli import main

    args = ["train", "--synthetic-users", "60", "--synthetic-items", "80", "--epochs", "1",
            "--dim", "8", "--hidden", "8", "--max-len", "6", "--no-progress"]
    assert main([*args, "--run", str(tmp_path / "off"), "--session-gap", "0"]) == 0
    ckpt = Checkpoint.load(tmp_path / "off" / "checkpoint")
    assert ckpt.model_config().session_id == 0 and ckpt.vocab.session_id == 0
    assert main([*args, "--run", str(tmp_path / "s"), "--model", "sasrec",
                 "--session-gap", "600"]) == 2
    assert "--session-gap does not apply to --model sasrec" in capsys.readouterr().err
    sim = ["simulate", "--run", str(tmp_path / "sim"), "--synthetic-users", "60",
           "--no-progress"]
    assert main([*sim, "--model", "dual_encoder", "--session-gap", "600"]) == 2
    assert "--session-gap does not apply to --model dual_encoder" in capsys.readouterr().err
    assert main([*sim, "--model", "repeat_sasrec", "--basket-weight", "1"]) == 2
    assert "--basket-weight applies to pocketrec train" in capsys.readouterr().err
    # Runs with and without separators rank the same items: one table compares them.
    assert main([*args, "--run", str(tmp_path / "on")]) == 0
    assert main(["evaluate", "--run", str(tmp_path / "on"), "--compare",
                 str(tmp_path / "off")]) == 0
    out = capsys.readouterr().out
    assert "repeat_sasrec +sessions torch (float)" in out
    assert "\nrepeat_sasrec torch (float)" in out


def test_the_simulator_builds_repeat_sasrec_with_separators_as_train_does():
    from trainer.cli import SESSION_GAP, _simulation_model, _trainable, build_parser

    def model(*flags):
        return _simulation_model(build_parser().parse_args(["simulate", *flags]))

    assert model().options["session_gap"] == SESSION_GAP
    assert model("--model", "repeat_sasrec", "--session-gap", "600").options[
        "session_gap"] == 600
    assert "session_gap" not in model("--model", "repeat_sasrec", "--session-gap", "0").options
    assert model().arch == "repeat_sasrec"  # the simulator's default family
    assert "session_gap" not in model("--model", "dual_encoder").options
    # --trainable names the tensors of the model as built, the separators' one included.
    trainable = _trainable(build_parser().parse_args(
        ["simulate", "--model", "repeat_sasrec", "--trainable", "repeat"]))
    assert trainable == ("repeat.age", "repeat.age_session", "repeat.gate.bias",
                         "repeat.gate.weight", "repeat.item_bias")


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


@pytest.mark.slow
def test_device_training_examples_see_what_serving_sees(repeat_export, tmp_path):
    """A device's local examples hold separators where serving puts them: the history
    before each step is the one a request at that step's time would have fed the model, and
    no example targets the separator."""
    from device_sdk.local_trainer import LocalTrainer
    from device_sdk.sessions import session_window
    from trainer.data.split import last_window

    ckpt, prepared, export, _ = repeat_export
    config = ckpt.model_config()
    users = [u for u, t in prepared.split.train_times.items()
             if len(t) > 4 and (np.diff(t) > 1800).any()]
    ids, stamps = prepared.split.train[users[0]], prepared.split.train_times[users[0]]
    log = EventLog(tmp_path / "events.db")
    log.log_many([(ckpt.vocab.keys[i], "purchase", float(t))
                  for i, t in zip(ids, stamps, strict=True)])
    histories, targets = LocalTrainer(load_bundle(export.bundle_dir)).examples(log.events(),
                                                                             1000)
    assert targets.tolist() == ids[1:].tolist()  # every step is a target, no separator is
    for step in (1, len(ids) // 2, len(ids) - 1):
        if config.session_id:
            expected = session_window(ids[:step], stamps[:step], config.session_id,
                                      config.session_gap, float(stamps[step]), config.max_len)
        else:
            expected = last_window(ids[:step], config.max_len)
        assert histories[step - 1].tolist() == expected.tolist()
    if config.session_id:  # this user has a gap over 30 minutes: a separator sits there
        assert (histories == config.session_id).any()
