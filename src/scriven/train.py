"""The shared trainer: one loop for every model, driven by a `Task` that owns the data and loss.

The loop knows optimisers, schedules, mixed precision, evaluation, early stopping, checkpoints and
exact resume; a task knows how to cut its data into batches, compute a loss and score a model.
Nothing here is global, and every write happens on rank 0 only, so `torchrun` runs it unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from . import accel
from . import checkpoint as ckpt_io
from .config import check, check_float, check_positive_int, to_dict
from .device import AMP_MODES, Distributed, autocast_dtype, resolve_device, training_precision
from .errors import ScrivenError
from .optimizers import OPTIMIZERS, Optimizers, load_optimizer, make_optimizer, optimizer_tensors

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None  # type: ignore[assignment]

# How the learning rate falls after warmup (`lr_at`).
SCHEDULES = ("cosine", "linear", "inverse_sqrt", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """The settings every task's training shares. Each task extends it with how it cuts batches
    (`scriven.lm.LMTrainConfig`, `scriven.translation.TranslateTrainConfig`), so a setting the
    task does not read is an unknown key, not silently ignored. Extended, not wrapped: the
    checkpoint's `train` stays one flat object, as older checkpoints wrote it."""

    # Settings counted per process, which a resume compares as totals over all processes.
    per_process: ClassVar[tuple[str, ...]] = ()

    epochs: int | None = None        # stop after this many passes over the training data
    minutes: float | None = None     # or after this much wall-clock time
    max_steps: int | None = None     # or after this many optimiser steps
    lr: float = 3e-3
    min_lr_ratio: float = 0.05       # the schedule decays to lr * min_lr_ratio
    schedule: str = "cosine"         # cosine | linear | inverse_sqrt | constant (after warmup)
    warmup_steps: int | None = None  # an explicit warmup; None: warmup_fraction of the plan
    warmup_fraction: float = 0.05    # of the planned steps (nanoGPT: 100 of 2,000; Vaswani et
                                     # al.: 4,000 of 100,000)
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    grad_clip: float = 1.0           # max global gradient norm; 0 = off
    label_smoothing: float = 0.0
    eval_every: int | None = None    # steps between validations (and checkpoints); None:
    evals_per_run: int = 10          # this many validations spread over the planned steps
    patience: int = 0                # validations without improvement before stopping; 0 = off
    amp: str = "auto"                # auto | bf16 | bf16-pure | fp16 | off
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    compile: bool = False            # torch.compile the model
    optimizer: str = "adamw"         # adamw | muon (Muon for hidden matrices, AdamW for the rest)
    seed: int = 0
    log_every: int = 20

    def __post_init__(self) -> None:
        for name in ("epochs", "max_steps"):
            value = getattr(self, name)
            if value is not None:
                check_positive_int(value, name)
        if self.minutes is not None:
            check_float(self.minutes, "minutes", 0.0, 1e6, low_open=True)
        check(self.epochs is not None or self.minutes is not None or self.max_steps is not None,
              "training length", "needs one of epochs, minutes or max_steps")
        for name in ("evals_per_run", "log_every"):
            check_positive_int(getattr(self, name), name)
        if self.eval_every is not None:
            check_positive_int(self.eval_every, "eval_every")
        if self.warmup_steps is not None:
            check_positive_int(self.warmup_steps, "warmup_steps", allow_zero=True)
        check_float(self.warmup_fraction, "warmup_fraction", 0.0, 0.5)
        check_positive_int(self.patience, "patience", allow_zero=True)
        check_positive_int(self.seed, "seed", allow_zero=True)
        check_float(self.lr, "lr", 0.0, 10.0, low_open=True)
        check_float(self.min_lr_ratio, "min_lr_ratio", 0.0, 1.0)
        check_float(self.weight_decay, "weight_decay", 0.0, 10.0)
        check_float(self.eps, "eps", 0.0, 1.0, low_open=True)
        check_float(self.grad_clip, "grad_clip", 0.0, 1e6)
        check_float(self.label_smoothing, "label_smoothing", 0.0, 1.0, high_open=True)
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
              f"must be two numbers in [0, 1), got {self.betas!r}")
        check(self.optimizer in OPTIMIZERS, "optimizer",
              f"must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        check(self.schedule in SCHEDULES, "schedule",
              f"must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        check(self.amp in AMP_MODES, "amp",
              f"must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
              "device", f"must be auto, cpu or cuda[:N], got {self.device!r}")


class Task(Protocol):
    """What the trainer needs from a model family's data and objective. `pure_bf16` says
    whether `auto` precision may run its steps on a bf16 copy of the model (measured faster and
    as good for that task)."""

    metric: str              # the validation metric early stopping and `best` follow
    higher_is_better: bool
    pure_bf16: bool

    def steps_per_epoch(self) -> int: ...
    def batches(self, epoch: int, start: int) -> Iterator[Any]: ...
    def loss(self, model: nn.Module, batch: Any, label_smoothing: float) -> tuple[Tensor, int]: ...
    def evaluate(self, model: nn.Module) -> dict[str, float]: ...
    def state(self) -> dict[str, Tensor]: ...
    def load_state(self, tensors: dict[str, Tensor]) -> None: ...
    def start_epoch(self, epoch: int) -> None: ...


# A --minutes run times this many steps (after its first, which pays for allocations and kernel
# choices) before planning the budget in steps: a few seconds, yet enough to average out noise.
PLAN_AFTER_STEPS = 20
# ... and plans again at each validation from the speed since then, where that moves the plan by
# more than this share: a translator's first steps ran at three quarters of its later pace, so
# a 60-minute run reached its planned last step at minute 48 and held the floor rate after.
REPLAN_TOLERANCE = 0.02


@dataclass(frozen=True)
class Plan:
    """The whole budget in optimiser steps, and the schedule and validations that follow it."""

    steps: int        # planned optimiser steps for the whole budget
    warmup: int       # steps of linear warmup
    eval_every: int   # steps between validations

    def describe(self, config: TrainConfig) -> str:
        span = f" in {config.minutes:g} minutes" if config.minutes else ""
        decay = {"cosine": f"cosine decay to {config.min_lr_ratio:g} x lr {config.lr:g}",
                 "linear": f"linear decay to {config.min_lr_ratio:g} x lr {config.lr:g}",
                 "inverse_sqrt": f"inverse square-root decay from lr {config.lr:g}",
                 "constant": f"constant lr {config.lr:g}"}[config.schedule]
        return (f"planned {self.steps:,} steps{span}: warmup {self.warmup:,} steps, {decay}, "
                f"validation every {self.eval_every:,} steps")


def make_plan(config: TrainConfig, steps: int) -> Plan:
    """The schedule for a budget of `steps` steps: warmup is `warmup_fraction` of it unless
    `warmup_steps` is given; validations are `evals_per_run` unless `eval_every` is given."""
    steps = max(1, steps)
    warmup = (config.warmup_steps if config.warmup_steps is not None
              else round(config.warmup_fraction * steps))
    eval_every = config.eval_every or max(1, math.ceil(steps / config.evals_per_run))
    return Plan(steps, warmup, eval_every)


def plan_from_speed(config: TrainConfig, step: int, elapsed: float, steps_per_second: float,
                    step_budget: int | None) -> Plan:
    """Plan a --minutes budget from the speed measured so far: the steps already taken plus
    those the remaining time holds at that speed, within any step budget also given."""
    left = max(0.0, config.minutes * 60 - elapsed) if config.minutes else 0.0
    steps = step + round(steps_per_second * left)
    return make_plan(config, min(steps, step_budget) if step_budget else steps)


def lr_at(config: TrainConfig, step: int, progress: float, plan: Plan | None = None) -> float:
    """Learning rate for step `step` (counting from 0); `progress` in [0, 1] is how much of the
    budget is used (`_budget_progress`).

    With a plan, warmup is its `warmup` steps and the decay runs from there to the plan's last
    step, or to the end of the time budget if that comes first (a machine slowed down
    mid-run still anneals before time is up; one that sped up holds the floor at the end).
    Without one (a --minutes run still measuring its speed) warmup follows the clock:
    `warmup_fraction` of the minutes."""
    warmup = plan.warmup if plan is not None else config.warmup_steps
    if plan is not None:
        progress = max(progress, (step + 1) / plan.steps)  # the last step runs at the floor
        warm_fraction = min(plan.warmup / plan.steps, 1.0)
    else:
        warm_fraction = config.warmup_fraction
    if warmup is not None:
        if step < warmup:
            return config.lr * (step + 1) / warmup
    elif progress < warm_fraction:
        return config.lr * progress / warm_fraction
    floor = config.lr * config.min_lr_ratio
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "inverse_sqrt":
        if warmup is not None:
            return max(floor, config.lr * math.sqrt(max(warmup, 1) / max(step, 1)))
        return max(floor, config.lr * math.sqrt(warm_fraction / progress)) if warm_fraction else config.lr
    decay = min(max((progress - warm_fraction) / max(1.0 - warm_fraction, 1e-9), 0.0), 1.0)
    if config.schedule == "linear":
        return config.lr - (config.lr - floor) * decay
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * decay))


@dataclass
class Progress:
    """Everything about where training stands that a resume must restore."""

    step: int = 0
    epoch: int = 0
    position: int = 0            # batches of the current epoch already consumed
    elapsed: float = 0.0         # seconds of training so far, across resumes
    tokens: int = 0
    best: float | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    planned_steps: int | None = None      # the plan, kept across resumes (see `Plan`) ...
    planned_minutes: float | None = None  # ... for this --minutes budget (None: a step budget)
    planned_warmup: int | None = None     # ... with its warmup and validation interval, which
    planned_eval_every: int | None = None  # a re-planned --minutes run keeps from its first plan


@dataclass
class TrainResult:
    out: Path
    steps: int
    epochs_done: float
    elapsed: float
    tokens: int
    tokens_per_second: float
    metrics: dict[str, float]
    best: float | None
    stopped_early: bool
    planned_steps: int | None = None


@dataclass
class CheckpointSpec:
    """What the caller adds to each checkpoint besides weights and training state."""

    kind: str
    model_config: dict[str, Any]
    tokenizer_json: str
    data: dict[str, Any]
    sizing: dict[str, Any] | None = None  # what `--preset auto` measured and chose


class _Log:
    """Metrics as JSON lines on rank 0; appends across resumes so one file tells the whole run."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise ScrivenError(f"cannot write {self.path}: {e.strerror or e}") from None


# Training settings a resume may change: how long to go on, how often to log and validate, and
# where to run. Everything else changes the numbers, so a resume that changed it would not be
# the run it claims to continue.
RESUME_MAY_CHANGE = ("epochs", "minutes", "max_steps", "eval_every", "log_every", "patience",
                     "device", "compile")
RUN_FILES = ("latest", "best", "latest.old", "best.old", "latest.tmp", "best.tmp",
             "metrics.jsonl", "loss.png")


def file_sha256(path: str | Path) -> str:
    """The data fingerprint a resume checks: sha256 of the file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class RunLock:
    """An exclusive `fcntl` lock on `out/.lock` while a run writes to `out`: a second run into the
    same folder is a clear error instead of two runs overwriting each other's checkpoints. The
    kernel drops the lock when the process dies, even by kill -9."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.file: Any = None

    def __enter__(self) -> RunLock:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.file = open(self.out / ".lock", "a")
        except OSError as e:
            raise ScrivenError(f"run folder {self.out}: cannot write there ({e.strerror or e})") from None
        if fcntl is not None:
            try:
                fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self.file.close()
                raise ScrivenError(f"run folder {self.out} is in use by another training run "
                                   "(it holds .lock there): wait for it to finish or choose "
                                   "another --out") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()  # closing releases the lock


def _prepare_fresh(out: Path, overwrite: bool) -> None:
    """A fresh run must not silently replace an earlier one's checkpoints and log."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    if not found:
        return
    if not overwrite:
        raise ScrivenError(f"{out} already holds a training run ({', '.join(found)}): pass "
                           "--resume to continue it, --overwrite to replace it, or choose a new "
                           "--out")
    for name in found:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()


def _check_resumable(saved: ckpt_io.Checkpoint, config: TrainConfig, spec: CheckpointSpec,
                     world: int, out: Path) -> None:
    """Refuse a resume whose settings or data differ from the run's (see RESUME_MAY_CHANGE).
    Only the settings this task's config has are compared: checkpoints written before each task
    had its own config also saved the other task's settings, which no run of this one read."""
    if saved.kind != spec.kind:
        raise ScrivenError(f"--resume: {out} holds a {saved.kind} run, not {spec.kind}")
    before = saved.config.get("train")
    if not isinstance(before, dict):
        raise ScrivenError(f"--resume: {out}/latest has no training config to compare with")
    now = json.loads(json.dumps(to_dict(config)))
    saved_world = saved.trainer.get("world", 1)
    changed = []
    for key, value in now.items():
        if key in RESUME_MAY_CHANGE or key not in before:
            continue  # a field newer than the checkpoint keeps its default
        old = before[key]
        if key in config.per_process and isinstance(old, int) and isinstance(saved_world, int):
            old, value = old * saved_world, value * world
        if old != value:
            changed.append(f"{key} {old!r} -> {value!r}")
    old_data = (saved.config.get("data") or {}).get("sha256")
    new_data = spec.data.get("sha256")
    if old_data and new_data and old_data != new_data:
        changed.append("the training data (its sha256 differs)")
    if changed:
        raise ScrivenError(f"--resume: {out} was trained with other settings: "
                           f"{'; '.join(changed)}. Resume with the run's settings (only "
                           f"{', '.join(RESUME_MAY_CHANGE)} may change) or start a new --out")


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint being resumed (they will be written again),
    and a line a kill cut short."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _budget_progress(config: TrainConfig, p: Progress, steps_per_epoch: int) -> float:
    fractions = []
    if config.max_steps:
        fractions.append(p.step / config.max_steps)
    if config.epochs:
        fractions.append(p.step / (config.epochs * steps_per_epoch))
    if config.minutes:
        fractions.append(p.elapsed / (config.minutes * 60))
    return max(fractions)


def fit(model: nn.Module, task: Task, config: TrainConfig, out: str | Path, spec: CheckpointSpec,
        resume: bool = False, progress_bar: bool = True, overwrite: bool = False,
        spent: float = 0.0) -> TrainResult:
    """Train `model` on `task` and write `out/latest`, `out/best`, `out/metrics.jsonl`.

    A fresh run into a folder that holds a run is an error unless `overwrite`; `resume`
    continues `out/latest` and refuses changed settings or data. `out` is locked meanwhile.
    `spent`: seconds of a --minutes budget already used before training (choosing a size)."""
    out = Path(out)
    dist = Distributed.from_env()
    with RunLock(out) if dist.main else contextlib.nullcontext():
        return _fit(model, task, config, out, spec, dist, resume, progress_bar, overwrite,
                        spent)


def _fit(model: nn.Module, task: Task, config: TrainConfig, out: Path, spec: CheckpointSpec,
         dist: Distributed, resume: bool, progress_bar: bool, overwrite: bool,
         spent: float) -> TrainResult:
    if not resume and dist.main:
        _prepare_fresh(out, overwrite)
    device = resolve_device(config.device, dist)
    owns_group = dist.world > 1 and not torch.distributed.is_initialized()
    if owns_group:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    run = _start(model, task, config, out, spec, dist, device, resume, progress_bar, spent)
    _train(run, resume)
    if run.bar is not None:
        run.bar.close()
    if owns_group:
        torch.distributed.destroy_process_group()
    p = run.p
    return TrainResult(out, p.step, p.epoch + p.position / run.steps_per_epoch, p.elapsed,
                       p.tokens, p.tokens / max(p.elapsed, 1e-9), run.metrics, p.best,
                       p.stopped_early, run.plan.steps if run.plan else None)


@dataclass
class _Window:
    """Training loss and tokens since the last log line."""

    loss: float = 0.0
    tokens: int = 0
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)


@dataclass
class _Run:
    """One run's state, shared by the steps of `_fit`."""

    model: nn.Module          # fp32 master weights: what the optimizer updates, validation
                              # reads and checkpoints store
    working: nn.Module        # what steps run on: `model`, or its bf16 copy under bf16-pure
    train_model: nn.Module    # `working`, compiled and/or wrapped in DDP
    task: Task
    config: TrainConfig
    spec: CheckpointSpec
    out: Path
    dist: Distributed
    device: torch.device
    amp_dtype: torch.dtype | None   # autocast for validation
    step_dtype: torch.dtype | None  # autocast for training steps (None under bf16-pure)
    opt: torch.optim.Optimizer | Optimizers
    scaler: torch.amp.GradScaler
    p: Progress
    log: _Log
    steps_per_epoch: int
    total_steps: int | None   # the step or epoch budget in steps; None: minutes only
    plan: Plan | None
    bar: Any = None           # tqdm on rank 0 with a progress bar
    metrics: dict[str, float] = field(default_factory=dict)
    window: _Window = field(default_factory=_Window)
    mark: tuple[int, float] | None = None  # (step, elapsed) where this process's timing starts
    replan_mark: tuple[int, float] | None = None  # ... and where its speed for re-plans starts
    last_eval_step: int = -1


def _start(model: nn.Module, task: Task, config: TrainConfig, out: Path, spec: CheckpointSpec,
           dist: Distributed, device: torch.device, resume: bool, progress_bar: bool,
           spent: float = 0.0) -> _Run:
    """Seed, place and accelerate the model, make the optimizer, restore a resumed run, then the
    bf16 working copy, wrappers, log, plan and progress bar."""
    precision = training_precision(config.amp, device, getattr(task, "pure_bf16", False))
    amp_dtype = autocast_dtype(precision, device)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model.to(device)
    accelerated = accel.apply(model, device, "train")
    if progress_bar and dist.main:
        print(f"accelerated: {json.dumps(accelerated)}", file=sys.stderr)
    opt = make_optimizer(model, config.optimizer, config.lr, config.weight_decay, config.betas,
                         config.eps, amp_dtype)
    p = (_restore(model, task, opt, config, out, spec, dist, device) if resume
         else Progress(elapsed=spent))

    # bf16-pure: steps run on `working`, a bf16 copy; `model` keeps the fp32 master weights.
    working = copy.deepcopy(model).to(torch.bfloat16) if precision == "bf16-pure" else model
    train_model: nn.Module = torch.compile(working) if config.compile else working
    if dist.world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)

    steps_per_epoch = task.steps_per_epoch()
    if steps_per_epoch < 1:
        raise ScrivenError("the training data is smaller than one batch: use more text or a "
                           "smaller batch_size/seq_len")
    total_steps = None
    if config.max_steps or config.epochs:
        total_steps = min(s for s in (config.max_steps, (config.epochs or 0) * steps_per_epoch or None) if s)
    run = _Run(model, working, train_model, task, config, spec, out, dist, device, amp_dtype,
               None if precision == "bf16-pure" else amp_dtype, opt, scaler, p,
               _Log(out / "metrics.jsonl" if dist.main else None), steps_per_epoch, total_steps,
               _initial_plan(config, p, total_steps), last_eval_step=p.step if resume else -1)
    if progress_bar and dist.main:
        from tqdm import tqdm
        run.bar = tqdm(total=run.plan.steps if run.plan else total_steps, initial=p.step,
                       unit="step", dynamic_ncols=True, file=sys.stderr, disable=None)
    if run.plan is not None and p.step == 0:  # a step budget: planned before the first step
        run.log.write({"step": 0, "plan": vars(run.plan)})
        if run.bar is not None:
            run.bar.write(run.plan.describe(config))
    return run


def _restore(model: nn.Module, task: Task, opt: torch.optim.Optimizer | Optimizers, config: TrainConfig,
             out: Path, spec: CheckpointSpec, dist: Distributed, device: torch.device) -> Progress:
    """Load `out/latest` into the model, optimizer, task and RNGs; return where it stood."""
    saved = ckpt_io.load(out / "latest", with_training_state=True)
    _check_resumable(saved, config, spec, dist.world, out)
    ckpt_io.load_weights(model, saved.weights, str(saved.path))
    try:
        load_optimizer(opt, {k: v.to(device) for k, v in saved.state.items()},
                       saved.trainer["param_groups"])
    except ValueError as e:  # another optimizer's state, or another model's
        raise ScrivenError(f"--resume: {out}/latest: its optimizer state does not fit this "
                           f"run ({e})") from None
    task.load_state({k[5:]: v.to(device) for k, v in saved.state.items() if k.startswith("task.")})
    torch.set_rng_state(saved.state["rng.torch"])
    if device.type == "cuda" and "rng.cuda" in saved.state:
        torch.cuda.set_rng_state(saved.state["rng.cuda"])
    unknown = set(saved.trainer["progress"]) - set(vars(Progress()))
    if unknown:
        raise ScrivenError(f"checkpoint {saved.path}: trainer.json: unknown progress "
                           f"field(s) {', '.join(sorted(unknown))}")
    p = Progress(**saved.trainer["progress"])
    if dist.main:
        _truncate_log(out / "metrics.jsonl", p.step)
        print(f"resuming from step {p.step}", file=sys.stderr, flush=True)
    return p


def _train(run: _Run, resume: bool) -> None:
    """Step through the data epoch by epoch until the budget is spent or early stopping says
    stop; the run ends on a validation."""
    p = run.p
    run.model.train()
    stop = _budget_spent(run) or p.stopped_early
    while not stop:
        if p.position == 0:
            run.task.start_epoch(p.epoch)
        for batch in run.task.batches(p.epoch, p.position):
            loss, n_tokens, lr = _step(run, batch)
            _record(run, loss, n_tokens, lr)
            if run.plan is None and run.config.minutes:
                _plan_when_timed(run)
            elif run.replan_mark is None:
                run.replan_mark = (p.step, p.elapsed)
            stop = _should_stop(run)
            if stop:
                break
        else:
            p.epoch += 1
            p.position = 0
    if run.last_eval_step != p.step:
        _validate(run)


def _step(run: _Run, batch: Any) -> tuple[Tensor, int, float]:
    """One optimiser step; returns its loss, tokens on this process and learning rate."""
    p, config, opt = run.p, run.config, run.opt
    t0 = time.perf_counter()
    lr = lr_at(config, p.step, _budget_progress(config, p, run.steps_per_epoch), run.plan)
    for group in opt.param_groups:
        group["lr"] = lr
    with torch.autocast(run.device.type, dtype=run.step_dtype or torch.float32,
                        enabled=run.step_dtype is not None):
        loss, n_tokens = run.task.loss(run.train_model, batch, config.label_smoothing)
    if not torch.isfinite(loss):
        raise ScrivenError(f"training diverged at step {p.step} (loss {loss.item()}): "
                           "lower lr or raise warmup_steps")
    run.scaler.scale(loss).backward()
    if run.working is not run.model:
        _grads_to_master(run.working, run.model)
    if config.grad_clip:
        run.scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip)
    run.scaler.step(opt)
    run.scaler.update()
    opt.zero_grad(set_to_none=True)
    if run.working is not run.model:
        with torch.no_grad():
            torch._foreach_copy_(list(run.working.parameters()), list(run.model.parameters()))
    p.step += 1
    p.position += 1
    p.tokens += n_tokens * run.dist.world
    p.elapsed += time.perf_counter() - t0
    if run.dist.world > 1 and config.minutes:
        # Rank 0's clock decides for everyone: processes that each read their own clock could
        # stop at different steps and wait forever in a collective, or run different learning
        # rates.
        clock = torch.tensor([p.elapsed], dtype=torch.float64, device=run.device)
        torch.distributed.broadcast(clock, src=0)
        p.elapsed = clock.item()
    return loss, n_tokens, lr


def _record(run: _Run, loss: Tensor, n_tokens: int, lr: float) -> None:
    """Add the step to the log window; every `log_every` steps write its mean loss and speed."""
    p, config, window = run.p, run.config, run.window
    window.loss += loss.item()
    window.tokens += n_tokens * run.dist.world
    window.steps += 1
    if p.step % config.log_every == 0:
        if run.dist.world > 1:  # every rank logs at the same steps, so this cannot deadlock
            mean = torch.tensor([window.loss], dtype=torch.float64, device=run.device)
            torch.distributed.all_reduce(mean)
            window.loss = mean.item() / run.dist.world
        now = time.perf_counter()
        rate = window.tokens / max(now - window.start, 1e-9)
        run.log.write({"step": p.step, "epoch": p.epoch, "elapsed": round(p.elapsed, 2),
                       "loss": window.loss / window.steps, "lr": lr, "tokens_per_s": rate})
        if run.bar is not None:
            post = {"loss": f"{window.loss / window.steps:.3f}", "tok/s": f"{rate:,.0f}"}
            if config.minutes:
                post["left"] = f"{max(0.0, config.minutes * 60 - p.elapsed):.0f}s"
            run.bar.set_postfix(post, refresh=False)
        run.window = _Window(start=now)
    if run.bar is not None:
        run.bar.update(1)


def _plan_when_timed(run: _Run) -> None:
    """A --minutes run without a plan times PLAN_AFTER_STEPS steps, then plans from its speed."""
    p = run.p
    if run.mark is None:
        run.mark = (p.step, p.elapsed)
    elif p.step - run.mark[0] >= PLAN_AFTER_STEPS:
        speed = (p.step - run.mark[0]) / max(p.elapsed - run.mark[1], 1e-9)
        plan = plan_from_speed(run.config, p.step, p.elapsed, speed, run.total_steps)
        _adopt(run, _agreed(plan, run.dist, run.device))


def _replan(run: _Run) -> None:
    """At a validation of a --minutes run: plan the steps left again from the speed measured
    since the plan was made (or the run resumed), keeping warmup and validation interval, so the
    decay ends with the budget when the machine turned out faster or slower than its first
    steps said. Time still ends a run that slowed down (see `lr_at`)."""
    p, plan = run.p, run.plan
    if not run.config.minutes or plan is None or run.replan_mark is None:
        return
    steps, seconds = p.step - run.replan_mark[0], p.elapsed - run.replan_mark[1]
    if steps < PLAN_AFTER_STEPS or seconds <= 0:
        return
    fresh = plan_from_speed(run.config, p.step, p.elapsed, steps / seconds, run.total_steps)
    if abs(fresh.steps - plan.steps) > REPLAN_TOLERANCE * plan.steps:
        fresh = Plan(max(fresh.steps, p.step + 1), plan.warmup, plan.eval_every)
        _adopt(run, _agreed(fresh, run.dist, run.device), announce=False)


def _adopt(run: _Run, plan: Plan, announce: bool = True) -> None:
    """Use `plan` from here on, keep it for resumes, and say what it is."""
    run.plan = plan
    _keep(run.p, plan, run.config)
    run.log.write({"step": run.p.step, "plan": vars(plan)})
    if run.bar is not None:
        run.bar.total = plan.steps
        if announce:
            run.bar.write(plan.describe(run.config))
        run.bar.refresh()


def _should_stop(run: _Run) -> bool:
    """After a step: validate when one is due; stop when early stopping or the budget says so."""
    eval_every = run.config.eval_every or (run.plan.eval_every if run.plan else 0)
    if eval_every and run.p.step % eval_every == 0:
        run.last_eval_step = run.p.step
        if _validate(run):
            return True
        _replan(run)
    return _budget_spent(run)


def _budget_spent(run: _Run) -> bool:
    config, p = run.config, run.p
    if config.max_steps and p.step >= config.max_steps:
        return True
    if config.epochs and p.step >= config.epochs * run.steps_per_epoch:
        return True
    return bool(config.minutes) and p.elapsed >= config.minutes * 60


def _validate(run: _Run) -> bool:
    """Evaluate, log, save; True when early stopping says stop."""
    p, config, task = run.p, run.config, run.task
    run.model.eval()
    with torch.no_grad(), torch.autocast(run.device.type, dtype=run.amp_dtype or torch.float32,
                                         enabled=run.amp_dtype is not None):
        run.metrics = task.evaluate(run.model)
    run.model.train()
    score = run.metrics[task.metric]
    improved = p.best is None or (score > p.best if task.higher_is_better else score < p.best)
    if improved:
        p.best, p.bad_evals = score, 0
    else:
        p.bad_evals += 1
    p.stopped_early = bool(config.patience) and p.bad_evals >= config.patience
    run.log.write({"step": p.step, "epoch": p.epoch, "elapsed": round(p.elapsed, 2),
                   **{f"val_{k}": v for k, v in run.metrics.items()}})
    _save(run, best=improved)
    if run.bar is not None:
        run.bar.write(f"step {p.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in run.metrics.items()))
    return p.stopped_early


def _save(run: _Run, best: bool) -> None:
    """Write `latest` (weights and training state), and `best` first when it improved."""
    task_state = run.task.state()  # on every rank: a task may gather its state across ranks
    if not run.dist.main:
        return
    tensors, groups = optimizer_tensors(run.opt)
    state = {**tensors, "rng.torch": torch.get_rng_state()}
    if run.device.type == "cuda":
        state["rng.cuda"] = torch.cuda.get_rng_state()
    state.update({f"task.{k}": v.detach().cpu() for k, v in task_state.items()})
    config_dict = {"model": run.spec.model_config, "train": to_dict(run.config),
                   "data": run.spec.data, "metrics": run.metrics}
    if run.spec.sizing is not None:
        config_dict["sizing"] = run.spec.sizing
    weights = ckpt_io.model_weights(run.model)
    trainer = {"progress": vars(run.p), "param_groups": groups, "world": run.dist.world}
    kind, tokenizer = run.spec.kind, run.spec.tokenizer_json
    # `best` first: a kill between the two saves leaves `latest` claiming an older best score
    # than `best` holds (the resumed run re-finds it), never a newer one.
    if best:
        ckpt_io.save(run.out / "best", ckpt_io.Checkpoint(kind, config_dict, weights, tokenizer))
    ckpt_io.save(run.out / "latest", ckpt_io.Checkpoint(kind, config_dict, weights, tokenizer,
                                                        state, trainer))


def _initial_plan(config: TrainConfig, p: Progress, total_steps: int | None) -> Plan | None:
    """The plan a run starts with: a step or epoch budget is planned at once; a --minutes budget
    keeps the plan it made before a resume, or has none until it has timed its first steps."""
    if not config.minutes:
        plan = make_plan(config, total_steps or 1)
    elif p.planned_steps and p.planned_minutes == config.minutes:
        plan = make_plan(config, min(p.planned_steps, total_steps or p.planned_steps))
        if p.planned_warmup is not None and p.planned_eval_every is not None:
            plan = Plan(plan.steps, p.planned_warmup, p.planned_eval_every)
    else:
        return None
    _keep(p, plan, config)
    return plan


def _keep(p: Progress, plan: Plan, config: TrainConfig) -> None:
    """Record `plan` in the progress a resume restores."""
    p.planned_steps, p.planned_minutes = plan.steps, config.minutes
    p.planned_warmup, p.planned_eval_every = plan.warmup, plan.eval_every


def _agreed(plan: Plan, dist: Distributed, device: torch.device) -> Plan:
    """Rank 0's plan on every rank, so all validate (a collective) at the same steps."""
    if dist.world == 1:
        return plan
    fields = torch.tensor([plan.steps, plan.warmup, plan.eval_every], dtype=torch.long,
                          device=device)
    torch.distributed.broadcast(fields, 0)
    return Plan(*(int(v) for v in fields.tolist()))


def _grads_to_master(working: nn.Module, master: nn.Module) -> None:
    """Move the bf16 copy's gradients onto the fp32 master weights (tied weights are one
    parameter in both, so the two lists align)."""
    for w, m in zip(working.parameters(), master.parameters()):
        m.grad = None if w.grad is None else w.grad.float()
        w.grad = None
