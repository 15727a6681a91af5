"""The mixer-by-name byte LM: prefix consistency and finite gradients for every mixer,
decoding == prefill and greedy generation == repeated full forwards, equal parameter counts
at the ``small`` preset, and name checks. Models and tokens come from the fresh per-test seed
(``SUBQ_TEST_SEED``); the comparisons run in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from subq.models.lm import DEFAULT_OPTIONS, LM, MIXERS, LMConfig, lm_config

DECODERS = {"dense", "local", "linear", "ntk", "hip", "scout", "hax", "mamba", "mamba+hax",
            "scout+swa", "scout+mamba"}

# Options that make every sparse pattern non-trivial at the short test lengths.
SHORT = {
    "local": {"window": 5},
    "combiner": {"span": 4},
    "hip": {"topk": 4, "block_q": 2, "block_k": 2, "sink": 1, "window": 4, "refresh": 2},
    "scout": {"segment": 4},
    "hax": {"k_lsh": 2, "k_ks": 2, "num_hash": 2},
    "mamba+hax": {"k_total": 4, "num_hash": 2},
    "scout+swa": {"window": 5, "segment": 4},
    "scout+mamba": {"segment": 4},
    "fixed": {"span": 4},
    "axial": {"span": 4},
}


# A repeated token has the same first-layer key up to RoPE's rounding, so hax's key selection
# by key norm (the op's default score) breaks an exact tie by rounding, which stepping and the
# full forward round differently. Decoding == prefill is checked on distinct tokens; greedy
# text repeats tokens, so hax's generation is compared with every key selectable.
GENERATE = {"hax": {"k_lsh": 2, "k_ks": 32, "num_hash": 2}}


def _short_lm(mixer: str, options: dict | None = None) -> LM:
    options = SHORT.get(mixer, {}) if options is None else options
    return LM(lm_config("tiny", mixer, options=options, max_len=64)).double().eval()


def _tokens(generator: torch.Generator, batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=generator)


@pytest.mark.parametrize("mixer", MIXERS)
def test_prefix_consistency(mixer: str, fresh_seed: int) -> None:
    lm = _short_lm(mixer)
    gen = torch.Generator().manual_seed(fresh_seed)
    tokens, cut = _tokens(gen, 2, 37), 21
    changed = tokens.clone()
    changed[:, cut:] = (tokens[:, cut:] + 1 + _tokens(gen, 2, 37 - cut) % 255) % 256
    with torch.no_grad():
        a, b = lm(tokens), lm(changed)
    torch.testing.assert_close(a[:, :cut], b[:, :cut], rtol=0, atol=1e-10)
    assert (a[:, cut:] - b[:, cut:]).abs().amax() > 1e-4  # later tokens do matter


def _greedy_by_forward(lm: LM, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    tokens = prompt
    for _ in range(new_tokens):
        tokens = torch.cat([tokens, lm(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


@pytest.mark.parametrize("mixer", MIXERS)
def test_decoding(mixer: str, fresh_seed: int) -> None:
    lm = _short_lm(mixer)
    assert lm.can_decode == (mixer in DECODERS)
    gen = torch.Generator().manual_seed(fresh_seed)
    prompt = _tokens(gen, 2, 5)
    if not lm.can_decode:
        if mixer == "combiner":  # one non-decoding mixer: generation by full forwards
            with torch.no_grad():
                expected = _greedy_by_forward(lm, prompt, 6)
            torch.testing.assert_close(lm.generate(prompt, 6), expected, rtol=0, atol=0)
        with pytest.raises(NotImplementedError):
            lm.init_state(2)
        return
    tokens = torch.stack([torch.randperm(256, generator=gen)[:19] for _ in range(2)])
    with torch.no_grad():
        full = lm(tokens)
        state = lm.init_state(2)
        stepped = []
        for t in range(tokens.shape[1]):
            logits, state = lm.step(tokens[:, t], state)
            stepped.append(logits)
        torch.testing.assert_close(torch.stack(stepped, 1), full, rtol=0, atol=1e-9)
        if mixer in GENERATE:
            lm = _short_lm(mixer, GENERATE[mixer])
        expected = _greedy_by_forward(lm, prompt, 12)
    generated = lm.generate(prompt, 12)
    assert generated.shape == (2, 17)
    torch.testing.assert_close(generated, expected, rtol=0, atol=0)


@pytest.mark.parametrize("mixer", MIXERS)
def test_gradients(mixer: str, fresh_seed: int) -> None:
    lm = LM(lm_config("tiny", mixer)).train()  # the default options, at a training length
    tokens = _tokens(torch.Generator().manual_seed(fresh_seed), 2, 129)
    logits = lm(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + lm.aux_loss()
    loss.backward()
    assert torch.isfinite(loss)
    if mixer == "mamba+hax":
        assert lm.aux_loss() > 0
    for name, p in lm.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def test_equal_parameters_at_small() -> None:
    with torch.device("meta"):
        counts = {m: LM(lm_config("small", m)) for m in MIXERS}
    dense = counts["dense"].num_parameters()
    print(f"\n{'mixer':<15} {'parameters':>10} {'vs dense':>9} {'mlp_hidden':>10}")
    for mixer, lm in counts.items():
        n = lm.num_parameters()
        print(f"{mixer:<15} {n:>10,} {100 * (n - dense) / dense:>+8.3f}% {lm.mlp_hidden:>10}")
        assert abs(n - dense) <= 0.05 * dense, mixer
        assert abs(n - dense) <= 1.5 * 256 * 4  # the rounding of the solved width
    assert 3.0e6 < dense < 3.5e6


def test_unmatched_width_and_lengths(fresh_seed: int) -> None:
    lm = LM(lm_config("tiny", "mamba", match_params=False))
    assert lm.mlp_hidden == round(8 * 64 / 3)
    rpe = LM(lm_config("tiny", "kernelized_rpe", max_len=16))
    assert rpe.max_length == 16 and rpe.supports_length(16) and not rpe.supports_length(17)
    assert LM(lm_config("tiny", "dense")).max_length is None
    with pytest.raises(ValueError, match="max_length"):
        rpe(_tokens(torch.Generator().manual_seed(fresh_seed), 1, 17))
    # Luo et al.'s baseline without RPE: no table, so no length limit and no table parameters.
    plain = LM(lm_config("tiny", "kernelized_rpe", max_len=16, match_params=False,
                         options={"rpe": False, "normalize": False}))
    with_table = LM(lm_config("tiny", "kernelized_rpe", max_len=16, match_params=False))
    assert plain.max_length is None and all(layer.mixer.bias is None for layer in plain.layers)
    assert with_table.num_parameters() - plain.num_parameters() == sum(
        p.numel() for layer in with_table.layers for p in layer.mixer.bias.parameters())
    assert plain(_tokens(torch.Generator().manual_seed(fresh_seed), 1, 40)).shape == (1, 40, 256)


def test_names_and_options() -> None:
    assert set(DEFAULT_OPTIONS) == set(MIXERS)
    for bad in (lambda: LMConfig(mixer="nope"), lambda: lm_config("tiny", "nope")):
        with pytest.raises(ValueError, match="valid mixers: dense, local"):
            bad()
    with pytest.raises(ValueError, match="preset"):
        lm_config("huge", "dense")
    with pytest.raises(ValueError, match="n_layers must be even"):
        lm_config("tiny", "scout+swa", n_layers=3)
    with pytest.raises(ValueError, match="unknown option"):
        LM(lm_config("tiny", "local", options={"windw": 3}))
    with pytest.raises(ValueError, match="feature_map"):
        LM(lm_config("tiny", "kernelized_rpe", options={"feature_map": "relu"}))
    assert lm_config("tiny", "hip", options={"topk": 8}).options["block_q"] == 8
