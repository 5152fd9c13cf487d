"""Train, sample and export the course's pixel-space DDPM on grey-scale 32×32 glyphs.

    python scripts/train_ddpm.py --benchmark                  # seconds per step of candidate sizes
    python scripts/train_ddpm.py --steps 300 --run-dir runs/ddpm_sanity --sample-after 36
    nohup python scripts/train_ddpm.py > runs/ddpm/train.log 2>&1 &            # the long run
    python scripts/train_ddpm.py --resume                     # continue runs/ddpm/checkpoint.safetensors
    python scripts/train_ddpm.py --sample runs/ddpm/samples.png                  # EMA samples
    python scripts/train_ddpm.py --export assets/checkpoints/ddpm_glyphs.safetensors

DDPM as in Ho et al. 2020: ε-prediction with L_simple (``minisd.diffusion.ddpm_loss``), linear
β from 1e-4 to 0.02 over T = 1000 steps, 1000-step ancestral sampling (Algorithm 2). The resumable
checkpoint (model, EMA, AdamW state, loss history) is rewritten every few minutes; ``--export``
writes the EMA weights only, with a JSON card beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minisd.data import GlyphDataset  # noqa: E402
from minisd.diffusion import ddpm_loss  # noqa: E402
from minisd.nn import UNet, UNetConfig  # noqa: E402
from minisd.schedules import DDPM_BETA_END, DDPM_BETA_START, NoiseSchedule  # noqa: E402
from minisd.checkpoints import read_metadata, save_model, write_card  # noqa: E402
from minisd.train import Trainer, TrainConfig  # noqa: E402

CHECKPOINT_NAME = "checkpoint.safetensors"
DEFAULT_STEPS = 4500  # ≈ 70-80 min at ~1 s/step on one busy CPU core
# Candidate sizes for --benchmark: (block_out_channels, layers_per_block, attention per level)
CANDIDATES = [
    ((32, 64, 64), 1, (False, False, True)),
    ((32, 64, 128), 1, (False, False, True)),
    ((32, 64, 64), 2, (False, False, True)),
    ((32, 64, 128), 2, (False, False, True)),
    ((64, 128, 128), 1, (False, False, True)),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/ddpm", help="checkpoint, samples and log go here")
    p.add_argument("--steps", type=int, default=None,
                   help="total optimizer steps (default 4500); with --resume: change the saved run's total")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--lr-schedule", default="cosine", choices=("constant", "cosine"))
    p.add_argument("--min-lr", type=float, default=5e-5)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0, help="data order, t and ε")
    p.add_argument("--block-out-channels", default="32,64,64")
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--attention", default="0,0,1", help="1 where a level has self-attention")
    p.add_argument("--attention-head-dim", type=int, default=32)
    p.add_argument("--norm-num-groups", type=int, default=8)
    p.add_argument("--num-images", type=int, default=40_000, help="pre-rendered glyphs to train on")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--save-every-min", type=float, default=3.0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--resume", action="store_true", help=f"continue from RUN_DIR/{CHECKPOINT_NAME}")
    p.add_argument("--sample-after", type=int, default=0, help="after training, save this many EMA samples")
    p.add_argument("--sample", metavar="PNG", help="only sample a grid from RUN_DIR's checkpoint (EMA)")
    p.add_argument("--num-samples", type=int, default=36)
    p.add_argument("--weights", default="ema", choices=("ema", "model"), help="which weights --sample uses")
    p.add_argument("--export", metavar="SAFETENSORS", help="only write the EMA weights and a JSON card")
    p.add_argument("--benchmark", action="store_true", help="only time the CANDIDATES")
    return p.parse_args(argv)


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def unet_config(args: argparse.Namespace) -> UNetConfig:
    return UNetConfig(
        in_channels=1, out_channels=1, sample_size=32, block_out_channels=ints(args.block_out_channels),
        layers_per_block=args.layers_per_block, attention=tuple(bool(a) for a in ints(args.attention)),
        attention_head_dim=args.attention_head_dim, norm_num_groups=args.norm_num_groups,
    )


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        steps=args.steps or DEFAULT_STEPS, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
        lr_schedule=args.lr_schedule, min_lr=args.min_lr, ema_decay=args.ema_decay, max_grad_norm=1.0,
        seed=args.seed,
    )


def dataset_card(args: argparse.Namespace) -> dict:
    return {"class": "minisd.data.GlyphDataset", "n": args.num_images, "size": 32, "seed": args.data_seed,
            "grayscale": True, "difficulty": "easy"}


SCHEDULE = NoiseSchedule(1000, DDPM_BETA_START, DDPM_BETA_END, "linear")  # DDPM, Ho et al. 2020 section 4


def loss_fn(model: torch.nn.Module, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return ddpm_loss(model, SCHEDULE, x0, generator)


@torch.no_grad()
def sample_ddpm(model: torch.nn.Module, n: int, seed: int = 0, log_every: int = 250) -> torch.Tensor:
    """1000-step ancestral sampling, Ho et al. 2020 Algorithm 2 with σ_t² = β_t. Returns (n, 1, 32, 32)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 32, 32, generator=generator)  # x_T
    for t in reversed(range(SCHEDULE.num_train_timesteps)):
        beta_t, alpha_t, alpha_bar_t = SCHEDULE.betas[t], SCHEDULE.alphas[t], SCHEDULE.alphas_cumprod[t]
        eps_pred = model(x, t)
        mean = (x - beta_t / (1 - alpha_bar_t).sqrt() * eps_pred) / alpha_t.sqrt()  # μ_θ(x_t, t), eq. 11
        x = mean + beta_t.sqrt() * torch.randn(x.shape, generator=generator) if t > 0 else mean
        if log_every and t % log_every == 0:
            print(f"  sampling: t = {t}", flush=True)
    return x.clamp(-1, 1)


def save_grid(images: torch.Tensor, path: Path, scale: int = 2) -> None:
    """(N, 1, H, W) in [-1, 1] → a square grid PNG, each image enlarged ``scale``×."""
    n, _, h, w = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * (h + 2), cols * (w + 2)), np.uint8)
    pixels = ((images[:, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * (h + 2) + 1: r * (h + 2) + 1 + h, c * (w + 2) + 1: c * (w + 2) + 1 + w] = pixels[i]
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
    print(f"saved {path}", flush=True)


def benchmark(args: argparse.Namespace) -> None:
    x0 = GlyphDataset(512, seed=args.data_seed, grayscale=True).images
    for widths, layers, attention in CANDIDATES:
        config = UNetConfig(block_out_channels=widths, layers_per_block=layers, attention=attention,
                            attention_head_dim=args.attention_head_dim, norm_num_groups=args.norm_num_groups)
        model = UNet(config)
        trainer = Trainer(model, TrainConfig(steps=10, batch_size=args.batch_size, warmup_steps=1), loss_fn, x0)
        trainer.train_step()  # warm-up: allocations
        start = time.perf_counter()
        for _ in range(5):
            trainer.train_step()
        seconds = (time.perf_counter() - start) / 5
        print(f"{widths} layers={layers} attention={attention}: {model.num_parameters / 1e6:.2f}M params, "
              f"batch {args.batch_size}: {seconds:.2f} s/step, {DEFAULT_STEPS} steps ≈ {seconds * DEFAULT_STEPS / 60:.0f} min",
              flush=True)


def train(args: argparse.Namespace, argv: list[str]) -> None:
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = run_dir / CHECKPOINT_NAME
    command = "python scripts/train_ddpm.py " + shlex.join(argv)
    t0 = time.time()
    data = GlyphDataset(args.num_images, seed=args.data_seed, grayscale=True).images  # (N, 1, 32, 32) in [-1, 1]
    print(f"rendered {len(data)} glyphs in {time.time() - t0:.1f} s", flush=True)

    wall_before, commands = 0.0, [command]
    if args.resume:
        meta = read_metadata(checkpoint)
        model = UNet(UNetConfig.from_dict(meta["model_config"]))
        config = TrainConfig.from_dict(meta["train_config"])
        if args.steps is not None and args.steps != config.steps:  # lengthen or shorten the run (moves the cosine's end)
            print(f"changing the run's total steps from {config.steps} to {args.steps}", flush=True)
            config = dataclasses.replace(config, steps=args.steps)
        trainer = Trainer.resume(checkpoint, model, loss_fn, data, config)
        wall_before, commands = meta.get("wall_time_s", 0.0), meta.get("commands", []) + [command]
        if meta.get("dataset") != dataset_card(args):
            raise ValueError(f"--resume with other data: checkpoint has {meta.get('dataset')}, args give {dataset_card(args)}.")
        print(f"resumed {checkpoint} at step {trainer.step}", flush=True)
    else:
        model = UNet(unet_config(args))
        trainer = Trainer(model, train_config(args), loss_fn, data)
    print(f"model: {model.config}\n{model.num_parameters:,} parameters\ntrain: {trainer.config}", flush=True)

    start = time.time()
    last = {"save": start, "log": start, "log_step": trainer.step}

    def save() -> None:
        trainer.save(checkpoint, {"dataset": dataset_card(args), "commands": commands,
                                  "wall_time_s": wall_before + time.time() - start,
                                  "device": f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                                  "torch": torch.__version__})
        last["save"] = time.time()

    def callback(tr: Trainer) -> None:
        if tr.step % args.log_every == 0:
            now = time.time()
            recent = tr.history[-args.log_every:]
            print(f"step {tr.step:5d}/{tr.config.steps} | loss {np.mean(recent):.4f} | "
                  f"{(tr.step - last['log_step']) / (now - last['log']):.2f} steps/s | "
                  f"elapsed {(now - start) / 60:.1f} min", flush=True)
            last["log"], last["log_step"] = now, tr.step
        if time.time() - last["save"] > 60 * args.save_every_min:
            save()
            print(f"saved {checkpoint} at step {tr.step}", flush=True)

    trainer.fit(progress=False, callback=callback)
    save()
    print(f"done: step {trainer.step}, saved {checkpoint}, wall {(wall_before + time.time() - start) / 60:.1f} min",
          flush=True)
    if args.sample_after:
        save_grid(sample_ddpm(trainer.ema_model, args.sample_after, seed=0), run_dir / f"samples_step{trainer.step}.png")


def load_ema(run_dir: Path, weights: str = "ema") -> tuple[UNet, dict]:
    """The EMA (or raw, ``weights="model"``) model of RUN_DIR's checkpoint, and its metadata."""
    checkpoint = run_dir / CHECKPOINT_NAME
    meta = read_metadata(checkpoint)
    model = UNet(UNetConfig.from_dict(meta["model_config"]))
    trainer = Trainer.resume(checkpoint, model, loss_fn, torch.zeros(1, 1, 32, 32))
    return (trainer.ema_model if weights == "ema" else trainer.model), meta


def export(args: argparse.Namespace, argv: list[str]) -> None:
    ema, meta = load_ema(Path(args.run_dir))
    path = Path(args.export)
    save_model(ema, path, {"step": meta["step"], "schedule": repr(SCHEDULE)})
    history = meta["history"]
    card = {
        "name": path.stem,
        "description": "Pixel-space DDPM (ε-prediction) on grey-scale 32×32 glyphs; EMA weights of minisd.nn.UNet.",
        "model_config": meta["model_config"],
        "num_parameters": ema.num_parameters,
        "schedule": {"num_train_timesteps": 1000, "beta_start": DDPM_BETA_START, "beta_end": DDPM_BETA_END,
                     "beta_schedule": "linear", "prediction_type": "epsilon"},
        "train_config": meta["train_config"],
        "dataset": meta["dataset"],
        "steps": meta["step"],
        "seed": meta["train_config"]["seed"],
        "final_loss_mean_last_200": float(np.mean(history[-200:])),
        "command": meta["commands"],
        "export_command": "python scripts/train_ddpm.py " + shlex.join(argv),
        "wall_time_s": round(meta["wall_time_s"], 1),
        "device": meta["device"],
        "torch": meta["torch"],
        "metrics": None,  # filled in by the evaluation step (minisd.metrics)
    }
    card = write_card(path, card)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, sha256 {card['sha256'][:12]}…) and its card")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.benchmark:
        benchmark(args)
    elif args.export:
        export(args, argv)
    elif args.sample:
        model, meta = load_ema(Path(args.run_dir), args.weights)
        print(f"sampling {args.num_samples} images from the {args.weights} weights at step {meta['step']}", flush=True)
        save_grid(sample_ddpm(model, args.num_samples, seed=0), Path(args.sample))
    else:
        train(args, argv)


if __name__ == "__main__":
    main()
