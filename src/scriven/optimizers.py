"""The optimisers a run trains with, and their state as checkpoint tensors.

`adamw`: AdamW for every parameter. `muon`: Muon for the hidden matrices (attention and
feed-forward projections, LSTM gate matrices), AdamW for the rest. Muon (Jordan et al., 2024)
keeps SGD momentum per matrix but steps along the momentum's orthogonalised form: the matrix
with the same singular vectors and every singular value near 1, found by a few Newton-Schulz
iterations. Every direction of the update then moves by about the same amount, where AdamW's
updates are dominated by a few directions; small models reach a given loss in fewer steps.

PyTorch's own `torch.optim.Muon` runs its iterations in bf16, which CPUs without native bf16
(AVX2 laptops, AMD Zen 2/3) emulate at about a hundredth of their fp32 speed: one step took
longer than the model's forward and backward pass. Here the iterations run in the precision the
training steps run in, and matrices of one shape are orthogonalised together in one batch.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

OPTIMIZERS = ("adamw", "muon")
# Embeddings, position tables and output heads stay on AdamW under Muon: their rows are looked
# up or scored one token at a time rather than mixed as one linear map, which is what the
# orthogonalised update is for.
NOT_FOR_MUON = ("embed", "pos", "head", "output")
# The quintic Newton-Schulz coefficients of Jordan et al.: the steepest slope at zero that still
# brings every singular value into about [0.7, 1.2] in five steps.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float,
                   betas: tuple[float, float], eps: float,
                   step_dtype: torch.dtype | None = None) -> torch.optim.Optimizer | Optimizers:
    """The optimiser `name` (one of OPTIMIZERS) over `model`'s trainable parameters. Weight
    decay applies to matrices only: decaying biases, norms and embeddings rarely helps.
    `step_dtype` is the training steps' autocast dtype (None: fp32): Muon's iterations run in
    bf16 only where the steps do, as emulated bf16 is slow."""
    hidden, decay, no_decay = [], [], []
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or "embed" in pname:
            no_decay.append(p)
        elif name == "muon" and not any(word in pname.split(".")[0] for word in NOT_FOR_MUON):
            hidden.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel: one pass per tensor instead of a dozen (CPU and CUDA).
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    adamw = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
    if not hidden:
        return adamw
    ns_dtype = torch.bfloat16 if step_dtype is torch.bfloat16 else torch.float32
    return Optimizers([Muon(hidden, lr=lr, weight_decay=weight_decay, ns_dtype=ns_dtype), adamw])


class Muon(torch.optim.Optimizer):
    """Muon over 2-D parameters. `lr` is on AdamW's scale: each orthogonalised update (whose
    entries have a root mean square of about 1/sqrt(max(rows, cols))) is scaled to the 0.2 RMS
    of a typical AdamW update, so one learning rate and schedule serve both optimisers."""

    def __init__(self, params: Iterable[Tensor], lr: float, weight_decay: float,
                 momentum: float = 0.95, ns_steps: int = 5,
                 ns_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      ns_steps=ns_steps))
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            if any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon takes matrices only")

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            updates = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                updates.append(p.grad.lerp(buf, group["momentum"]))  # Nesterov
            by_shape: dict[torch.Size, list[int]] = defaultdict(list)
            for i, u in enumerate(updates):
                by_shape[u.shape].append(i)
            for shape, members in by_shape.items():
                ortho = orthogonalise(torch.stack([updates[i] for i in members]),
                                      group["ns_steps"], self.ns_dtype)
                scale = group["lr"] * 0.2 * math.sqrt(max(shape))
                for i, o in zip(members, ortho):
                    p = params[i]
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(o.to(p.dtype), alpha=-scale)


def orthogonalise(g: Tensor, steps: int, dtype: torch.dtype) -> Tensor:
    """Matrices (n, A, B) with the singular vectors of `g` and singular values near 1: Newton-
    Schulz on X / |X| (so no singular value starts above 1), on the wide side (fewer rows, a
    smaller Gram matrix)."""
    tall = g.size(1) > g.size(2)
    x = g.to(dtype)
    if tall:
        x = x.transpose(1, 2).contiguous()  # strided operands slow the matmuls by a third
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=1e-7)
    wide = x.size(2) >= 2 * x.size(1)
    # The Gram form rounds differently: kept to fp32, where it matches (tested).
    x = _newton_schulz_gram(x, steps) if wide and dtype == torch.float32 else _newton_schulz(x, steps)
    return x.transpose(1, 2) if tall else x


def _newton_schulz(x: Tensor, steps: int) -> Tensor:
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.transpose(1, 2)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G^2
        x = torch.baddbmm(x, poly, x, beta=a)                    # a X + (b G + c G^2) X
    return x


def _newton_schulz_gram(x: Tensor, steps: int) -> Tensor:
    """The same iteration for a wide X (A x B, B >= 2A) in A x A matrices only: every iterate is
    Q X with Q a polynomial in S = X X^T, so Q commutes with S, the iterate's Gram matrix is
    Q S Q, and each step updates Q alone. X is multiplied twice (S, then Q X) instead of twice
    per step: about half the work for a 128 x 512 matrix."""
    a, b, c = NS_COEFFICIENTS
    s = x @ x.transpose(1, 2)
    eye = torch.eye(s.size(1), dtype=s.dtype, device=s.device)
    q = None
    for _ in range(steps):
        gram = s if q is None else q @ s @ q
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c) + a * eye
        q = poly if q is None else poly @ q
    return x if q is None else q @ x


class Optimizers:
    """Several optimisers stepped as one, each over its own parameters. Its `state_dict` has one
    optimiser's layout (parameters numbered across all of them), so checkpoints and resume treat
    it like any optimiser."""

    def __init__(self, parts: list[torch.optim.Optimizer]) -> None:
        self.parts = parts

    @property
    def param_groups(self) -> list[dict]:
        return [g for part in self.parts for g in part.param_groups]

    def step(self, closure: Any = None) -> None:
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        state: dict[int, Any] = {}
        groups: list[dict] = []
        offset = 0
        for part in self.parts:
            sd = part.state_dict()
            state.update({offset + index: slots for index, slots in sd["state"].items()})
            groups += [{**g, "params": [offset + i for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in sd["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if len(sd["param_groups"]) != len(self.param_groups):
            raise ValueError(f"{len(sd['param_groups'])} parameter groups saved, "
                             f"{len(self.param_groups)} here")
        offset = 0
        groups = iter(sd["param_groups"])
        for part in self.parts:
            mine = [next(groups) for _ in part.param_groups]
            count = sum(len(g["params"]) for g in mine)
            part.load_state_dict({
                "state": {int(i) - offset: slots for i, slots in sd["state"].items()
                          if offset <= int(i) < offset + count},
                "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in mine]})
            offset += count


def optimizer_tensors(opt: torch.optim.Optimizer | Optimizers) -> tuple[dict[str, Tensor], list[dict]]:
    """The optimiser's state as named tensors and its parameter groups (for trainer.json)."""
    sd = opt.state_dict()
    tensors = {}
    for index, slots in sd["state"].items():
        for name, value in slots.items():
            tensors[f"optim.{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer(opt: torch.optim.Optimizer | Optimizers, tensors: dict[str, Tensor],
                   groups: list[dict]) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})
