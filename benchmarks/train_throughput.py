"""Training throughput of the text-to-image U-Net: optimizer steps per second at 1 and 2 threads.

    python benchmarks/train_throughput.py                       # the shipped model's config
    python benchmarks/train_throughput.py --block-out-channels 32,64 --attention 1,1 --steps 10

One step is what ``scripts/train_text_to_image.py`` runs: ``Trainer.train_step`` with
``text_to_image_loss`` (batch 64 of 4×8×8 latents, 16 text tokens of 384, caption dropout, AdamW,
clipping, EMA). Latents and text states are random: speed does not depend on their values. Prints
also the FLOPs of one forward + backward pass as counted by torch. The figure depends on what else
the machine runs: the wall-clock rate and the process's CPU time per step are both printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minisd.nn.unet import UNet, UNetConfig  # noqa: E402
from minisd.schedules import NoiseSchedule  # noqa: E402
from minisd.text_to_image import text_to_image_loss  # noqa: E402
from minisd.train import Trainer, TrainConfig  # noqa: E402

NUM_PROMPTS, MAX_LENGTH, TEXT_DIM = 64, 16, 384  # a stand-in caption table, shaped like MiniLM's


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--block-out-channels", default="32,64,128")
    p.add_argument("--attention", default="1,1,0")
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--attention-head-dim", type=int, default=16)
    p.add_argument("--norm-num-groups", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps per thread count (after 3 untimed)")
    p.add_argument("--threads", default="1,2")
    args = p.parse_args()
    ints = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    config = UNetConfig(in_channels=4, out_channels=4, sample_size=8, block_out_channels=ints(args.block_out_channels),
                        layers_per_block=args.layers_per_block, attention=tuple(map(bool, ints(args.attention))),
                        attention_head_dim=args.attention_head_dim, norm_num_groups=args.norm_num_groups,
                        cross_attention_dim=TEXT_DIM)
    g = torch.Generator().manual_seed(0)
    data = {"latents": torch.randn(1024, 4, 8, 8, generator=g), "caption_index": torch.randint(0, NUM_PROMPTS, (1024,), generator=g)}
    table = torch.randn(NUM_PROMPTS, MAX_LENGTH, TEXT_DIM, generator=g)
    loss_fn = partial(text_to_image_loss, prompt_embeds=table, schedule=NoiseSchedule.stable_diffusion())
    torch.manual_seed(0)
    model = UNet(config)
    x, t = torch.randn(args.batch_size, 4, 8, 8), torch.randint(0, 1000, (args.batch_size,))
    with FlopCounterMode(display=False) as counter:
        model(x, t, encoder_hidden_states=table[:1].expand(args.batch_size, -1, -1)).square().mean().backward()
    print(f"{model.num_parameters:,} parameters {config.block_out_channels}, attention {config.attention}; "
          f"batch {args.batch_size}: {counter.get_total_flops() / 1e9:.1f} GFLOP per forward + backward")
    for threads in ints(args.threads):
        torch.set_num_threads(threads)
        trainer = Trainer(model, TrainConfig(steps=10_000, batch_size=args.batch_size), loss_fn, data)
        for _ in range(3):
            trainer.train_step()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            trainer.train_step()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"{threads} thread(s): {args.steps / wall:.2f} steps/s ({wall / args.steps:.3f} s/step wall, "
              f"{cpu / args.steps:.3f} CPU-s/step)", flush=True)


if __name__ == "__main__":
    main()
