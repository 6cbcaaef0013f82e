"""Transformer: causal, blind to padding, cache-transparent, both norm layouts, validated config."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from scriven.config import from_dict, to_dict
from scriven.errors import ScrivenError
from scriven.models.transformer import (
    PRESETS,
    Transformer,
    TransformerConfig,
    sinusoidal_positions,
)

ATOL = 1e-5
V = 23


def tiny(**changes: object) -> Transformer:
    cfg = TransformerConfig(src_vocab_size=V, tgt_vocab_size=V, d_model=16, n_heads=4, d_ff=32,
                            encoder_layers=2, decoder_layers=2, dropout=0.1, max_len=32)
    torch.manual_seed(0)
    return Transformer(dataclasses.replace(cfg, **changes)).eval()


def ids(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(list(rows))


SRC = ids([5, 6, 7, 8, 9], [10, 11, 12, 0, 0])  # second sentence padded with pad_id 0
TGT = ids([2, 13, 14, 15, 16, 17], [2, 18, 19, 20, 0, 0])


LAYOUTS = [
    {"norm_first": True},
    {"norm_first": False},
    {"positions": "learned", "activation": "gelu"},
    {"share_embeddings": True},
]


@pytest.mark.parametrize("changes", LAYOUTS)
def test_forward_shapes_and_training_step(changes: dict) -> None:
    model = tiny(**changes).train()
    logits = model(SRC, TGT)
    assert logits.shape == (2, 6, V)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_logits_at_chosen_positions_equal_the_full_logits_there() -> None:
    model = tiny()
    at = (TGT.flatten() != 0).nonzero().squeeze(1)  # the real positions, as training picks them
    full = model(SRC, TGT).flatten(0, 1)             # (B*T, V)
    torch.testing.assert_close(model(SRC, TGT, at), full[at], atol=ATOL, rtol=0)


@pytest.mark.parametrize("changes", LAYOUTS)
def test_future_target_tokens_do_not_change_earlier_logits(changes: dict) -> None:
    model = tiny(**changes)
    changed = TGT.clone()
    changed[:, 3] = 21
    a, b = model(SRC, TGT), model(SRC, changed)
    torch.testing.assert_close(a[:, :3], b[:, :3], atol=ATOL, rtol=0)
    assert not torch.allclose(a[:, 3:], b[:, 3:])


@pytest.mark.parametrize("changes", LAYOUTS)
def test_source_padding_does_not_change_logits(changes: dict) -> None:
    model = tiny(**changes)
    alone = model(ids([10, 11, 12]), TGT[1:])
    padded = model(ids([10, 11, 12, 0, 0, 0, 0]), TGT[1:])
    batched = model(SRC, TGT)[1:]
    torch.testing.assert_close(padded, alone, atol=ATOL, rtol=0)
    torch.testing.assert_close(batched, alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("changes", LAYOUTS)
def test_cached_decode_steps_equal_full_decode(changes: dict) -> None:
    model = tiny(**changes)
    memory = model.encode(SRC)
    src_mask = SRC.ne(0)[:, None, None, :]
    full, _ = model.decode(TGT, memory, src_mask)
    cache = model.new_cache()
    steps = [model.decode_step(TGT[:, t], memory, src_mask, cache) for t in range(4)]
    chunk, _ = model.decode(TGT[:, 4:], memory, src_mask, cache=cache)  # a 2-token chunk too
    assert cache.position == 6
    incremental = torch.cat([torch.stack(steps, dim=1), chunk], dim=1)
    torch.testing.assert_close(incremental, full, atol=ATOL, rtol=0)


def test_cache_reorder_follows_batch_rows() -> None:
    model = tiny()
    memory = model.encode(SRC)
    src_mask = SRC.ne(0)[:, None, None, :]
    cache = model.new_cache()
    for t in range(3):
        model.decode_step(TGT[:, t], memory, src_mask, cache)
    index = torch.tensor([1, 1, 0])
    cache.reorder(index)
    step = model.decode_step(TGT[index, 3], memory[index], src_mask[index], cache)
    full, _ = model.decode(TGT[index, :4], memory[index], src_mask[index])
    torch.testing.assert_close(step, full[:, 3], atol=ATOL, rtol=0)


def test_attention_maps_shapes_and_rows() -> None:
    model = tiny().train()
    maps = model.attention_maps(SRC, TGT)
    assert model.training  # mode restored
    assert set(maps) == {"encoder_self", "decoder_self", "cross"}
    assert [m.shape for m in maps["encoder_self"]] == [(2, 4, 5, 5)] * 2
    assert [m.shape for m in maps["decoder_self"]] == [(2, 4, 6, 6)] * 2
    assert [m.shape for m in maps["cross"]] == [(2, 4, 6, 5)] * 2
    for cross in maps["cross"]:
        torch.testing.assert_close(cross.sum(-1), torch.ones(2, 4, 6))
        assert torch.all(cross[1, :, :, 3:] == 0)  # padded source positions get no attention
    for dec in maps["decoder_self"]:
        assert torch.all(dec.triu(diagonal=1) == 0)  # nothing from the future


def test_shared_embeddings_are_one_table() -> None:
    model = tiny(share_embeddings=True)
    assert model.src_embed.weight is model.tgt_embed.weight is model.output.weight
    assert model.num_parameters() < tiny().num_parameters()


def test_too_long_input_is_a_user_error() -> None:
    model = tiny()
    with pytest.raises(ScrivenError, match="max_len"):
        model(torch.full((1, 40), 5), TGT[:1])


def test_sinusoidal_positions() -> None:
    pe = sinusoidal_positions(50, 16)
    assert pe.shape == (50, 16)
    torch.testing.assert_close(pe[0, 0::2], torch.zeros(8))
    torch.testing.assert_close(pe[0, 1::2], torch.ones(8))
    torch.testing.assert_close(pe[:, 0], torch.sin(torch.arange(50.0)))
    assert pe.abs().max() <= 1.0
    assert sinusoidal_positions(4, 7).shape == (4, 7)  # odd widths work too


def test_embeddings_are_scaled_by_sqrt_d_model() -> None:
    model = tiny(dropout=0.0)
    x = model._embed(ids([5]), model.src_embed, None)
    expected = model.src_embed.weight[5] * 4.0 + model.sinusoids[0]
    torch.testing.assert_close(x[0, 0], expected)


def test_presets() -> None:
    seed = TransformerConfig.preset("seed", 8000, 9000)
    assert (seed.encoder_layers, seed.decoder_layers, seed.d_model, seed.d_ff, seed.n_heads) == (
        6, 6, 256, 1024, 8)
    assert seed.norm_first is False and seed.dropout == 0.1
    default = TransformerConfig.preset("default", 8000, 8000)
    assert default.norm_first and default.share_embeddings
    assert not TransformerConfig.preset("default", 8000, 9000).share_embeddings
    separate = TransformerConfig.preset("default", 8000, 8000, share_embeddings=False)
    assert not separate.share_embeddings
    assert set(PRESETS) >= {"seed", "default"}
    with pytest.raises(ScrivenError, match="preset"):
        TransformerConfig.preset("huge", 10, 10)


def test_bias_choice() -> None:
    # The book's model has biases everywhere; the default keeps only the output layer's.
    def linears(cfg):
        model = Transformer(cfg)
        return [(name, m.bias is not None) for name, m in model.named_modules()
                if isinstance(m, torch.nn.Linear)]

    with_bias = linears(TransformerConfig.preset("seed", 50, 50))
    assert all(has for _, has in with_bias)
    without = dict(linears(TransformerConfig.preset("default", 50, 50)))
    assert without.pop("output") and not any(without.values())
    # Checkpoints written before the option existed had biases: a config without it keeps them.
    old = {k: v for k, v in to_dict(TransformerConfig.preset("seed", 50, 50)).items()
           if k != "bias"}
    assert from_dict(TransformerConfig, old).bias


def test_config_round_trips_through_dict() -> None:
    cfg = TransformerConfig.preset("default", 100, 100)
    assert from_dict(TransformerConfig, to_dict(cfg)) == cfg
    with pytest.raises(ScrivenError, match="unknown key"):
        from_dict(TransformerConfig, {**to_dict(cfg), "layers": 3})


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"d_model": 30, "n_heads": 4}, "d_model"),
        ({"n_heads": 0}, "n_heads"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"activation": "tanh"}, "activation"),
        ({"positions": "rotary"}, "positions"),
        ({"encoder_layers": 0}, "encoder_layers"),
        ({"max_len": 0}, "max_len"),
        ({"src_vocab_size": 10, "tgt_vocab_size": 12, "share_embeddings": True},
         "share_embeddings"),
        ({"pad_id": 50}, "pad_id"),
        ({"norm_first": "yes"}, "norm_first"),
        ({"bias": 1}, "bias"),
        ({"d_ff": 2.5}, "d_ff"),
    ],
)
def test_config_rejects_bad_values(changes: dict, name: str) -> None:
    values = {"src_vocab_size": 20, "tgt_vocab_size": 20, **changes}
    with pytest.raises(ScrivenError, match=name):
        from_dict(TransformerConfig, values)
