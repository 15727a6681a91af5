"""The contract every registered mechanism obeys (DESIGN.md), parametrised over the registry:
a mechanism registered later is tested here with no edits to this file."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import subq
from subq.api import padding_by_rows
from subq.ops.common import poison_outputs
from subq.padded_rows import RowStates
from subq.registry import Pattern, mechanisms

from .helpers import call_options, pattern_lengths, random_qkv, rel_rms, run

MECHANISMS = mechanisms()
CASES = [pytest.param(m, p, id=f"{m.name}-{p.short}")
         for m in MECHANISMS for p in Pattern if p in m.patterns]
UNSUPPORTED = [pytest.param(m, p, id=f"{m.name}-{p.short}")
               for m in MECHANISMS for p in Pattern if p not in m.patterns]
CAUSAL_CASES = [c for c in CASES if c.values[1].causal]
DECODERS = [pytest.param(m, id=m.name) for m in MECHANISMS if m.decodes]
BY_NAME = [pytest.param(m, id=m.name) for m in MECHANISMS]

LENGTHS = [1, 7, 63, 333, 500]  # 333: a multiple of no block or chunk size


def _forward_and_grads(fn_name, mech, pattern, q, k, v, cotangent=None):
    out = run(fn_name, mech, pattern, q, k, v)
    if cotangent is None:
        cotangent = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), cotangent, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip((q, k, v), grads, strict=True)]
    return out, grads, cotangent


def _assert_matches_reference(mech, pattern, q, k, v, tol):
    ref, ref_grads, cot = _forward_and_grads("reference", mech, pattern, q, k, v)
    out, grads, _ = _forward_and_grads("fast", mech, pattern, q, k, v, cot)
    assert out.shape == ref.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[-1])
    assert out.dtype == q.dtype and out.device == q.device
    assert rel_rms(ref, out) <= tol, f"output: rel RMS {rel_rms(ref, out):.3e} > {tol}"
    largest = max(_rms(g) for g in ref_grads)
    for name, g_ref, g in zip("qkv", ref_grads, grads, strict=True):
        err = _grad_error(g_ref, g, largest)
        assert err <= tol, f"d{name}: rel RMS {err:.3e} > {tol}"


def _rms(x):
    return float(x.detach().double().pow(2).mean().sqrt())


def _grad_error(g_ref, g, largest):
    """rel RMS; a gradient that is zero in exact arithmetic (dq, dk of a normalised attention
    with a single key: every weight is 1) is roundoff on both sides, so it is measured against
    the largest gradient of the call instead."""
    scale = _rms(g_ref)
    if scale < 1e-6 * largest:
        scale = largest
    return _rms(g_ref - g) / scale if scale > 0 else _rms(g)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("mech, pattern", CASES)
def test_matches_reference_float64(mech, pattern, length):
    lq, lk = pattern_lengths(pattern, length)
    q, k, v = random_qkv(lq=lq, lk=lk, dim=16, value_dim=12, requires_grad=True)
    _assert_matches_reference(mech, pattern, q, k, v, tol=1e-10)


@pytest.mark.parametrize("mech, pattern", CASES)
def test_matches_reference_float32(mech, pattern):
    lq, lk = pattern_lengths(pattern, 333)
    q, k, v = random_qkv(lq=lq, lk=lk, dim=32, dtype=torch.float32, requires_grad=True)
    _assert_matches_reference(mech, pattern, q, k, v, tol=1e-4)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 2), groups=st.integers(1, 3),
       lq=st.integers(1, 90), extra_keys=st.integers(1, 40), dim=st.sampled_from([4, 8, 16]),
       value_dim=st.sampled_from([4, 8, 16]), case=st.sampled_from(CASES))
def test_matches_reference_any_shape(batch, kv_heads, groups, lq, extra_keys, dim, value_dim,
                                     case):
    mech, pattern = case.values
    lk = lq + extra_keys if pattern.cross else lq
    q, k, v = random_qkv(batch, kv_heads * groups, kv_heads, lq, lk, dim, value_dim)
    ref = run("reference", mech, pattern, q, k, v)
    assert rel_rms(ref, run("fast", mech, pattern, q, k, v)) <= 1e-10


@pytest.mark.parametrize("mech, pattern", CASES)
def test_gradcheck(mech, pattern):
    lq, lk = pattern_lengths(pattern, 10)
    q, k, v = random_qkv(batch=1, q_heads=2, kv_heads=1, lq=lq, lk=lk, dim=4,
                         requires_grad=True)
    options = call_options(mech, q, k, v)

    def fast(q, k, v):
        return subq.attention(q, k, v, method=mech.name, causal=pattern.causal,
                              cross=pattern.cross, **options)

    assert torch.autograd.gradcheck(fast, (q, k, v))


@pytest.mark.parametrize("mech, pattern", CASES)
def test_length_zero_is_empty(mech, pattern):
    lq, lk = (0, 5) if pattern.cross else (0, 0)
    q, k, v = random_qkv(lq=lq, lk=lk, value_dim=6)
    out = run("fast", mech, pattern, q, k, v)
    assert out.shape == (2, 4, 0, 6)


@pytest.mark.parametrize("mech, pattern", CASES)
def test_key_padding_mask(mech, pattern):
    lq, lk = pattern_lengths(pattern, 63)
    q, k, v = random_qkv(lq=lq, lk=lk, requires_grad=True)
    mask = torch.rand(q.shape[0], lk) < 0.3
    mask[0, : lk // 2] = True  # a long run of padding, so some queries may see no key
    try:
        out = run("fast", mech, pattern, q, k, v, key_padding_mask=mask)
    except NotImplementedError as err:
        assert "key_padding_mask" in str(err)
        return
    ref = run("reference", mech, pattern, q, k, v, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    assert rel_rms(ref, out) <= 1e-10
    # Padding keys have no influence: changing them leaves the output as it was.
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2.transpose(1, 2)[mask] = torch.randn_like(k2.transpose(1, 2)[mask])
    v2.transpose(1, 2)[mask] = torch.randn_like(v2.transpose(1, 2)[mask])
    again = run("fast", mech, pattern, q.detach(), k2, v2, key_padding_mask=mask)
    assert rel_rms(out.detach(), again) <= 1e-10


@pytest.mark.parametrize("mech, pattern", CAUSAL_CASES)
def test_prefix_consistency(mech, pattern):
    """CAB: the output at i is unchanged when anything after i changes (later queries, and for
    causal self later keys and values too)."""
    lq, lk = pattern_lengths(pattern, 200)
    q, k, v = random_qkv(lq=lq, lk=lk)
    out = run("fast", mech, pattern, q, k, v)
    for cut in (1, 57, lq // 2):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        q2[:, :, cut:] = torch.randn_like(q2[:, :, cut:])
        if not pattern.cross:
            k2[:, :, cut:] = torch.randn_like(k2[:, :, cut:])
            v2[:, :, cut:] = torch.randn_like(v2[:, :, cut:])
        out2 = run("fast", mech, pattern, q2, k2, v2)
        assert rel_rms(out[:, :, :cut], out2[:, :, :cut]) <= 1e-12, f"leak into prefix < {cut}"
        assert rel_rms(out[:, :, cut:], out2[:, :, cut:]) > 1e-3  # the change did arrive


def _options_for_prefix(mech, options, long_lengths, short_lengths):
    """``options`` drawn for a ``(Lq, Lk)`` call, restricted to a shorter one: a tensor whose
    last dim is ``Lq + Lk - 1`` holds one value per diagonal (a Toeplitz bias, offsets
    ``-(Lq - 1) .. Lk - 1``) and keeps the shorter call's diagonals; any other tensor must not
    depend on the length (checked: a new convention must be taught here, not skipped)."""
    (lq2, lk2), (lq1, lk1) = long_lengths, short_lengths
    short_shapes = {name: getattr(x, "shape", None) for name, x in mech.sample_options(
        *random_qkv(lq=lq1, lk=lk1), generator=torch.Generator().manual_seed(0)).items()}
    restricted = {}
    for name, x in options.items():
        if isinstance(x, torch.Tensor) and x.shape != short_shapes.get(name, x.shape):
            assert x.shape[-1] == lq2 + lk2 - 1, f"option {name}: unknown length convention"
            x = x[..., lq2 - lq1:lq2 - 1 + lk1]
        restricted[name] = x
    return restricted


@pytest.mark.parametrize("defaults", [False, True], ids=["test-options", "defaults"])
@pytest.mark.parametrize("mech, pattern", CAUSAL_CASES)
def test_prefix_consistency_across_lengths(mech, pattern, defaults):
    """A causal output at i does not depend on the total length: the first rows of a long call
    equal a short call on the prefix (causal cross: the same keys, a prefix of the queries),
    with the test options and with the defaults a user gets."""
    (lq2, lk2), (lq1, lk1) = pattern_lengths(pattern, 333), pattern_lengths(pattern, 150)
    if pattern.cross:
        lk1 = lk2
    q, k, v = random_qkv(lq=lq2, lk=lk2)
    options = call_options(mech, q, k, v)
    if defaults:
        options = {n: x for n, x in options.items() if isinstance(x, torch.Tensor)}
    long = subq.attention(q, k, v, method=mech.name, causal=True, cross=pattern.cross,
                          **options)
    short = subq.attention(q[:, :, :lq1], k[:, :, :lk1], v[:, :, :lk1], method=mech.name,
                           causal=True, cross=pattern.cross,
                           **_options_for_prefix(mech, options, (lq2, lk2), (lq1, lk1)))
    assert rel_rms(long[:, :, :lq1], short) <= 1e-12


@pytest.mark.parametrize("mech", DECODERS)
def test_decode_equals_prefill(mech):
    length = 70
    q, k, v = random_qkv(lq=length, value_dim=12)
    options = call_options(mech, q, k, v)
    prefill = subq.attention(q, k, v, method=mech.name, causal=True, **options)
    state = subq.init_state(mech.name, batch=2, kv_heads=2, head_dim=16, value_dim=12,
                            dtype=q.dtype, device=q.device, **options)
    for t in range(length):
        out_t, state = subq.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state,
                                 method=mech.name, **options)
        assert out_t.shape == (2, 4, 1, 12)
        assert rel_rms(prefill[:, :, t:t + 1], out_t) <= 1e-10, f"step {t} differs from prefill"


@pytest.mark.parametrize("mech", DECODERS)
@pytest.mark.parametrize("prefix", [0, 1, 40])
def test_prefill_state_continues_like_stepping_from_the_start(mech, prefix):
    """``subq.prefill_state`` of the first tokens (built at once where the mechanism can,
    else stepped) decodes the rest as stepping through every token does."""
    length = 70
    q, k, v = random_qkv(lq=length, value_dim=12)
    options = call_options(mech, q, k, v)
    state = subq.init_state(mech.name, batch=2, kv_heads=2, head_dim=16, value_dim=12,
                            dtype=q.dtype, **options)
    from_prefill = subq.prefill_state(mech.name, q[:, :, :prefix], k[:, :, :prefix],
                                      v[:, :, :prefix], **options)
    for t in range(length):
        token = (q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
        out_t, state = subq.step(*token, state, method=mech.name, **options)
        if t >= prefix:
            out_p, from_prefill = subq.step(*token, from_prefill, method=mech.name, **options)
            assert rel_rms(out_t, out_p) <= 1e-12, f"step {t} after a prefill of {prefix}"


@pytest.mark.parametrize("mech", DECODERS)
def test_padded_prefill_decodes_each_row_as_alone(mech):
    """A batch whose rows are left-padded prompts of different lengths: after
    ``prefill_state(..., key_padding_mask)`` every step of a row equals the same prompt
    decoded alone (padded keys never reach an output, whatever they hold): one state for the
    batch where the mechanism's state takes the padding, one per row (its real tokens) where
    its layout counts positions from the first token; reordered as beam search does, each row
    still equals its own prompt alone."""
    length, prompt = 50, 30
    q, k, v = random_qkv(batch=2, lq=length, value_dim=12)
    options = call_options(mech, q, k, v)
    pads = [0, 9]
    padding = torch.zeros(2, prompt, dtype=torch.bool)
    padding[1, :pads[1]] = True
    k_garbage = k.clone()
    k_garbage[1, :, :pads[1]] = float("nan")
    args = (q[:, :, :prompt], k_garbage[:, :, :prompt], v[:, :, :prompt])
    if mech.name in ("dense", "local", "linear", "ntk"):
        assert not padding_by_rows(mech.name)  # no position in their layout: batched
    index = torch.tensor([1, 0])
    swapped_options = {name: value[index] if isinstance(value, torch.Tensor)
                       and value.shape[0] == 2 else value for name, value in options.items()}
    for row, pad in enumerate(pads):
        # tensor options with a batch dimension (NTK's summaries) are the row's own
        own_options = {name: value[row:row + 1] if isinstance(value, torch.Tensor)
                       and value.shape[0] == 2 else value for name, value in options.items()}
        alone = subq.prefill_state(mech.name, q[row:row + 1, :, pad:prompt],
                                   k[row:row + 1, :, pad:prompt],
                                   v[row:row + 1, :, pad:prompt], **own_options)
        # a step may update its state in place (HiP): fresh states for every row checked
        batch_state = subq.prefill_state(mech.name, *args, key_padding_mask=padding, **options)
        assert isinstance(batch_state, RowStates) == padding_by_rows(mech.name)
        swapped = subq.reorder_state(batch_state, index)
        for t in range(prompt, length):
            token = [x[:, :, t:t + 1] for x in (q, k, v)]
            out, batch_state = subq.step(*token, batch_state, method=mech.name, **options)
            out_swapped, swapped = subq.step(*[x[index] for x in token], swapped,
                                             method=mech.name, **swapped_options)
            own, alone = subq.step(*[x[row:row + 1] for x in token], alone, method=mech.name,
                                   **own_options)
            assert rel_rms(own, out[row:row + 1]) <= 1e-12, (row, t)
            assert rel_rms(own, out_swapped[1 - row:2 - row]) <= 1e-12, (row, t)


@pytest.mark.parametrize("mech", DECODERS)
def test_reordered_state_decodes_the_reordered_batch(mech):
    """Beam search's cache reorder: after 40 steps the state's rows are kept, dropped and
    duplicated (``index``); stepping on from it equals decoding the reordered sequences from
    the start."""
    length, cut = 70, 40
    q, k, v = random_qkv(batch=3, lq=length, value_dim=12)
    options = call_options(mech, q, k, v)
    index = torch.tensor([2, 0, 2])

    def decode(q, k, v, state, steps):
        outs = []
        for t in steps:
            out_t, state = subq.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                     state, method=mech.name, **options)
            outs.append(out_t)
        return torch.cat(outs, dim=2), state

    def empty():
        return subq.init_state(mech.name, batch=3, kv_heads=2, head_dim=16, value_dim=12,
                               dtype=q.dtype, **options)

    _, state = decode(q, k, v, empty(), range(cut))
    state = subq.reorder_state(state, index)
    # The reordered rows continue with fresh tokens of their own.
    tail = [torch.cat([x[index, :, :cut], y[:, :, cut:]], dim=2)
            for x, y in zip((q, k, v), random_qkv(batch=3, lq=length, value_dim=12),
                            strict=True)]
    continued, _ = decode(*tail, state, range(cut, length))
    expected, _ = decode(*tail, empty(), range(length))
    assert rel_rms(expected[:, :, cut:], continued) <= 1e-12


@pytest.mark.parametrize("mech, pattern", CASES)
def test_bfloat16_close_to_float32(mech, pattern):
    lq, lk = pattern_lengths(pattern, 200)
    q, k, v = random_qkv(lq=lq, lk=lk, dim=32, dtype=torch.float32)
    q, k, v = (x.bfloat16().float() for x in (q, k, v))  # the same numbers in both dtypes
    out32 = run("fast", mech, pattern, q, k, v)
    out16 = run("fast", mech, pattern, q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out16.dtype == torch.bfloat16
    assert torch.isfinite(out16).all()
    assert rel_rms(out32, out16) <= 1e-2


@pytest.mark.parametrize("mech, pattern", CASES)
def test_output_buffers_written_before_read(mech, pattern):
    lq, lk = pattern_lengths(pattern, 333)
    q, k, v = random_qkv(lq=lq, lk=lk)
    with poison_outputs():
        out = run("fast", mech, pattern, q, k, v)
    assert not torch.isnan(out).any()
    assert rel_rms(run("reference", mech, pattern, q, k, v), out) <= 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("mech", BY_NAME)
def test_torch_compile_fullgraph(mech):
    pattern = Pattern.CAUSAL_SELF if Pattern.CAUSAL_SELF in mech.patterns else next(
        p for p in Pattern if p in mech.patterns)
    lq, lk = pattern_lengths(pattern, 100)
    q, k, v = random_qkv(lq=lq, lk=lk, dtype=torch.float32)
    options = mech.resolve_options(call_options(mech, q, k, v))
    kwargs = dict(causal=pattern.causal, cross=pattern.cross, scale=0.25,
                  key_padding_mask=None, **options)
    eager = mech.fn(q, k, v, **kwargs)
    torch._dynamo.reset()
    compiled = torch.compile(mech.fn, fullgraph=True, dynamic=False)
    assert rel_rms(eager, compiled(q, k, v, **kwargs)) <= 1e-5


# ---- bad input: a clear error naming the argument, never a silent wrong answer ----

def _valid_call(mech):
    pattern = next(p for p in Pattern if p in mech.patterns)
    lq, lk = pattern_lengths(pattern, 20)
    q, k, v = random_qkv(lq=lq, lk=lk)
    return pattern, q, k, v


@pytest.mark.parametrize("mech", BY_NAME)
@pytest.mark.parametrize("bad, expected", [
    (lambda q, k, v: (q[0], k, v), "q must be 4-D"),
    (lambda q, k, v: (q, k[0], v), "k must be 4-D"),
    (lambda q, k, v: (q, k, v[..., None]), "v must be 4-D"),
    (lambda q, k, v: (q[:1], k, v), "batch"),
    (lambda q, k, v: (q[:, :3], k, v), "heads"),
    (lambda q, k, v: (q, k, v[:, :1]), "heads"),
    (lambda q, k, v: (q, k[..., :-1], v), "head dim"),
    (lambda q, k, v: (q, k, v[:, :, :-1]), "length"),
    (lambda q, k, v: (q.long(), k, v), "floating dtype"),
    (lambda q, k, v: (q, k.float(), v), "dtype"),
])
def test_bad_tensors_raise(mech, bad, expected):
    pattern, q, k, v = _valid_call(mech)
    with pytest.raises(ValueError, match=expected):
        run("fast", mech, pattern, *bad(q, k, v))


@pytest.mark.parametrize("mech", BY_NAME)
def test_bad_arguments_raise(mech):
    pattern, q, k, v = _valid_call(mech)
    with pytest.raises(ValueError, match="unknown option.*not_an_option"):
        run("fast", mech, pattern, q, k, v, not_an_option=3)
    with pytest.raises(ValueError, match="scale"):
        run("fast", mech, pattern, q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="key_padding_mask"):
        run("fast", mech, pattern, q, k, v, key_padding_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="method"):
        subq.attention(q, k, v, method="no-such-mechanism")
    if not pattern.cross:
        with pytest.raises(ValueError, match="cross"):
            subq.attention(q, k[:, :, :-1], v[:, :, :-1], method=mech.name, cross=False)


def _out_of_range_values(option):
    if option.choices is not None:
        yield "not-a-choice"
    if option.low is not None:
        yield option.type(option.low - 1)
    if option.high is not None:
        yield option.type(option.high + 1)
    if option.type in (int, float):
        yield "a string"


@pytest.mark.parametrize("mech", BY_NAME)
def test_option_out_of_range_raises(mech):
    pattern, q, k, v = _valid_call(mech)
    for option in mech.options:
        for value in _out_of_range_values(option):
            with pytest.raises(ValueError, match=f"option '{option.name}'"):
                run("fast", mech, pattern, q, k, v, **{option.name: value})


@pytest.mark.parametrize("mech, pattern", UNSUPPORTED)
def test_unsupported_pattern_raises(mech, pattern):
    lq, lk = pattern_lengths(pattern, 20)
    q, k, v = random_qkv(lq=lq, lk=lk)
    with pytest.raises(NotImplementedError, match=f"{mech.name}.*{pattern.value}"):
        run("fast", mech, pattern, q, k, v)


@pytest.mark.parametrize("mech", BY_NAME)
def test_record_is_complete(mech):
    assert mech.patterns, "a mechanism supports at least one pattern"
    assert mech.fn.__doc__ and mech.reference.__doc__
    assert mech.resolve_options({}) == {o.name: o.default for o in mech.options}
    if mech.weights is not None:
        pattern, q, k, v = _valid_call(mech)
        options = call_options(mech, q, k, v)
        a = subq.weights(q, k, method=mech.name, causal=pattern.causal, cross=pattern.cross,
                         **options)
        assert a.shape == (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        expected = run("reference", mech, pattern, q, k, v)
        groups = q.shape[1] // k.shape[1]
        assert rel_rms(expected, a @ v.repeat_interleave(groups, dim=1)) <= 1e-10
