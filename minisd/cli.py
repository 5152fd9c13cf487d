"""The command line: ``python -m minisd generate|img2img|inpaint …`` (or ``minisd …`` once installed).

Every pipeline argument is a flag with diffusers' name in kebab case; the course's shipped model is the
default; images are written as PNG. Examples:

    minisd generate --prompt "a red letter K on a yellow background" --seed 0 --output k.png
    minisd img2img --image k.png --prompt "a blue letter K on a yellow background" --strength 0.6
    minisd inpaint --image k.png --mask mask.png --prompt "a green letter Q on a yellow background"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .samplers import SAMPLERS

COMMANDS = {
    "generate": "text-to-image: draw what the prompt says",
    "img2img": "image-to-image: start from --image, noised by --strength, and steer it with the prompt",
    "inpaint": "inpainting: redraw the white part of --mask in --image, keep the rest",
}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="what to draw, e.g. \"a red letter K on a yellow background\"")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (replaces \"\" in guidance)")
    p.add_argument("--num-inference-steps", "--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--guidance-scale", "--cfg", type=float, default=7.5,
                   help="classifier-free guidance w ≥ 0: 1 = none, higher = follow the prompt more (default 7.5)")
    p.add_argument("--sampler", default="ddim", choices=SAMPLERS, help="the sampler (default ddim)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's η in [0, 1] (ddim only; default 0)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same image (default 0)")
    p.add_argument("--num-images-per-prompt", "--num-images", type=int, default=1, help="images to draw (default 1)")
    p.add_argument("--output", "-o", type=Path, default=Path("minisd.png"),
                   help="PNG to write; several images become NAME-0.png, NAME-1.png, … (default minisd.png)")
    p.add_argument("--model", type=Path, default=None, help="a U-Net .safetensors with its card (default: the shipped model)")
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: MINISD_DEVICE, else the best available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minisd", description="Generate images with the course's Stable Diffusion.",
                                     epilog="Run `minisd COMMAND --help` for a command's flags.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = commands.add_parser(name, help=help_text, description=help_text)
        _add_common(p)
        if name == "generate":
            p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the training size)")
            p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the training size)")
        else:
            p.add_argument("--image", type=Path, required=True, help="the input image (any format PIL reads)")
            default = "1.0" if name == "inpaint" else "0.8"
            p.add_argument("--strength", type=float, default=float(default),
                           help=f"in [0, 1]: how much of the input to noise away (default {default})")
        if name == "inpaint":
            p.add_argument("--mask", type=Path, required=True, help="the mask: white = redraw, black = keep; same size")
            p.add_argument("--blend-noise", default="fresh", choices=("fresh", "fixed"),
                           help="noise for the kept region: fresh each step (BLD paper) or fixed (diffusers)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from PIL import Image  # heavy imports after --help

    import torch

    from .pipeline import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.model, device=args.device)
    kwargs = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.num_inference_steps,
                  guidance_scale=args.guidance_scale, sampler=args.sampler, eta=args.eta,
                  num_images_per_prompt=args.num_images_per_prompt, progress=not args.quiet,
                  generator=torch.Generator().manual_seed(args.seed))
    if args.command == "generate":
        kwargs |= dict(height=args.height, width=args.width)
    else:
        kwargs |= dict(image=Image.open(args.image).convert("RGB"), strength=args.strength)
    if args.command == "inpaint":
        kwargs |= dict(mask_image=Image.open(args.mask).convert("L"), blend_noise=args.blend_noise)
    try:
        images = pipe(**kwargs).images
    except (ValueError, TypeError) as error:  # bad input: say what, write nothing
        print(f"minisd {args.command}: error: {error}", file=sys.stderr)
        return 2
    paths = [args.output] if len(images) == 1 else [args.output.with_name(f"{args.output.stem}-{i}.png")
                                                   for i in range(len(images))]
    for image, path in zip(images, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="PNG")
        print(f"wrote {path}")
    return 0
