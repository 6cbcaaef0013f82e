import pytest
import torch

from scriven.errors import ScrivenError
from scriven.models import build_model
from scriven.optimizers import (
    Muon,
    Optimizers,
    _newton_schulz,
    _newton_schulz_gram,
    make_optimizer,
    orthogonalise,
)
from scriven.train import TrainConfig


def _names(model, opt):
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("kind, config", [
    ("gpt", dict(vocab_size=50, d_model=32, n_heads=2, n_layers=2, d_ff=64)),
    ("lstm", dict(vocab_size=50, embed_dim=32, hidden_dim=32, num_layers=2)),
    ("transformer", dict(src_vocab_size=50, tgt_vocab_size=60, d_model=32, n_heads=2,
                         encoder_layers=1, decoder_layers=1, d_ff=64)),
])
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(kind, config):
    model = build_model(kind, config)
    opt = make_optimizer(model, "muon", 1e-3, 0.01, (0.9, 0.99), 1e-8)
    assert isinstance(opt, Optimizers)
    muon, adamw = opt.parts
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    hidden, rest = _names(model, muon), _names(model, adamw)
    assert hidden and not hidden & rest
    assert hidden | rest == {n for n, _ in model.named_parameters()}
    assert all(model.get_parameter(n).dim() == 2 for n in hidden)
    assert not any(word in n for n in hidden for word in ("embed", "pos", "head", "output"))
    # AdamW alone keeps every parameter.
    plain = make_optimizer(model, "adamw", 1e-3, 0.01, (0.9, 0.99), 1e-8)
    assert isinstance(plain, torch.optim.AdamW)
    assert _names(model, plain) == hidden | rest


def test_the_combined_state_round_trips_into_a_fresh_optimizer():
    torch.manual_seed(0)
    model = build_model("gpt", dict(vocab_size=20, d_model=16, n_heads=2, n_layers=1, d_ff=32))
    settings = ("muon", 1e-3, 0.01, (0.9, 0.99), 1e-8)
    opt = make_optimizer(model, *settings)
    for _ in range(2):
        model(torch.randint(0, 20, (2, 8)))[0].sum().backward()
        opt.step()
        opt.zero_grad()
    saved = opt.state_dict()
    fresh = make_optimizer(model, *settings)
    fresh.load_state_dict(saved)
    again = fresh.state_dict()
    assert again["param_groups"] == saved["param_groups"]
    assert saved["state"].keys() == again["state"].keys()
    for index, slots in saved["state"].items():
        for name, value in slots.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(again["state"][index][name]))
    # Numbered across both optimisers, as one optimiser would number them.
    count = sum(len(g["params"]) for g in saved["param_groups"])
    assert sorted(i for g in saved["param_groups"] for i in g["params"]) == list(range(count))


def test_an_unknown_optimizer_is_named():
    with pytest.raises(ScrivenError, match="optimizer"):
        TrainConfig(max_steps=1, optimizer="sgd")


@pytest.mark.parametrize("shape", [(3, 8, 8), (2, 16, 4), (2, 4, 16), (2, 32, 8)])
def test_orthogonalise_brings_every_singular_value_near_one(shape):
    torch.manual_seed(0)
    n, rows, cols = shape
    k = min(rows, cols)
    left = torch.linalg.qr(torch.randn(n, rows, k))[0]
    right = torch.linalg.qr(torch.randn(n, cols, k))[0]
    g = left @ torch.diag_embed(torch.logspace(-1, 1, k).expand(n, k)) @ right.transpose(1, 2)
    # (singular values 100x apart)
    o = orthogonalise(g, 5, torch.float32)
    assert o.shape == g.shape
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.6 and s.max() < 1.25
    # The same singular vectors: in g's singular bases, o is diagonal.
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    inner = u.transpose(1, 2) @ o @ vh.transpose(1, 2)
    off = inner - torch.diag_embed(torch.diagonal(inner, dim1=1, dim2=2))
    # (the Gram form's fp32 rounding reaches 2e-3 here; bf16 iterations, as Muon often runs
    # them, about 1e-2)
    assert off.abs().max() < 5e-3


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_the_gram_form_equals_the_direct_iteration(dtype, tol):
    torch.manual_seed(0)
    x = torch.randn(3, 16, 48, dtype=dtype)
    x = x / x.norm(dim=(1, 2), keepdim=True)
    direct, gram = _newton_schulz(x, 5), _newton_schulz_gram(x, 5)
    assert (direct - gram).abs().max() < tol * direct.abs().max()


def test_muon_takes_matrices_only():
    with pytest.raises(ValueError, match="matrices"):
        Muon([torch.nn.Parameter(torch.zeros(3))], lr=1e-3, weight_decay=0.0)
