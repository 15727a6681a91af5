"""The class-conditional DiT (subq/models/dit.py): shapes per attention name, adaLN-Zero's zero
output at initialisation, conditioning on t and y, class dropout to the null class,
classifier-free guidance, preset parameter counts and the softmax/LiT parameter split."""

from __future__ import annotations

import pytest
import torch

from subq.models.dit import (
    ATTENTIONS,
    DiT,
    DiTConfig,
    dit_config,
    dit_parameters,
    shared_parameter_names,
)

TINY = dict(hidden=16, depth=1, heads=2, frequency_dim=16)


def tiny_model(attention: str = "softmax", dtype=torch.float64, **kwargs) -> DiT:
    return DiT(DiTConfig(attention=attention, **{**TINY, **kwargs})).to(dtype)


def inputs(batch: int = 2, dtype=torch.float64):
    x = torch.randn(batch, 1, 28, 28, dtype=dtype)
    t = torch.randint(0, 1000, (batch,)).to(dtype)
    y = torch.randint(0, 10, (batch,))
    return x, t, y


def perturb_zero_layers(model: DiT) -> None:
    """Random weights in every zero-initialised layer (final layer, every block's adaLN)."""
    layers = [model.final_layer.linear, model.final_layer.adaLN_modulation[1]]
    layers += [block.adaLN_modulation[1] for block in model.blocks]
    with torch.no_grad():
        for layer in layers:
            layer.weight.normal_(std=0.1)
            layer.bias.normal_(std=0.1)


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_output_shape(attention, learn_sigma):
    model = tiny_model(attention, torch.float32, learn_sigma=learn_sigma)
    perturb_zero_layers(model)
    out = model(*inputs(2, torch.float32))
    assert out.shape == (2, 2 if learn_sigma else 1, 28, 28)
    assert torch.isfinite(out).all()


def test_unknown_attention_lists_names():
    with pytest.raises(ValueError, match="softmax, linear, hierarchical_local"):
        DiT(DiTConfig(attention="nope", **TINY))


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_initial_output_is_exactly_zero(attention):
    model = tiny_model(attention).train()
    assert torch.equal(model(*inputs()), torch.zeros(2, 2, 28, 28, dtype=torch.float64))


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_output_depends_on_t_and_y(attention):
    model = tiny_model(attention).eval()
    perturb_zero_layers(model)
    x, t, y = inputs()
    base = model(x, t, y)
    assert not torch.allclose(model(x, t + 100, y), base)
    assert not torch.allclose(model(x, t, (y + 1) % 10), base)


def test_class_dropout_to_null_class():
    model = tiny_model().eval()
    perturb_zero_layers(model)
    x, t, y = inputs(3)
    drop = torch.tensor([True, False, True])
    assert model.y_embedder.drop(y, drop).tolist() == [10, y[1].item(), 10]
    out = model(x, t, y, force_drop=drop)
    explicit_null = model(x, t, torch.where(drop, torch.full_like(y, 10), y))
    assert torch.equal(out, explicit_null)
    base = model(x, t, y)
    assert torch.equal(out[1], base[1])
    assert not torch.allclose(out[0], base[0]) and not torch.allclose(out[2], base[2])
    # random dropout: only in training, seeded by the generator, probability 1 drops all
    model.y_embedder.dropout_prob = 1.0
    assert torch.equal(model.y_embedder.drop(y), y)  # eval mode: no dropout
    model.train()
    assert (model.y_embedder.drop(y) == 10).all()
    model.y_embedder.dropout_prob = 0.5
    labels = torch.randint(0, 10, (64,))
    first = model.y_embedder.drop(labels, generator=torch.Generator().manual_seed(0))
    again = model.y_embedder.drop(labels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, again) and 0 < (first == 10).sum() < 64


def test_forward_with_cfg_scale_one_is_conditional():
    model = tiny_model().eval()
    perturb_zero_layers(model)
    x, t, y = inputs()
    cond = model(x, t, y)
    guided = model.forward_with_cfg(x, t, y, 1.0)
    assert guided.shape == cond.shape
    torch.testing.assert_close(guided, cond)
    uncond = model(x, t, y, force_drop=torch.ones(2, dtype=torch.bool))
    scaled = model.forward_with_cfg(x, t, y, 3.0)
    torch.testing.assert_close(scaled[:, :1], uncond[:, :1] + 3.0 * (cond[:, :1] - uncond[:, :1]))
    torch.testing.assert_close(scaled[:, 1:], cond[:, 1:])


def test_preset_parameter_counts_as_documented():
    assert dit_parameters(dit_config("tiny")) == 95_720
    assert dit_parameters(dit_config("tiny", attention="linear")) == 96_344
    assert dit_parameters(dit_config("tiny", attention="linear", attention_heads=2)) == 96_968
    assert dit_parameters(dit_config("mini")) == 715_424
    assert dit_parameters(dit_config("mini", attention="linear", attention_heads=2)) == 720_416
    assert dit_parameters(dit_config("small")) == 4_163_720
    assert dit_parameters(dit_config("small", attention="linear")) == 4_168_712
    assert dit_parameters(dit_config("small", attention="linear", attention_heads=2)) == 4_178_696
    model = DiT(dit_config("tiny"))  # the meta count equals a real build
    assert sum(p.numel() for p in model.parameters()) == 95_720


@pytest.mark.parametrize("heads", [None, 2])
def test_softmax_and_linear_share_all_but_attention(heads):
    teacher = dit_config("tiny")
    student = dit_config("tiny", attention="linear", attention_heads=heads)
    split = shared_parameter_names(teacher, student)
    names = [n for n, _ in DiT(teacher).named_parameters()]
    assert split.shared == [n for n in names if ".attn." not in n]
    assert split.only_a == [] and split.mismatched == []
    depth = teacher.depth
    assert split.only_b == [f"blocks.{i}.attn.dwc.{w}" for i in range(depth)
                            for w in ("weight", "bias")]
    expected = {f"blocks.{i}.attn.{m}.{w}" for i in range(depth)
                for m in ("qkv", "proj", "dwc") for w in ("weight", "bias")}
    assert set(split.attention) == expected
    # LiT-style inheritance: loading the shared tensors leaves only attention keys missing
    src, dst = DiT(teacher), DiT(student)
    state = {k: v for k, v in src.state_dict().items() if k in split.shared}
    missing, unexpected = dst.load_state_dict(state, strict=False)
    assert set(missing) == expected and unexpected == []
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in state.items())


def test_attention_modules_by_name():
    from subq.models.vit import GridAttention
    from subq.nn.dit import SoftmaxAttention
    from subq.nn.lit import LiTAttention

    kinds = {"softmax": SoftmaxAttention, "linear": LiTAttention,
             "hierarchical_local": GridAttention}
    for name, kind in kinds.items():
        model = tiny_model(name, attention_heads=1)
        assert all(type(block.attn) is kind and block.attn.heads == 1 for block in model.blocks)
