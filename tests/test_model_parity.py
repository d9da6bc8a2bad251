"""The numpy twin and the torch module compute the same logits and gradients."""

import numpy as np
import pytest
import torch

import model_zoo


def _pair(seed: int, **cfg):
    arch = model_zoo.get("dual_encoder")
    config = arch.config(**cfg)
    torch.manual_seed(seed)
    module = arch.torch_module(config)
    # Non-zero biases so their gradients are exercised too.
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    params = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
    return config, module, arch.numpy_model(config, params)


def _histories(rng, config, batch):
    h = rng.integers(1, config.n_items, size=(batch, config.max_len))
    lengths = rng.integers(0, config.max_len + 1, size=batch)
    lengths[0] = 0  # an empty history
    lengths[1] = config.max_len  # a full one
    for row, n in enumerate(lengths):
        h[row, : config.max_len - n] = 0
    h[2, -3:] = h[2, -1]  # repeated ids must accumulate gradient
    return h


@pytest.mark.parametrize("decay", [1.0, 0.8])
def test_logits_and_gradients_match_torch(decay):
    config, module, twin = _pair(0, n_items=97, dim=16, hidden=24, max_len=12, recency_decay=decay)
    rng = np.random.default_rng(1)
    history = _histories(rng, config, 32)
    targets = rng.integers(1, config.n_items, size=32)

    logits_t = module(torch.from_numpy(history))
    loss_t = torch.nn.functional.cross_entropy(logits_t, torch.from_numpy(targets))
    loss_t.backward()

    logits_n = twin.logits(history)
    np.testing.assert_allclose(logits_n, logits_t.detach().numpy(), rtol=1e-5, atol=1e-5)
    loss_n, grads = twin.loss_and_grads(history, targets)
    assert loss_n == pytest.approx(loss_t.item(), rel=1e-5)
    torch_grads = {k: p.grad.numpy() for k, p in module.named_parameters()}
    assert set(grads) == set(torch_grads)
    for name, g in grads.items():
        np.testing.assert_allclose(g, torch_grads[name], rtol=1e-4, atol=1e-6, err_msg=name)
    assert not grads["item_emb.weight"][0].any()


def test_gradient_matches_finite_differences():
    """Independent of torch: a central difference on a few coordinates of each tensor."""
    _, _, twin = _pair(3, n_items=31, dim=6, hidden=5, max_len=5, recency_decay=0.7)
    twin.params = {k: v.astype(np.float64) for k, v in twin.params.items()}
    rng = np.random.default_rng(4)
    history = _histories(rng, twin.config, 8)
    targets = rng.integers(1, 31, size=8)
    _, grads = twin.loss_and_grads(history, targets)
    for name, value in twin.params.items():
        flat = value.reshape(-1)
        candidates = np.flatnonzero(grads[name].reshape(-1)) if name == "item_emb.weight" else None
        picks = rng.choice(candidates if candidates is not None else flat.size, size=3)
        for i in picks:
            old = flat[i]
            flat[i] = old + 1e-5
            up, _ = twin.loss_and_grads(history, targets)
            flat[i] = old - 1e-5
            down, _ = twin.loss_and_grads(history, targets)
            flat[i] = old
            assert grads[name].reshape(-1)[i] == pytest.approx((up - down) / 2e-5, abs=1e-4), name


def test_topk_never_returns_padding_and_is_sorted():
    config, module, twin = _pair(5, n_items=20, dim=8, hidden=8, max_len=4, top_k=19)
    ids, scores = twin.topk(np.array([[0, 0, 3, 4], [0, 0, 0, 0]]))
    assert ids.dtype == np.int32 and ids.shape == (2, 19)
    assert (ids > 0).all()
    assert (np.diff(scores, axis=1) <= 0).all()
    full = twin.logits(np.array([[0, 0, 3, 4]]))[0]
    assert set(ids[0]) == set(np.argsort(-full)[:19])


def test_bad_shapes_are_refused():
    config, _, twin = _pair(6, n_items=20, dim=8, hidden=8, max_len=4)
    with pytest.raises(ValueError, match="shape"):
        twin.logits(np.zeros((2, 5), dtype=np.int64))
    with pytest.raises(ValueError, match="ids must be in"):
        twin.logits(np.full((1, 4), 20))
    with pytest.raises(ValueError, match="lack"):
        model_zoo.get("dual_encoder").numpy_model(config, {})
    with pytest.raises(KeyError, match="unknown architecture"):
        model_zoo.get("nope")


def _sasrec_pair(seed: int, **cfg):
    arch = model_zoo.get("sasrec")
    config = arch.config(**cfg)
    torch.manual_seed(seed)
    module = arch.torch_module(config).eval()  # dropout off: devices train without it
    with torch.no_grad():  # non-default biases and layer norm gains, so all are exercised
        for name, p in module.named_parameters():
            if name.endswith("bias") or ".ln" in name or name.startswith("ln_"):
                p.add_(torch.randn_like(p) * 0.1)
    params = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
    return config, module, arch.numpy_model(config, params)


@pytest.mark.parametrize("heads,blocks", [(1, 2), (2, 1), (4, 3)])
def test_sasrec_logits_and_gradients_match_torch(heads, blocks):
    config, module, twin = _sasrec_pair(0, n_items=97, dim=16, hidden=24, blocks=blocks,
                                        heads=heads, max_len=12)
    assert set(twin.params) == set(module.state_dict())  # one set of names for both
    rng = np.random.default_rng(1)
    history = _histories(rng, config, 32)
    targets = rng.integers(1, config.n_items, size=32)

    logits_t = module(torch.from_numpy(history))
    loss_t = torch.nn.functional.cross_entropy(logits_t, torch.from_numpy(targets))
    loss_t.backward()

    np.testing.assert_allclose(twin.logits(history), logits_t.detach().numpy(),
                               rtol=1e-5, atol=1e-5)
    loss_n, grads = twin.loss_and_grads(history, targets)
    assert loss_n == pytest.approx(loss_t.item(), rel=1e-5)
    torch_grads = {k: p.grad.numpy() for k, p in module.named_parameters()}
    assert set(grads) == set(torch_grads)
    for name, g in grads.items():
        np.testing.assert_allclose(g, torch_grads[name], rtol=1e-4, atol=2e-6, err_msg=name)
    assert not grads["item_emb.weight"][0].any()

    # The federated subset alone: same numbers, and only those tensors.
    federated = config.federated_params()
    assert "out.weight" in federated and f"blocks.{blocks - 1}.q.weight" in federated
    assert not any(n.startswith(("item_emb", "pos_emb")) for n in federated)
    assert (blocks == 1) == any(n.startswith("blocks.0.") for n in federated)
    sub_loss, sub = twin.loss_and_grads(history, targets, federated)
    assert sub_loss == loss_n and set(sub) == set(federated)
    for name in federated:
        np.testing.assert_array_equal(sub[name], grads[name])


def test_sasrec_gradient_matches_finite_differences():
    """Independent of torch: central differences in float64 on a few coordinates of each
    tensor (attention, layer norms, feed-forward, embeddings, output table)."""
    _, _, twin = _sasrec_pair(3, n_items=31, dim=8, hidden=6, blocks=2, heads=2, max_len=6)
    twin.params = {k: v.astype(np.float64) for k, v in twin.params.items()}
    rng = np.random.default_rng(4)
    history = _histories(rng, twin.config, 8)
    targets = rng.integers(1, 31, size=8)
    _, grads = twin.loss_and_grads(history, targets)
    for name, value in twin.params.items():
        flat = value.reshape(-1)
        nonzero = np.flatnonzero(grads[name].reshape(-1))
        picks = rng.choice(nonzero if name == "item_emb.weight" else flat.size, size=3)
        for i in picks:
            old = flat[i]
            flat[i] = old + 1e-5
            up, _ = twin.loss_and_grads(history, targets, names=())
            flat[i] = old - 1e-5
            down, _ = twin.loss_and_grads(history, targets, names=())
            flat[i] = old
            assert grads[name].reshape(-1)[i] == pytest.approx((up - down) / 2e-5, abs=1e-5), name


def test_sasrec_never_looks_ahead_or_at_padding():
    """Real positions never attend to padding (whatever the padding row holds) nor to later
    positions; the model is order-aware; topk never returns padding."""
    config, module, twin = _sasrec_pair(5, n_items=40, dim=8, hidden=8, blocks=2, max_len=6)
    short = np.array([[0, 0, 0, 5, 9, 7]])
    u = twin.user_vectors(short)
    twin.params["item_emb.weight"][0] = 3.0  # a padding row the mask must make irrelevant
    np.testing.assert_array_equal(twin.user_vectors(short), u)
    assert not np.allclose(twin.user_vectors(np.array([[0, 0, 0, 9, 5, 7]])), u)
    with torch.no_grad():
        a = module.sequence_states(torch.tensor([[0, 0, 3, 5, 9, 7]]))
        b = module.sequence_states(torch.tensor([[0, 0, 3, 5, 1, 2]]))
    torch.testing.assert_close(a[:, :4], b[:, :4])  # position l sees positions <= l only
    assert not torch.allclose(a[:, 4:], b[:, 4:])
    ids, scores = twin.topk(np.array([[0, 0, 0, 5, 9, 7], [0] * 6]), 39)
    assert (ids > 0).all() and (np.diff(scores, axis=1) <= 0).all()
    with pytest.raises(ValueError, match="not parameters"):
        twin.loss_and_grads(short, np.array([3]), names=["nope"])
    with pytest.raises(ValueError, match="lack"):
        model_zoo.get("sasrec").numpy_model(config, {})
