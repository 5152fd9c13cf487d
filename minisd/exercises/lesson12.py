"""Checks for lesson 12: inpainting (Blended Latent Diffusion, Avrahami et al. 2022, Alg. 1).

The central answer is a sampler callback, so the check calls it itself, step by step, on inputs where
every sub-step leaves a different trace: a pixel mask whose edges fall inside the f × f blocks of a
latent pixel (so that nearest, average and max downsampling differ), a different noise for every step
(so that the noise index shows), and timesteps far apart (so that noising to the current instead of the
next timestep shows). At the first step whose replacement x differs, it names the slip.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..pipeline import blend_latents, latent_mask
from ..schedules import NoiseSchedule
from .core import ExerciseError, not_written, randn

__all__ = ["check_downsample_mask", "check_blend_callback", "check_dilate_mask",
           "reference_downsample_mask", "reference_make_blend_callback", "reference_dilate_mask"]

TOL = 1e-5


def _close(a: Any, b: torch.Tensor) -> bool:
    return isinstance(a, torch.Tensor) and a.shape == b.shape and torch.allclose(a.detach().double(), b.double(), atol=TOL, rtol=TOL)


def _pixel_mask(batch: int = 2, size: int = 16) -> torch.Tensor:
    """(B, 1, size, size) of 0/1: a rectangle whose edges fall inside 4 × 4 blocks, and another per item."""
    mask = torch.zeros(batch, 1, size, size)
    mask[0, :, 2:11, 5:14] = 1.0  # top/left edges mid-block, bottom edge mid-block
    mask[1 % batch, :, 6:16, 0:7] = 1.0
    return mask


def _raise_first_slip(where: str, what: str, got: Any, expected: torch.Tensor, slips: list[tuple[torch.Tensor, str]]) -> None:
    if got is None:
        raise ExerciseError(f"{where} returned None: did you forget the `return`?")
    if not isinstance(got, torch.Tensor):
        raise ExerciseError(f"{where}: {what} is a {type(got).__name__}, expected a tensor {tuple(expected.shape)}.")
    if _close(got, expected):
        return
    for wrong, hint in slips:
        if _close(got, wrong) and not _close(wrong, expected):
            raise ExerciseError(f"{where}: {what} is wrong: {hint}.")
    if got.shape != expected.shape:
        raise ExerciseError(f"{where}: {what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}.")
    error = (got.detach().double() - expected.double()).abs()
    worst = tuple(int(i) for i in torch.unravel_index(error.argmax(), error.shape))
    raise ExerciseError(f"{where}: {what} has wrong values: largest difference {error.max().item():.3g} at index "
                        f"{worst} (expected {expected[worst].item():.6g}, got {got[worst].item():.6g}).")


# ----------------------------------------------------------------------------- 1. the mask at latent resolution


def reference_downsample_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) of 0/1 → (B, 1, h, w): latent pixel (i, j) takes pixel (f·i, f·j), as diffusers (nearest)."""
    return latent_mask(mask, size)


def check_downsample_mask(fn: Callable) -> Callable:
    """Check ``fn(mask, size)``: nearest-neighbour downsampling of a (B, 1, H, W) mask to ``size`` = (h, w)."""
    cases = [(_pixel_mask(), (4, 4)), (_pixel_mask(1, 32), (8, 8)), (_pixel_mask(2, 16), (8, 8))]
    for mask, size in cases:
        where = f"`downsample_mask` on input (mask {tuple(mask.shape)}, size={size})"
        try:
            got = fn(mask.clone(), size)
        except NotImplementedError:
            return not_written("downsample_mask", reference_downsample_mask)
        except Exception as error:
            raise ExerciseError(f"{where} raised {type(error).__name__}: {error}") from error
        f = mask.shape[-1] // size[-1]
        slips = [(F.interpolate(mask, size=size, mode="bilinear"), "the values are blends (bilinear): a latent pixel "
                  "must be either repainted or kept; use mode='nearest'"),
                 (F.avg_pool2d(mask, f), "the values are block averages (area): a latent pixel must be either "
                  "repainted or kept; use mode='nearest'"),
                 (F.max_pool2d(mask, f), "a latent pixel repaints when ANY pixel of its block is masked: that "
                  "dilates the mask (exercise 3); here take the top-left pixel of each block, as mode='nearest'"),
                 (F.interpolate(mask, size=size, mode="nearest-exact"), "you took the pixel at the block's "
                  "centre (nearest-exact); diffusers takes the top-left one, F.interpolate(mode='nearest')"),
                 (1 - reference_downsample_mask(mask, size), "the mask is inverted: keep 1 = repaint")]
        _raise_first_slip(where, "the latent mask", got, reference_downsample_mask(mask, size), slips)
    print(f"✅ `downsample_mask` matches diffusers' nearest-neighbour mask on {len(cases)} inputs.")
    return fn


# ----------------------------------------------------------------------------- 2. the blend step


def reference_make_blend_callback(schedule: NoiseSchedule, image_latents: torch.Tensor, mask: torch.Tensor,
                                  timesteps: torch.Tensor, noises: torch.Tensor) -> Callable:
    """BLD's step as a sampler callback: after step i the known region is z_0 noised to timesteps[i + 1].

    image_latents: z_0, (B, 4, h, w) scaled; mask: (B, 1, H, W) pixels, 1 = repaint; timesteps: (n,) the
    sampler's; noises: (n, B, 4, h, w), noises[i] the ε for the known region after step i.
    """
    m = reference_downsample_mask(mask, tuple(image_latents.shape[-2:]))  # (B, 1, h, w)
    n = len(timesteps)

    def blend(i: int, t: int, x: torch.Tensor) -> torch.Tensor:
        if i + 1 < n:  # x is at timesteps[i + 1] now: bring the known latents to the same level
            known = schedule.add_noise(image_latents, noises[i], timesteps[i + 1])
        else:  # after the last step x is clean, and so is the input
            known = image_latents
        return blend_latents(x, known, m)  # m ⊙ x + (1 − m) ⊙ known

    return blend


def _blend_slips(schedule, z, mask, timesteps, noises, i: int, x: torch.Tensor) -> list[tuple[torch.Tensor, str]]:
    """What the replacement x looks like after each common slip, at step i."""
    n, size = len(timesteps), tuple(z.shape[-2:])
    f = mask.shape[-1] // size[-1]
    m = reference_downsample_mask(mask, size)
    t_now, last = int(timesteps[i]), i + 1 == n
    known = z if last else schedule.add_noise(z, noises[i], timesteps[i + 1])
    slips = [((1 - m) * x + m * known, "the mask is inverted: m = 1 marks the region to REPAINT, where the model's "
              "x stays; the known latents go where m = 0"),
             (x, "x came back unchanged: paste the known latents outside the mask"),
             (known, "only the known latents came back: keep the model's x inside the mask")]
    for other, how in ((F.avg_pool2d(mask, f), "by block averages"), (F.max_pool2d(mask, f), "by max-pooling"),
                       (F.interpolate(mask, size=size, mode="bilinear"), "bilinearly"),
                       (F.interpolate(mask, size=size, mode="nearest-exact"), "at the block centres")):
        slips.append((blend_latents(x, known, other), f"the mask was downsampled {how}; take the nearest "
                      "(top-left) pixel of each block, as downsample_mask"))
    if last:
        slips.append((blend_latents(x, schedule.add_noise(z, noises[i], t_now), m), "after the LAST step x is clean: "
                      "paste the clean image latents there, not noised ones"))
    else:
        t_next = int(timesteps[i + 1])
        slips.append((blend_latents(x, schedule.add_noise(z, noises[i], t_now), m), f"the known latents were noised "
                      f"to the CURRENT timestep t = {t_now}; after step i the sampler's x is at timesteps[i + 1] = "
                      f"{t_next}: noise them to that"))
        slips.append((blend_latents(x, schedule.add_noise(z, noises[i + 1], timesteps[i + 1]), m),
                      "the known latents use noises[i + 1]; after step i use noises[i]"))
        slips.append((blend_latents(x, z, m), "the known latents were pasted clean before the last step: noise them "
                      f"to timesteps[i + 1] = {t_next}, the level of x"))
    return slips


def _localise(got: torch.Tensor, expected: torch.Tensor, m: torch.Tensor) -> str:
    wrong = ((got - expected).abs() > TOL).any(1, keepdim=True)  # (B, 1, h, w)
    inside, outside = bool((wrong & (m > 0.5)).any()), bool((wrong & (m < 0.5)).any())
    if inside and not outside:
        return "inside the mask (m = 1, where the model's x should be kept)"
    if outside and not inside:
        return "outside the mask (m = 0, where the noised known latents belong)"
    return "inside and outside the mask"


def check_blend_callback(fn: Callable) -> Callable:
    """Check ``fn(schedule, image_latents, mask, timesteps, noises)`` -> ``callback(i, t, x)`` returning the new x."""
    schedule = NoiseSchedule.stable_diffusion()
    for label, n, batch in (("5 steps, batch 2", 5, 2), ("3 steps, batch 1", 3, 1)):
        timesteps = schedule.inference_timesteps(n, "leading", 1)
        z, mask = randn(batch, 4, 4, 4, seed=120 + n), _pixel_mask(batch, 16)
        noises = randn(n, batch, 4, 4, 4, seed=121 + n)
        where = f"`make_blend_callback` on input ({label}: image_latents {tuple(z.shape)}, mask {tuple(mask.shape)})"
        try:
            callback = fn(schedule, z.clone(), mask.clone(), timesteps.clone(), noises.clone())
        except NotImplementedError:
            return not_written("make_blend_callback", reference_make_blend_callback)
        except Exception as error:
            raise ExerciseError(f"{where} raised {type(error).__name__}: {error}") from error
        if not callable(callback):
            raise ExerciseError(f"{where} returned a {type(callback).__name__}: return the function blend(i, t, x).")
        reference = reference_make_blend_callback(schedule, z, mask, timesteps, noises)
        m = reference_downsample_mask(mask, (4, 4))
        for i in range(n):
            x = randn(batch, 4, 4, 4, seed=130 + 10 * n + i)
            step = f"{where}, after step i = {i} (t = {int(timesteps[i])}{', the last' if i == n - 1 else ''})"
            try:
                got = callback(i, int(timesteps[i]), x.clone())
            except NotImplementedError:
                return not_written("make_blend_callback", reference_make_blend_callback)
            except RuntimeError as error:
                hint = (" Hint: the mask is (B, 1, H, W) in pixels and x is (B, 4, h, w) in latents: downsample the mask "
                        "to x's size first (downsample_mask)." if "size" in str(error) or "match" in str(error) else "")
                raise ExerciseError(f"{step} raised RuntimeError: {error}.{hint}") from error
            except IndexError as error:
                hint = (f" After the last step (i = {n - 1}) there is no timesteps[i + 1]: x is clean, paste the clean "
                        "image latents." if i == n - 1 else "")
                raise ExerciseError(f"{step} raised IndexError: {error}.{hint}") from error
            except Exception as error:
                raise ExerciseError(f"{step} raised {type(error).__name__}: {error}") from error
            expected = reference(i, int(timesteps[i]), x)
            if isinstance(got, torch.Tensor) and got.shape == expected.shape and not _close(got, expected):
                slips = _blend_slips(schedule, z, mask, timesteps, noises, i, x)
                for wrong, hint in slips:
                    if _close(got, wrong) and not _close(wrong, expected):
                        raise ExerciseError(f"{step}: the replacement x is wrong: {hint}.")
                raise ExerciseError(f"{step}: the replacement x is wrong {_localise(got, expected, m)}; largest "
                                    f"difference {(got - expected).abs().max().item():.3g}.")
            _raise_first_slip(step, "the replacement x", got, expected, [])
    print("✅ `make_blend_callback` matches the reference at every step of 2 runs.")
    return fn


# ----------------------------------------------------------------------------- 3. dilation


def reference_dilate_mask(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Grow the repaint region by ``radius`` pixels in every direction (square window): (B, 1, H, W) → same."""
    return F.max_pool2d(mask, 2 * radius + 1, stride=1, padding=radius)


def check_dilate_mask(fn: Callable) -> Callable:
    """Check ``fn(mask, radius)``: binary dilation with a (2r + 1) × (2r + 1) square, same shape as mask."""
    cases = [(_pixel_mask(), 1), (_pixel_mask(), 3), (_pixel_mask(1, 32), 2), (_pixel_mask(), 0)]
    for mask, radius in cases:
        where = f"`dilate_mask` on input (mask {tuple(mask.shape)}, radius={radius})"
        try:
            got = fn(mask.clone(), radius)
        except NotImplementedError:
            return not_written("dilate_mask", reference_dilate_mask)
        except Exception as error:
            raise ExerciseError(f"{where} raised {type(error).__name__}: {error}") from error
        if isinstance(got, torch.Tensor) and got.dtype == torch.bool:
            got = got.float()
        slips = [(-F.max_pool2d(-mask, 2 * radius + 1, stride=1, padding=radius), "the mask shrank (erosion, a min): "
                  "dilation takes the max over the window"),
                 (F.max_pool2d(mask, 2 * radius + 1, stride=1), "the result is smaller than the mask: pad by the radius "
                  "(padding=radius) so that the shape stays (B, 1, H, W)")]
        if radius > 0:
            slips.append((reference_dilate_mask(mask, 2 * radius), "the mask grew by 2·radius: the window is "
                          "2·radius + 1 wide, so it reaches radius pixels each way"))
        _raise_first_slip(where, "the dilated mask", got, reference_dilate_mask(mask, radius), slips)
    print(f"✅ `dilate_mask` matches the reference on {len(cases)} inputs.")
    return fn
