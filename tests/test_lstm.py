import pytest
import torch

from scriven import precision as precision_module
from scriven.errors import ScrivenError
from scriven.models.lstm import LSTMConfig, LSTMLanguageModel
from scriven.stepper import LSTMStepper


def model(**overrides):
    torch.manual_seed(0)
    config = dict(vocab_size=40, embed_dim=16, hidden_dim=24, num_layers=2, dropout=0.0)
    config.update(overrides)
    return LSTMLanguageModel(LSTMConfig(**config)).eval()


def test_carried_state_equals_reading_everything_at_once():
    m = model()
    ids = torch.randint(0, 40, (3, 20))
    full, _ = m(ids)
    first, state = m(ids[:, :7])
    second, _ = m(ids[:, 7:], state)
    assert torch.allclose(torch.cat([first, second], 1), full, atol=1e-5)


def test_causal_future_tokens_do_not_change_past_logits():
    m = model()
    ids = torch.randint(0, 40, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 40
    assert torch.allclose(m(ids)[0][:, :8], m(changed)[0][:, :8])


def test_tied_embeddings_share_one_matrix_and_project_when_sizes_differ():
    m = model(tie_embeddings=True)
    assert m.head.weight is m.embed.weight
    logits, (h, c) = m(torch.randint(0, 40, (2, 5)))
    assert logits.shape == (2, 5, 40)
    assert h.shape == (2, 2, 16) and c.shape == (2, 2, 24)


def test_seed_preset_has_the_books_sizes():
    c = LSTMConfig.preset("seed", 1000)
    assert (c.embed_dim, c.hidden_dim, c.num_layers, c.dropout) == (128, 128, 3, 0.2)


@pytest.mark.parametrize("field, value", [("vocab_size", 0), ("hidden_dim", -1), ("dropout", 1.0),
                                          ("num_layers", 1.5)])
def test_config_rejects_bad_values(field, value):
    config = dict(vocab_size=10)
    config[field] = value
    with pytest.raises(ScrivenError, match=field):
        LSTMConfig(**config)


def test_unknown_preset_is_named():
    with pytest.raises(ScrivenError, match="preset"):
        LSTMConfig.preset("huge", 10)


@pytest.mark.parametrize("tie", [False, True])  # tied and embed != hidden: a projected LSTM
def test_stepper_reads_and_steps_like_the_full_lstm(tie):
    m = model(tie_embeddings=tie)
    stepper = LSTMStepper(m)
    ids = torch.randint(0, 40, (3, 9))
    full, _ = m(ids)                                          # (B, T, V)
    with torch.no_grad():
        logits, state = stepper.read(ids[:, :4])
        steps = [logits]
        for t in range(4, 9):
            logits, state = stepper.step(ids[:, t], state)
            steps.append(logits)
    assert torch.allclose(torch.stack(steps, 1), full[:, 3:], atol=1e-5)
    assert state[0].shape == (2, 3, 16 if tie else 24)


@pytest.mark.parametrize("precision, tolerance", [("bf16", 0.05), ("int8", 0.05)])
@pytest.mark.parametrize("layers_too", [False, True])  # small layers stay fp32 unless forced
def test_lower_precision_steps_stay_close_to_fp32(precision, tolerance, layers_too, monkeypatch):
    if layers_too:
        monkeypatch.setattr(precision_module, "LOW_PRECISION_MIN", 0)
        monkeypatch.setattr(precision_module, "INT8_MATMUL_MIN", 0)
    m = model(vocab_size=300, embed_dim=64, hidden_dim=64)
    ids = torch.randint(0, 300, (2, 6))
    with torch.no_grad():
        exact, state = LSTMStepper(m).read(ids)
        reference = LSTMStepper(m).step(ids[:, 0], state)[0]
        approx = LSTMStepper(m, precision).step(ids[:, 0], state)[0]
    scale = reference.abs().max()
    assert (approx - reference).abs().max() <= tolerance * scale
    assert not torch.equal(approx, reference)  # it really ran in lower precision


def test_int8_without_the_native_kernels_steps_each_stream_as_if_alone(monkeypatch):
    """On PyTorch's int8 matmul a stream's logits are the same alone and batched with others
    (served requests share batches)."""
    from scriven import accel
    from scriven.precision import PackedInt8

    if not PackedInt8.available():
        pytest.skip("PyTorch has no int8 matmul on this CPU")
    monkeypatch.setattr(accel, "lstm_int8_step", lambda model: None)
    monkeypatch.setattr(precision_module, "INT8_MATMUL_MIN", 0)  # these layers are small
    m = model(vocab_size=300, embed_dim=32, hidden_dim=48)
    stepper = LSTMStepper(m, "int8")
    assert all(layer.gates.packed is not None for layer in stepper.layers)
    ids = torch.randint(0, 300, (4, 6))
    with torch.no_grad():
        _, state = LSTMStepper(m).read(ids)
        batch, (h, c) = stepper.step(ids[:, 0], state)
        for i in range(4):
            alone, (h_i, c_i) = stepper.step(ids[i:i + 1, 0], (state[0][:, i:i + 1], state[1][:, i:i + 1]))
            assert torch.equal(alone, batch[i:i + 1]) and torch.equal(h_i, h[:, i:i + 1])


def test_unknown_precision_is_named():
    with pytest.raises(ScrivenError, match="precision"):
        LSTMStepper(model(), "fp8")
