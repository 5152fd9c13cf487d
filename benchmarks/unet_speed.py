"""Speed of minisd's text-conditioned U-Net against diffusers' UNet2DConditionModel on CPU.

Same config, same weights (minisd's state dict loads into diffusers' model unchanged), same inputs:
forward (no grad, as in sampling), forward + backward (as in training) and, for minisd, a whole
training step with AdamW. Prints the best seconds per call over the repeats (robust to other jobs on a
shared machine; minisd's and diffusers' calls alternate so that both see the same load) and the ratio
minisd / diffusers (goal ≤ 1.0).

    python benchmarks/unet_speed.py                          # course and mid configs, 1 and 2 threads
    python benchmarks/unet_speed.py --configs course --threads 1 --batch-size 64 --repeats 20
    python benchmarks/unet_speed.py --threads 1 --clock cpu   # on a busy machine: CPU seconds, not wall

``--clock cpu`` counts the process's CPU time (all its threads), which other jobs do not inflate: with
one thread it is the wall time the call would take on an idle core.

Configs: ``course`` is the proposed text-to-image model (4×8×8 latents of the course VAE, MiniLM's
384-d token states, 16 tokens); ``mid`` is a wider model on 4×16×16 latents (SD's shape at 1/10 width).
"""

from __future__ import annotations

import argparse
import time

import torch

from minisd.nn import UNet, UNetConfig

CONFIGS = {
    # cross-attention at 8×8 (1 head of 32) and 4×4 (2 heads), mid block at 2×2 (4 heads): 3,434,564 parameters
    "course": (UNetConfig(in_channels=4, out_channels=4, sample_size=8, block_out_channels=(32, 64, 128),
                          layers_per_block=1, attention=(True, True, False), attention_head_dim=32,
                          norm_num_groups=8, cross_attention_dim=384), 64),
    "mid": (UNetConfig(in_channels=4, out_channels=4, sample_size=16, block_out_channels=(64, 128, 256, 256),
                       layers_per_block=2, attention=(True, True, True, False), num_attention_heads=8,
                       attention_head_dim=None, norm_num_groups=32, cross_attention_dim=384), 16),
}  # name → (config, default batch size)
TEXT_TOKENS = 16  # MiniLM prompts padded to max_length 16 (DESIGN.md)


def diffusers_twin(model: UNet):
    """diffusers' UNet2DConditionModel with minisd's config, holding the same weights."""
    import diffusers

    c = model.config
    theirs = diffusers.UNet2DConditionModel(
        sample_size=c.sample_size, in_channels=c.in_channels, out_channels=c.out_channels,
        block_out_channels=c.block_out_channels, layers_per_block=c.layers_per_block,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in c.attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in c.attention[::-1]),
        attention_head_dim=tuple(c.heads(w) for w in c.block_out_channels),  # diffusers' name for the head count
        norm_num_groups=c.norm_num_groups, norm_eps=c.norm_eps, cross_attention_dim=c.cross_attention_dim,
        use_linear_projection=c.use_linear_projection, transformer_layers_per_block=c.transformer_layers_per_block,
    )
    theirs.load_state_dict(model.state_dict())
    return theirs


def best_seconds(fns: list, repeats: int, clock=time.perf_counter) -> list[float]:
    """Best wall time of each function over ``repeats`` rounds (calls alternate within a round), after a warm-up."""
    for fn in fns:
        fn()  # warm-up: allocator and oneDNN caches
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = clock()
            fn()
            best[i] = min(best[i], clock() - start)
    return best


def forward_fns(model, inputs, returns_sample: bool) -> tuple:
    """(forward without grad, forward + backward) as zero-argument functions."""
    x, t, text = inputs

    def forward():
        with torch.no_grad():
            model(x, t, encoder_hidden_states=text)

    def forward_backward():
        out = model(x, t, encoder_hidden_states=text)
        out = out.sample if returns_sample else out
        out.square().mean().backward()
        model.zero_grad(set_to_none=True)

    return forward, forward_backward


def train_step_fn(model: UNet, inputs):
    """fwd + bwd + AdamW step, ε-MSE against random targets (the unit of DESIGN.md's step times)."""
    x, t, text = inputs
    target = torch.randn_like(x)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = torch.nn.functional.mse_loss(model(x, t, encoder_hidden_states=text), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 (course), 16 (mid)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: process CPU time (busy machines)")
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    print(f"torch {torch.__version__}, CPU; best of {args.repeats} calls after one warm-up; {args.clock} seconds per call")
    header = f"{'config':<7} {'params':>10} {'batch':>5} {'thr':>3} | {'fwd minisd':>10} {'diffusers':>9} {'ratio':>5} " \
             f"| {'fwd+bwd minisd':>14} {'diffusers':>9} {'ratio':>5} | {'train step':>10}"
    print(header)
    print("-" * len(header))
    for name in args.configs:
        config, default_batch = CONFIGS[name]
        batch = args.batch_size or default_batch
        torch.manual_seed(0)
        ours = UNet(config).train()
        theirs = diffusers_twin(ours).train()
        g = torch.Generator().manual_seed(0)
        inputs = (torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, generator=g),
                  torch.randint(0, 1000, (batch,), generator=g),
                  torch.randn(batch, TEXT_TOKENS, config.cross_attention_dim, generator=g))
        for threads in args.threads:
            torch.set_num_threads(threads)
            fwd, their_fwd = best_seconds([forward_fns(ours, inputs, False)[0], forward_fns(theirs, inputs, True)[0]],
                                          args.repeats, clock)
            fwd_bwd, their_fwd_bwd = best_seconds([forward_fns(ours, inputs, False)[1],
                                                   forward_fns(theirs, inputs, True)[1]], args.repeats, clock)
            (step,) = best_seconds([train_step_fn(ours, inputs)], args.repeats, clock)
            print(f"{name:<7} {ours.num_parameters:>10,} {batch:>5} {threads:>3} | {fwd:>10.4f} {their_fwd:>9.4f} "
                  f"{fwd / their_fwd:>5.2f} | {fwd_bwd:>14.4f} {their_fwd_bwd:>9.4f} {fwd_bwd / their_fwd_bwd:>5.2f} "
                  f"| {step:>10.4f}", flush=True)


if __name__ == "__main__":
    main()
