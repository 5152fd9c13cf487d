"""Lesson 06's study, end to end: autoencoders for f = 1…16 at equal size, then a latent diffusion model on each.

    python scripts/compression_study.py --phase autoencoders   # the course VAE (vae_f4), then ae_f1…ae_f16
    python scripts/compression_study.py --phase ldm            # ldm_f1…ldm_f16 on the study autoencoders

Each job is one process of ``scripts/train_autoencoder.py`` or ``scripts/train_latent_diffusion.py``
(one CPU thread each), ``--parallel`` at a time, sharing the GPU if there is one. Autoencoders
train for a time budget (``--budget-minutes``: the first steps are timed, then the step count is
fixed); every LDM trains for the same number of steps. Each shipped checkpoint's card records the
exact command that made it and the device it ran on (the autoencoders and ldm_f1/ldm_f2 on one
H100, ldm_f4/8/16 on one CPU core: same steps, batch and schedule).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minisd.nn.vae import AutoencoderConfig, AutoencoderKL  # noqa: E402

FACTORS = (1, 2, 4, 8, 16)
PARAMETER_BUDGET = 600_000  # each study autoencoder as close to this as widths in steps of 8 allow (563k–621k)
CHECKPOINTS = Path("assets/checkpoints")


def study_widths(f: int, budget: int = PARAMETER_BUDGET) -> tuple[int, ...]:
    """Widths (a, b, b, …) with log2(f) + 1 levels whose AutoencoderKL is closest to ``budget`` parameters."""
    levels = f.bit_length()
    best: tuple[int, tuple[int, ...]] | None = None
    for a in range(16, 257, 8):
        for b in range(a, 2 * a + 1, 8) if levels > 1 else (a,):
            widths = (a,) + (b,) * (levels - 1)
            with torch.device("meta"):  # count parameters without allocating or initialising them
                n = AutoencoderKL(AutoencoderConfig(block_out_channels=widths, norm_num_groups=8, layers_per_block=1)).num_parameters
            if best is None or abs(n - budget) < abs(best[0] - budget):
                best = (n, widths)
    return best[1]


def autoencoder_jobs(args: argparse.Namespace) -> dict[str, list[str]]:
    """name → arguments of scripts/train_autoencoder.py; each trains for a time budget (minutes)."""
    common = ["--batch-size", str(args.batch_size), "--steps", "1000000", *args.extra]
    jobs = {"vae_f4": ["--block-out-channels", "32,64,64", "--layers-per-block", "2", "--norm-num-groups", "16",
                       "--budget-minutes", str(args.course_minutes), "--export", str(CHECKPOINTS / "vae_f4.safetensors")]}
    for f in FACTORS:
        widths = ",".join(map(str, study_widths(f)))
        jobs[f"ae_f{f}"] = ["--block-out-channels", widths, "--layers-per-block", "1", "--norm-num-groups", "8",
                            "--budget-minutes", str(args.minutes), "--fp16", "--export", str(CHECKPOINTS / f"ae_f{f}.safetensors")]
    return {name: [sys.executable, "scripts/train_autoencoder.py", "--name", name, *job, *common]
            for name, job in jobs.items()}


def ldm_jobs(args: argparse.Namespace) -> dict[str, list[str]]:
    """name → arguments of scripts/train_latent_diffusion.py, one per f, all with the same step count."""
    return {f"ldm_f{f}": [sys.executable, "scripts/train_latent_diffusion.py", "--autoencoder",
                          str(CHECKPOINTS / f"ae_f{f}.safetensors"), "--steps", str(args.ldm_steps),
                          "--eval-fractions", "0.0625,0.125,0.25,0.5", "--batch-size", str(args.batch_size),
                          "--num-eval-samples", str(args.num_eval_samples), "--fp16",
                          "--export", str(CHECKPOINTS / f"ldm_f{f}.safetensors"), *args.extra] for f in FACTORS}


def run(jobs: dict[str, list[str]], parallel: int) -> list[str]:
    """Run the jobs, ``parallel`` at a time, each logging to runs/logs/NAME.log; returns the failed names."""
    Path("runs/logs").mkdir(parents=True, exist_ok=True)
    start, pending, running, failed = time.time(), list(jobs.items()), [], []
    while pending or running:
        while pending and len(running) < parallel:
            name, job = pending.pop(0)
            log = open(f"runs/logs/{name}.log", "w")
            running.append((name, subprocess.Popen(job, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log))
            print(f"{time.time() - start:6.0f} s  started {name}: {' '.join(job[1:])}", flush=True)
        for name, proc, log in list(running):
            if proc.poll() is not None:
                log.close()
                running.remove((name, proc, log))
                print(f"{time.time() - start:6.0f} s  {name}: exit {proc.returncode}", flush=True)
                if proc.returncode:
                    failed.append(name)
        time.sleep(1)
    return failed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", required=True, choices=("autoencoders", "ldm"))
    p.add_argument("--only", default="", help="comma-separated job names (default: all of the phase)")
    p.add_argument("--minutes", type=float, default=0.7, help="training budget of each study autoencoder")
    p.add_argument("--course-minutes", type=float, default=1.5, help="training budget of the course VAE, vae_f4")
    p.add_argument("--ldm-steps", type=int, default=3000, help="training steps of every LDM (equal for all f)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--parallel", type=int, default=1, help="jobs at a time")
    p.add_argument("--num-eval-samples", type=int, default=1000)
    p.add_argument("--num-images", type=int, default=None, help="training images per job (scripts' defaults if unset)")
    args = p.parse_args()
    args.extra = ["--num-images", str(args.num_images)] if args.num_images else []
    jobs = autoencoder_jobs(args) if args.phase == "autoencoders" else ldm_jobs(args)
    if args.only:
        jobs = {name: jobs[name] for name in args.only.split(",")}
    failed = run(jobs, args.parallel)
    if failed:
        sys.exit(f"failed: {failed}")


if __name__ == "__main__":
    main()
