"""Export a trained checkpoint to a runtime that needs no scriven model code: CTranslate2 for
translators, ONNX for language models (LSTM and GPT).

An export is a directory:

    export.json      model kind, format, export format version, special ids, sampling defaults,
                     the checkpoint's model config and data notes (dataset attribution)
    tokenizer.json   the checkpoint's tokenizer, unchanged
    ctranslate2/     translators: the CTranslate2 model directory (model.bin, vocabulary)
    step.onnx        language models: one token per row in, logits and the new state out
    prompt.onnx      language models: a whole prompt in (LSTM without a projection only; a GPT's
                     step graph takes any number of tokens, so it reads prompts itself)

Weights are read by state-dict key, never through the model classes, so an export depends only
on what a checkpoint stores. `scriven.runtimes` loads and runs exports.
"""

from __future__ import annotations

import json
import math
import shutil
from importlib import import_module
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import __version__
from . import checkpoint as ckpt_io
from .attention import alibi_slopes
from .errors import ScrivenError
from .tokenizers import BOS, BOS_ID, EOS, EOS_ID, PAD_ID, UNK, UNK_ID

EXPORT_VERSION = 1
EXPORT_FILE = "export.json"
FORMATS = {"transformer": "ctranslate2", "lstm": "onnx", "gpt": "onnx"}
QUANTIZATIONS = {
    "ctranslate2": ("float32", "int8", "int8_float32", "bfloat16"),
    "onnx": ("float32", "int8"),
}
PACKAGES = {"ctranslate2": ("ctranslate2",), "onnx": ("onnx", "onnxruntime")}
LAYER_NORM_EPS = 1e-5  # scriven's LayerNorm default; not stored in checkpoints
ONNX_OPSET = 17

# What `scriven generate` / `scriven translate` use when not told otherwise.
SAMPLING_DEFAULTS = {
    "lm": {"max_new_tokens": 200, "temperature": 1.0, "top_k": None, "top_p": None,
           "repetition_penalty": 1.0},
    "translator": {"beam": 1, "length_penalty": 1.0},
}


def require(package: str, format: str) -> Any:
    """Import an optional runtime package, or say how to install it."""
    try:
        return import_module(package)
    except ImportError:
        raise ScrivenError(f"the {format} format needs the Python package {package!r}: "
                           f"pip install 'scriven[export]'") from None


def export(checkpoint: str | Path, format: str, out: str | Path,
           quantization: str | None = None) -> Path:
    """Write the model in `checkpoint` to the directory `out` for the runtime `format`
    ("ctranslate2" for translators, "onnx" for LSTM and GPT language models). `quantization`:
    ctranslate2 float32 (default), int8, int8_float32 or bfloat16; onnx float32 (default) or
    int8 (dynamic int8 matmuls). Returns `out`."""
    ckpt = ckpt_io.load(checkpoint)
    expected = FORMATS.get(ckpt.kind)
    if expected is None:
        raise ScrivenError(f"checkpoint {ckpt.path}: a {ckpt.kind} model cannot be exported")
    if format not in QUANTIZATIONS:
        raise ScrivenError(f"format {format!r} unknown; choose from {', '.join(QUANTIZATIONS)}")
    if format != expected:
        raise ScrivenError(f"checkpoint {ckpt.path} holds a {ckpt.kind} model, which exports to "
                           f"{expected}, not {format}")
    quantization = quantization or "float32"
    if quantization not in QUANTIZATIONS[format]:
        raise ScrivenError(f"quantization {quantization!r} is not one of "
                           f"{', '.join(QUANTIZATIONS[format])} for {format}")
    for package in PACKAGES[format]:
        require(package, format)
    if "model" not in ckpt.config:
        raise ScrivenError(f"checkpoint {ckpt.path}: config.json has no model config")

    out = Path(out)
    if out.exists() and not (out / EXPORT_FILE).is_file() and any(out.iterdir()):
        raise ScrivenError(f"--out {out} exists and is not an export; give a new directory")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        model_config = ckpt.config["model"]
        if ckpt.kind == "transformer":
            _export_ctranslate2(ckpt.weights, model_config, ckpt_io.tokenizer_of(ckpt),
                                tmp / "ctranslate2", quantization)
        elif ckpt.kind == "lstm":
            _export_onnx(LSTMExport(ckpt.weights, model_config), tmp, quantization)
        else:
            _export_onnx(GPTExport(ckpt.weights, model_config), tmp, quantization)
        (tmp / "tokenizer.json").write_text(ckpt.tokenizer_json, encoding="utf-8")
        info = {
            "scriven_export": EXPORT_VERSION,
            "scriven_version": __version__,
            "kind": ckpt.kind,
            "format": format,
            "quantization": quantization,
            "special_ids": {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID},
            "sampling": SAMPLING_DEFAULTS["translator" if ckpt.kind == "transformer" else "lm"],
            "model": model_config,
            # a GPT's trained window, the most it may read at once (see OnnxStepper)
            **({"context": ckpt_io.trained_context(ckpt.config)} if ckpt.kind == "gpt" else {}),
            "data": ckpt.config.get("data") or {},
            "source": str(ckpt.path),
        }
        ckpt_io.write_json_atomic(tmp / EXPORT_FILE, info)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out


def read_info(path: str | Path) -> dict[str, Any]:
    """export.json of an export directory, checked: a scriven export this version can read."""
    file = Path(path) / EXPORT_FILE
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScrivenError(f"{path}: not a scriven export (no {EXPORT_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ScrivenError(f"{file} is corrupted: {e}") from None
    version = info.get("scriven_export") if isinstance(info, dict) else None
    if not isinstance(version, int):
        raise ScrivenError(f"{file}: not a scriven export (no scriven_export version)")
    if version > EXPORT_VERSION:
        raise ScrivenError(f"{path} was exported by scriven {info.get('scriven_version', '?')} "
                           f"(export format {version}); this scriven {__version__} reads format "
                           f"{EXPORT_VERSION} and older: upgrade scriven or export again")
    if FORMATS.get(info.get("kind")) != info.get("format"):
        raise ScrivenError(f"{file}: kind {info.get('kind')!r} in format "
                           f"{info.get('format')!r} is not an export scriven makes")
    return info


def is_export(path: Any) -> bool:
    """Whether `path` names an export directory (as opposed to a checkpoint)."""
    return isinstance(path, (str, Path)) and (Path(path) / EXPORT_FILE).is_file()


# ---------------------------------------------------------------------------------------------
# Translator → CTranslate2


def _linear(spec: Any, weights: dict[str, Tensor], *names: str) -> None:
    """Fill a CTranslate2 LinearSpec with the projections `names` stacked along the outputs
    (one fused query/key/value matrix, say); biases only when the checkpoint has them."""
    spec.weight = torch.cat([weights[f"{n}.weight"] for n in names]).numpy()
    biases = [weights.get(f"{n}.bias") for n in names]
    if all(b is not None for b in biases):
        spec.bias = torch.cat(biases).numpy()
    elif any(b is not None for b in biases):
        raise ScrivenError(f"cannot export: only some of {', '.join(names)} have biases")


def _norm(spec: Any, weights: dict[str, Tensor], name: str) -> None:
    spec.gamma = weights[f"{name}.weight"].numpy()
    spec.beta = weights[f"{name}.bias"].numpy()


def _self_attention_and_ffn(layer: Any, weights: dict[str, Tensor], p: str, ffn_norm: str) -> None:
    """The parts an encoder and a decoder layer share: self-attention (q, k, v in one matrix)
    and the feed-forward network, each with its norm."""
    _norm(layer.self_attention.layer_norm, weights, f"{p}.norm1")
    _linear(layer.self_attention.linear[0], weights,
            f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj")
    _linear(layer.self_attention.linear[1], weights, f"{p}.self_attn.out_proj")
    _norm(layer.ffn.layer_norm, weights, f"{p}.{ffn_norm}")
    _linear(layer.ffn.linear_0, weights, f"{p}.ff.linear1")
    _linear(layer.ffn.linear_1, weights, f"{p}.ff.linear2")


def _export_ctranslate2(weights: dict[str, Tensor], config: dict[str, Any], tokenizer: Any,
                        out: Path, quantization: str) -> None:
    from .config import from_dict
    from .models.transformer import TransformerConfig, sinusoidal_positions

    specs = require("ctranslate2", "ctranslate2").specs
    cfg = from_dict(TransformerConfig, config, "model config")
    tokens = [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]
    if not cfg.src_vocab_size == cfg.tgt_vocab_size == len(tokens):
        raise ScrivenError(
            f"cannot export to ctranslate2: the vocabularies ({cfg.src_vocab_size} source, "
            f"{cfg.tgt_vocab_size} target) are not the tokenizer's {len(tokens)} tokens, and "
            f"CTranslate2 reads tokens as strings of one vocabulary per side")
    if len(set(tokens)) != len(tokens):
        raise ScrivenError("cannot export to ctranslate2: the tokenizer has duplicate token "
                           "strings, and CTranslate2 maps strings to ids")
    weights = {k: v.detach().float().cpu() for k, v in weights.items()}
    activation = {"relu": specs.Activation.RELU, "gelu": specs.Activation.GELU}[cfg.activation]
    spec = specs.TransformerSpec.from_config((cfg.encoder_layers, cfg.decoder_layers),
                                             cfg.n_heads, pre_norm=cfg.norm_first,
                                             activation=activation)
    # The positional tables go in whole: CTranslate2's own sinusoids put all sines before all
    # cosines, where scriven (like the paper) interleaves them.
    if cfg.positions == "sinusoidal":
        table = sinusoidal_positions(cfg.max_len, cfg.d_model)
        src_pos = tgt_pos = table
    else:
        src_pos, tgt_pos = weights["src_pos.weight"], weights["tgt_pos.weight"]
    src_table = weights["src_embed.weight"]
    tgt_table = weights.get("tgt_embed.weight", src_table)  # tied: stored once
    # Both sides multiply embeddings by √d_model (`scale_embeddings`, on by default).
    enc, dec = spec.encoder, spec.decoder
    enc.embeddings[0].weight = src_table.numpy()
    enc.position_encodings.encodings = src_pos.numpy()
    dec.embeddings.weight = tgt_table.numpy()
    dec.position_encodings.encodings = tgt_pos.numpy()
    for i, layer in enumerate(enc.layer):
        _self_attention_and_ffn(layer, weights, f"encoder.{i}", ffn_norm="norm2")
    for i, layer in enumerate(dec.layer):
        p = f"decoder.{i}"
        _self_attention_and_ffn(layer, weights, p, ffn_norm="norm3")
        _norm(layer.attention.layer_norm, weights, f"{p}.norm2")
        _linear(layer.attention.linear[0], weights, f"{p}.cross_attn.q_proj")
        _linear(layer.attention.linear[1], weights, f"{p}.cross_attn.k_proj",
                f"{p}.cross_attn.v_proj")
        _linear(layer.attention.linear[2], weights, f"{p}.cross_attn.out_proj")
    if cfg.norm_first:  # pre-norm: one final norm per stack
        _norm(enc.layer_norm, weights, "encoder_norm")
        _norm(dec.layer_norm, weights, "decoder_norm")
    dec.projection.weight = weights.get("output.weight", tgt_table).numpy()
    if "output.bias" in weights:
        dec.projection.bias = weights["output.bias"].numpy()
    spec.register_source_vocabulary(tokens)
    spec.register_target_vocabulary(tokens)
    spec.config.unk_token, spec.config.bos_token, spec.config.eos_token = UNK, BOS, EOS
    spec.config.decoder_start_token = BOS
    spec.config.layer_norm_epsilon = LAYER_NORM_EPS
    try:
        spec.validate()
    except ValueError as e:
        raise ScrivenError(f"cannot export to ctranslate2: {e}") from None
    spec.optimize(quantization=quantization)
    out.mkdir()
    spec.save(str(out))


# ---------------------------------------------------------------------------------------------
# Language models → ONNX
#
# The graphs are written here in plain tensor operations over the checkpoint's weights, so
# what is exported does not depend on how the training model is built (fused kernels, caches
# held in Python objects); tests check they give the model's numbers.


class LSTMExport(nn.Module):
    """An LSTM language model as a step graph: ids (B,), h (L, B, H'), c (L, B, H) → logits
    (B, V) for the next token, and the new h and c."""

    def __init__(self, weights: dict[str, Tensor], config: dict[str, Any]) -> None:
        super().__init__()
        self.config = config
        w = {k: v.detach().float().cpu() for k, v in weights.items()}
        self.num_layers = config["num_layers"]
        self.embed = nn.Parameter(w["embed.weight"], requires_grad=False)
        self.head_weight = nn.Parameter(w.get("head.weight", w["embed.weight"]),
                                        requires_grad=False)
        self.head_bias = nn.Parameter(w["head.bias"], requires_grad=False)
        # Per layer, w_ih and w_hh side by side, so a step is one matmul of [x, h] per layer
        # (ONNX Runtime spends more on each extra node than on the arithmetic at batch 1).
        self.layers = nn.ParameterList()
        self.projections = nn.ParameterList()
        for k in range(self.num_layers):
            both = torch.cat([w[f"lstm.weight_ih_l{k}"], w[f"lstm.weight_hh_l{k}"]], 1)
            self.layers.append(nn.Parameter(both.t().contiguous(), requires_grad=False))
            # (In + H', 4H)
            self.layers.append(nn.Parameter(w[f"lstm.bias_ih_l{k}"] + w[f"lstm.bias_hh_l{k}"],
                                            requires_grad=False))
            if f"lstm.weight_hr_l{k}" in w:
                self.projections.append(nn.Parameter(w[f"lstm.weight_hr_l{k}"],
                                                     requires_grad=False))
        self.hidden = w["lstm.weight_hh_l0"].size(1)  # H', the size of h (w_hh reads h)
        self.cell = w["lstm.weight_hh_l0"].size(0) // 4  # H, the size of c
        self.vocab_size = self.embed.size(0)

    def forward(self, ids: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.embed[ids]                                                  # (B, E)
        hs, cs = [], []
        for k, (h_k, c_k) in enumerate(zip(h.unbind(0), c.unbind(0))):
            w, b = self.layers[2 * k], self.layers[2 * k + 1]
            i, f, g, o = (torch.cat([x, h_k], 1) @ w + b).split(self.cell, 1)  # (B, H) each
            c_k = torch.sigmoid(f) * c_k + torch.sigmoid(i) * torch.tanh(g)
            x = torch.sigmoid(o) * torch.tanh(c_k)
            if len(self.projections):
                x = x @ self.projections[k].t()                              # (B, H')
            hs.append(x)
            cs.append(c_k)
        return x @ self.head_weight.t() + self.head_bias, torch.stack(hs), torch.stack(cs)

    def prompt_module(self) -> nn.Module | None:
        """The prompt graph: ids (B, T), h, c → logits after the last token (B, V), h, c, as
        one ONNX LSTM operator per layer. None with a projection (ONNX's LSTM has none): the
        runtime then reads a prompt a token at a time through the step graph."""
        if len(self.projections):
            return None
        return _LSTMPrompt(self)

    def example_inputs(self) -> tuple[Tensor, ...]:
        b = 2
        return (torch.zeros(b, dtype=torch.long), torch.zeros(self.num_layers, b, self.hidden),
                torch.zeros(self.num_layers, b, self.cell))

    input_names = ["ids", "h", "c"]
    output_names = ["logits", "h_out", "c_out"]
    dynamic_axes = {"ids": {0: "batch"}, "h": {1: "batch"}, "c": {1: "batch"},
                    "logits": {0: "batch"}, "h_out": {1: "batch"}, "c_out": {1: "batch"}}


class _LSTMPrompt(nn.Module):
    def __init__(self, step: LSTMExport) -> None:
        super().__init__()
        self.embed, self.head_weight, self.head_bias = step.embed, step.head_weight, step.head_bias
        n = step.num_layers
        self.lstm = nn.LSTM(self.embed.size(1), step.cell, n, batch_first=True)
        with torch.no_grad():
            for k in range(n):
                w = step.layers[2 * k].t()                                   # (4H, In + H)
                w_ih, w_hh = w.split([w.size(1) - step.hidden, step.hidden], 1)
                getattr(self.lstm, f"weight_ih_l{k}").copy_(w_ih)
                getattr(self.lstm, f"weight_hh_l{k}").copy_(w_hh)
                getattr(self.lstm, f"bias_ih_l{k}").copy_(step.layers[2 * k + 1])
                getattr(self.lstm, f"bias_hh_l{k}").zero_()

    def forward(self, ids: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        y, (h, c) = self.lstm(self.embed[ids], (h, c))                       # (B, T, H)
        return y[:, -1] @ self.head_weight.t() + self.head_bias, h, c        # (B, V)


class GPTExport(nn.Module):
    """A GPT language model as one graph for prompts and steps: ids (B, T) following P cached
    positions, keys and values (L, B, H, P, Dh) → logits after the last token (B, V) and the
    cache grown to P + T positions. A prompt is read with P = 0, a step with T = 1."""

    def __init__(self, weights: dict[str, Tensor], config: dict[str, Any]) -> None:
        super().__init__()
        from .models.transformer import sinusoidal_positions

        self.config = config
        w = {k: v.detach().float().cpu() for k, v in weights.items()}
        self.n_layers, self.n_heads = config["n_layers"], config["n_heads"]
        self.d_model = d = config["d_model"]
        self.head_dim = d // self.n_heads
        self.max_len = config["max_len"]
        self.vocab_size = w["embed.weight"].size(0)
        self.alibi = config.get("positions", "learned") == "alibi"
        if config.get("positions", "learned") == "learned":
            pos = w["pos.weight"]
        elif self.alibi:
            pos = torch.zeros(self.max_len, d)  # no position vectors: a bias in attention
        else:
            pos = sinusoidal_positions(self.max_len, d)
        self.params = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(v, requires_grad=False)
                                        for k, v in w.items()})
        self.params["pos_table"] = nn.Parameter(pos, requires_grad=False)
        if "head__weight" not in self.params:
            self.params["head__weight"] = self.params["embed__weight"]

    def _p(self, name: str) -> Tensor | None:
        key = name.replace(".", "__")
        return self.params[key] if key in self.params else None

    def _linear(self, x: Tensor, name: str) -> Tensor:
        weight, bias = self._p(f"{name}.weight"), self._p(f"{name}.bias")
        y = x @ weight.t()
        return y if bias is None else y + bias

    def _norm(self, x: Tensor, name: str) -> Tensor:
        return torch.nn.functional.layer_norm(x, (self.d_model,), self._p(f"{name}.weight"),
                                              self._p(f"{name}.bias"), LAYER_NORM_EPS)

    def forward(self, ids: Tensor, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t = ids.shape
        past = keys.size(3)
        positions = torch.arange(t) + past                                   # (T,)
        x = self._p("embed.weight")[ids] + self._p("pos_table")[positions]   # (B, T, D)
        allowed = torch.arange(t + past)[None, :] <= positions[:, None]     # (T, P+T)
        bias = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
        if self.alibi:
            distance = (positions[:, None] - torch.arange(t + past)[None, :]).float()
            bias = bias - alibi_slopes(self.n_heads)[:, None, None] * distance  # (H, T, P+T)
        new_keys, new_values = [], []
        for i in range(self.n_layers):
            p = f"blocks.{i}"
            y = self._norm(x, f"{p}.norm1")
            q = self._heads(self._linear(y, f"{p}.attn.q_proj"), b, t)      # (B, H, T, Dh)
            k = torch.cat([keys[i], self._heads(self._linear(y, f"{p}.attn.k_proj"), b, t)], 2)
            v = torch.cat([values[i], self._heads(self._linear(y, f"{p}.attn.v_proj"), b, t)], 2)
            new_keys.append(k)
            new_values.append(v)
            scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim) + bias   # (B, H, T, P+T)
            a = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, t, self.d_model)
            x = x + self._linear(a, f"{p}.attn.out_proj")
            y = torch.nn.functional.gelu(self._linear(self._norm(x, f"{p}.norm2"), f"{p}.ff.0"))
            x = x + self._linear(y, f"{p}.ff.2")
        x = self._norm(x[:, -1], "norm")                                     # (B, D)
        return self._linear(x, "head"), torch.stack(new_keys), torch.stack(new_values)

    def _heads(self, x: Tensor, b: int, t: int) -> Tensor:
        return x.reshape(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def empty_cache(self, batch: int) -> tuple[Tensor, Tensor]:
        shape = (self.n_layers, batch, self.n_heads, 0, self.head_dim)
        return torch.zeros(shape), torch.zeros(shape)

    def example_inputs(self) -> tuple[Tensor, ...]:
        shape = (self.n_layers, 2, self.n_heads, 3, self.head_dim)
        return torch.zeros(2, 2, dtype=torch.long), torch.zeros(shape), torch.zeros(shape)

    def prompt_module(self) -> None:
        return None

    input_names = ["ids", "keys", "values"]
    output_names = ["logits", "keys_out", "values_out"]
    dynamic_axes = {"ids": {0: "batch", 1: "new"}, "keys": {1: "batch", 3: "past"},
                    "values": {1: "batch", 3: "past"}, "logits": {0: "batch"},
                    "keys_out": {1: "batch", 3: "total"}, "values_out": {1: "batch", 3: "total"}}


def _onnx_save(module: nn.Module, inputs: tuple[Tensor, ...], file: Path,
               names: LSTMExport | GPTExport, dynamic_axes: dict[str, dict[int, str]]) -> None:
    """Trace `module` to ONNX with the input/output names of `names`. The TorchScript exporter
    (dynamo=False) is used: it keeps nn.LSTM as one ONNX LSTM operator per layer."""
    import warnings
    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module, inputs, str(file), input_names=names.input_names,
                          output_names=names.output_names, dynamic_axes=dynamic_axes,
                          opset_version=ONNX_OPSET, dynamo=False)


def _export_onnx(graph: LSTMExport | GPTExport, out: Path, quantization: str) -> None:
    files = [out / "step.onnx"]
    _onnx_save(graph, graph.example_inputs(), files[0], graph, graph.dynamic_axes)
    prompt = graph.prompt_module()
    if prompt is not None:
        ids, h, c = graph.example_inputs()
        axes = dict(graph.dynamic_axes, ids={0: "batch", 1: "length"})
        files.append(out / "prompt.onnx")
        _onnx_save(prompt, (torch.zeros(2, 3, dtype=torch.long), h, c), files[1], graph, axes)
    if quantization == "int8":
        import logging

        from onnxruntime.quantization import QuantType, quantize_dynamic
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # its advice to pre-process is for image models
        try:
            for file in files:
                quantized = file.with_name(file.stem + ".int8.onnx")
                quantize_dynamic(str(file), str(quantized), weight_type=QuantType.QInt8)
                quantized.replace(file)
        finally:
            root.setLevel(level)
