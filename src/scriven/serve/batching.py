"""Model work for the server, off the event loop, batched and fair.

Each served model has one worker thread. Requests wait in a first-in first-out queue and are
admitted in arrival order, up to `max_batch` rows at a time.

Generation: continuous batching. Every sample of every active request is one row of the
batch, and each step samples every row and advances it by one token. A finished request leaves
at once and a waiting one joins at the next step. Each row samples with its own temperature,
top-k, top-p and random generator, so a seeded request gives the same text whatever else is
running (up to float rounding in batches of different sizes). The rows' states are kept in
groups that one model call steps together (`stepper.join`): an LSTM's recurrent state is the
same size whatever a request's prompt or progress, so all its rows form one group; a GPT's
key/value caches differ in length, so rows join only rows whose caches hold as many positions
(the samples of a request, requests admitted together with prompts of one length), and each
group is one model call per step.

Translation: micro-batching. The requests that arrived while a batch was decoding form the next
batch; sentences with the same search settings decode together, greedy ones in one batched
KV-cache loop that streams each token as it comes (`search.greedy_search`), beam ones with
`search.beam_search`; each search checks at every step whether a request has been cancelled or
has timed out, and drops its sentences. A request with "attention": true whose maps could hold
more than `MAX_ATTENTION_FLOATS` numbers is answered 413 before any decoding, with a detail
that says so.

An exported translator decodes through `CT2Translator.search_ids`, the path `translate` takes
for it: CTranslate2 runs a batch to its end with no step hook, so its sentences stream as each
batch finishes (no token events) and a cancelled request is dropped between batches. It has no
attention weights: "attention": true answers `{"available": false, "reason": ...}` for each
sentence instead of maps. An exported model steps through its `OnnxStepper` in the same
continuous batch as a checkpoint's stepper.

The event loop and a worker talk through a `Ticket`: the worker sends events, collected per
step and handed to the loop in one call; the loop sets `cancelled` when the client leaves, and
the worker drops the request at its next step (so does the deadline).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..generation import LoadedLM, next_piece, stop_at
from ..pairs import pad_sequences
from ..runtimes import CT2Translator
from ..sampling import penalize_rows, sample_rows
from ..search import GreedyStep, beam_search, greedy_search, output_limit
from ..tokenizers import BOS_ID, EOS_ID, PAD_ID
from ..translator import (
    CrossAttention,
    LoadedTranslator,
    read_attention,
    translation_text,
)

log = logging.getLogger("scriven.serve")

Event = tuple[str, dict[str, Any]]  # ("start" | "token" | "translation" | "done" | "error", data)


class QueueFull(Exception):
    """The worker's queue is at its limit: the server answers 429 with Retry-After (the
    server is well; the client should come back shortly)."""


class Ticket:
    """One request's link between the event loop, which awaits its events, and a worker
    thread, which produces them. Create it on the loop's thread."""

    def __init__(self, stream: bool, timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.stream = stream  # False: the worker sends only the final "done" or "error"
        self.deadline = time.monotonic() + timeout
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def stopped(self) -> str | None:
        """Why the work must stop now, or None."""
        if self.cancelled:
            return "cancelled"
        if time.monotonic() > self.deadline:
            return "timeout"
        return None

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


class _Outbox:
    """Events of one worker step, delivered to each event loop in a single thread-safe call
    (one wake-up per step, not one per token)."""

    def __init__(self) -> None:
        self.items: list[tuple[Ticket, str, dict[str, Any]]] = []

    def put(self, ticket: Ticket, kind: str, data: dict[str, Any]) -> None:
        self.items.append((ticket, kind, data))

    def flush(self) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Ticket, str, dict[str, Any]]]] = \
            defaultdict(list)
        for item in self.items:
            by_loop[item[0].loop].append(item)
        self.items = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop has closed: the server is shutting down
                pass


def _deliver(items: list[tuple[Ticket, str, dict[str, Any]]]) -> None:
    for ticket, kind, data in items:
        ticket.queue.put_nowait((kind, data))


def _stop_error(reason: str, timeout: float | None = None) -> dict[str, Any]:
    if reason == "timeout":
        return {"status": 504, "detail": "the request took longer than the server's "
                                          f"request timeout{f' ({timeout:g} s)' if timeout else ''}"}
    return {"status": 499, "detail": "the client closed the connection"}


class _Worker:
    """A thread that takes jobs from a FIFO queue and runs `_step` until closed."""

    def __init__(self, name: str, max_queue: int) -> None:
        self.max_queue = max_queue
        self._pending: deque[Any] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.outbox = _Outbox()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Any) -> None:
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting; try again shortly")
            self._pending.append(job)
            self._cond.notify()

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return len(self._pending)

    def _take(self, idle: bool, room: int, size) -> list[Any]:
        """Jobs from the head of the queue while they fit in `room` (at least one when idle);
        waits for one when `idle`. Empty when closed."""
        with self._cond:
            while idle and not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return []
            taken = []
            while self._pending and (size(self._pending[0]) <= room or (idle and not taken)):
                job = self._pending.popleft()
                room -= size(job)
                taken.append(job)
            return taken

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._closed:
                try:
                    self._step()
                except Exception:  # a bug must not kill the thread: fail what was running
                    log.exception("serving worker step failed")
                    self._fail_all({"status": 500, "detail": "internal error while decoding"})
                self.outbox.flush()
        self._fail_all({"status": 503, "detail": "the server is shutting down"})
        with self._cond:
            for job in self._pending:
                self.outbox.put(job.ticket, "error", {"status": 503,
                                                      "detail": "the server is shutting down"})
            self._pending.clear()
        self.outbox.flush()

    def _step(self) -> None:
        raise NotImplementedError

    def _fail_all(self, error: dict[str, Any]) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Generation


@dataclass
class GenerationJob:
    """One generation request, validated: prompt ids and sampling settings."""

    ticket: Ticket
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None
    num_samples: int = 1
    alternatives: int = 0
    # Filled in by the worker:
    generator: torch.Generator | None = None
    samples: list[_Row] = field(default_factory=list)
    started: float = 0.0


@dataclass
class _Row:
    job: GenerationJob
    sample: int
    text: str = ""    # decoded prompt + generated text: where stop strings are looked for
    output: str = ""  # the generated text, as `generate` appends it to the prompt
    generated: list[int] = field(default_factory=list)
    held: int = 0     # tokens whose text waits for the next one (see `next_piece`)
    tokens: list[dict[str, Any]] = field(default_factory=list)
    finish: str | None = None  # "length" | "stop" once done


class GenerationWorker(_Worker):
    """Continuous batching for one language model (see the module docstring)."""

    def __init__(self, lm: LoadedLM, max_batch: int = 64, max_queue: int = 1024,
                 name: str = "lm") -> None:
        self.lm = lm
        self.stepper = lm.decoder
        self.max_batch = max_batch
        self.rows: list[_Row] = []
        # The rows' states, in row order: (state, how many rows it holds) per group.
        self.groups: list[tuple[Any, int]] = []
        self.last: Tensor | None = None                  # (R, V) logits for each row's next token
        self.steps = 0      # model steps taken
        self.peak_rows = 0  # the most rows ever decoded in one step
        super().__init__(f"scriven-generate-{name}", max_queue)

    @property
    def active(self) -> int:
        return len({id(row.job) for row in self.rows})

    def stats(self) -> dict[str, int]:
        return {"steps": self.steps, "peak_rows": self.peak_rows}

    def _step(self) -> None:
        self._admit(self._take(not self.rows, self.max_batch - len(self.rows),
                               lambda job: job.num_samples))
        self._drop_stopped()
        if not self.rows:
            return
        self._advance()

    def _admit(self, jobs: list[GenerationJob]) -> None:
        """Read the prompts (equal lengths together in one call) and add one row per sample."""
        by_length: dict[int, list[GenerationJob]] = defaultdict(list)
        for job in jobs:
            reason = job.ticket.stopped()
            if reason:
                self.outbox.put(job.ticket, "error", _stop_error(reason))
                continue
            job.started = time.monotonic()
            job.generator = torch.Generator(device=self.lm.device)
            job.generator.manual_seed(job.seed if job.seed is not None else secrets.randbits(63))
            if job.max_new_tokens == 0:
                job.samples = [_Row(job, s, finish="length") for s in range(job.num_samples)]
                self._finish(job)
                continue
            by_length[len(job.prompt_ids)].append(job)
        for group in by_length.values():
            prompts = torch.tensor([job.prompt_ids for job in group], device=self.lm.device)
            last, state = self.stepper.read(prompts)                        # (G, V)
            repeat = torch.tensor([job.num_samples for job in group], device=self.lm.device)
            rows = torch.arange(len(group), device=self.lm.device).repeat_interleave(repeat)
            last, state = last.index_select(0, rows), self.stepper.select(state, rows)  # (R', V)
            for job in group:
                prompt = self.lm.tokenizer.decode(job.prompt_ids)
                job.samples = [_Row(job, s, text=prompt) for s in range(job.num_samples)]
                self.rows.extend(job.samples)
            self._add_group(state, len(rows))
            self.last = last if self.last is None else torch.cat([self.last, last], 0)

    def _add_group(self, state: Any, count: int) -> None:
        """Rows that follow the last group's join it where the stepper can stack them."""
        joined = self.stepper.join(self.groups[-1][0], state) if self.groups else None
        if joined is None:
            self.groups.append((state, count))
        else:
            self.groups[-1] = (joined, self.groups[-1][1] + count)

    def _select(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.groups, self.last = [], None
            return
        assert self.last is not None
        device = self.lm.device
        self.last = self.last.index_select(0, torch.tensor(keep, device=device))
        groups, self.groups, start, k = self.groups, [], 0, 0
        for state, count in groups:
            mine = []  # this group's kept rows, counted from its first
            while k < len(keep) and keep[k] < start + count:
                mine.append(keep[k] - start)
                k += 1
            if len(mine) == count:
                self.groups.append((state, count))
            elif mine:
                self.groups.append((self.stepper.select(state, torch.tensor(mine, device=device)),
                                    len(mine)))
            start += count

    def _drop_stopped(self) -> None:
        """Rows of cancelled or timed-out requests leave the batch."""
        stopped: dict[int, str] = {}
        for row in self.rows:
            if id(row.job) not in stopped:
                reason = row.job.ticket.stopped()
                if reason:
                    stopped[id(row.job)] = reason
                    self.outbox.put(row.job.ticket, "error", _stop_error(reason))
        if stopped:
            self._select([i for i, row in enumerate(self.rows) if id(row.job) not in stopped])

    def _advance(self) -> None:
        """Sample one token for every row, send it, drop finished rows, feed the rest."""
        assert self.groups and self.last is not None
        rows, logits = self.rows, self.last
        device, v = logits.device, logits.size(-1)
        self.peak_rows = max(self.peak_rows, len(rows))
        jobs = list({id(row.job): row.job for row in rows}.values())
        if any(row.job.repetition_penalty != 1.0 for row in rows):
            logits = penalize_rows(logits, [row.job.prompt_ids + row.generated for row in rows],
                                   [row.job.repetition_penalty for row in rows])
        temperature = torch.tensor([row.job.temperature for row in rows], device=device)
        top_k = torch.tensor([row.job.top_k or v for row in rows], device=device)
        top_p = torch.tensor([row.job.top_p or 1.0 for row in rows], device=device)
        # Each request draws from its own generator, its samples in order: reproducible.
        counts = Counter(id(row.job) for row in rows)
        draws = {id(job): iter(torch.rand(counts[id(job)], generator=job.generator,
                                          device=device).tolist()) for job in jobs}
        uniform = torch.tensor([next(draws[id(row.job)]) for row in rows], device=device)
        wanted = max(row.job.alternatives for row in rows)
        ids, probs, (alt_p, alt_i) = sample_rows(logits, temperature, top_k, top_p, uniform,
                                                 wanted)
        self._emit(ids.tolist(), probs.tolist(), alt_p.tolist(), alt_i.tolist())
        self.steps += 1
        keep = [i for i, row in enumerate(rows) if row.finish is None]
        for job in jobs:
            if all(row.finish is not None for row in job.samples):
                self._finish(job)
        self.outbox.flush()  # tokens out before the next model call
        self._select(keep)
        if self.rows:
            feed = ids.index_select(0, torch.tensor(keep, device=device))   # (R,)
            logits, start = [], 0
            for g, (state, count) in enumerate(self.groups):
                last, state = self.stepper.step(feed[start:start + count], state)
                logits.append(last)                                         # (count, V)
                self.groups[g] = (state, count)
                start += count
            self.last = logits[0] if len(logits) == 1 else torch.cat(logits)  # (R, V)

    def _emit(self, ids: list[int], probs: list[float], alt_p: list[list[float]],
              alt_i: list[list[int]]) -> None:
        tok = self.lm.tokenizer
        for i, row in enumerate(self.rows):
            job = row.job
            row.generated.append(ids[i])
            piece, row.held = next_piece(tok, job.prompt_ids, row.generated, row.text, row.held,
                                         last=len(row.generated) >= job.max_new_tokens)
            row.text += piece
            cut = stop_at(row.text, piece, job.stop)
            if cut is not None:
                piece = piece[: len(piece) - (len(row.text) - cut)]
                row.finish = "stop"
            elif len(row.generated) >= job.max_new_tokens:
                row.finish = "length"
            row.output += piece
            token = {"sample": row.sample, "id": ids[i], "token": tok.id_to_token(ids[i]),
                     "text": piece,
                     "probability": probs[i],
                     "alternatives": [[tok.id_to_token(t), p] for t, p in
                                      zip(alt_i[i][:job.alternatives], alt_p[i][:job.alternatives])]}
            if job.ticket.stream:
                self.outbox.put(job.ticket, "token", token)
            else:
                row.tokens.append(token)

    def _finish(self, job: GenerationJob) -> None:
        samples = [{"sample": row.sample, "generated": row.output, "finish_reason": row.finish,
                    "generated_tokens": len(row.generated),
                    **({} if job.ticket.stream else {"tokens": row.tokens})}
                   for row in job.samples]
        self.outbox.put(job.ticket, "done", {
            "samples": samples, "seconds": round(time.monotonic() - job.started, 4)})

    def _fail_all(self, error: dict[str, Any]) -> None:
        for job in {id(row.job): row.job for row in self.rows}.values():
            self.outbox.put(job.ticket, "error", error)
        self.rows, self.groups, self.last = [], [], None


# ---------------------------------------------------------------------------------------------
# Translation


@dataclass
class TranslationJob:
    """One translation request, validated: source ids per sentence and search settings."""

    ticket: Ticket
    sources: list[list[int]]
    texts: list[str]
    beam: int = 1
    n_best: int = 1
    length_penalty: float = 1.0
    max_len: int | None = None
    attention: bool = False
    results: list[dict[str, Any] | None] = field(default_factory=list)
    started: float = 0.0


@dataclass
class _Sentence:
    job: TranslationJob
    index: int

    @property
    def src(self) -> list[int]:
        return self.job.sources[self.index]


EXPORT_HAS_NO_ATTENTION = (
    "this translator is a CTranslate2 export, which does not give attention weights; "
    "serve its checkpoint to see them")

# Cross-attention numbers one request may ask for (about 10 bytes each in JSON): enough for
# dozens of long sentences, not for a whole document's maps in one answer.
MAX_ATTENTION_FLOATS = 2_000_000


class TranslationWorker(_Worker):
    """Micro-batching for one translator (see the module docstring)."""

    def __init__(self, translator: LoadedTranslator | CT2Translator, max_batch: int = 64,
                 max_queue: int = 1024, name: str = "translator",
                 max_attention_floats: int = MAX_ATTENTION_FLOATS) -> None:
        self.tr = translator
        self.exported = isinstance(translator, CT2Translator)
        self.max_attention_floats = max_attention_floats
        self.max_batch = max_batch
        self.running: list[TranslationJob] = []
        self.batches = 0     # decoding batches run
        self.peak_batch = 0  # the most sentences ever decoded together
        super().__init__(f"scriven-translate-{name}", max_queue)

    @property
    def active(self) -> int:
        return len(self.running)

    def stats(self) -> dict[str, int]:
        return {"batches": self.batches, "peak_batch": self.peak_batch}

    def _limit(self, sentence: _Sentence) -> int:
        return sentence.job.max_len or output_limit(self.tr.max_len, len(sentence.src))

    def _group(self, sentence: _Sentence) -> tuple:
        """Sentences with equal keys decode together. Beam search needs one length limit per
        batch (greedy rows each keep their own), so every sentence gets what `translate`
        gives it; an export's search takes one `max_len` (or none) per call, as `translate`
        passes it."""
        job = sentence.job
        if self.exported:
            return ("export", job.beam, job.n_best, job.length_penalty, job.max_len)
        if job.beam == 1:
            return (1,)
        return (job.beam, job.n_best, job.length_penalty, self._limit(sentence))

    def _step(self) -> None:
        jobs = self._take(True, 4 * self.max_batch, lambda job: len(job.sources))
        for job in jobs:
            reason = job.ticket.stopped()
            if reason:
                self.outbox.put(job.ticket, "error", _stop_error(reason))
                continue
            if (job.attention and not self.exported
                    and self._attention_floats(job) > self.max_attention_floats):
                self.outbox.put(job.ticket, "error", {"status": 413, "detail": (
                    f"the attention maps asked for could hold up to "
                    f"{self._attention_floats(job):,} numbers, over this server's limit of "
                    f"{self.max_attention_floats:,} per request: send fewer or shorter "
                    "sentences with \"attention\": true, or a lower max_len")})
                continue
            job.started = time.monotonic()
            job.results = [None] * len(job.sources)
            self.running.append(job)
        groups: dict[tuple, list[_Sentence]] = defaultdict(list)
        for job in self.running:
            for i in range(len(job.sources)):
                s = _Sentence(job, i)
                groups[self._group(s)].append(s)
        for key, sentences in groups.items():
            sentences.sort(key=lambda s: len(s.src))
            for start in range(0, len(sentences), self.max_batch):
                chunk = [s for s in sentences[start:start + self.max_batch]
                         if not s.job.ticket.stopped()]
                if not chunk:
                    continue
                self.peak_batch = max(self.peak_batch, len(chunk))
                if key[0] == "export":
                    self._exported(chunk, *key[1:])
                elif key[0] == 1:
                    self._greedy(chunk)
                else:
                    self._beam(chunk, *key)
                self.batches += 1
                self.outbox.flush()
        for job in self.running:
            reason = job.ticket.stopped()
            if reason and any(r is None for r in job.results):
                self.outbox.put(job.ticket, "error", _stop_error(reason))
        self.running = []

    def _greedy(self, chunk: list[_Sentence]) -> None:
        """`search.greedy_search` with each sentence's own length limit, each new token
        streamed as it comes, and the sentences of stopped requests dropped at the next step."""
        tok = self.tr.tokenizer
        src = pad_sequences([s.src for s in chunk], PAD_ID).to(self.tr.device)  # (B, S)

        def on_step(state: GreedyStep) -> set[int]:
            for row, token in zip(state.sentences, state.tokens):
                sentence = chunk[row]
                if token != EOS_ID and sentence.job.ticket.stream:
                    self.outbox.put(sentence.job.ticket, "token", {
                        "index": sentence.index, "id": token, "token": tok.id_to_token(token),
                        "text": translation_text(tok, state.outputs[row])})
            stopped = {row for row in state.sentences if chunk[row].job.ticket.stopped()}
            for row in set(state.finished) - stopped:
                self._done(chunk[row], [(state.outputs[row], None)])
            self.outbox.flush()
            return stopped

        greedy_search(self.tr.model, src, BOS_ID, EOS_ID, [self._limit(s) for s in chunk],
                      on_step=on_step)

    def _beam(self, chunk: list[_Sentence], beam: int, n_best: int, length_penalty: float,
              limit: int) -> None:
        """`search.beam_search`; a request that times out or whose client leaves stops its
        sentences at the next step."""
        src = pad_sequences([s.src for s in chunk], PAD_ID).to(self.tr.device)  # (B, S)
        found = beam_search(self.tr.model, src, beam, BOS_ID, EOS_ID, limit, length_penalty,
                            n_best, on_step=lambda state: {
                                row for row in state.sentences
                                if chunk[row].job.ticket.stopped()})
        for sentence, hyps in zip(chunk, found):
            if hyps and not sentence.job.ticket.stopped():
                self._done(sentence, hyps)

    def _exported(self, chunk: list[_Sentence], beam: int, n_best: int, length_penalty: float,
                  max_len: int | None) -> None:
        """The export's own search (`CT2Translator.search_ids`), as `translate` runs it."""
        found = self.tr.search_ids([s.src for s in chunk], beam, n_best, length_penalty, max_len,
                                   batch_size=len(chunk))
        for sentence, hyps in zip(chunk, found):
            if not sentence.job.ticket.stopped():
                self._done(sentence, hyps)

    def _done(self, sentence: _Sentence, hyps: list[tuple[list[int], float | None]]) -> None:
        job, tok = sentence.job, self.tr.tokenizer
        ids = hyps[0][0]
        result: dict[str, Any] = {"index": sentence.index, "source": job.texts[sentence.index],
                                  "text": translation_text(tok, ids),
                                  "tokens": [tok.id_to_token(i) for i in ids]}
        if hyps[0][1] is not None:
            result["score"] = hyps[0][1]
        if job.n_best > 1:
            result["hypotheses"] = [{"text": translation_text(tok, h), "score": score}
                                    for h, score in hyps]
        if job.attention:
            result["attention"] = self._attention(sentence.src, ids)
        job.results[sentence.index] = result
        if job.ticket.stream:
            self.outbox.put(job.ticket, "translation", result)
        if all(r is not None for r in job.results):
            self.outbox.put(job.ticket, "done", {
                "translations": [] if job.ticket.stream else job.results,
                "seconds": round(time.monotonic() - job.started, 4)})

    def _attention(self, src: list[int], ids: list[int]) -> dict[str, Any]:
        """Cross-attention of the model reading its own output, as `translator.attention`
        gives it, rounded to 4 decimals (the JSON stays about half as long). `available`
        says whether there are maps: an export has none, and an empty list would read as a
        model that attended to nothing."""
        if self.exported:
            return {"available": False, "reason": EXPORT_HAS_NO_ATTENTION}
        found = CrossAttention.of(read_attention(self.tr, src, ids))
        found.cross = (found.cross * 1e4).round() / 1e4
        return {"available": True, **found.to_dict()}

    def _attention_floats(self, job: TranslationJob) -> int:
        """The most numbers the job's cross-attention maps can hold: layers × heads × source
        length × (output length limit + <eos>), per sentence."""
        config = self.tr.model.config
        return sum(config.decoder_layers * config.n_heads * len(src)
                   * (min(self._limit(_Sentence(job, i)), self.tr.max_len - 1) + 1)
                   for i, src in enumerate(job.sources))

    def _fail_all(self, error: dict[str, Any]) -> None:
        for job in self.running:
            if any(r is None for r in job.results):
                self.outbox.put(job.ticket, "error", error)
        self.running = []
