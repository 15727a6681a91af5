"""HAX-Mamba mixer (subq/nn/hax.py): ranking loss, fusion, causality, the baselines,
decoding."""

from __future__ import annotations

import math

import pytest
import torch

from subq.nn.hax import HaxMamba, pairwise_ranking_loss, ranking_loss
from subq.nn.mamba import Mamba

from ..helpers import rel_rms


def test_pairwise_ranking_loss_hand_computed():
    # pairs (a, b): logits x_a - x_b = [[0, 1], [-1, 0]], targets [[1/2, 1], [0, 1/2]]
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([2.0, 1.0])
    expected = (2 * math.log(2) + 2 * math.log(1 + math.exp(-1))) / 4
    assert abs(float(pairwise_ranking_loss(x, y)) - expected) < 1e-6
    # equal targets give 1/2 both ways: only log 2 terms
    assert abs(float(pairwise_ranking_loss(x, torch.tensor([3.0, 3.0]))) - 0.5 * (
        math.log(2) + 0.5 * (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))))) < 1e-6


def test_ranking_loss_targets_are_linear_attention_mass():
    length, d = 9, 4
    q, k = torch.randn(2, length, d), torch.randn(2, length, d)
    scores = torch.randn(2, length, requires_grad=True)
    y = torch.zeros(2, length)
    for b in range(2):
        for j in range(length):
            y[b, j] = sum(torch.sigmoid(q[b, i] @ k[b, j]) for i in range(j, length))
    # With every key sampled the pair set is all of them (the mean is order-free).
    loss = ranking_loss(scores, q, k, num_keys=length)
    assert abs(loss.item() - pairwise_ranking_loss(scores, y).item()) < 1e-5
    loss.backward()
    assert scores.grad.abs().sum() > 0


def _mixer(**kw):
    return HaxMamba(16, d_state=8, k_total=8, num_hash=3, max_length=32, **kw)


def test_gate_zero_is_plain_mamba_and_gate_starts_at_ones():
    mixer = _mixer().eval()
    assert torch.equal(mixer.gate.detach(), torch.ones(mixer.d_inner))
    plain = Mamba(16, d_state=8)
    plain.load_state_dict({k: v for k, v in mixer.state_dict().items()
                           if k in plain.state_dict()})
    x = torch.randn(2, 30, 16)
    assert rel_rms(plain(x), mixer(x)) > 1e-3  # the branch contributes
    with torch.no_grad():
        mixer.gate.zero_()
    assert rel_rms(plain(x), mixer(x)) <= 1e-6


@pytest.mark.parametrize("sparse", ["hax", "lsh", "ks", "window", "sink", "dilated",
                                    "window+dilated", "full"])
def test_causal_in_eval_and_aux_loss_only_in_training(sparse):
    mixer = _mixer(sparse=sparse)
    x = torch.randn(2, 40, 16)
    out = mixer.eval()(x)
    x2 = x.clone()
    x2[:, 25:] = torch.randn_like(x2[:, 25:])
    assert rel_rms(out[:, :25], mixer(x2)[:, :25]) <= 1e-6
    assert float(mixer.aux_loss) == 0.0
    mixer.train()(x).sum()
    assert (float(mixer.aux_loss) > 0) == (sparse in ("hax", "ks"))


def test_official_normalization_is_not_causal():
    mixer = _mixer(official_code_normalization=True).eval()
    x = torch.randn(2, 40, 16)
    x2 = x.clone()
    x2[:, 25:] = 5 * torch.randn_like(x2[:, 25:])
    assert rel_rms(mixer(x)[:, :25], mixer(x2)[:, :25]) > 1e-4


def test_scorer_learns_only_from_the_ranking_loss():
    mixer = _mixer().train()
    out = mixer(torch.randn(2, 30, 16))
    out.square().mean().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in mixer.scorer.parameters())
    assert mixer.xx_proj.weight.grad.abs().sum() > 0
    mixer.zero_grad()
    mixer(torch.randn(2, 30, 16))
    mixer.aux_loss.backward()
    # (the last bias cancels in x_a - x_b, so only the weights must receive gradient)
    assert all(layer.weight.grad.abs().sum() > 0 for layer in mixer.scorer[::2])


def test_full_branch_is_dense_causal_attention():
    mixer = _mixer(sparse="full").eval()
    u = torch.randn(2, 20, mixer.d_inner)
    k, q = mixer.xx_proj(u).chunk(2, dim=-1)
    logits = q @ k.transpose(1, 2) / math.sqrt(8)
    logits = logits.masked_fill(torch.ones(20, 20).triu(1).bool(), float("-inf"))
    expected = torch.softmax(logits, -1) @ u
    assert rel_rms(expected, mixer.sparse_attention(u)) <= 1e-5


def test_bad_arguments_and_official_normalization_cannot_decode():
    with pytest.raises(ValueError, match="sparse"):
        HaxMamba(16, sparse="nope")
    with pytest.raises(ValueError, match="k_total"):
        HaxMamba(16, k_total=1)
    official = _mixer(official_code_normalization=True)
    assert not official.decodes and _mixer().decodes
    with pytest.raises(NotImplementedError, match="official_code_normalization"):
        official.init_state(2)


ALL_SPARSE = ["hax", "lsh", "ks", "window", "sink", "dilated", "window+dilated", "full"]


def _decoder(sparse: str) -> HaxMamba:
    # k_total=8: 4 LSH + 4 selected keys (hax), 2^3 buckets: over 80 tokens a bucket holds
    # about 10 keys, so both the per-bucket recency and the top-k evict.
    return _mixer(sparse=sparse).double().eval()


def _step_all(mixer: HaxMamba, x: torch.Tensor, state) -> tuple[torch.Tensor, object]:
    outs = []
    for t in range(x.shape[1]):
        out, state = mixer.step(x[:, t], state)
        outs.append(out)
    return torch.stack(outs, 1), state


@pytest.mark.parametrize("sparse", ALL_SPARSE)
def test_step_equals_forward_at_every_position(sparse):
    mixer = _decoder(sparse)
    x = torch.randn(2, 80, 16, dtype=torch.float64)
    with torch.no_grad():
        full = mixer(x)
        stepped, state = _step_all(mixer, x, mixer.init_state(2, torch.float64))
    torch.testing.assert_close(stepped, full, rtol=0, atol=1e-10)
    assert state.attention.t == 80
    if sparse in ("hax", "lsh", "ks", "window", "sink"):  # a bounded cache, not all 80 keys
        assert state.attention.keys.shape[2] < 80
    if sparse == "hax":  # the sparse branch is not dense attention
        dense = _decoder("full")
        dense.load_state_dict(mixer.state_dict(), strict=False)
        with torch.no_grad():
            assert rel_rms(dense(x), full) > 1e-3


@pytest.mark.parametrize("sparse", ["hax", "dilated"])
def test_prefill_then_step_equals_forward(sparse):
    mixer = _decoder(sparse)
    x = torch.randn(2, 80, 16, dtype=torch.float64)
    with torch.no_grad():
        full = mixer(x)
        prefix, state = mixer(x[:, :50], return_state=True)
        rest, _ = _step_all(mixer, x[:, 50:], state)
        chunk, after = mixer(x[:, 50:65], state, return_state=True)  # continue by a chunk
        last, _ = _step_all(mixer, x[:, 65:], after)
    torch.testing.assert_close(prefix, full[:, :50], rtol=0, atol=1e-10)
    torch.testing.assert_close(rest, full[:, 50:], rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.cat([chunk, last], 1), full[:, 50:], rtol=0, atol=1e-10)


def test_step_gradients_match_forward():
    mixer = _decoder("hax")
    x = torch.randn(1, 40, 16, dtype=torch.float64)
    mixer(x).sum().backward()
    expected = {n: p.grad.clone() for n, p in mixer.named_parameters() if p.grad is not None}
    mixer.zero_grad()
    _step_all(mixer, x, mixer.init_state(1, torch.float64))[0].sum().backward()
    for name, grad in expected.items():
        torch.testing.assert_close(dict(mixer.named_parameters())[name].grad, grad,
                                   rtol=0, atol=1e-9)
