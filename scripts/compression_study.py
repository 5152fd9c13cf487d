"""Lesson 06's study, end to end: autoencoders for f = 2…16, then diffusion at equal compute for f = 1…16.

    python scripts/compression_study.py --phase autoencoders   # ae_f2…ae_f16, equal steps and batch
    python scripts/compression_study.py --phase ldm            # ldm_f1…ldm_f16, equal training compute
    python scripts/compression_study.py --phase ldm --only ldm_f4,ldm_f2   # some of them; rerun to resume

Each job is one process of ``scripts/train_autoencoder.py`` or ``scripts/train_latent_diffusion.py``
(one CPU thread each), ``--parallel`` at a time, sharing the GPU if there is one. Every job saves a
resumable checkpoint under ``--run-root`` and is started with ``--resume``, so running the same
command again continues where it stopped. Autoencoders train for equal steps and batch, with a
held-out reconstruction curve in their cards; LDMs train for equal compute (FLOPs counted by torch),
scored at the same fractions of it. f = 1 is the paper's LDM-1: no autoencoder, diffusion on the
pixels (``--autoencoder pixels``), so it has no autoencoder job. Each shipped checkpoint's card records the exact commands that
made it and the device it ran on.
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
AUTOENCODER_FACTORS = FACTORS[1:]  # f = 1 is pixel space: nothing to train
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
    """name → arguments of scripts/train_autoencoder.py: every study autoencoder trains for the same
    steps and batch (``--ae-steps``), with its held-out reconstruction scored along the way (the card's
    curve shows whether it has flattened). The course VAE, vae_f4, is not retrained here: lessons 07–12
    and the text-to-image model are built on it."""
    jobs = {}
    for f in AUTOENCODER_FACTORS:
        widths = ",".join(map(str, study_widths(f)))
        jobs[f"ae_f{f}"] = ["--block-out-channels", widths, "--layers-per-block", "1", "--norm-num-groups", "8",
                            "--steps", str(args.ae_steps), "--curve-every", str(max(1, args.ae_steps // 8)),
                            "--fp16", "--export", str(Path(args.export_dir) / f"ae_f{f}.safetensors")]
    return {name: [sys.executable, "scripts/train_autoencoder.py", "--name", name, *job, "--batch-size",
                   str(args.batch_size), "--run-dir", f"{args.run_root}/{name}", "--resume", *args.extra]
            for name, job in jobs.items()}


def ldm_jobs(args: argparse.Namespace) -> dict[str, list[str]]:
    """name → arguments of scripts/train_latent_diffusion.py, one per f, all with the same training
    compute (``--ldm-tflops``: a cheap f takes more steps) and scored at the same fractions of it."""
    return {f"ldm_f{f}": [sys.executable, "scripts/train_latent_diffusion.py", "--name", f"ldm_f{f}", "--autoencoder",
                          "pixels" if f == 1 else str(Path(args.export_dir) / f"ae_f{f}.safetensors"), "--train-tflops", str(args.ldm_tflops),
                          "--eval-fractions", "0.0625,0.125,0.25,0.5", "--batch-size", str(args.batch_size),
                          "--num-eval-samples", str(args.num_eval_samples), "--num-curve-samples",
                          str(args.num_curve_samples), "--fp16", "--run-dir", f"{args.run_root}/ldm_f{f}", "--resume",
                          "--export", str(Path(args.export_dir) / f"ldm_f{f}.safetensors"), *args.extra,
                          *(["--max-minutes", str(args.ldm_max_minutes)] if args.ldm_max_minutes else [])]
            for f in FACTORS}


def run(jobs: dict[str, list[str]], parallel: int, logs: str) -> list[str]:
    """Run the jobs, ``parallel`` at a time, each logging to logs/NAME.log (appended to on every restart); returns the failed names."""
    Path(logs).mkdir(parents=True, exist_ok=True)
    start, pending, running, failed = time.time(), list(jobs.items()), [], []
    while pending or running:
        while pending and len(running) < parallel:
            name, job = pending.pop(0)
            log = open(f"{logs}/{name}.log", "a")
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
    p.add_argument("--ae-steps", type=int, default=1500, help="training steps of every study autoencoder")
    p.add_argument("--ldm-tflops", type=float, default=48.0, help="training compute of every LDM (TFLOP, equal for all f)")
    p.add_argument("--ldm-max-minutes", type=float, default=None,
                   help="stop an LDM early after this many minutes of training (its card says so and how far it got)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--parallel", type=int, default=1, help="jobs at a time")
    p.add_argument("--num-eval-samples", type=int, default=1000, help="samples scored at the end of each LDM")
    p.add_argument("--num-curve-samples", type=int, default=256, help="samples scored at each intermediate point")
    p.add_argument("--num-images", type=int, default=None, help="training images per job (scripts' defaults if unset)")
    p.add_argument("--run-root", default="runs/study", help="resumable checkpoints and logs (outside git)")
    p.add_argument("--export-dir", default=str(CHECKPOINTS),
                   help="where the weights and cards go (and where the LDMs read their autoencoders)")
    args = p.parse_args()
    args.extra = ["--num-images", str(args.num_images)] if args.num_images else []
    jobs = autoencoder_jobs(args) if args.phase == "autoencoders" else ldm_jobs(args)
    if args.only:
        jobs = {name: jobs[name] for name in args.only.split(",")}
    failed = run(jobs, args.parallel, f"{args.run_root}/logs")
    if failed:
        sys.exit(f"failed: {failed}")


if __name__ == "__main__":
    main()
