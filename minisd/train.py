"""One small training loop for every model in the course: DDPM, the VAE, text-to-image.

What is trained is decided by ``loss_fn(model, batch, generator) -> scalar loss``; the loop itself
does the rest, each piece a few lines you can read:

* AdamW (Loshchilov & Hutter 2019) with linear warm-up, then a constant or cosine learning rate;
* optional gradient accumulation: k micro-batches of B give the gradient of one batch of k·B;
* gradient clipping by global norm, and an EMA of the weights (sample from ``ema_model``);
* seeded data order: step s draws its batch (and each micro-batch's noise seed) from a generator
  seeded by (seed, s), so a resumed run sees exactly the batches the uninterrupted run would have seen;
* an EMA whose decay warms up (``ema_decay_at``), so it never keeps the random initial weights;
* data-parallel over several processes with DDP (``torchrun``), same steps as one process;
* save / resume to **safetensors**: weights, EMA and optimizer state as tensors, step, configs
  and loss history as JSON in the file's header. Never pickle: a checkpoint cannot run code.

Dropout draws from torch's global generator: with dropout > 0 a resumed run is statistically,
not bitwise, the same as an uninterrupted one.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from contextlib import nullcontext as _nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .checkpoints import check_state_dict, model_config, read_metadata, read_tensors, save_tensors

LR_SCHEDULES = ("constant", "cosine")
CHECKPOINT_FORMAT = "minisd.train/1"  # written to every checkpoint's header
SEED_STRIDE = 1_000_000  # step s of seed k uses generator seed k·10⁶ + s: distinct for s < 10⁶
EMA_WARMUP = 10  # decay_k = min(decay, (1 + k) / (EMA_WARMUP + k)): diffusers' EMAModel schedule

Batch = torch.Tensor | dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Defaults: the course's glyph models on a CPU."""

    steps: int = 1000  # optimizer steps in the whole run (the cosine schedule ends here)
    batch_size: int = 64  # images per micro-batch
    lr: float = 1e-3  # peak learning rate, reached after warm-up
    warmup_steps: int = 200  # linear warm-up from lr/warmup_steps to lr: avoids early Adam blow-ups
    lr_schedule: str = "cosine"  # after warm-up: "constant", or "cosine" down to min_lr at `steps`
    min_lr: float = 0.0  # where the cosine schedule ends
    weight_decay: float = 0.0  # AdamW's decoupled weight decay (SD: 1e-2)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's moment decay rates (torch's defaults)
    grad_accum_steps: int = 1  # micro-batches per optimizer step: effective batch = batch_size × this
    ema_decay: float = 0.999  # EMA weight: averages over the last ~1 / (1 - decay) steps
    max_grad_norm: float | None = 1.0  # clip the global gradient norm to this; None: no clipping
    seed: int = 0  # decides the data order, t and ε at every step

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} is unknown; use one of {LR_SCHEDULES}.")
        for name in ("steps", "batch_size", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be ≥ 1.")
        if self.warmup_steps < 0 or not 0 <= self.ema_decay < 1:
            raise ValueError(f"need warmup_steps ≥ 0 and 0 ≤ ema_decay < 1, got {self.warmup_steps}, {self.ema_decay}.")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up, then constant or cosine."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of optimizer step ``step``: its batch indices, then the loss's randomness."""
    # mod 2³²: torch's CPU generator (Mersenne Twister) keeps only the low 32 bits of a seed
    return torch.Generator().manual_seed((seed * SEED_STRIDE + step) % 2**32)


def ema_decay_at(step: int, decay: float) -> float:
    """The EMA decay of update number ``step`` (0 for the first): min(decay, (1 + k) / (10 + k)).

    A fixed decay d keeps d^k of the random initial weights after k updates (22 % after 1500 steps at
    d = 0.999). Warming the decay up as diffusers' ``EMAModel`` does (0.1 for the first update, 0.5
    at k = 8, 0.9 at k = 81) forgets the start at once: after k updates its weight is
    ∏ (1 + j) / (10 + j) = 1 / C(k + 9, 9), below 1e-6 by k = 20.
    """
    return min(decay, (1 + step) / (EMA_WARMUP + step))


@torch.no_grad()
def ema_update(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """θ_ema ← decay · θ_ema + (1 - decay) · θ for every parameter; buffers are copied.

    ``Trainer`` passes ``ema_decay_at(step, config.ema_decay)``, not the fixed decay.
    """
    for p_ema, p in zip(ema_model.parameters(), model.parameters()):
        p_ema.mul_(decay).add_(p.detach(), alpha=1 - decay)
    for b_ema, b in zip(ema_model.buffers(), model.buffers()):
        b_ema.copy_(b)


def _num_items(data: Batch) -> int:
    if isinstance(data, torch.Tensor):
        return data.shape[0]
    if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        sizes = {k: v.shape[0] for k, v in data.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"every tensor in data needs the same first dimension N; got {sizes}.")
        return next(iter(sizes.values()))
    raise TypeError(f"data must be a tensor (N, …) or a dict of such tensors, got {type(data).__name__}.")


class Trainer:
    """Trains ``model`` by minimising ``loss_fn(model, batch, generator)`` over random batches of ``data``.

    Args:
        model: any ``nn.Module``; the EMA copy is ``trainer.ema_model``.
        config: a ``TrainConfig``.
        loss_fn: ``(model, batch, generator) -> scalar``; ``batch`` is ``data`` indexed by a batch
            of indices (a tensor, or a dict of tensors); draw all randomness from ``generator``.
        data: a tensor (N, …) or a dict of tensors with the same N, e.g. {"image": …, "caption_index": …}.

    Data-parallel: started under ``torchrun`` with a process group initialised
    (``torch.distributed.init_process_group``), each of the W processes wraps the model in
    ``DistributedDataParallel`` and takes every W-th micro-batch of the step; DDP averages the
    gradients, so W processes with ``grad_accum_steps = A`` take the same steps as one process with
    ``grad_accum_steps = A·W`` (global batch ``batch_size × A × W`` either way).
    """

    def __init__(self, model: torch.nn.Module, config: TrainConfig, loss_fn: LossFn, data: Batch) -> None:
        self.num_items = _num_items(data)
        self.model, self.config, self.loss_fn, self.data = model, config, loss_fn, data
        self.device = next(model.parameters()).device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr_at(0, config), betas=config.betas,
                                           weight_decay=config.weight_decay)
        self.ema_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.step = 0  # optimizer steps taken
        self.history: list[float] = []  # mean loss of every step
        distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size() if distributed else 1
        self.rank = dist.get_rank() if distributed else 0
        # DDP broadcasts rank 0's weights at construction, so every process starts alike
        self.train_model = torch.nn.parallel.DistributedDataParallel(model) if distributed else model

    def get_batch(self, indices: torch.Tensor) -> Batch:
        if isinstance(self.data, torch.Tensor):
            return self.data[indices].to(self.device)
        return {k: v[indices].to(self.device) for k, v in self.data.items()}

    def compute_gradients(self, step: int) -> float:
        """Fill ``.grad`` with the gradient of step ``step``'s batch; return its mean loss (all processes).

        The step's generator draws the global batch's indices (with replacement) and one seed per
        micro-batch; micro-batch m's loss draws from its own generator, so the same micro-batch gets
        the same noise whichever process runs it. Each loss is divided by the number of micro-batches,
        so the summed (and, across processes, averaged) gradient is that of the mean loss.
        """
        c, W = self.config, self.world_size
        generator = step_generator(c.seed, step)
        micro_batches = c.grad_accum_steps * W
        indices = torch.randint(0, self.num_items, (c.batch_size * micro_batches,), generator=generator)
        seeds = torch.randint(0, 2**62, (micro_batches,), generator=generator)
        mine = list(range(self.rank, micro_batches, W))  # this process's micro-batches
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64)
        for n, m in enumerate(mine):
            batch = self.get_batch(indices[m * c.batch_size:(m + 1) * c.batch_size])
            micro_generator = torch.Generator().manual_seed(int(seeds[m]))
            last = n == len(mine) - 1
            sync = self.train_model.no_sync() if W > 1 and not last else _nullcontext()
            with sync:  # DDP all-reduces the gradients once, after the last micro-batch
                loss = self.loss_fn(self.train_model, batch, micro_generator)
                (loss / c.grad_accum_steps).backward()  # DDP's average over W completes the 1 / (A·W)
            total += loss.detach().double().cpu()
        if W > 1:
            dist.all_reduce(total)
        return total.item() / micro_batches

    def train_step(self) -> float:
        """One optimizer step: gradients, clipping, AdamW at this step's learning rate, EMA."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.config)
        loss = self.compute_gradients(self.step)
        if self.config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        ema_update(self.ema_model, self.model, ema_decay_at(self.step, self.config.ema_decay))
        self.step += 1
        self.history.append(loss)
        return loss

    def fit(self, steps: int | None = None, progress: bool = True,
            callback: Callable[["Trainer"], None] | None = None) -> list[float]:
        """Train ``steps`` more steps (default: up to ``config.steps``); ``callback(trainer)`` after each."""
        steps = self.config.steps - self.step if steps is None else steps
        bar = tqdm(range(steps), desc="training", disable=not progress or self.rank != 0)
        for _ in bar:
            loss = self.train_step()
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr_at(self.step - 1, self.config):.2e}")
            if callback is not None:
                callback(self)
        return self.history

    # ------------------------------------------------------------------------- checkpoints

    def save(self, path: str | Path, metadata: dict | None = None) -> None:
        """Everything needed to resume, in one safetensors file (module docstring)."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors |= {f"ema.{k}": v for k, v in self.ema_model.state_dict().items()}
        for index, state in self.optimizer.state_dict()["state"].items():
            tensors |= {f"optimizer.{index}.{name}": v for name, v in state.items()}
        header = {"format": CHECKPOINT_FORMAT, "step": self.step, "train_config": asdict(self.config),
                  "model_class": type(self.model).__name__, "model_config": model_config(self.model),
                  "history": self.history, **(metadata or {})}
        save_tensors(tensors, path, header)

    def load(self, path: str | Path) -> "Trainer":
        """Restore model, EMA, optimizer state, step and history from ``save``'s file."""
        meta = read_metadata(path)
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a Trainer checkpoint (format {meta.get('format')!r}, "
                             f"expected {CHECKPOINT_FORMAT!r}); weights-only files load with checkpoints.load_model.")
        if meta.get("model_class", type(self.model).__name__) != type(self.model).__name__:
            raise ValueError(f"{path} holds a {meta['model_class']} run, not a {type(self.model).__name__} run.")
        tensors = read_tensors(path)  # on the CPU; load_state_dict moves them to the model's device
        parts: dict[str, dict] = {"model": {}, "ema": {}, "optimizer": {}}
        for key, value in tensors.items():
            part, rest = key.split(".", 1)
            parts[part][rest] = value
        check_state_dict(self.model, parts["model"], f"{path} (model weights)")
        check_state_dict(self.ema_model, parts["ema"], f"{path} (EMA weights)")
        self.model.load_state_dict(parts["model"])
        self.ema_model.load_state_dict(parts["ema"])
        state: dict[int, dict] = {}
        for key, value in parts["optimizer"].items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": self.optimizer.state_dict()["param_groups"]})
        self.step, self.history = meta["step"], list(meta["history"])
        return self

    @classmethod
    def resume(cls, path: str | Path, model: torch.nn.Module, loss_fn: LossFn, data: Batch,
               config: TrainConfig | None = None) -> "Trainer":
        """A Trainer continuing ``path``'s run; its saved TrainConfig unless ``config`` is given."""
        config = config or TrainConfig.from_dict(read_metadata(path)["train_config"])
        return cls(model, config, loss_fn, data).load(path)


def plot_loss(history: list[float], smoothing: float = 0.98, ax=None, log_scale: bool = True):
    """Raw loss per step (faint) and its bias-corrected exponential moving average; returns the Axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    smoothed, running = [], 0.0
    for i, loss in enumerate(history):
        running = smoothing * running + (1 - smoothing) * loss
        smoothed.append(running / (1 - smoothing ** (i + 1)))  # debias the first steps (as Adam does)
    ax.plot(history, alpha=0.3, lw=0.8, label="per step")
    ax.plot(smoothed, lw=1.8, label=f"EMA ({smoothing})")
    ax.set(xlabel="step", ylabel="loss", yscale="log" if log_scale else "linear")
    ax.legend()
    return ax
