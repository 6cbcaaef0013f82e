"""Pictures of what happens inside the models. Each function draws one picture to PNG or SVG
(the file's suffix decides) and returns the numbers it plotted, so tests can check them."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from . import checkpoint as ckpt_io  # noqa: E402
from .config import check_positive_int  # noqa: E402
from .device import resolve_device  # noqa: E402
from .errors import ScrivenError  # noqa: E402
from .models import KINDS  # noqa: E402
from .models.transformer import sinusoidal_positions  # noqa: E402
from .sampling import filter_logits, validate  # noqa: E402
from .tokenizers import SPECIAL_TOKENS  # noqa: E402
from .translator import ATTENTION_KINDS, LoadedTranslator, all_attention  # noqa: E402


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    if out.suffix.lower() not in (".png", ".svg"):
        raise ScrivenError(f"output {out}: must end in .png or .svg")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp" + out.suffix)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, out)
    return out


def plot_training_curves(metrics: str | Path, out: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Training loss and validation loss against steps, from a run's metrics.jsonl."""
    path = Path(metrics)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise ScrivenError(f"metrics log {path}: no such file")
    train, valid = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ScrivenError(f"metrics log {path}, line {number}: not JSON") from None
        if "loss" in record:
            train.append((record["step"], record["loss"]))
        if "val_loss" in record:
            valid.append((record["step"], record["val_loss"]))
    if not train and not valid:
        raise ScrivenError(f"metrics log {path}: no loss values to plot")
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="training loss", lw=1.2)
    if valid:
        ax.plot(*zip(*valid), label="validation loss", marker="o", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, out)
    return {"train": train, "valid": valid}


# ---------------------------------------------------------------------------------------------
# Attention of a translation

_ATTENTION_TITLES = {
    "encoder_self": ("encoder self-attention", "source (key)", "source (query)"),
    "decoder_self": ("decoder masked self-attention", "decoder input (key)",
                     "decoder input (query)"),
    "cross": ("cross-attention", "source (key)", "predicted target token (query)"),
}


def _loaded_translator(checkpoint: Any, device: str) -> LoadedTranslator:
    if isinstance(checkpoint, LoadedTranslator):
        return checkpoint
    return LoadedTranslator.load(checkpoint, device)


def translation_attention(checkpoint: Any, source: str, target: str | None = None,
                          device: str = "auto") -> dict[str, Any]:
    """Every attention map of one translation: the model's greedy translation of `source`, or
    `target` teacher-forced (`translation.all_attention`). Returns tokens and {kind: [(H, Tq,
    Tk)] per layer} for kinds encoder_self (source × source), decoder_self (decoder input ×
    decoder input, masked) and cross (predicted token × source); rows sum to 1."""
    found = all_attention(_loaded_translator(checkpoint, device), source, target)
    return {"source_tokens": found.source_tokens, "decoder_tokens": found.decoder_tokens,
            "target_tokens": found.target_tokens, "translation": found.translation,
            "maps": found.maps}


def _heatmap(ax, weights: Tensor, cols: list[str], rows: list[str], title: str,
             xlabel: str, ylabel: str, label_rows: bool):
    size = max(5.0, min(9.0, 160 / max(len(cols), len(rows), 1)))
    image = ax.imshow(weights.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto",
                      interpolation="nearest")
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=size)
    ax.set_yticks(range(len(rows)), rows if label_rows else [""] * len(rows), fontsize=size)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    if label_rows:
        ax.set_ylabel(ylabel, fontsize=8)
    return image


def plot_attention(checkpoint: Any, source: str, out: str | Path, target: str | None = None,
                   layer: int = 0, kinds: Sequence[str] = ATTENTION_KINDS,
                   device: str = "auto") -> dict[str, Any]:
    """Heatmaps of one layer's attention for translating `source` (into the model's greedy
    translation, or into `target`): a row of heads for each of `kinds` (encoder_self,
    decoder_self, cross), tokens on the axes. `layer` counts from 0; negative counts from the
    end. Returns the tokens and {kind: (H, Tq, Tk)} for that layer: the numbers drawn."""
    kinds = list(kinds)
    if not kinds or any(k not in ATTENTION_KINDS for k in kinds):
        raise ScrivenError(f"kinds must be some of {', '.join(ATTENTION_KINDS)}, got {kinds}")
    found = translation_attention(checkpoint, source, target, device)
    n_layers = {k: len(found["maps"][k]) for k in kinds}
    chosen: dict[str, Tensor] = {}
    for k in kinds:
        if not -n_layers[k] <= layer < n_layers[k]:
            raise ScrivenError(f"layer must be in [{-n_layers[k]}, {n_layers[k] - 1}] for "
                               f"{k} ({n_layers[k]} layers), got {layer}")
        chosen[k] = found["maps"][k][layer]                                 # (H, Tq, Tk)
    axes_tokens = {
        "encoder_self": (found["source_tokens"], found["source_tokens"]),
        "decoder_self": (found["decoder_tokens"], found["decoder_tokens"]),
        "cross": (found["source_tokens"], found["target_tokens"]),
    }
    heads = chosen[kinds[0]].size(0)
    width = max(2.4, 0.2 * max(len(axes_tokens[k][0]) for k in kinds) + 1.0)
    height = max(2.4, 0.2 * max(len(axes_tokens[k][1]) for k in kinds) + 1.2)
    fig, axes = plt.subplots(len(kinds), heads, figsize=(width * heads + 1.2, height * len(kinds) + 0.6),
                             squeeze=False, layout="constrained")
    image = None
    for r, k in enumerate(kinds):
        title, xlabel, ylabel = _ATTENTION_TITLES[k]
        cols, rows = axes_tokens[k]
        for h in range(heads):
            image = _heatmap(axes[r][h], chosen[k][h], cols, rows, f"{title}, head {h + 1}",
                             xlabel, ylabel, label_rows=h == 0)
    shown_layer = layer % n_layers[kinds[0]]
    fig.suptitle(f"layer {shown_layer + 1}: {found['translation'] or '(empty translation)'}",
                 fontsize=10)
    fig.colorbar(image, ax=axes, shrink=min(0.6, 3 / len(kinds)), label="attention weight")
    _save(fig, out)
    return {"layer": shown_layer, "source_tokens": found["source_tokens"],
            "decoder_tokens": found["decoder_tokens"], "target_tokens": found["target_tokens"],
            "translation": found["translation"], "maps": chosen}


# ---------------------------------------------------------------------------------------------
# Positional encodings


def positional_encoding(max_len: int = 64, d_model: int = 128,
                        checkpoint: Any = None, device: str = "auto") -> Tensor:
    """(max_len, d_model) position table: sinusoidal, or a translator checkpoint's own (its
    d_model; learned positions when it has them; max_len at most the model's)."""
    check_positive_int(max_len, "max_len")
    check_positive_int(d_model, "d_model")
    if checkpoint is None:
        return sinusoidal_positions(max_len, d_model)
    model = _loaded_translator(checkpoint, device).model
    n = min(max_len, model.config.max_len)
    if model.src_pos is not None:
        return model.src_pos.weight[:n].detach().float().cpu()
    return sinusoidal_positions(n, model.config.d_model)


def plot_positional_encoding(out: str | Path, max_len: int = 64, d_model: int = 128,
                             checkpoint: Any = None, device: str = "auto") -> dict[str, Tensor]:
    """The position table (positions × dimensions) and the dot product between every two
    positions' encodings (nearby positions are similar, and similarity depends only on the
    distance). Returns {"encoding": (L, D), "similarity": (L, L)}."""
    table = positional_encoding(max_len, d_model, checkpoint, device)       # (L, D)
    similarity = table @ table.T                                            # (L, L)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained",
                                      gridspec_kw={"width_ratios": [1.4, 1]})
    a = left.imshow(table.numpy(), cmap="RdBu_r", vmin=-1.0, vmax=1.0, aspect="auto",
                    interpolation="nearest")
    left.set_xlabel("dimension")
    left.set_ylabel("position")
    left.set_title(f"positional encoding ({table.size(0)} positions × {table.size(1)} dims)")
    fig.colorbar(a, ax=left, shrink=0.8, label="value")
    b = right.imshow(similarity.numpy(), cmap="magma", aspect="equal", interpolation="nearest")
    right.set_xlabel("position")
    right.set_ylabel("position")
    right.set_title("dot product between positions")
    fig.colorbar(b, ax=right, shrink=0.8, label="PE[i] · PE[j]")
    _save(fig, out)
    return {"encoding": table, "similarity": similarity}


# ---------------------------------------------------------------------------------------------
# Next-token distribution of a language model


def _loaded_lm(checkpoint: Any, device: str):  # -> LoadedLM
    from .generation import LoadedLM
    if isinstance(checkpoint, LoadedLM):
        return checkpoint
    return LoadedLM.load(checkpoint, device)


@torch.inference_mode()
def next_token_logits(checkpoint: Any, prompt: str, device: str = "auto") -> tuple[Tensor, Any]:
    """The LM's logits (V,) for the token after `prompt`, and its tokenizer."""
    from .generation import encode_prompt
    lm = _loaded_lm(checkpoint, device)
    ids = torch.tensor([encode_prompt(lm.tokenizer, prompt)], device=lm.device)  # (1, T)
    logits, _ = lm.model(ids)                                               # (1, T, V)
    return logits[0, -1].float().cpu(), lm.tokenizer


def plot_next_token(checkpoint: Any, prompt: str, out: str | Path,
                    temperatures: Sequence[float] = (0.5, 1.0, 1.5), top_k: int | None = None,
                    top_p: float | None = None, show: int = 20,
                    device: str = "auto") -> dict[str, Any]:
    """The probability of each of the `show` most likely next tokens after `prompt`, one panel
    per temperature, with the top-k and top-p cut-offs marked (bars past them are grey: sampling
    never picks them). Returns the tokens, the raw logits (V,), {temperature: probabilities of
    the shown tokens before filtering} and {temperature: tokens kept by the filters}."""
    temps = [float(t) for t in temperatures]
    if not temps:
        raise ScrivenError("temperatures: give at least one")
    for t in temps:
        if not math.isfinite(t) or t <= 0:
            raise ScrivenError(f"temperatures must be numbers > 0, got {t!r}")
    check_positive_int(show, "show")
    logits, tok = next_token_logits(checkpoint, prompt, device)             # (V,)
    validate(1.0, top_k, top_p, 1.0, tok.vocab_size)
    n = min(show, logits.numel())
    order = torch.argsort(logits, descending=True)[:n]   # same ranking at every temperature
    tokens = [tok.id_to_token(i) for i in order.tolist()]
    probabilities: dict[float, Tensor] = {}
    kept: dict[float, int] = {}
    fig, axes = plt.subplots(len(temps), 1, figsize=(max(6.0, 0.42 * n + 2), 2.3 * len(temps) + 0.8),
                             sharex=True, squeeze=False, layout="constrained")
    for ax, t in zip(axes[:, 0], temps):
        probs = torch.softmax(logits / t, dim=-1)                           # (V,)
        allowed = torch.isfinite(filter_logits(logits, t, top_k, top_p))    # (V,)
        probabilities[t], kept[t] = probs[order], int(allowed.sum())
        colours = ["tab:blue" if a else "0.75" for a in allowed[order].tolist()]
        ax.bar(range(n), probabilities[t].numpy(), color=colours)
        ax.set_ylabel("probability")
        ax.set_title(f"temperature {t:g}: the filters keep {kept[t]} of {logits.numel()} tokens",
                     fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if top_k is not None and top_k < n:
            ax.axvline(top_k - 0.5, color="tab:red", ls="--", lw=1.2, label=f"top-k = {top_k}")
        # Top-p runs after top-k and keeps a prefix of what top-k kept: it cut where fewer
        # than top_k tokens are left.
        if top_p is not None and kept[t] < n and (top_k is None or kept[t] < top_k):
            ax.axvline(kept[t] - 0.5, color="tab:green", ls=":", lw=1.6,
                       label=f"top-p = {top_p:g}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper right")
    last = axes[-1, 0]
    last.set_xticks(range(n), tokens, rotation=60, ha="right", fontsize=8)
    last.set_xlabel("next token (most likely first)")
    fig.suptitle(f"next token after {prompt!r}", fontsize=10)
    _save(fig, out)
    return {"tokens": tokens, "ids": order.tolist(), "logits": logits,
            "probabilities": probabilities, "kept": kept, "top_k": top_k, "top_p": top_p}


# ---------------------------------------------------------------------------------------------
# Embeddings


def _embedding_model(checkpoint: Any, device: str):
    """(embedding table (V, D), tokenizer) of any checkpoint or loaded model."""
    if hasattr(checkpoint, "model") and hasattr(checkpoint, "tokenizer"):
        model, tok = checkpoint.model, checkpoint.tokenizer
    else:
        model, tok, _ = ckpt_io.load_model(checkpoint, resolve_device(device),
                                           kinds=tuple(KINDS))
    table = model.src_embed if hasattr(model, "src_embed") else model.embed
    return table.weight.detach().float().cpu(), tok


def _word_id(tok: Any, word: str) -> int:
    for candidate in (word, "\u2581" + word, word.lower(), "\u2581" + word.lower()):
        i = tok.token_to_id(candidate)
        if i is not None and i >= len(SPECIAL_TOKENS):
            return i
    raise ScrivenError(f"word {word!r} is not in the model's vocabulary")


def nearest_words(table: Tensor, tok: Any, word: str, k: int = 10) -> list[tuple[str, float]]:
    """The `k` tokens whose embeddings have the highest cosine similarity to `word`'s
    (special tokens and the word itself left out), most similar first."""
    check_positive_int(k, "k")
    i = _word_id(tok, word)
    unit = torch.nn.functional.normalize(table, dim=-1)                     # (V, D)
    cosine = unit @ unit[i]                                                 # (V,)
    cosine[: len(SPECIAL_TOKENS)] = float("-inf")
    cosine[i] = float("-inf")
    k = min(k, int(torch.isfinite(cosine).sum()))
    values, ids = torch.topk(cosine, k)
    return [(tok.id_to_token(j), v) for v, j in zip(values.tolist(), ids.tolist())]


def pca_2d(vectors: Tensor) -> tuple[Tensor, Tensor]:
    """Coordinates (N, 2) of `vectors` (N, D) on their two principal axes (SVD of the centred
    vectors; each axis' sign fixed so its largest coordinate is positive), and the fraction of
    the variance each axis explains (2,)."""
    centred = vectors - vectors.mean(dim=0, keepdim=True)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    coords = u[:, :2] * s[:2]                                               # (N, <=2)
    if coords.size(1) < 2:
        coords = torch.cat([coords, torch.zeros(coords.size(0), 2 - coords.size(1))], dim=1)
    flip = torch.sign(coords.gather(0, coords.abs().argmax(dim=0, keepdim=True)))
    coords = coords * torch.where(flip == 0, torch.ones_like(flip), flip)
    variance = s**2
    explained = variance[:2] / variance.sum().clamp_min(1e-12)
    return coords, torch.cat([explained, torch.zeros(2 - explained.numel())])


def plot_embeddings(checkpoint: Any, words: Sequence[str], out: str | Path,
                    neighbours: int = 8, device: str = "auto") -> dict[str, Any]:
    """Nearest neighbours of each word by cosine similarity of the input embeddings (a bar
    chart for the first three words), and a 2-D PCA projection of the words with their
    neighbours. Returns {"neighbours": {word: [(token, cosine)]}, "points": [token],
    "projection": (N, 2), "explained": (2,)}."""
    words = list(words)
    if not words:
        raise ScrivenError("words: give at least one word")
    table, tok = _embedding_model(checkpoint, device)
    near = {w: nearest_words(table, tok, w, neighbours) for w in words}
    points = list(dict.fromkeys([tok.id_to_token(_word_id(tok, w)) for w in words]
                                + [t for w in words for t, _ in near[w]]))
    ids = [tok.token_to_id(t) for t in points]
    coords, explained = pca_2d(table[ids])
    chosen = {tok.id_to_token(_word_id(tok, w)) for w in words}
    bars = words[:3]
    fig = plt.figure(figsize=(4.0 * max(len(bars), 2), 8.5), layout="constrained")
    grid = fig.add_gridspec(2, len(bars), height_ratios=[1, 1.4])
    for c, w in enumerate(bars):
        ax = fig.add_subplot(grid[0, c])
        names = [t for t, _ in near[w]][::-1]
        ax.barh(range(len(names)), [v for _, v in near[w]][::-1], color="tab:blue")
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel("cosine similarity")
        ax.set_title(f"nearest to {w!r}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    ax = fig.add_subplot(grid[1, :])
    for (x, y), name in zip(coords.tolist(), points):
        main = name in chosen
        ax.scatter([x], [y], s=40 if main else 14, color="tab:red" if main else "0.55")
        ax.annotate(name, (x, y), xytext=(3, 3), textcoords="offset points",
                    fontsize=9 if main else 7, fontweight="bold" if main else "normal")
    ax.set_xlabel(f"principal axis 1 ({100 * explained[0]:.0f}% of variance)")
    ax.set_ylabel(f"principal axis 2 ({100 * explained[1]:.0f}% of variance)")
    ax.set_title("2-D projection (PCA) of the words (red) and their neighbours", fontsize=9)
    ax.grid(alpha=0.3)
    _save(fig, out)
    return {"neighbours": near, "points": points, "projection": coords, "explained": explained}
