"""The accelerator layer: `accel.apply` swaps faster parts into a plain model and reports them;
the swapped model keeps its state dict and gives the plain model's numbers within rounding."""

import pytest
import torch
from torch import nn

from scriven import accel
from scriven.accel import native
from scriven.models.gpt import GPT, GPTConfig
from scriven.models.transformer import Transformer, TransformerConfig


def _transformer(dropout=0.0):
    torch.manual_seed(0)
    cfg = TransformerConfig(src_vocab_size=64, tgt_vocab_size=64, d_model=64, n_heads=4, d_ff=128,
                            encoder_layers=2, decoder_layers=2, dropout=dropout,
                            share_embeddings=True, bias=False)
    return Transformer(cfg)


def _batch():
    g = torch.Generator().manual_seed(1)
    src = torch.randint(1, 64, (3, 9), generator=g)
    src[1, 6:] = 0
    tgt = torch.randint(1, 64, (3, 7), generator=g)
    at = torch.tensor([0, 1, 2, 5, 8, 13, 20])
    labels = torch.randint(1, 64, (7,), generator=g)
    return src, tgt, at, labels


def _loss_and_grads(model, dtype=torch.float32):
    model = model.to(dtype)
    model.zero_grad()
    src, tgt, at, labels = _batch()
    loss = model(src, tgt, at=at, labels=labels, label_smoothing=0.1)
    loss.backward()
    return loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


@pytest.mark.native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swapped_transformer_equals_the_plain_one(dtype):
    plain = _transformer()
    fast = _transformer()
    report = accel.apply(fast, "cpu", "train")
    assert "attention" in report and "layer_norm" in report and "loss" in report
    assert fast.state_dict().keys() == plain.state_dict().keys()
    assert any(type(m).__name__ == "NativeLayerNorm" for m in fast.modules())
    loss_a, grads_a = _loss_and_grads(plain, dtype)
    loss_b, grads_b = _loss_and_grads(fast, dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(loss_b, loss_a, atol=1e-4, rtol=1e-4)
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-4, rtol=1e-3)
        return
    # bf16: both paths round differently; each must be about as near the fp32 result.
    exact_loss, exact = _loss_and_grads(_transformer().float())
    assert abs(loss_b - exact_loss) <= 2 * abs(loss_a - exact_loss) + 1e-2
    for name in exact:
        ours = (grads_b[name] - exact[name]).norm()
        theirs = (grads_a[name] - exact[name]).norm()
        assert ours <= 2 * theirs + 1e-2 * exact[name].norm(), name


@pytest.mark.native
def test_swapped_gpt_generates_the_plain_logits():
    torch.manual_seed(0)
    plain = GPT(GPTConfig(vocab_size=50, d_model=64, n_heads=4, n_layers=2, d_ff=128,
                          dropout=0.0, max_len=32)).eval()
    fast = GPT(plain.config).eval()
    fast.load_state_dict(plain.state_dict())
    accel.apply(fast, "cpu", "infer")
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids)[0], plain(ids)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.native
def test_training_swaps_dropout_for_the_hashed_mask_and_apply_is_idempotent():
    model = _transformer(dropout=0.1)
    first = accel.apply(model, "cpu", "train")
    second = accel.apply(model, "cpu", "train")
    assert "dropout" in first and "dropout" not in second  # already swapped
    kinds = {type(m).__name__ for m in model.modules()}
    assert "HashDropout" in kinds and "Dropout" not in kinds


def test_plain_pytorch_without_the_kernels_or_on_another_device(monkeypatch):
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    native.library.cache_clear()
    try:
        model = _transformer(dropout=0.1)
        report = accel.apply(model, "cpu", "train")
        assert "plain PyTorch" in report["all"] and "SCRIVEN_NATIVE=0" in report["all"]
        assert "64 at a time" in report["dropout"]
        kinds = {type(m).__name__ for m in model.modules()}
        assert "BitsDropout" in kinds and "Dropout" not in kinds and "HashDropout" not in kinds
        assert all(type(m) is nn.LayerNorm or "Norm" not in type(m).__name__
                   for m in model.modules())
        assert model.fused_loss is None
        loss, _ = _loss_and_grads(model)
        assert torch.isfinite(loss)
    finally:
        native.library.cache_clear()
    assert "cuda" in accel.apply(_transformer(), "cuda", "train")["all"]
    with pytest.raises(ValueError, match="mode"):
        accel.apply(_transformer(), "cpu", "serve")
