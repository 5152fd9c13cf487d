"""SD v1.5's U-Net at full size on this machine: minisd vs diffusers (time), and the peak memory of a
guided 512² step with fused vs written-out attention. Prints the figures; asserts nothing.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/sd_unet_speed.py      # all of it: ~5 min, ~4.5 GB, on 2 cores
    python benchmarks/sd_unet_speed.py --repeats 3 --skip-memory          # the time ratio only

Random weights at SD v1.5's config (``UNetConfig.stable_diffusion_v1()``, 859,520,964 parameters): no
machine here can download the real ones, and the time and memory of a forward pass do not depend on
the values. One copy of the weights is shared by both models (``load_state_dict(assign=True)``), as in
tests/test_sd_full_size.py, so the comparison needs ~3.5 GB rather than 7.

* **Time**: one U-Net forward on a (1, 4, 64, 64) latent (a 512² image) with (1, 77, 768) text states,
  diffusers' ``UNet2DConditionModel`` and minisd's ``UNet`` alternated, the median of ``--repeats``
  calls each after one warm-up call each. Goal: minisd / diffusers ≤ 1.0×.
* **Memory**: one guided generation step, the U-Net on a batch of 2 (unconditional and conditional
  halves), each variant in a fresh subprocess: the peak resident memory above what the process held
  just before the step (weights, inputs), from Linux's /proc/self/status (VmHWM, reset through
  /proc/self/clear_refs). Variants: "fused", minisd as it is (``F.scaled_dot_product_attention``,
  which never stores the N × N matrix), and "written out", the same model with every attention
  computed as softmax(QKᵀ/√d)V explicitly (``sdpa_kernel(SDPBackend.MATH)``, PyTorch's reference
  implementation of that formula). Lesson 13 predicts the size of one such matrix.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minisd.convert import diffusers_unet_config  # noqa: E402
from minisd.nn import UNet, UNetConfig  # noqa: E402

LATENT_SHAPE, TEXT_SHAPE = (4, 64, 64), (77, 768)  # SD v1.5 at 512²: latents and CLIP states per image
VARIANTS = ("fused", "written out")


def inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, *LATENT_SHAPE, generator=g), torch.randn(batch, *TEXT_SHAPE, generator=g)


@torch.no_grad()
def compare_time(repeats: int) -> None:
    import diffusers

    config = UNetConfig.stable_diffusion_v1()
    torch.manual_seed(0)
    start = time.perf_counter()
    theirs = diffusers.UNet2DConditionModel(**diffusers_unet_config(config)).eval()
    with torch.device("meta"):
        ours = UNet(config)
    ours.load_state_dict(theirs.state_dict(), assign=True)  # strict; the same tensors, not copies
    ours.eval()
    print(f"built SD v1.5's U-Net ({ours.num_parameters:,} parameters, shared by both) in {time.perf_counter() - start:.0f} s")
    latents, states = inputs(1)
    models = {"diffusers": lambda: theirs(latents, 500, encoder_hidden_states=states).sample,
              "minisd": lambda: ours(latents, 500, encoder_hidden_states=states)}
    outputs = {name: run() for name, run in models.items()}  # warm-up, and the outputs to compare
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, run in models.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    print(f"U-Net forward, (1, 4, 64, 64) latents, {torch.get_num_threads()} thread(s), median of {repeats}: "
          + ", ".join(f"{name} {median[name]:.1f} s ({', '.join(f'{s:.1f}' for s in seconds[name])})" for name in models))
    print(f"  time ratio minisd / diffusers: {median['minisd'] / median['diffusers']:.2f}× (goal ≤ 1.0×); "
          f"max |Δ| of the outputs = {(outputs['minisd'] - outputs['diffusers']).abs().max().item():.2e}")


def _status(field: str) -> int:
    """A size from /proc/self/status in bytes (VmRSS: now, VmHWM: the peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


@torch.no_grad()
def child_memory(variant: str) -> dict:
    """One guided step (batch 2) of a freshly built SD v1.5 U-Net; runs inside its own process."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    unet = UNet(UNetConfig.stable_diffusion_v1()).eval()
    latents, states = inputs(2)
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current resident size
    before = _status("VmRSS:")
    start = time.perf_counter()
    if variant == "written out":
        with sdpa_kernel(SDPBackend.MATH):  # softmax(QKᵀ/√d)V with the N × N matrix in memory
            unet(latents, 500, encoder_hidden_states=states)
    else:
        unet(latents, 500, encoder_hidden_states=states)
    return {"variant": variant, "seconds": time.perf_counter() - start, "weights": weights, "before": before,
            "peak_above": _status("VmHWM:") - before}


def compare_memory(threads: int) -> None:
    if not Path("/proc/self/clear_refs").exists():
        print("memory: skipped (needs Linux's /proc/self/clear_refs to reset the peak)")
        return
    results = []
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--child", variant, "--threads", str(threads)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"one guided 512² step (U-Net, batch 2), {threads} thread(s), each variant in a fresh process:")
    for r in results:
        print(f"  {r['variant']:12s} peak {r['peak_above'] / 1e9:5.2f} GB above the {r['before'] / 1e9:.2f} GB held before "
              f"the step (weights {r['weights'] / 1e9:.2f} GB); {r['seconds']:.1f} s")
    fused, written = (r["peak_above"] for r in results)
    print(f"  written out / fused: {written / fused:.1f}× the extra memory; one (2, 8, 4096, 4096) float32 attention "
          f"matrix is {2 * 8 * 4096 ** 2 * 4 / 1e9:.2f} GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per model after one warm-up each")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one memory variant
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child_memory(args.child)))
        return
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    if not args.skip_time:
        compare_time(args.repeats)
    if not args.skip_memory:
        compare_memory(args.threads)


if __name__ == "__main__":
    main()
