import pytest
import torch

from scriven.attention import KVCache
from scriven.errors import ScrivenError
from scriven.generation import generate, sample_ids
from scriven.lm import evaluate_lm, stream_nll, train_lm
from scriven.models.gpt import GPT, GPTConfig


def model(**overrides):
    torch.manual_seed(0)
    config = dict(vocab_size=30, d_model=32, n_heads=4, n_layers=2, d_ff=64, dropout=0.0, max_len=24)
    config.update(overrides)
    return GPT(GPTConfig(**config)).eval()


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "alibi"])
def test_cached_decoding_equals_recomputation(positions):
    m = model(positions=positions, head_bias=positions == "alibi")
    ids = torch.randint(0, 30, (2, 15))
    full, _ = m(ids)
    logits, cache = m(ids[:, :6])
    steps = [logits]
    for t in range(6, 15):
        out, cache = m(ids[:, t:t + 1], cache)
        steps.append(out)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


@pytest.mark.parametrize("positions", ["learned", "alibi"])
def test_causal_mask_holds(positions):
    m = model(positions=positions)
    ids = torch.randint(0, 30, (1, 12))
    changed = ids.clone()
    changed[0, 7:] = (changed[0, 7:] + 3) % 30
    assert torch.allclose(m(ids)[0][:, :7], m(changed)[0][:, :7], atol=1e-6)


def test_greedy_generation_with_cache_equals_recomputed_greedy():
    m = model()
    prompt = torch.randint(0, 30, (1, 5))
    got = torch.stack([i for i, _, _ in sample_ids(m, prompt, 10, temperature=0)], 1)
    seq = prompt
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat([seq, m(seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, seq[:, 5:])


def test_generation_runs_past_the_context_window():
    m = model(max_len=8)
    out = list(sample_ids(m, torch.randint(0, 30, (2, 3)), 40, temperature=1.0,
                          generator=torch.Generator().manual_seed(0)))
    assert len(out) == 40


def test_alibi_scores_fall_with_distance_and_need_no_position_table():
    m = model(positions="alibi")
    assert not any("pos" in name for name, _ in m.named_parameters())
    from scriven.attention import alibi_bias
    bias = alibi_bias(4, 5)                                             # (H, Tq, Tk)
    assert torch.all(bias[:, 4, :4].diff(dim=-1) > 0)                   # nearer keys: higher
    assert torch.all(bias[:, torch.arange(5), torch.arange(5)] == 0)    # itself: no penalty
    assert torch.allclose(bias[0] / 4, bias[1])                         # geometric slopes


def test_a_head_bias_is_learnt_and_saved_like_any_weight():
    m = model(head_bias=True)
    assert m.head.bias is not None and m.head.weight is m.embed.weight
    assert model().head.bias is None  # older configs have none


def test_dropout_falls_on_the_residual_paths_not_on_the_attention_weights():
    m = model(dropout=0.5).train()
    seen = []
    m.blocks[0].attn.register_forward_hook(lambda mod, args, kwargs, out: seen.append((args, kwargs, out[0])),
                                           with_kwargs=True)
    ids = torch.randint(0, 30, (2, 10))
    m(ids)
    args, kwargs, trained = seen[0]
    m.eval()
    again, _ = m.blocks[0].attn(*args, **{**kwargs, "cache": KVCache()})
    assert torch.equal(trained, again)
    m.train()
    assert not torch.equal(m(ids)[0], m(ids)[0])  # dropout is still on elsewhere


def test_too_long_input_is_named():
    with pytest.raises(ScrivenError, match="max_len"):
        model()(torch.zeros(1, 25, dtype=torch.long))


def test_sliding_evaluation_scores_every_token_once():
    m = model(max_len=8)
    ids = torch.randint(0, 30, (50,))
    nll, count = stream_nll(m, ids, torch.device("cpu"))
    assert count == 49
    assert nll > 0


def test_train_gpt_end_to_end(tiny_text, tmp_path):
    run = tmp_path / "gpt"
    result = train_lm(str(tiny_text), run, model="gpt", preset="tiny", batch_size=4, seq_len=16,
                      max_steps=30, lr=3e-3, eval_every=10, progress=False)
    assert result.metrics["perplexity"] < 40
    assert generate(run, "anna said", max_new_tokens=5, seed=0)[0].startswith("Anna said")
    assert generate(run, "anna said", max_new_tokens=5, precision="bf16")[0].startswith("Anna")
    with pytest.raises(ScrivenError, match="int8"):
        generate(run, "anna said", precision="int8")
    assert evaluate_lm(run, str(tiny_text))["perplexity"] > 1
    with pytest.raises(ScrivenError, match="seq_len"):
        train_lm(str(tiny_text), tmp_path / "x", model="gpt", preset="tiny", seq_len=100,
                 max_steps=1, progress=False)
