"""A prompt UI in the notebook: the form of AUTOMATIC1111's Stable Diffusion WebUI, on minisd's pipeline.

    ui = PromptUI(StableDiffusionPipeline.from_pretrained())
    ui            # in a notebook: prompt, negative prompt, steps, CFG scale, seed, sampler, size → image

Every control is one argument of ``StableDiffusionPipeline.__call__``; ``WEBUI_PARAMETERS`` maps the
WebUI's names to ours (``webui_table()`` renders it as markdown). Pressing *Generate* calls the pipeline
once, moves the progress bar after each sampler step (the pipeline's ``callback``), and shows the
images, enlarged without smoothing so that 32×32 pixels stay sharp. A ``ValueError`` from the pipeline
(e.g. a size that is not a multiple of 16) is shown in the status line instead of raising.
"""

from __future__ import annotations

import html
import io
import random
import time

import ipywidgets as widgets
import torch
from PIL import Image

from .samplers import SAMPLERS

DISPLAY_HEIGHT_PX = 192  # shown height of each image: 32×32 pixels are unreadably small at 1:1
MAX_SEED = 2**31 - 1  # the WebUI's seeds are 32-bit; -1 draws a random one, as there
MAX_BATCH = 8  # images per press (num_images_per_prompt)
SIZE_MULTIPLES = 8  # size choices: 1…8 × the pipeline's size multiple (16 px for the course model)

# (WebUI name, minisd argument, what it does / how ours differs). The WebUI's labels as in its txt2img tab.
WEBUI_PARAMETERS = (
    ("Prompt", "`prompt`", "what to draw; tokenised to 16 positions (SD: 77, the WebUI chains several 75-token chunks)"),
    ("Negative prompt", "`negative_prompt`", "takes the place of \"\" in the unconditional half of CFG"),
    ("Sampling steps", "`num_inference_steps`", "denoising steps; leading spacing, offset 1 (SD v1's scheduler)"),
    ("Sampling method", "`sampler`", "DDIM, Euler, Euler a, DPM++ 2M, Heun, DDPM: `ddim`, `euler`, `euler_ancestral`, "
     "`dpmpp_2m`, `heun`, `ddpm`"),
    ("Schedule type: Karras (older WebUIs: \"DPM++ 2M Karras\")", "`use_karras_sigmas=True`", "Karras et al.'s σ spacing (eq. 5, ρ = 7) for "
     "`euler`, `euler_ancestral`, `heun`, `dpmpp_2m`; DPM++ 2M Karras = `sampler=\"dpmpp_2m\", use_karras_sigmas=True`"),
    ("CFG Scale", "`guidance_scale`", "w in ε_u + w (ε_c − ε_u); 1 = no guidance (one U-Net call), WebUI default 7"),
    ("Seed", "`generator=torch.Generator().manual_seed(seed)`", "the same seed, same image; −1 draws a random seed"),
    ("Width / Height", "`width` / `height`", "pixels, multiples of 16 here (8 in SD); the model was trained at 32×32"),
    ("Batch size", "`num_images_per_prompt`", "images drawn together in one batch; one generator draws all their "
     "noise (the WebUI gives image i the seed + i)"),
    ("Batch count", "a loop over calls", "batches one after another, each with the next seeds"),
    ("Denoising strength", "`strength` (with `image`)", "img2img: how much of the input is noised away (lesson 11)"),
    ("Inpaint (mask)", "`mask_image`", "repaint the white part of the mask (lesson 12)"),
    ("Eta (settings)", "`eta`", "DDIM's η: 0 deterministic, 1 as noisy as DDPM"),
    ("Clip skip (settings)", "—", "which text-encoder layer; minisd uses the last (lesson 07)"),
    ("Hires. fix, Restore faces, Tiling", "—", "extra passes and models outside SD's pipeline; not in minisd"),
)


def webui_table() -> str:
    """``WEBUI_PARAMETERS`` as a markdown table."""
    rows = [f"| {webui} | {ours} | {note} |" for webui, ours, note in WEBUI_PARAMETERS]
    return "\n".join(["| AUTOMATIC1111 WebUI | minisd | notes |", "|---|---|---|", *rows])


def to_png(images: list[Image.Image], height: int = DISPLAY_HEIGHT_PX) -> bytes:
    """PIL images side by side, each enlarged by an integer factor (nearest neighbour) to about ``height`` px."""
    zoom = max(1, height // max(im.height for im in images))
    row = Image.new("RGB", (sum(im.width * zoom + 4 for im in images) - 4, max(im.height for im in images) * zoom), "white")
    x = 0
    for im in images:
        row.paste(im.resize((im.width * zoom, im.height * zoom), Image.NEAREST), (x, 0))
        x += im.width * zoom + 4
    buffer = io.BytesIO()
    row.save(buffer, format="PNG")
    return buffer.getvalue()


class PromptUI:
    """Widgets for one text-to-image call of ``pipe`` (a ``StableDiffusionPipeline``), and its result.

    The controls are attributes named after the pipeline's arguments (``prompt``, ``negative_prompt``,
    ``num_inference_steps``, ``guidance_scale``, ``seed``, ``sampler``, ``use_karras_sigmas``, ``width``, ``height``,
    ``num_images_per_prompt``); ``button`` generates, ``progress`` counts steps, ``image`` shows the
    result, ``status`` says what was drawn and how long it took. ``widget`` is the whole form.
    """

    def __init__(self, pipe, prompt: str = "a red letter K on a yellow background", negative_prompt: str = "",
                 num_inference_steps: int = 25, guidance_scale: float = 7.5, seed: int = 0, sampler: str = "ddim") -> None:
        self.pipe = pipe
        style = {"description_width": "120px"}
        wide = widgets.Layout(width="420px")
        self.prompt = widgets.Textarea(prompt, description="Prompt", rows=2, style=style, layout=wide)
        self.negative_prompt = widgets.Text(negative_prompt, description="Negative prompt", style=style, layout=wide)
        self.num_inference_steps = widgets.IntSlider(num_inference_steps, min=1, max=150, description="Sampling steps", style=style)
        self.sampler = widgets.Dropdown(options=SAMPLERS, value=sampler, description="Sampling method", style=style)
        self.use_karras_sigmas = widgets.Checkbox(False, description="Karras σ spacing", style=style)
        self.guidance_scale = widgets.FloatSlider(guidance_scale, min=0.0, max=20.0, step=0.5, description="CFG scale", style=style)
        self.seed = widgets.BoundedIntText(seed, min=-1, max=MAX_SEED, description="Seed (−1: random)", style=style)
        training_size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        sizes = [pipe.size_multiple * k for k in range(1, SIZE_MULTIPLES + 1)]
        sizes = sorted(set(sizes) | {training_size})
        self.width = widgets.Dropdown(options=sizes, value=training_size, description="Width", style=style)
        self.height = widgets.Dropdown(options=sizes, value=training_size, description="Height", style=style)
        self.num_images_per_prompt = widgets.IntSlider(1, min=1, max=MAX_BATCH, description="Batch size", style=style)
        self.button = widgets.Button(description="Generate", button_style="primary", icon="paint-brush")
        self.progress = widgets.IntProgress(0, min=0, max=num_inference_steps, description="steps", style=style)
        self.status = widgets.HTML("")
        self.image = widgets.Image(format="png")
        self.images: list[Image.Image] = []  # the last result, as PIL images
        self.last_kwargs: dict = {}  # the last call's arguments (what reached the pipeline)
        self.button.on_click(self.generate)
        controls = widgets.VBox([self.prompt, self.negative_prompt, self.num_inference_steps, self.sampler,
                                 self.use_karras_sigmas, self.guidance_scale, self.seed, widgets.HBox([self.width, self.height]),
                                 self.num_images_per_prompt, self.button])
        self.widget = widgets.HBox([controls, widgets.VBox([self.image, self.progress, self.status])])

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def pipeline_kwargs(self) -> dict:
        """The pipeline's arguments as the controls set them (a seed of −1 is drawn here)."""
        seed = self.seed.value if self.seed.value >= 0 else random.SystemRandom().randint(0, MAX_SEED)
        return dict(prompt=self.prompt.value, negative_prompt=self.negative_prompt.value or None,
                    num_inference_steps=self.num_inference_steps.value, guidance_scale=self.guidance_scale.value,
                    sampler=self.sampler.value, use_karras_sigmas=self.use_karras_sigmas.value,
                    height=self.height.value, width=self.width.value,
                    num_images_per_prompt=self.num_images_per_prompt.value, seed=seed)

    def _step(self, i: int, t: int, x: torch.Tensor) -> None:
        """The pipeline's callback after sampler step i: move the bar (and leave x as it is)."""
        self.progress.value = i + 1

    def generate(self, _button=None) -> list[Image.Image]:
        """One pipeline call with the current settings; shows and returns the images ([] on bad input)."""
        kwargs = self.pipeline_kwargs()
        seed = kwargs.pop("seed")
        self.progress.max, self.progress.value = kwargs["num_inference_steps"], 0
        self.button.disabled = True
        self.status.value = "generating…"
        start = time.perf_counter()
        try:
            images = self.pipe(**kwargs, generator=torch.Generator().manual_seed(seed), output_type="pil",
                               callback=self._step, progress=False).images
        except (ValueError, TypeError) as error:  # bad settings: say what, keep the last image
            self.status.value = f"<span style='color:#b00'>{html.escape(str(error))}</span>"
            return []
        finally:
            self.button.disabled = False
        self.last_kwargs = kwargs | {"seed": seed}
        self.images = images
        self.image.value = to_png(images)
        karras = " Karras" if kwargs["use_karras_sigmas"] else ""
        self.status.value = (f"seed {seed} · {kwargs['sampler']}{karras}, {kwargs['num_inference_steps']} steps, "
                             f"CFG {kwargs['guidance_scale']:g} · {kwargs['width']}×{kwargs['height']} · "
                             f"{time.perf_counter() - start:.1f} s")
        return images
