"""Speed of minisd's text-to-image pipeline against diffusers' StableDiffusionPipeline, on CPU.

Same components for both: the shipped U-Net and VAE (minisd's state dicts loaded into diffusers'
UNet2DConditionModel and AutoencoderKL through ``minisd.convert.diffusers_unet_config`` /
``diffusers_vae_config``), minisd's text states handed to both as ``prompt_embeds`` /
``negative_prompt_embeds``, the same DDIM scheduler settings and the same seed. Prints:

1. seconds per call, minisd / diffusers (goal: ratio ≤ 1.05), and the largest pixel difference;
2. classifier-free guidance as one batched U-Net call of 2B against two calls of B (same result);
3. seconds per image for the shipped model at batch 1 and a large batch, 25 and 50 steps, w = 7.5.

    python benchmarks/pipeline_speed.py                     # the shipped model, 1 thread, CPU clock
    python benchmarks/pipeline_speed.py --model /tmp/x/t2i_glyphs.safetensors --repeats 5 --clock wall

``--clock cpu`` (default) counts this process's CPU seconds, which other jobs on a shared machine do not
inflate: with one thread it is the wall time on an idle core. Each figure is the best of ``--repeats``
runs after a warm-up, minisd's and diffusers' runs alternating so that both see the same load.
"""

from __future__ import annotations

import argparse
import time

import torch

from minisd.convert import diffusers_scheduler, diffusers_unet_config, diffusers_vae_config
from minisd.pipeline import StableDiffusionPipeline, classifier_free_guidance
from minisd.samplers import sample

PROMPT, NEGATIVE = "a red letter K on a yellow background", ""
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def diffusers_twin(pipe: StableDiffusionPipeline, sampler: str = "ddim"):
    """diffusers' StableDiffusionPipeline holding minisd's U-Net and VAE weights; no text encoder (embeds given)."""
    import diffusers

    unet = diffusers.UNet2DConditionModel(**diffusers_unet_config(pipe.unet.config)).eval()
    unet.load_state_dict(pipe.unet.state_dict())  # identical key names, strict
    vae = diffusers.AutoencoderKL(**diffusers_vae_config(pipe.vae.config)).eval()
    vae.load_state_dict(pipe.vae.state_dict())
    theirs = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=diffusers_scheduler(sampler, pipe.schedule),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    return theirs


def best_seconds(fns: dict, repeats: int, clock) -> dict[str, float]:
    """Best time of each function over ``repeats`` rounds (the functions alternate within a round), after a warm-up."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: min(t) for name, t in times.items()}


def two_call_guidance(unet, prompt_embeds, negative_prompt_embeds, guidance_scale):
    """CFG as two U-Net calls of B rows each: the same ε̃, without batching."""
    def guided(x, t):
        eps_uncond = unet(x, t, encoder_hidden_states=negative_prompt_embeds)
        eps_cond = unet(x, t, encoder_hidden_states=prompt_embeds)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    return guided


def compare_with_diffusers(pipe, batch: int, steps: int, repeats: int, clock) -> None:
    cond, uncond = pipe.encode_prompt([PROMPT] * batch, 1, [NEGATIVE] * batch)
    common = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps, guidance_scale=7.5,
                  output_type="pt")
    theirs = diffusers_twin(pipe)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    run_ours = lambda: pipe(**common, generator=torch.Generator().manual_seed(0), progress=False).images  # noqa: E731
    run_theirs = lambda: theirs(**common, height=size, width=size, generator=torch.Generator().manual_seed(0)).images  # noqa: E731
    difference = (run_ours() - run_theirs()).abs().max().item()
    seconds = best_seconds({"minisd": run_ours, "diffusers": run_theirs}, repeats, clock)
    print(f"\n1. text-to-image, batch {batch}, DDIM {steps} steps, w = 7.5, output {size}×{size}")
    print(f"   minisd    {seconds['minisd']:7.3f} s\n   diffusers {seconds['diffusers']:7.3f} s")
    print(f"   ratio minisd / diffusers = {seconds['minisd'] / seconds['diffusers']:.3f} (goal ≤ 1.05); "
          f"max |Δ| of the images = {difference:.1e}")


def compare_batched_guidance(pipe, batch: int, steps: int, repeats: int, clock) -> None:
    cond, uncond = pipe.encode_prompt([PROMPT] * batch, 1, [NEGATIVE] * batch)
    x_T = torch.randn(batch, 4, pipe.unet.config.sample_size, pipe.unet.config.sample_size,
                      generator=torch.Generator().manual_seed(0))
    models = {"one call of 2B": classifier_free_guidance(pipe.unet, cond, uncond, 7.5),
              "two calls of B": two_call_guidance(pipe.unet, cond, uncond, 7.5)}
    runs = {name: (lambda m=m: sample(m, x_T, pipe.schedule, "ddim", steps, progress=False)) for name, m in models.items()}
    difference = (runs["one call of 2B"]() - runs["two calls of B"]()).abs().max().item()
    seconds = best_seconds(runs, repeats, clock)
    print(f"\n2. guided sampling loop (latents only), batch {batch}, DDIM {steps} steps")
    for name, s in seconds.items():
        print(f"   {name:15s} {s:7.3f} s")
    print(f"   two calls / one call = {seconds['two calls of B'] / seconds['one call of 2B']:.2f}; "
          f"max |Δ| of the latents = {difference:.1e}")


def seconds_per_image(pipe, batches: list[int], steps_list: list[int], repeats: int, clock) -> None:
    print("\n3. the shipped model, w = 7.5, DDIM: seconds per image")
    print(f"   {'batch':>5s} {'steps':>5s} {'s/call':>8s} {'s/image':>8s}")
    for batch in batches:
        for steps in steps_list:
            run = lambda: pipe([PROMPT] * batch, num_inference_steps=steps, guidance_scale=7.5, output_type="pt",  # noqa: E731
                               generator=torch.Generator().manual_seed(0), progress=False)
            s = best_seconds({"run": run}, max(1, repeats if batch < 32 else 1), clock)["run"]
            print(f"   {batch:5d} {steps:5d} {s:8.3f} {s / batch:8.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a U-Net .safetensors with its card (default: the shipped model)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16, help="batch of parts 1 and 2")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps of parts 1 and 2")
    parser.add_argument("--large-batch", type=int, default=64, help="the large batch of part 3")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = StableDiffusionPipeline.from_pretrained(args.model, device="cpu")
    clock = CLOCKS[args.clock]
    params = sum(p.numel() for p in pipe.unet.parameters())
    print(f"CPU, {torch.get_num_threads()} thread(s), {args.clock} clock, best of {args.repeats}; U-Net {params:,} "
          f"parameters, latents {pipe.unet.config.in_channels}×{pipe.unet.config.sample_size}², torch {torch.__version__}")
    compare_with_diffusers(pipe, args.batch_size, args.steps, args.repeats, clock)
    compare_batched_guidance(pipe, args.batch_size, args.steps, args.repeats, clock)
    seconds_per_image(pipe, [1, args.large_batch], [25, 50], args.repeats, clock)


if __name__ == "__main__":
    main()
