"""Train one of the course's autoencoders (KL or VQ) on glyphs + photo patches, evaluate it, export it.

    python scripts/train_autoencoder.py --name vae_f4 --steps 200 --device cpu       # a quick sanity run
    python scripts/train_autoencoder.py --name vae_f4 --steps 12000 --batch-size 128 \\
        --export assets/checkpoints/vae_f4.safetensors                                  # the course VAE
    python scripts/train_autoencoder.py --name ae_f16 --block-out-channels 24,48,48,48,48 ... --fp16

Data: ``minisd.data.autoencoder_images`` (half RGB glyphs, half patches of 11 photos). Held out:
1000 glyphs of another seed and 1000 patches of the two photos training never sees
(``HELD_OUT_PHOTOS``). After training, the EMA weights are evaluated there (PSNR, SSIM, and the
rFID-style ``glyph_fid`` of reconstructions for glyphs), the latent scaling factor is measured
as 1 / std of sampled latents of 2048 training images (as SD did), and with ``--export`` the
weights (scaling factor in the config) are written with a JSON card beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minisd.data import HELD_OUT_PHOTOS, GlyphDataset, autoencoder_images, photo_patches  # noqa: E402
from minisd.metrics import load_glyph_classifier, reconstruction_metrics  # noqa: E402
from minisd.checkpoints import load_weights, read_metadata, save_model, write_card  # noqa: E402
from minisd.nn.vae import AutoencoderConfig, AutoencoderKL, kl_vae_loss, scaling_factor_from_latents  # noqa: E402
from minisd.nn.vq import VQModel, vq_loss  # noqa: E402
from minisd.train import Trainer, TrainConfig  # noqa: E402

CHECKPOINT_NAME = "checkpoint.safetensors"
EVAL_GLYPH_SEED, EVAL_PHOTO_SEED, NUM_EVAL = 10_001, 10_002, 1000


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="run name: runs/ae/NAME, and the card's name")
    p.add_argument("--kind", default="kl", choices=("kl", "vq"))
    p.add_argument("--block-out-channels", default="32,64,64", help="one width per level: f = 2^(levels-1)")
    p.add_argument("--layers-per-block", type=int, default=2)
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--norm-num-groups", type=int, default=16)
    p.add_argument("--num-vq-embeddings", type=int, default=256)
    p.add_argument("--kl-weight", type=float, default=1e-6, help="SD's value; see kl_vae_loss")
    p.add_argument("--steps", type=int, default=12_000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=40_000, help="training images, half glyphs, half photo patches")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--run-dir", default=None, help="default runs/ae/NAME")
    p.add_argument("--resume", action="store_true", help=f"continue RUN_DIR/{CHECKPOINT_NAME}")
    p.add_argument("--init-from", metavar="SAFETENSORS",
                   help="start from these exported weights (a fine-tuning run); their card's commands are kept")
    p.add_argument("--max-minutes", type=float, default=None, help="stop early (and say so in the card) after this long")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="time the first steps, then set --steps to what fits in this many minutes (the card records it)")
    p.add_argument("--save-every-min", type=float, default=2.0)
    p.add_argument("--log-every", type=int, default=250)
    p.add_argument("--curve-every", type=int, default=0,
                   help="every this many steps, score the EMA weights on 256 held-out glyphs and 256 held-out photo "
                        "patches (PSNR): the card's reconstruction-vs-steps curve. 0: no curve")
    p.add_argument("--export", metavar="SAFETENSORS", help="after training, write EMA weights and a JSON card here")
    p.add_argument("--fp16", action="store_true", help="export weights as float16 (half the file)")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, TrainConfig]:
    config = AutoencoderConfig(
        latent_channels=args.latent_channels, block_out_channels=tuple(int(c) for c in args.block_out_channels.split(",")),
        layers_per_block=args.layers_per_block, norm_num_groups=args.norm_num_groups,
        num_vq_embeddings=args.num_vq_embeddings)
    model = (AutoencoderKL if args.kind == "kl" else VQModel)(config)
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                        lr_schedule="cosine", min_lr=args.min_lr, ema_decay=args.ema_decay, max_grad_norm=1.0,
                        seed=args.seed)
    return model, train


def loss_function(args: argparse.Namespace):
    if args.kind == "kl":
        return lambda model, x, generator: kl_vae_loss(model, x, args.kl_weight, generator)[0]
    return lambda model, x, generator: vq_loss(model, x, generator)[0]


@torch.no_grad()
def evaluate(model: torch.nn.Module, train_images: torch.Tensor) -> dict:
    """Held-out PSNR / SSIM / rFID-style, latent statistics and the scaling factor (1 / std)."""
    model.eval()
    device = next(model.parameters()).device
    glyphs = GlyphDataset(NUM_EVAL, seed=EVAL_GLYPH_SEED).images
    photos = photo_patches(NUM_EVAL, seed=EVAL_PHOTO_SEED, names=HELD_OUT_PHOTOS)
    classifier = load_glyph_classifier(device="cpu")
    metrics = {"glyphs": reconstruction_metrics(glyphs, model.reconstruct(glyphs), classifier),
               "photos_held_out": reconstruction_metrics(photos, model.reconstruct(photos))}
    x = train_images[:2048].to(device)
    if isinstance(model, AutoencoderKL):
        posterior = model.encode(x)
        latents = posterior.sample(torch.Generator(device=device).manual_seed(0))
        metrics["kl_per_image"] = posterior.kl().mean().item()
    else:
        latents = model.encode(x)
        codes = model.quantize(latents)[2]
        metrics["codebook_used"] = int(codes.unique().numel())
    metrics["latent_std"] = latents.std().item()
    metrics["latent_mean"] = latents.mean().item()
    metrics["scaling_factor"] = scaling_factor_from_latents(latents)
    return metrics


NUM_CURVE = 256  # held-out images per curve point: enough to see a 0.1 dB trend, cheap on a CPU


@torch.no_grad()
def curve_point(model: torch.nn.Module, step: int, held_out: dict[str, torch.Tensor]) -> dict:
    """Held-out PSNR (dB) of ``model``'s reconstructions at ``step``: glyphs and photo patches separately."""
    model.eval()
    device = next(model.parameters()).device
    point = {"step": step}
    for name, images in held_out.items():
        reconstructions = torch.cat([model.reconstruct(x.to(device)).cpu() for x in images.split(128)])
        point[f"psnr_{name}"] = round(reconstruction_metrics(images, reconstructions)["psnr"], 3)
    return point


BUDGET_PROBE = (20, 120)  # time steps 20…120 (after cuDNN's autotuning) to size a --budget-minutes run


def steps_for_budget(trainer: Trainer, minutes: float, start: float, probe_start: float, name: str) -> TrainConfig:
    """The run's TrainConfig with ``steps`` set to what fits in ``minutes`` at the rate measured so far."""
    rate = (BUDGET_PROBE[1] - BUDGET_PROBE[0]) / (time.time() - probe_start)
    steps = max(trainer.step + 1, int(rate * (60 * minutes - (time.time() - start))) + trainer.step)
    print(f"[{name}] {rate:.1f} steps/s: {steps} steps fit in {minutes} min", flush=True)
    return dataclasses.replace(trainer.config, steps=steps)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # GPU only: TF32 matmuls and convs
    torch.backends.cudnn.benchmark = True
    run_dir = Path(args.run_dir or f"runs/ae/{args.name}")
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = run_dir / CHECKPOINT_NAME
    command = "python scripts/train_autoencoder.py " + shlex.join(argv)
    t0 = time.time()
    data = autoencoder_images(args.num_images, seed=args.seed)
    print(f"[{args.name}] {len(data)} training images in {time.time() - t0:.1f} s", flush=True)

    model, train_config = build(args)
    model.to(args.device)
    trainer = Trainer(model, train_config, loss_function(args), data)
    wall_before, commands, curve = 0.0, [command], []
    if args.init_from:
        load_weights(model, args.init_from)
        trainer.ema_model.load_state_dict(model.state_dict())
        previous = json.loads(Path(args.init_from).with_suffix(".json").read_text())
        wall_before, commands = previous["wall_time_s"], previous["command"] + [command]
        print(f"[{args.name}] starting from {args.init_from} ({previous['steps']} steps)", flush=True)
    if args.resume and checkpoint.exists():
        trainer.load(checkpoint)
        meta = read_metadata(checkpoint)
        wall_before, commands = meta.get("wall_time_s", 0.0), meta.get("commands", []) + [command]
        curve = meta.get("curve", [])
        print(f"[{args.name}] resumed at step {trainer.step}", flush=True)
    print(f"[{args.name}] {model.config}, {model.num_parameters:,} parameters, latents {model.config.latent_shape}",
          flush=True)

    start = time.time()
    last = {"save": start}
    stopped_early = False

    held_out = {"glyphs": GlyphDataset(NUM_CURVE, seed=EVAL_GLYPH_SEED).images,
                "photos": photo_patches(NUM_CURVE, seed=EVAL_PHOTO_SEED, names=HELD_OUT_PHOTOS)}
    scoring = {"seconds": 0.0}  # curve scoring time, not counted as training time

    def save() -> None:
        trainer.save(checkpoint, {"commands": commands, "curve": curve,
                                  "wall_time_s": wall_before + time.time() - start - scoring["seconds"]})
        last["save"] = time.time()

    while trainer.step < trainer.config.steps:
        loss = trainer.train_step()
        if trainer.step == BUDGET_PROBE[0]:
            probe_start = time.time()
        if args.budget_minutes and trainer.step == BUDGET_PROBE[1]:
            trainer.config = train_config = steps_for_budget(trainer, args.budget_minutes, start, probe_start, args.name)
        if trainer.step % args.log_every == 0:
            print(f"[{args.name}] step {trainer.step}/{train_config.steps} loss {loss:.4f} "
                  f"({(time.time() - start) / 60:.1f} min)", flush=True)
        if args.curve_every and (trainer.step % args.curve_every == 0 or trainer.step == trainer.config.steps):
            lap = time.time()
            curve.append(curve_point(trainer.ema_model, trainer.step, held_out))
            scoring["seconds"] += time.time() - lap
            print(f"[{args.name}] curve {json.dumps(curve[-1])}", flush=True)
        if time.time() - last["save"] > 60 * args.save_every_min:
            save()
        if args.max_minutes and time.time() - start > 60 * args.max_minutes:
            stopped_early = True
            print(f"[{args.name}] stopping early at step {trainer.step} (--max-minutes {args.max_minutes})", flush=True)
            break
    save()
    wall = wall_before + time.time() - start - scoring["seconds"]

    ema = trainer.ema_model
    metrics = evaluate(ema, data)
    config = dataclasses.replace(ema.config, scaling_factor=round(metrics["scaling_factor"], 5))
    ema.config = config
    print(f"[{args.name}] {json.dumps(metrics)}", flush=True)
    if not args.export:
        return
    path = Path(args.export)
    save_model(ema, path, {"step": trainer.step}, dtype=torch.float16 if args.fp16 else None)
    card = {
        "name": path.stem,
        "description": f"{type(ema).__name__} (f = {config.downsample_factor}, latents {config.latent_shape} for 32×32 RGB), "
                       "EMA weights; trained on RGB glyphs and photo patches (minisd.data.autoencoder_images).",
        "model_class": type(ema).__name__,
        "model_config": config.to_dict(),
        "num_parameters": ema.num_parameters,
        "kl_weight": args.kl_weight if args.kind == "kl" else None,
        "loss": (f"L1 + {args.kl_weight} * KL / pixels (minisd.nn.vae.kl_vae_loss)" if args.kind == "kl"
                 else "L1 + VQ codebook + 0.25 * commitment (minisd.nn.vq.vq_loss)"),
        "train_config": dataclasses.asdict(trainer.config),
        "dataset": {"function": "minisd.data.autoencoder_images", "n": args.num_images, "seed": args.seed,
                    "photo_fraction": 0.5, "held_out_photos": list(HELD_OUT_PHOTOS)},
        "steps": trainer.step,
        "stopped_early": stopped_early,
        "budget_minutes": args.budget_minutes,
        "seed": args.seed,
        "final_loss_mean_last_200": sum(trainer.history[-200:]) / len(trainer.history[-200:]),
        "curve": {"what": f"EMA weights' PSNR (dB) on {NUM_CURVE} held-out glyphs and {NUM_CURVE} held-out photo patches",
                  "points": curve} if curve else None,
        "command": commands,
        "wall_time_s": round(wall, 1),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "weights_dtype": "float16" if args.fp16 else "float32",
        "metrics": {"evaluation": f"EMA weights; {NUM_EVAL} held-out glyphs (GlyphDataset seed {EVAL_GLYPH_SEED}) and "
                                  f"{NUM_EVAL} patches of {list(HELD_OUT_PHOTOS)} (seed {EVAL_PHOTO_SEED}); "
                                  "latents: posterior mean (KL) or codebook (VQ); rfid = glyph_fid(reconstructions, originals)",
                    **metrics},
    }
    write_card(path, card)
    print(f"[{args.name}] wrote {path} ({path.stat().st_size / 1e6:.2f} MB) and its card, wall {wall / 60:.1f} min",
          flush=True)


if __name__ == "__main__":
    main()
