"""Text generation from a language-model checkpoint: the prompt is read once, then the recurrent
state (or key/value cache) is carried, so each new token costs one model step."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from . import accel, runtimes
from . import checkpoint as ckpt_io
from .config import check_positive_int
from .device import bf16_matmuls_fast, resolve_device
from .errors import ScrivenError
from .export import is_export
from .models import kinds_for
from .models.gpt import GPT
from .models.lstm import LSTMLanguageModel
from .precision import check_precision
from .sampling import repetition_penalty_filter, sample_shared, uniform, validate
from .stepper import GPTStepper, LSTMStepper
from .tokenizers import SPECIAL_TOKENS, Tokenizer, detokenize

LM_KINDS = kinds_for("lm")


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one sample, as it comes."""

    sample: int        # which of the num_samples streams
    token_id: int
    text: str          # the text it adds to the output: "" for a quote mark held until the
                       # next token shows its side (that token's text then carries it)
    probability: float # the model's probability of this token after filtering and temperature
    alternatives: tuple[tuple[str, float], ...] = ()  # the most likely tokens at this step


@dataclass
class LoadedLM:
    """A language model ready to generate: load once, generate many times (the server does).
    `precision` (fp32, bf16, int8; see `scriven.precision`) is how the weights are held for
    generation, and `stepper` steps the model (laid out once)."""

    model: nn.Module
    tokenizer: Tokenizer
    device: torch.device
    path: Path | None = None
    precision: str = "fp32"
    stepper: LSTMStepper | GPTStepper | runtimes.OnnxStepper | None = None

    @classmethod
    def load(cls, checkpoint: str | Path, device: str = "auto", precision: str = "fp32") -> LoadedLM:
        check_precision(precision)
        if is_export(checkpoint):  # an exported model runs on ONNX Runtime, as exported
            if precision != "fp32":
                raise ScrivenError("an export keeps the precision it was exported in; "
                                   "export again with --quantization int8 instead")
            stepper, tok = runtimes.load_lm(checkpoint)
            return cls(None, tok, torch.device("cpu"), Path(checkpoint), precision, stepper)  # type: ignore[arg-type]
        dev = resolve_device(device)
        model, tok, ckpt = ckpt_io.load_model(checkpoint, dev, kinds=LM_KINDS)
        accel.apply(model, dev, "infer")
        if isinstance(model, LSTMLanguageModel):
            return cls(model, tok, dev, ckpt.path, precision, LSTMStepper(model, precision))
        if precision == "int8":
            raise ScrivenError("precision int8 is for LSTM generators; use bf16 or fp32 with a GPT")
        if precision == "bf16":
            # bf16 numbers; multiplied in bf16 only where that is fast (else emulated, slower)
            model = model.to(torch.bfloat16)
            if dev.type == "cpu" and not bf16_matmuls_fast():
                model = model.float()
        stepper = GPTStepper(model, ckpt_io.trained_context(ckpt.config))
        return cls(model, tok, dev, ckpt.path, precision, stepper)

    @property
    def context(self) -> int | None:
        """The most tokens a GPT reads at once, its trained window
        (`checkpoint.trained_context`); None for an LSTM, whose state carries all of its past."""
        return getattr(self.stepper, "context", None)

    @property
    def decoder(self) -> LSTMStepper | GPTStepper | runtimes.OnnxStepper:
        """What `sample_ids` steps."""
        assert self.stepper is not None
        return self.stepper


def _loaded(checkpoint: str | Path | LoadedLM, device: str, precision: str | None) -> LoadedLM:
    """The model to generate with; `precision` None means fp32, or a loaded model's own."""
    if not isinstance(checkpoint, LoadedLM):
        return LoadedLM.load(checkpoint, device, precision or "fp32")
    if precision is not None and precision != checkpoint.precision:
        raise ScrivenError(f"precision {precision!r} asked of a model loaded in "
                           f"{checkpoint.precision!r}; load it with LoadedLM.load(..., "
                           f"precision={precision!r})")
    return checkpoint


def _check_lengths(max_new_tokens: int, num_samples: int) -> None:
    check_positive_int(max_new_tokens, "max_new_tokens", allow_zero=True)
    check_positive_int(num_samples, "num_samples")


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Prompt ids; unknown words become <unk> with a warning that names them."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ScrivenError("prompt is empty: give at least one word to continue")
    ids, unknown = tokenizer.encode_with_unknowns(prompt)
    if not ids:
        raise ScrivenError("prompt has no tokens the model can read")
    if unknown:
        shown = ", ".join(repr(w) for w in unknown[:5]) + (" …" if len(unknown) > 5 else "")
        warnings.warn(f"prompt words not in the vocabulary, read as <unk>: {shown}", stacklevel=3)
    return ids


def prompt_text(tokenizer: Tokenizer, prompt: str, prompt_ids: list[int]) -> str:
    """The prompt as it reads in the output: the user's words (unknown ones too), detokenized
    the way generated text is."""
    if tokenizer.kind == "word":
        return detokenize(tokenizer.tokenize(prompt), sentence_case=tokenizer.lowercase)
    return tokenizer.decode(prompt_ids)


@torch.inference_mode()
def sample_ids(model: nn.Module | LSTMStepper | GPTStepper | runtimes.OnnxStepper,
               prompt_ids: Tensor, max_new_tokens: int,
               temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
               repetition_penalty: float = 1.0, generator: torch.Generator | None = None,
               alternatives: int = 0, context: int | None = None,
               ) -> Iterator[tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]]:
    """Yield (next ids (B,), their probabilities (B,), top alternatives or None) one step at a
    time; alternatives are (probabilities (B, A), ids (B, A)) of the `alternatives` most likely
    tokens. The prompt (B, T) is read once; after that each step feeds only the newest token and
    the carried state (see `scriven.stepper`). A model is stepped in fp32 through its stepper;
    a GPT reads at most `context` tokens at once (default: its max_len)."""
    if isinstance(model, LSTMLanguageModel):
        model = LSTMStepper(model)
    elif isinstance(model, GPT):
        model = GPTStepper(model, context)
    steps = _steps(model, prompt_ids)
    history = prompt_ids
    last = next(steps)                                                    # (B, V)
    for step in range(max_new_tokens):
        if repetition_penalty != 1.0:
            last = repetition_penalty_filter(last, history, repetition_penalty)
        u = uniform(last.size(0), generator, last.device) if temperature else None
        ids, probs, top = sample_shared(last, temperature, top_k, top_p, u, alternatives)
        yield ids, probs, top if alternatives else None
        if repetition_penalty != 1.0:
            history = torch.cat([history, ids[:, None]], dim=1)
        if step + 1 < max_new_tokens:
            last = steps.send(ids)


def _steps(stepper: LSTMStepper | GPTStepper | runtimes.OnnxStepper,
           prompt_ids: Tensor) -> Iterator[Tensor]:
    """Next-token logits (B, V) for the prompt, then for each id (B,) sent: only the newest
    token is fed, with the state that holds the past."""
    last, state = stepper.read(prompt_ids)                                # (B, V)
    while True:
        ids = yield last
        last, state = stepper.step(ids, state)


def generate_stream(checkpoint: str | Path | LoadedLM, prompt: str, max_new_tokens: int = 200,
                    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                    repetition_penalty: float = 1.0, stop: list[str] | None = None,
                    seed: int | None = None, num_samples: int = 1, device: str = "auto",
                    alternatives: int = 0, precision: str | None = None) -> Iterator[TokenEvent]:
    """Generate and yield each token as it comes (see `generate` for the parameters);
    `alternatives` > 0 adds that many most likely tokens and their probabilities to each event."""
    lm = _loaded(checkpoint, device, precision)
    _check_lengths(max_new_tokens, num_samples)
    validate(temperature, top_k, top_p, repetition_penalty, lm.tokenizer.vocab_size)
    check_positive_int(alternatives, "alternatives", allow_zero=True)
    prompt_ids = encode_prompt(lm.tokenizer, prompt)
    yield from _events(lm, prompt_ids, max_new_tokens, temperature, top_k, top_p,
                       repetition_penalty, stop, seed, num_samples, min(alternatives, lm.tokenizer.vocab_size))


def _events(lm: LoadedLM, prompt_ids: list[int], max_new_tokens: int, temperature: float,
            top_k: int | None, top_p: float | None, repetition_penalty: float,
            stop: list[str] | None, seed: int | None, num_samples: int,
            alternatives: int = 0) -> Iterator[TokenEvent]:
    tok = lm.tokenizer
    stops = [s for s in (stop or []) if s]
    generator = torch.Generator(device=lm.device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    batch = torch.tensor([prompt_ids] * num_samples, dtype=torch.long, device=lm.device)
    texts = [tok.decode(prompt_ids) for _ in range(num_samples)]
    generated: list[list[int]] = [[] for _ in range(num_samples)]
    done = [False] * num_samples
    held = [0] * num_samples
    for step, (ids, probs, top) in enumerate(sample_ids(
            lm.decoder, batch, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
            generator, alternatives)):
        for s, (token_id, prob) in enumerate(zip(ids.tolist(), probs.tolist())):
            if done[s]:
                continue
            generated[s].append(token_id)
            piece, held[s] = next_piece(tok, prompt_ids, generated[s], texts[s], held[s],
                                        last=step == max_new_tokens - 1)
            texts[s] += piece
            cut = stop_at(texts[s], piece, stops)
            if cut is not None:
                piece = piece[: len(piece) - (len(texts[s]) - cut)]
                done[s] = True
            alts = () if top is None else tuple(
                (tok.id_to_token(i), p) for p, i in zip(top[0][s].tolist(), top[1][s].tolist()))
            yield TokenEvent(s, token_id, piece, prob, alts)
        if all(done):
            return


def next_piece(tok: Tokenizer, prompt_ids: list[int], generated: list[int], so_far: str,
               held: int, last: bool) -> tuple[str, int]:
    """The text to show now that generated[-1] has come, and how many tokens stay held back.

    A token whose spacing depends on the one after it (a word tokenizer's quote mark: `prince
    . " "` may go on `why` or end there) is held until that token comes, so text once shown
    never has to change; `last` (no token will follow) releases everything."""
    context = (prompt_ids[-1:] + generated)[-2:]
    if not last and held < _MAX_HELD and tok.spacing_waits(context):
        return "", held + 1
    return _new_text(tok, prompt_ids, generated, so_far, held + 1), 0


_MAX_HELD = 8  # a run of quote marks is shown after this many, whatever follows


def _new_text(tok: Tokenizer, prompt_ids: list[int], generated: list[int], so_far: str,
              count: int = 1, window: int = 24) -> str:
    """The text the last `count` tokens add. Decoding a short tail keeps this constant-time;
    the tail's text before and after those tokens differ only in what they added.

    The prompt's <unk> ids stay in the tail as "<unk>": they stand for words the user wrote,
    so what follows them is spaced and cased as after a word (dropped, a continuation of an
    unknown last word was glued to it and capitalised as if it started the text). Generated
    special tokens add no text and are left out."""
    context = prompt_ids + _readable(generated[:-count])
    new = _readable(generated[-count:])
    if not new:
        return ""
    tail = (context + new)[-(window + len(new) - 1):]
    before = tok.decode(tail[:-len(new)], skip_special=False)
    after = tok.decode(tail, skip_special=False)
    if after.startswith(before):
        return after[len(before):]
    piece = tok.decode(new)
    return piece if not so_far or not piece or piece[0] in " ,.;:!?)'" else " " + piece


def _readable(ids: list[int]) -> list[int]:
    """`ids` without special tokens (their ids come first in every vocabulary)."""
    return [i for i in ids if i >= len(SPECIAL_TOKENS)]


def stop_at(text: str, piece: str, stops: Sequence[str]) -> int | None:
    """Where `text` must end if a stop string has just appeared in it, `piece` being the text
    just added (the stop string is cut); None if none has."""
    for s in stops:
        at = text.find(s, max(0, len(text) - len(piece) - len(s)))
        if at != -1:
            return at
    return None


def generate(checkpoint: str | Path | LoadedLM, prompt: str, max_new_tokens: int = 200,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float = 1.0, stop: list[str] | None = None,
             seed: int | None = None, num_samples: int = 1, device: str = "auto",
             precision: str | None = None) -> list[str]:
    """Continue `prompt` with a trained text generator; returns `num_samples` texts, each the
    prompt followed by what was generated.

    temperature: 0 is greedy; top_k / top_p: keep only the k most likely tokens / the smallest
    set with probability mass p; repetition_penalty > 1 discourages tokens already present;
    stop: strings that end a sample (not included); seed: makes sampling reproducible;
    precision: fp32 (the default: the model's own numbers), bf16 or int8 (faster; see
    `scriven.precision`); a `LoadedLM` keeps the precision it was loaded in."""
    lm = _loaded(checkpoint, device, precision)
    _check_lengths(max_new_tokens, num_samples)
    validate(temperature, top_k, top_p, repetition_penalty, lm.tokenizer.vocab_size)
    prompt_ids = encode_prompt(lm.tokenizer, prompt)
    texts = [prompt_text(lm.tokenizer, prompt, prompt_ids)] * num_samples
    for event in _events(lm, prompt_ids, max_new_tokens, temperature, top_k, top_p,
                         repetition_penalty, stop, seed, num_samples):
        texts[event.sample] += event.text
    return texts
