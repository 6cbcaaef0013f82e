"""Pictures: each function writes a PNG or SVG of a sensible size and returns numbers that come
from the model (checked here against the model itself)."""

from __future__ import annotations

import struct

import pytest
import torch

from scriven import plots
from scriven.errors import ScrivenError
from scriven.generation import LoadedLM
from scriven.models.transformer import sinusoidal_positions
from scriven.sampling import filter_logits
from scriven.translator import LoadedTranslator, attention


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from test_serve import one_thread, trained_models
    with one_thread():
        lm, tr = trained_models(tmp_path_factory)
        yield LoadedLM.load(lm, "cpu"), LoadedTranslator.load(tr, "cpu")


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])  # IHDR: width, height


def test_positional_encoding_is_the_model_table_and_depends_on_distance(tmp_path):
    found = plots.plot_positional_encoding(tmp_path / "pe.png", max_len=40, d_model=32)
    table, similarity = found["encoding"], found["similarity"]
    assert torch.equal(table, sinusoidal_positions(40, 32))
    assert torch.allclose(similarity, table @ table.T)
    # The dot product depends only on the distance between positions, and peaks at 0.
    assert torch.allclose(similarity[5, 9], similarity[20, 24], atol=1e-4)
    assert torch.allclose(similarity.diagonal(), torch.full((40,), 16.0), atol=1e-4)
    width, height = png_size(tmp_path / "pe.png")
    assert 800 < width < 2000 and 300 < height < width


def test_svg_by_suffix_and_other_suffixes_refused(tmp_path):
    plots.plot_positional_encoding(tmp_path / "pe.svg", max_len=8, d_model=8)
    assert "<svg" in (tmp_path / "pe.svg").read_text()[:2000]
    with pytest.raises(ScrivenError, match="png or .svg"):
        plots.plot_positional_encoding(tmp_path / "pe.jpg", max_len=8, d_model=8)
    assert not list(tmp_path.glob("*.tmp*"))  # atomic writes leave nothing behind


def test_a_translator_gives_its_own_positions(models, tmp_path):
    _, tr = models
    found = plots.plot_positional_encoding(tmp_path / "own.png", max_len=10, checkpoint=tr)
    assert torch.equal(found["encoding"], tr.model.sinusoids[:10])


def test_attention_maps_are_the_model_maps(models, tmp_path):
    _, tr = models
    source = "the big dog sleeps."
    found = plots.plot_attention(tr, source, tmp_path / "att.png", layer=-1)
    heads = tr.model.config.n_heads
    s, t = len(found["source_tokens"]), len(found["decoder_tokens"])
    assert found["maps"]["encoder_self"].shape == (heads, s, s)
    assert found["maps"]["decoder_self"].shape == (heads, t, t)
    assert found["maps"]["cross"].shape == (heads, t, s)
    for weights in found["maps"].values():
        assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-5)
    # Masked self-attention: nothing above the diagonal.
    assert torch.all(found["maps"]["decoder_self"].triu(1) == 0)
    # The same numbers the translator's own attention() gives for its translation.
    expected = attention(tr, source)
    assert found["source_tokens"] == expected.source_tokens
    assert found["target_tokens"] == expected.target_tokens
    assert torch.allclose(found["maps"]["cross"], expected.cross[-1], atol=1e-6)
    width, height = png_size(tmp_path / "att.png")
    assert width > 300 * heads and height > 600


def test_attention_for_a_given_target_and_bad_layers(models, tmp_path):
    _, tr = models
    found = plots.plot_attention(tr, "the cat eats.", tmp_path / "a.svg", target="le chat mange.",
                                 kinds=["cross"])
    assert found["translation"] == "le chat mange."
    assert set(found["maps"]) == {"cross"}
    with pytest.raises(ScrivenError, match="layer"):
        plots.plot_attention(tr, "the cat eats.", tmp_path / "b.png", layer=5)
    with pytest.raises(ScrivenError, match="kinds"):
        plots.plot_attention(tr, "the cat eats.", tmp_path / "b.png", kinds=["sideways"])


def test_next_token_probabilities_come_from_the_model(models, tmp_path):
    lm, _ = models
    temperatures = (0.5, 1.0, 2.0)
    found = plots.plot_next_token(lm, "anna said", tmp_path / "next.png",
                                  temperatures=temperatures, top_k=5, top_p=0.5, show=12)
    ids = torch.tensor([lm.tokenizer.encode("anna said")])
    with torch.no_grad():
        logits = lm.model(ids)[0][0, -1]
    assert torch.allclose(found["logits"], logits)
    assert found["tokens"] == [lm.tokenizer.id_to_token(i) for i in found["ids"]]
    for t in temperatures:
        probs = torch.softmax(logits / t, -1)
        assert torch.allclose(found["probabilities"][t], probs[found["ids"]])
        kept = torch.isfinite(filter_logits(logits[None], t, 5, 0.5)).sum().item()
        assert found["kept"][t] == kept <= 5
    # Bars are the most likely tokens, in order.
    assert found["probabilities"][1.0][0] == torch.softmax(logits, -1).max()
    assert torch.all(found["probabilities"][1.0][:-1] >= found["probabilities"][1.0][1:])
    width, height = png_size(tmp_path / "next.png")
    assert width > 500 and height > 400


def test_next_token_refuses_bad_settings(models, tmp_path):
    lm, _ = models
    with pytest.raises(ScrivenError, match="temperatures"):
        plots.plot_next_token(lm, "anna", tmp_path / "x.png", temperatures=[0])
    with pytest.raises(ScrivenError, match="top_p"):
        plots.plot_next_token(lm, "anna", tmp_path / "x.png", top_p=2.0)


def test_embedding_neighbours_and_projection_come_from_the_embeddings(models, tmp_path):
    lm, _ = models
    found = plots.plot_embeddings(lm, ["anna", "house"], tmp_path / "emb.png", neighbours=5)
    table = lm.model.embed.weight.detach()
    tok = lm.tokenizer
    for word, near in found["neighbours"].items():
        assert len(near) == 5 and word not in [t for t, _ in near]
        cosines = [c for _, c in near]
        assert cosines == sorted(cosines, reverse=True)
        w = table[tok.token_to_id(word)]
        for token, c in near:
            expected = torch.cosine_similarity(w, table[tok.token_to_id(token)], dim=0)
            assert c == pytest.approx(float(expected), abs=1e-5)
    # PCA: centred points on orthogonal axes, keeping as much spread as any 2-D projection.
    points = table[[tok.token_to_id(t) for t in found["points"]]]
    coords = found["projection"]
    centred = points - points.mean(0)
    assert torch.allclose(coords.mean(0), torch.zeros(2), atol=1e-5)
    assert abs(float(coords[:, 0] @ coords[:, 1])) < 1e-3 * float((coords**2).sum())
    explained = (coords**2).sum(0) / (centred**2).sum()
    assert torch.allclose(explained, found["explained"], atol=1e-5)
    assert explained[0] >= explained[1]
    width, height = png_size(tmp_path / "emb.png")
    assert width > 600 and height > 600


def test_unknown_words_are_named(models, tmp_path):
    lm, _ = models
    with pytest.raises(ScrivenError, match="zebra"):
        plots.plot_embeddings(lm, ["anna", "zebra"], tmp_path / "x.png")


def test_plot_commands(models, tmp_path, capsys):
    from scriven.cli import main
    lm, tr = models
    out = tmp_path / "cli.png"
    assert main(["plot", "positions", "--max-len", "16", "--d-model", "8", "--out", str(out)]) == 0
    assert png_size(out)[0] > 100
    assert main(["plot", "next-token", str(lm.path), "anna", "--top-k", "3",
                 "--out", str(tmp_path / "n.svg")]) == 0
    assert main(["plot", "attention", str(tr.path), "the cat eats.", "--kinds", "cross",
                 "--out", str(tmp_path / "a.png")]) == 0
    assert main(["plot", "embeddings", str(lm.path), "zebra"]) == 2
    assert "zebra" in capsys.readouterr().err
