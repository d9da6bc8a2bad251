"""DP-SGD: exact per-sample gradient norms for the pooled embedding, and the epsilon the
trainer reports is the RDP accountant's for the steps actually taken."""

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

import model_zoo
from model_zoo.dual_encoder.torch_module import PooledEmbedding
from sync_server.privacy import default_delta
from trainer.data.dataset import DataSpec, prepare
from trainer.train import DPConfig, TrainConfig, train


def test_pooled_embedding_per_sample_norms_are_exact():
    torch.manual_seed(0)
    layer = PooledEmbedding(30, 5)
    torch.nn.init.normal_(layer.weight)
    history = torch.randint(0, 30, (6, 8))
    history[0, :] = 0  # empty history
    history[1, :4] = history[1, 4]  # repeated ids must add up
    attn = torch.rand(6, 8) * (history > 0)
    backprops = torch.randn(6, 5)
    norms = PooledEmbedding.per_sample_grad_norms(layer, [history, attn], backprops)[layer.weight]
    for b in range(6):
        layer.weight.grad = None
        (layer(history[b : b + 1], attn[b : b + 1]) * backprops[b : b + 1]).sum().backward()
        assert norms[b].item() == pytest.approx(layer.weight.grad.norm().item(), rel=1e-5, abs=1e-7)


def _tiny_dp_run(seed: int, dp: DPConfig):
    """(prepared data, fresh module, config) for two DP epochs on a small synthetic shop."""
    prepared = prepare(DataSpec(synthetic_users=200, synthetic_items=80, seed=seed), max_len=10)
    arch = model_zoo.get("dual_encoder")
    config = arch.config(n_items=len(prepared.vocab), dim=8, hidden=8, max_len=10)
    cfg = TrainConfig(epochs=2, batch_size=128, patience=5, dp=dp)
    return prepared, arch.torch_module(config), cfg


@pytest.mark.slow
def test_dp_training_reports_the_accountants_epsilon():
    dp = DPConfig(noise_multiplier=1.1, max_grad_norm=0.5, delta=1e-5)
    prepared, module, cfg = _tiny_dp_run(3, dp)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    result = train(module, prepared.split, cfg, progress=False)
    p = result.privacy
    n = len(prepared.split.train_examples(10)[1])
    batches = -(-n // 128)
    assert p["sample_rate"] == pytest.approx(1 / batches)
    assert p["steps"] == 2 * batches
    accountant = RDPAccountant()
    accountant.history = [(1.1, 1 / batches, p["steps"])]
    assert p["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-6)
    assert 0 < p["epsilon"] < 100 and p["delta"] == 1e-5 and p["unit"] == "example"
    changed = [k for k, v in result.params.items() if not np.allclose(v, before[k].numpy())]
    assert "out.weight" in changed and "item_emb.weight" in changed


def test_default_delta_is_the_servers_rule_at_most_a_tenth_of_one_over_n():
    """Central DP-SGD uses the server's one delta rule (``sync_server.privacy``)."""
    prepared, module, cfg = _tiny_dp_run(1, DPConfig(noise_multiplier=1.1, max_grad_norm=0.5))
    result = train(module, prepared.split, cfg, progress=False)
    n = len(prepared.split.train_examples(10)[1])
    assert result.privacy["delta"] == default_delta(n) <= 1 / (10 * n)
    assert result.privacy["delta"] > 1 / (100 * n)  # the largest power of ten that fits
    for count, expected in ((1, 0.1), (10, 1e-2), (1000, 1e-4), (1001, 1e-5), (896, 1e-4)):
        assert default_delta(count) == pytest.approx(expected, rel=1e-12)


@pytest.mark.slow
def test_target_epsilon_calibrates_the_noise():
    dp = DPConfig(target_epsilon=3.0, max_grad_norm=1.0, delta=1e-5)
    prepared, module, cfg = _tiny_dp_run(4, dp)
    result = train(module, prepared.split, cfg, progress=False)
    # Calibrated for the planned epochs; Poisson sampling makes the step count approximate.
    assert result.privacy["epsilon"] == pytest.approx(3.0, rel=0.15)
    assert result.privacy["noise_multiplier"] > 0.3


def test_dp_refuses_sampled_softmax_and_ambiguous_settings():
    with pytest.raises(ValueError, match="full softmax"):
        TrainConfig(loss="sampled", dp=DPConfig(noise_multiplier=1.0))
    with pytest.raises(ValueError, match="exactly one"):
        DPConfig(noise_multiplier=1.0, target_epsilon=2.0)
    with pytest.raises(ValueError, match="exactly one"):
        DPConfig()


def test_sasrec_ghost_clipping_clips_each_sequence_chunk_exactly():
    """One DP-SGD step (no noise, SGD lr 1) on the sequence model equals the hand-computed
    mean of per-chunk gradients each clipped to C: Opacus' ghost norms for every layer the
    model uses (Linear on [B, L, d], Embedding, LayerNorm) are exact, per chunk."""
    from opacus import PrivacyEngine

    arch = model_zoo.get("sasrec")
    config = arch.config(n_items=30, dim=8, hidden=12, blocks=2, heads=2, max_len=6,
                         dropout=0.0)
    torch.manual_seed(0)
    module = arch.torch_module(config)
    x = torch.randint(1, 30, (5, 6))
    x[0, :3] = 0  # a partly padded chunk
    y = torch.randint(1, 30, (5, 6))
    y[0, :3] = 0  # no targets where there is no input
    clip = 0.05
    start = {k: v.detach().clone() for k, v in module.named_parameters()}
    criterion = torch.nn.CrossEntropyLoss(ignore_index=0)

    def chunk_loss(m, xb, yb):
        logits = m.sequence_logits(xb)
        return criterion(logits.reshape(-1, 30), yb.reshape(-1))

    expected = {k: torch.zeros_like(v) for k, v in start.items()}
    for i in range(5):
        module.zero_grad()
        chunk_loss(module, x[i : i + 1], y[i : i + 1]).backward()
        grads = {k: p.grad.clone() for k, p in module.named_parameters()}
        norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
        assert norm > clip  # every chunk is clipped, so the check is sharp
        for k, g in grads.items():
            expected[k] += g * (clip / norm) / 5

    module.zero_grad()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    wrapped, optimizer, dp_criterion, _ = PrivacyEngine().make_private(
        module=module, optimizer=torch.optim.SGD(module.parameters(), lr=1.0),
        criterion=criterion, data_loader=loader, noise_multiplier=0.0, max_grad_norm=clip,
        grad_sample_mode="ghost", poisson_sampling=False,
    )
    logits = module.sequence_logits(x)
    loss = dp_criterion(logits.reshape(-1, 30), y.reshape(-1), shape=logits.shape)
    loss.backward()
    optimizer.step()
    for name, p in module.named_parameters():
        step = start[name] - p.detach()
        torch.testing.assert_close(step, expected[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.slow
def test_sasrec_dp_training_accounts_per_chunk():
    prepared = prepare(DataSpec(synthetic_users=120, synthetic_items=60, seed=5), max_len=8)
    arch = model_zoo.get("sasrec")
    module = arch.torch_module(arch.config(n_items=len(prepared.vocab), dim=8, hidden=8,
                                           max_len=8))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    dp = DPConfig(noise_multiplier=1.1, max_grad_norm=0.5, delta=1e-5)
    result = train(module, prepared.split, TrainConfig(epochs=1, batch_size=32, dp=dp),
                   progress=False)
    p = result.privacy
    chunks = len(prepared.split.train_sequences(8)[0])
    assert p["unit"] == "sequence chunk"
    assert p["sample_rate"] == pytest.approx(1 / -(-chunks // 32))
    accountant = RDPAccountant()
    accountant.history = [(1.1, p["sample_rate"], p["steps"])]
    assert p["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-6)
    changed = [k for k, v in result.params.items() if not np.allclose(v, before[k].numpy())]
    assert {"out.weight", "item_emb.weight", "pos_emb.weight", "blocks.0.q.weight"} <= set(changed)
