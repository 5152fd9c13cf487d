"""Train an unconditional latent diffusion model on one autoencoder's glyph latents, scoring it as it learns.

    python scripts/train_latent_diffusion.py --autoencoder assets/checkpoints/ae_f4.safetensors \\
        --steps 6000 --eval-at 375,750,1500,3000,6000 --export assets/checkpoints/ldm_f4.safetensors --fp16

Lesson 06's second half: the LDM paper's "LDM-f" study (Rombach et al. 2022, §4.1, Fig. 6),
small. Every f gets the same U-Net widths (``UNET_WIDTHS``, fewer levels only where the latent
grid is too small to halve), batch, learning rate and number of steps. At each ``--eval-at``
step the EMA weights draw ``--num-eval-samples`` samples (DDIM, 50 steps, η = 0; the paper used
100), the autoencoder decodes them, and the glyph classifier scores them: ``glyph_fid`` against
real held-out glyphs and the share of recognisable samples. The training compute of each step
is counted with ``torch.utils.flop_counter`` so curves can be compared at equal FLOPs too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minisd.data import GlyphDataset  # noqa: E402
from minisd.diffusion import ddpm_loss  # noqa: E402
from minisd.metrics import glyph_fid, glyph_kid, load_glyph_classifier, recognisable  # noqa: E402
from minisd.nn import UNet, UNetConfig  # noqa: E402
from minisd.nn.vae import AutoencoderKL, PixelSpace  # noqa: E402
from minisd.samplers import sample  # noqa: E402
from minisd.schedules import NoiseSchedule  # noqa: E402
from minisd.checkpoints import read_metadata, save_model, sha256, write_card  # noqa: E402
from minisd.train import Trainer, TrainConfig  # noqa: E402

UNET_WIDTHS = (32, 64, 64)  # the pixel DDPM's widths (lesson 03), for every f
SCHEDULE = NoiseSchedule.stable_diffusion()  # scaled-linear β, 0.00085 → 0.012, T = 1000
REFERENCE_SEED, NUM_REFERENCE = 20_001, 2000  # real glyphs that samples are compared with
CHECKPOINT_NAME = "checkpoint.safetensors"


def unet_config_for(latent_shape: tuple[int, int, int]) -> UNetConfig:
    """UNET_WIDTHS on a c×s×s latent grid; levels capped so the lowest one is at least 1×1."""
    c, side, _ = latent_shape
    levels = min(len(UNET_WIDTHS), int(math.log2(side)) + 1)
    widths = UNET_WIDTHS[:levels]
    return UNetConfig(in_channels=c, out_channels=c, sample_size=side, block_out_channels=widths,
                      layers_per_block=1, attention=tuple(i == levels - 1 for i in range(levels)),
                      attention_head_dim=32, norm_num_groups=8)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--autoencoder", required=True,
                   help="an AutoencoderKL safetensors file (scaling factor in its header), or 'pixels': no autoencoder, "
                        "diffusion on the pixels themselves (the paper's LDM-1, f = 1)")
    p.add_argument("--name", default=None, help="default: ldm_ + the autoencoder's name without 'ae_'")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--train-tflops", type=float, default=None,
                   help="train for this much compute instead of --steps: steps = TFLOP / (TFLOP per step); "
                        "the way to compare autoencoders at equal training compute")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--snr-gamma", type=float, default=None,
                   help="Min-SNR-γ loss weighting (Hang et al. 2023; they use 5); default: unweighted L_simple")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=20_000, help="RGB glyphs to encode and train on")
    p.add_argument("--eval-at", default="", help="comma-separated steps at which to score the EMA model")
    p.add_argument("--num-eval-samples", type=int, default=500, help="samples scored at the end")
    p.add_argument("--num-curve-samples", type=int, default=None,
                   help="samples scored at the intermediate points (default: --num-eval-samples)")
    p.add_argument("--resume", action="store_true", help=f"continue RUN_DIR/{CHECKPOINT_NAME}")
    p.add_argument("--save-every-min", type=float, default=5.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--run-dir", default=None, help="default runs/ldm/NAME")
    p.add_argument("--max-minutes", type=float, default=None, help="stop early (the card says so) after this long")
    p.add_argument("--eval-fractions", default="0.0625,0.125,0.25,0.5",
                   help="also score at these fractions of the total steps (and always at the end)")
    p.add_argument("--export", metavar="SAFETENSORS")
    p.add_argument("--fp16", action="store_true", help="export weights as float16")
    return p.parse_args(argv)


@torch.no_grad()
def encode_all(vae: AutoencoderKL | PixelSpace, images: torch.Tensor, device: str, batch_size: int = 500) -> torch.Tensor:
    return torch.cat([vae.encode_latents(x.to(device)).cpu() for x in images.split(batch_size)])


def train_flops_per_step(model: UNet, batch_size: int, latent_shape: tuple[int, int, int], device: str) -> int:
    """FLOPs of one forward + backward pass at this batch size, counted by torch (matmuls and convs)."""
    x = torch.randn(batch_size, *latent_shape, device=device)
    t = torch.randint(0, 1000, (batch_size,), device=device)
    with FlopCounterMode(display=False) as counter:
        model(x, t).square().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


@torch.no_grad()
def score(model: UNet, vae: AutoencoderKL | PixelSpace, n: int, reference: torch.Tensor, classifier, device: str) -> dict:
    """Glyph-FID and KID against ``reference[:n]`` (equal sample counts: FID's bias depends on N) and the
    share of recognisable samples, for ``n`` DDIM-50 samples from fixed noise."""
    model.eval()
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(n, *vae.config.latent_shape, generator=generator).to(device)
    latents = torch.cat([sample(model, z, SCHEDULE, sampler="ddim", num_inference_steps=50, progress=False)
                         for z in noise.split(250)])
    images = torch.cat([vae.decode_latents(z).cpu() for z in latents.split(250)])
    mask, _ = recognisable(images, classifier)
    kid, kid_std = glyph_kid(images, reference[:n], classifier)
    return {"n": n, "glyph_fid": glyph_fid(images, reference[:n], classifier), "kid": kid, "kid_std": kid_std,
            "recognisable": mask.float().mean().item()}


def floors(reference: torch.Tensor, n: int, classifier) -> dict:
    """What the scores read for real glyphs (another seed, same n) and for uniform noise: their floors."""
    real = GlyphDataset(n, seed=REFERENCE_SEED + 1).images
    noise = torch.rand(n, *real.shape[1:], generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = {}
    for name, images in (("real_vs_real", real), ("uniform_noise", noise)):
        kid, kid_std = glyph_kid(images, reference[:n], classifier)
        out[name] = {"n": n, "glyph_fid": glyph_fid(images, reference[:n], classifier), "kid": kid, "kid_std": kid_std,
                     "recognisable": recognisable(images, classifier)[0].float().mean().item()}
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # GPU only: TF32 matmuls and convs
    torch.backends.cudnn.benchmark = True
    pixels = args.autoencoder == "pixels"
    vae = PixelSpace().to(args.device) if pixels else AutoencoderKL.from_pretrained(args.autoencoder, device=args.device)
    name = args.name or ("ldm_f1" if pixels else "ldm_" + Path(args.autoencoder).stem.removeprefix("ae_"))
    run_dir = Path(args.run_dir or f"runs/ldm/{name}")
    run_dir.mkdir(parents=True, exist_ok=True)
    command = "python scripts/train_latent_diffusion.py " + shlex.join(argv)

    t0 = time.time()
    latents = encode_all(vae, GlyphDataset(args.num_images, seed=args.seed).images, args.device)  # (N, c, s, s), scaled
    reference = GlyphDataset(NUM_REFERENCE, seed=REFERENCE_SEED).images
    classifier = load_glyph_classifier(device=args.device)
    print(f"[{name}] encoded {len(latents)} glyphs to {tuple(latents.shape[1:])} in {time.time() - t0:.1f} s; "
          f"latent std {latents.std():.3f}", flush=True)

    model = UNet(unet_config_for(vae.config.latent_shape)).to(args.device)
    flops = train_flops_per_step(model, args.batch_size, vae.config.latent_shape, args.device)
    steps = max(1, round(args.train_tflops * 1e12 / flops)) if args.train_tflops else args.steps
    config = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                         lr_schedule="constant", ema_decay=args.ema_decay, max_grad_norm=1.0, seed=args.seed)
    trainer = Trainer(model, config, lambda m, z, g: ddpm_loss(m, SCHEDULE, z, g, snr_gamma=args.snr_gamma), latents)
    print(f"[{name}] {model.num_parameters:,} parameters, {model.config.block_out_channels}, "
          f"{flops / 1e9:.2f} GFLOP per training step: {steps} steps", flush=True)
    curve, train_seconds, commands, checkpoint = [], 0.0, [command], run_dir / CHECKPOINT_NAME
    if args.resume and checkpoint.exists():
        trainer.load(checkpoint)
        meta = read_metadata(checkpoint)
        curve, train_seconds, commands = meta["curve"], meta.get("train_seconds", 0.0), meta["commands"] + [command]
        print(f"[{name}] resumed at step {trainer.step}", flush=True)

    def eval_steps(total: int) -> set[int]:
        fixed = {int(x) for x in args.eval_at.split(",") if x}
        return fixed | {max(1, round(total * float(x))) for x in args.eval_fractions.split(",") if x} | {total}

    eval_at = eval_steps(config.steps)
    clock, stopped_early, last_save = time.time(), False, time.time()  # clock: when training last resumed

    def trained_for() -> float:
        return train_seconds + time.time() - clock  # seconds of training so far, scoring excluded

    def save() -> None:
        trainer.save(checkpoint, {"curve": curve, "commands": commands, "train_seconds": round(trained_for(), 1)})

    while trainer.step < trainer.config.steps:
        trainer.train_step()
        out_of_time = bool(args.max_minutes) and trained_for() > 60 * args.max_minutes
        if trainer.step in eval_at or out_of_time:
            train_seconds, lap = trained_for(), time.time()
            final = trainer.step == trainer.config.steps or out_of_time
            n = args.num_eval_samples if final else (args.num_curve_samples or args.num_eval_samples)
            point = {"step": trainer.step, "train_flops": flops * trainer.step, "train_seconds": round(train_seconds, 1),
                     "loss_last_100": sum(trainer.history[-100:]) / len(trainer.history[-100:]),
                     **score(trainer.ema_model, vae, n, reference, classifier, args.device)}
            curve.append(point)
            print(f"[{name}] {json.dumps(point)} (scored in {time.time() - lap:.1f} s)", flush=True)
            clock = time.time()
        if time.time() - last_save > 60 * args.save_every_min:
            save()
            last_save = time.time()
        if out_of_time:
            stopped_early = True
            print(f"[{name}] stopped early at step {trainer.step} (--max-minutes {args.max_minutes})", flush=True)
            break
    save()
    if not args.export:
        return
    path = Path(args.export)
    ema = trainer.ema_model
    save_model(ema, path, {"step": trainer.step, "autoencoder": Path(args.autoencoder).name},
                 dtype=torch.float16 if args.fp16 else None)
    card = {
        "name": path.stem,
        "description": ("Unconditional pixel-space diffusion (ε-prediction) on RGB glyphs, the paper's LDM-1 (f = 1, "
                        f"no autoencoder); EMA weights of minisd.nn.UNet." if pixels else
                        f"Unconditional latent diffusion (ε-prediction) on RGB glyph latents of {Path(args.autoencoder).name} "
                        f"(f = {vae.config.downsample_factor}, latents {vae.config.latent_shape}); EMA weights of minisd.nn.UNet."),
        "autoencoder": ({"file": None, "pixels": True, "scaling_factor": 1.0} if pixels else
                        {"file": Path(args.autoencoder).name, "scaling_factor": vae.config.scaling_factor,
                         "sha256": sha256(args.autoencoder)}),
        "model_config": ema.config.to_dict(),
        "num_parameters": ema.num_parameters,
        "schedule": {"num_train_timesteps": 1000, "beta_start": SCHEDULE.betas[0].item(), "beta_end": SCHEDULE.betas[-1].item(),
                     "beta_schedule": "scaled_linear", "prediction_type": "epsilon"},
        "train_config": dataclasses.asdict(config),
        "loss": {"snr_gamma": args.snr_gamma,
                 "kind": "L_simple (DDPM eq. 14)" if args.snr_gamma is None else f"Min-SNR-{args.snr_gamma:g} weighted ε MSE"},
        "dataset": {"class": "minisd.data.GlyphDataset", "n": args.num_images, "seed": args.seed, "difficulty": "easy"},
        "steps": trainer.step,
        "stopped_early": stopped_early,
        "seed": args.seed,
        "train_flops_per_step": flops,
        "train_seconds": round(train_seconds, 1),
        "curve": curve,
        "floors": floors(reference, args.num_eval_samples, classifier),
        "evaluation": f"EMA weights; n samples (see each point), DDIM 50 steps (η = 0), decoded by the autoencoder; "
                      f"glyph_fid and KID (minisd.metrics.glyph_kid) against the first n of {NUM_REFERENCE} real glyphs "
                      f"(GlyphDataset seed {REFERENCE_SEED}); recognisable = top character probability ≥ 0.9; floors: "
                      "real glyphs of another seed and uniform noise, same n",
        "command": commands,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "weights_dtype": "float16" if args.fp16 else "float32",
    }
    write_card(path, card)
    print(f"[{name}] wrote {path} ({path.stat().st_size / 1e6:.2f} MB) and its card", flush=True)


if __name__ == "__main__":
    main()
