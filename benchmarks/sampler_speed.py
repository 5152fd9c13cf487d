"""Sampling speed of every sampler: model evaluations (NFE), seconds per batch and images per second.

    python benchmarks/sampler_speed.py                        # stand-in conv net, 20 steps, 3×32×32
    python benchmarks/sampler_speed.py --steps 50 --batch-size 64 --samplers ddim heun
    python benchmarks/sampler_speed.py --channels 4 --image-size 8   # SD-style latents

The stand-in is a small frozen random conv net with a time embedding (about the per-call cost of a
tiny U-Net); what matters is the ratio between samplers, which is set by the NFE each one makes.
``--checkpoint`` times a trained course U-Net instead, e.g. the shipped pixel DDPM:

    python benchmarks/sampler_speed.py --checkpoint assets/checkpoints/ddpm_glyphs.safetensors --steps 50
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from minisd.config import get_device
from minisd.nn import UNet
from minisd.samplers import SAMPLERS, count_model_evaluations, sample
from minisd.schedules import NoiseSchedule


class StandInModel(nn.Module):
    """ε̂(x_t, t): three 3×3 convolutions, the timestep added as a sinusoidal embedding after the first."""

    def __init__(self, channels: int, width: int = 64, embedding_dim: int = 64) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.time_proj = nn.Linear(embedding_dim, width)
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.conv_mid = nn.Conv2d(width, width, 3, padding=1)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        half = self.embedding_dim // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=x.device) / half)  # DDPM's embedding
        angles = t.float()[:, None] * freqs[None]  # (B, half)
        emb = self.time_proj(torch.cat([angles.sin(), angles.cos()], dim=1))  # (B, width)
        h = torch.nn.functional.silu(self.conv_in(x) + emb[:, :, None, None])
        h = torch.nn.functional.silu(self.conv_mid(h))
        return self.conv_out(h)


def time_sampler(model, shape, schedule, sampler, steps, repeats, device) -> float:
    """Best wall time of ``repeats`` runs of ``sample`` (seconds per batch), after one warm-up run."""
    times = []
    for run in range(repeats + 1):
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(run)).to(device)
        generator = torch.Generator().manual_seed(run)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        sample(model, x_T, schedule, sampler, steps, generator=generator, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if run > 0:  # run 0 warms up kernels and caches
            times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="num_inference_steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per sampler; the best is shown")
    parser.add_argument("--checkpoint", help="a trained course U-Net (safetensors with its config in the header)")
    args = parser.parse_args()

    device = get_device()
    torch.manual_seed(0)
    if args.checkpoint:
        model = UNet.from_pretrained(args.checkpoint, device=device)
        args.channels, args.image_size = model.config.in_channels, model.config.sample_size
        schedule, name = NoiseSchedule(), args.checkpoint  # the course's pixel DDPM uses DDPM's linear schedule
    else:
        model = StandInModel(args.channels).to(device).eval()
        schedule, name = NoiseSchedule.stable_diffusion(), "stand-in model"
    shape = (args.batch_size, args.channels, args.image_size, args.image_size)
    params = sum(p.numel() for p in model.parameters())
    print(f"device {device}, threads {torch.get_num_threads()}, {name} ({params / 1e3:.0f}k params), "
          f"batch {shape}, {args.steps} steps")
    print(f"{'sampler':16s} {'NFE':>5s} {'s/batch':>9s} {'images/s':>9s} {'ms/NFE':>8s}")
    for sampler in args.samplers:
        nfe = count_model_evaluations(sampler, args.steps)
        seconds = time_sampler(model, shape, schedule, sampler, args.steps, args.repeats, device)
        images_per_second, ms_per_nfe = args.batch_size / seconds, 1e3 * seconds / nfe
        print(f"{sampler:16s} {nfe:5d} {seconds:9.3f} {images_per_second:9.1f} {ms_per_nfe:8.2f}", flush=True)


if __name__ == "__main__":
    main()
