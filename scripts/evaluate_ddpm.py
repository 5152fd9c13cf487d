"""Measure the shipped pixel DDPM and write the figures into its card.

    python scripts/evaluate_ddpm.py --num-samples 128

Samples ``--num-samples`` glyphs with 1000-step ancestral DDPM sampling (Ho et al. 2020,
Algorithm 2) and reports, with ``minisd.metrics``' glyph classifier:
* recognisable: the share of samples whose most likely character has probability ≥ 0.9;
* characters: how many of the 36 characters appear among the recognisable samples;
* glyph_fid: the FID-style distance of classifier features to as many real grey-scale glyphs,
  beside the same distance between two sets of real glyphs (the floor at this sample size).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minisd import data, metrics, samplers  # noqa: E402
from minisd.checkpoints import card_path, write_card  # noqa: E402
from minisd.nn import UNet  # noqa: E402
from minisd.schedules import NoiseSchedule  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="assets/checkpoints/ddpm_glyphs.safetensors")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = UNet.from_pretrained(args.checkpoint)
    generator = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.num_samples, 1, 32, 32, generator=generator)
    start = time.perf_counter()
    samples = samplers.sample(model, noise, NoiseSchedule(), sampler="ddpm", num_inference_steps=1000,
                              steps_offset=0, generator=generator)
    seconds = time.perf_counter() - start
    classifier = metrics.load_glyph_classifier(device="cpu")
    confident, chars = metrics.recognisable(samples, classifier)  # top character ≥ 0.9
    real_a = data.GlyphDataset(args.num_samples, seed=args.seed + 1, grayscale=True).images
    real_b = data.GlyphDataset(args.num_samples, seed=args.seed + 2, grayscale=True).images
    figures = {
        "sampler": "ddpm, 1000 steps (Algorithm 2)",
        "num_samples": args.num_samples,
        "recognisable": round(confident.float().mean().item(), 4),
        "distinct_characters": int(chars[confident].unique().numel()),
        "glyph_fid": round(metrics.glyph_fid(samples, real_a, classifier), 2),
        "glyph_fid_real_vs_real": round(metrics.glyph_fid(real_b, real_a, classifier), 2),
        "sampling_seconds": round(seconds, 1),
        "command": "python scripts/evaluate_ddpm.py " + shlex.join(sys.argv[1:]),
    }
    card = json.loads(card_path(args.checkpoint).read_text())
    write_card(args.checkpoint, card | {"metrics": figures})
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
