"""Checks for lesson 05: the VAE.

The first three answers are one formula each and are compared value by value (``core.check``). The
VQ quantiser has four steps (nearest entries, lookup, the two-term loss, the straight-through
gradient); its check hands the learner's function a ``VectorQuantizer`` with a known codebook, then
checks the steps in that order, with autograd for the two that only gradients can tell apart (which
term moves the codebook, which moves the encoder output), and names the first that diverges.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..nn.vq import VectorQuantizer
from .core import Case, ExerciseError, check, randn

__all__ = ["check_reparameterize", "check_kl_divergence", "check_scaling_factor", "check_vector_quantize",
           "reference_vector_quantize"]

TOL = 1e-5  # float32 answers computed in another order differ by ~1e-7 here


def _reference_reparameterize(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return mean + torch.exp(0.5 * logvar) * noise


def check_reparameterize(fn: Callable) -> Callable:
    """Check ``fn(mean, logvar, noise)``: z = μ + σ ε with σ = exp(½ log σ²) (Kingma & Welling 2014, eq. 10)."""
    mean, noise = randn(2, 4, 3, 3, seed=13), randn(2, 4, 3, 3, seed=14)
    cases = [Case({"mean": mean, "logvar": logvar, "noise": noise}, label)
             for logvar, label in [(torch.zeros(2, 4, 3, 3), "log σ² = 0 (σ = 1)"),
                                   (torch.full((2, 4, 3, 3), -4.0), "log σ² = -4 (σ = e⁻²)"),
                                   (randn(2, 4, 3, 3, seed=15), "random log σ²")]]
    return check("reparameterize", fn, _reference_reparameterize, cases)


def _reference_kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def check_kl_divergence(fn: Callable) -> Callable:
    """Check ``fn(mean, logvar)``: KL(N(μ, σ²) ‖ N(0, 1)) summed over each image's latents, shape (B,)."""
    cases = [Case({"mean": torch.zeros(2, 4, 2, 2), "logvar": torch.zeros(2, 4, 2, 2)}, "the prior itself: KL = 0"),
             Case({"mean": randn(3, 4, 2, 2, seed=16), "logvar": torch.zeros(3, 4, 2, 2)}, "σ = 1, random μ"),
             Case({"mean": randn(3, 4, 2, 2, seed=17), "logvar": randn(3, 4, 2, 2, seed=18) - 3}, "small σ")]
    return check("kl_divergence", fn, _reference_kl_divergence, cases, atol=1e-4, rtol=1e-5)


def _reference_scaling_factor(latents: torch.Tensor) -> torch.Tensor:
    return torch.tensor(1.0 / latents.float().std().item())


def check_scaling_factor(fn: Callable) -> Callable:
    """Check ``fn(latents)``: 1 / (standard deviation of all latent values), SD's recipe for 0.18215."""
    cases = [Case({"latents": randn(64, 4, 8, 8, seed=19) * scale + shift}, f"std {scale}, mean {shift}")
             for scale, shift in [(5.5, 0.0), (0.5, 0.2), (1.0, -1.0)]]
    return check("scaling_factor", fn, _reference_scaling_factor, cases, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- 4. the VQ quantiser

MARGIN = 1e-3  # every case's nearest entry beats the runner-up by this much, so float32 answers agree on it
GRAD_TOL = 1e-3  # relative tolerance on the loss's gradient coefficients (float32 sums over ~100 values)


Quantized = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (z_q, loss, codes), as VectorQuantizer.forward


def reference_vector_quantize(quantizer: VectorQuantizer, z: torch.Tensor) -> Quantized:
    """minisd's ``VectorQuantizer`` forward: (z_q with a straight-through gradient, loss (), codes (B, H, W))."""
    return quantizer(z)


def _rows(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B·H·W, C): one row per latent pixel, row b·H·W + y·W + x = pixel (b, y, x)."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def _squared_distances(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return (flat[:, None, :] - codebook[None]).pow(2).sum(-1)  # (N, K), exact in float64


def _quantizer_case(seed: int, B: int, C: int, H: int, W: int, K: int,
                    beta: float) -> tuple[VectorQuantizer, torch.Tensor]:
    """A quantizer with K entries of varied length (so ‖e‖² matters) and latents z whose nearest entry is
    clear at every pixel, for the right flattening and for the channel-mixing one alike."""
    g = torch.Generator().manual_seed(seed)
    quantizer = VectorQuantizer(K, C, beta=beta)
    while True:
        codebook = torch.randn(K, C, generator=g) * (0.5 + torch.rand(K, 1, generator=g))
        z = torch.randn(B, C, H, W, generator=g)
        gaps = [_squared_distances(flat.double(), codebook.double()).sort(1).values.diff(dim=1)[:, 0].min()
                for flat in (_rows(z), z.reshape(-1, C))]
        if min(gaps) > MARGIN:
            break
    with torch.no_grad():
        quantizer.embedding.weight.copy_(codebook)
    return quantizer, z


def _unpack(where: str, got: Any, shape: tuple[int, ...]) -> Quantized:
    """(z_q, loss, codes) from the answer, naming a wrong count, type or order."""
    if not isinstance(got, (tuple, list)) or len(got) != 3:
        raise ExerciseError(f"{where} should return three things, (z_q, loss, codes) as VectorQuantizer does; "
                            f"got {type(got).__name__}{f' of {len(got)}' if isinstance(got, (tuple, list)) else ''}.")
    for what, value in zip(("z_q", "loss", "codes"), got):
        if not isinstance(value, torch.Tensor):
            hint = " (keep the loss a tensor: no .item(), it must carry gradients)" if what == "loss" else ""
            raise ExerciseError(f"{where}: {what} is a {type(value).__name__}, expected a tensor{hint}.")
    B, C, H, W = shape
    role = lambda t: ("z_q" if t.shape == shape and t.is_floating_point() else "loss" if t.numel() == 1  # noqa: E731
                      else "codes" if not t.is_floating_point() and t.numel() == B * H * W else None)
    roles = [role(t) for t in got]
    if sorted(r or "" for r in roles) == ["codes", "loss", "z_q"] and roles != ["z_q", "loss", "codes"]:
        raise ExerciseError(f"{where}: you return ({', '.join(roles)}); return them in the order (z_q, loss, codes).")
    return tuple(got)


def _check_codes(where: str, codes: torch.Tensor, z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Step 1: the nearest entry at every pixel (eq. 1), in pixel order; returns the right codes (B·H·W,)."""
    (B, C, H, W), K = z.shape, codebook.shape[0]
    flat, e = _rows(z.detach().double()), codebook.detach().double()
    d2 = _squared_distances(flat, e)  # (B·H·W, K)
    right = d2.argmin(1)
    if codes.is_floating_point() or codes.dtype == torch.bool:
        raise ExerciseError(f"{where}: codes has dtype {codes.dtype}; codes are entry indices, integers "
                            "(argmin gives int64).")
    if codes.shape != (B, H, W):
        hint = ("reshape them to (B, H, W)" if codes.numel() == B * H * W else
                "one index per latent pixel: argmin over the K entries, dim=1 of the (B·H·W, K) distances")
        raise ExerciseError(f"{where}: codes has shape {tuple(codes.shape)}, expected (B, H, W) = {(B, H, W)}: {hint}.")
    got = codes.reshape(-1).long()
    if torch.equal(got, right):
        return right
    dot = flat @ e.T
    slips = [
        (d2.argmax(1), "each pixel got its FARTHEST entry: take argmin of the distances, not argmax"),
        (dot.argmax(1), "the entries are ranked by z·e alone; entries differ in length, so the distance needs all "
                        "three terms, ‖z‖² − 2 z·e + ‖e‖²"),
        ((flat.pow(2).sum(1, keepdim=True) + 2 * dot + e.pow(2).sum(1)).argmin(1),
         "the cross term has the wrong sign: ‖z − e‖² = ‖z‖² − 2 z·e + ‖e‖²"),
        (_squared_distances(z.detach().double().reshape(-1, C), e).argmin(1),
         "the vectors compared are not the latent pixels: z.reshape(-1, C) on (B, C, H, W) mixes channels and "
         "pixels; put C last first, z.permute(0, 2, 3, 1).reshape(-1, C)")]
    for wrong, hint in slips:
        if torch.equal(got, wrong) and not torch.equal(wrong, right):
            raise ExerciseError(f"{where}: the codes are wrong: {hint}.")
    if torch.equal(got.sort().values, right.sort().values):
        raise ExerciseError(f"{where}: the codes are the right entries on the wrong pixels (the same codes in another "
                            "order): flatten row by row, z.permute(0, 2, 3, 1).reshape(-1, C), and reshape the codes "
                            "back with .reshape(B, H, W).")
    i = int((got != right).nonzero()[0])
    b, y, x = i // (H * W), i // W % H, i % W
    k, nearest = int(got[i]), int(right[i])
    if not 0 <= k < K:
        raise ExerciseError(f"{where}: codes[{b}, {y}, {x}] = {k} is not an entry index: the codebook has K = {K} entries.")
    raise ExerciseError(f"{where}: the codes are wrong: at latent pixel (b={b}, y={y}, x={x}) you chose entry {k} "
                        f"(squared distance {d2[i, k]:.4f}), but entry {nearest} is nearer ({d2[i, nearest]:.4f}).")


def _check_z_q(where: str, z_q: torch.Tensor, z: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Step 2: the forward value of z_q is the looked-up entries, back in (B, C, H, W); returns it."""
    B, C, H, W = z.shape
    entries = codebook.detach().double()[codes]  # (B·H·W, C)
    right = entries.reshape(B, H, W, C).permute(0, 3, 1, 2)
    got = z_q.detach().double()
    if torch.allclose(got, right, atol=TOL, rtol=TOL):
        return right
    slips = [(entries.reshape(B, C, H, W), "the looked-up entries (B·H·W, C) are reshaped straight to (B, C, H, W), "
                                           "which scatters each entry over several pixels: reshape(B, H, W, C), "
                                           "then permute(0, 3, 1, 2)"),
             (z.detach().double(), "z_q is z_e unchanged: its value must be the codebook entries "
                                   "(z_e + (z_q − z_e).detach() has the value of z_q and the gradient of z_e)")]
    for wrong, hint in slips:
        if torch.allclose(got, wrong, atol=TOL, rtol=TOL):
            raise ExerciseError(f"{where}: z_q is wrong: {hint}.")
    got_rows = _rows(got)
    on_codebook = _squared_distances(got_rows, codebook.detach().double()).min(1)
    if (on_codebook.values < TOL).all() and torch.equal(on_codebook.indices.sort().values, codes.sort().values):
        raise ExerciseError(f"{where}: z_q holds the right entries on the wrong pixels: codebook[codes] is (B·H·W, C), "
                            "row by row; reshape(B, H, W, C), then permute(0, 3, 1, 2).")
    error = (got - right).abs()
    i = tuple(int(j) for j in torch.unravel_index(error.argmax(), error.shape))
    raise ExerciseError(f"{where}: z_q should be codebook[codes] at every pixel (shape (B, C, H, W)); largest difference "
                        f"{error.max().item():.3g} at index {i}.")


def _grads(output: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """d output / d inputs, zeros where ``output`` does not depend on an input."""
    if not output.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    grads = torch.autograd.grad(output, inputs, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]


def _coefficient(got: torch.Tensor, unit: torch.Tensor) -> float | None:
    """a with got = a · unit, or None when got is not a multiple of unit."""
    got, unit = got.detach().double(), unit.double()
    a = (got * unit).sum().item() / unit.pow(2).sum().item()
    return a if torch.allclose(got, a * unit, atol=1e-7, rtol=GRAD_TOL) else None


def _loss_hint(r: float, a_z: float | None, a_e: float | None, beta: float, C: int, N: int) -> str | None:
    """What a loss with value r·mse and gradients a_z·(unit), a_e·(unit) got wrong; None when it is right."""
    near = lambda a, b: a is not None and abs(a - b) <= GRAD_TOL * max(1.0, abs(b))  # noqa: E731
    if near(r, 1 + beta) and near(a_z, beta) and near(a_e, 1.0):
        return None
    named = [((1 + beta, 1.0, beta), "the codebook and commitment terms are swapped: β weighs the codebook term, or each "
              "sg[·] sits on the wrong side (same gradients): the loss moves the codebook with weight β and the "
              "encoder output z_e with weight 1. Codebook term ‖sg[z_e] − e‖² (weight 1: detach z_e, it moves only "
              "the codebook), commitment term β‖z_e − sg[e]‖² (detach e, it moves only z_e)"),
             ((1 + beta, 1 + beta, 1 + beta), "the stop-gradients are missing: both terms move both z_e and the "
              "codebook; detach z_e in the codebook term ‖sg[z_e] − e‖² and e in the commitment term "
              "β‖z_e − sg[e]‖²"),
             ((1 + beta, 0.0, 1 + beta), "both terms detach z_e, so the loss never moves the encoder output: the "
              "commitment term β‖z_e − sg[e]‖² detaches e"),
             ((1 + beta, 1 + beta, 0.0), "both terms detach e, so the loss never moves the codebook: the codebook "
              "term ‖sg[z_e] − e‖² detaches z_e"),
             ((1 + beta, beta - 1, 0.0), "the loss was computed from the straight-through z_q: its codebook term then "
              "pushes z_e away from its entry and never moves the codebook. Compute the loss from the looked-up "
              "entries, before the line z + (z_q - z).detach()"),
             ((1 + beta, beta, 0.0), "the loss never moves the codebook: look the entries up in "
              "quantizer.embedding.weight itself (not .data or a detached copy); only z_e is detached, in the "
              "codebook term"),
             ((2.0, 1.0, 1.0), "the commitment term is not weighted: multiply it by β = quantizer.beta"),
             ((2 * beta, beta, beta), "β multiplies both terms; only the commitment term is weighted: "
              "‖sg[z_e] − e‖² + β‖z_e − sg[e]‖²"),
             ((1.0, 0.0, 1.0), "the commitment term β‖z_e − sg[e]‖² is missing"),
             ((beta, beta, 0.0), "the codebook term ‖sg[z_e] − e‖² is missing")]
    if beta != 0.25:
        named.append(((1.25, 0.25, 1.0), f"β is hard-coded as 0.25: use quantizer.beta (here β = {beta:g})"))
    for (r0, z0, e0), hint in named:
        if near(r, r0) and near(a_z, z0) and near(a_e, e0):
            return hint
    s = r / (1 + beta)
    if near(a_z, s * beta) and near(a_e, s):
        how = {N: "a sum over all values", C: "summed over the C channels and averaged over the pixels"}
        told = next((f" ({text})" for n, text in how.items() if near(s, n)), "")
        return (f"it is {s:.4g} × VectorQuantizer's{told}: average the squared differences over all B·C·H·W "
                "values, F.mse_loss's default reduction")
    fmt = lambda a: "not a multiple of (z_e − e)" if a is None else f"{a:.4g}"  # noqa: E731
    return (f"with mse = mean((z_e − e)²) over all B·C·H·W values, the loss should be (1 + β)·mse, its gradient "
            f"β·d(mse) for z_e and 1·d(mse) for the codebook; yours is {r:.4g}·mse with {fmt(a_z)}·d(mse) for z_e and "
            f"{fmt(a_e)}·d(mse) for the codebook")


def _check_loss(where: str, loss: torch.Tensor, quantizer: VectorQuantizer, z: torch.Tensor, z_q: torch.Tensor,
                codes: torch.Tensor) -> None:
    """Step 3: value and gradients of ‖sg[z_e] − e‖² + β‖z_e − sg[e]‖² (eq. 3), means over all values."""
    (B, C, H, W), codebook = z.shape, quantizer.embedding.weight
    if loss.shape != ():
        raise ExerciseError(f"{where}: loss has shape {tuple(loss.shape)}; it must be one number, shape (): average "
                            "over all B·C·H·W values (F.mse_loss's default), as VectorQuantizer does.")
    N, diff = z.numel(), z.detach().double() - z_q  # z_q: the exact entries, (B, C, H, W)
    mse = diff.pow(2).mean().item()
    unit_z = 2 * diff / N  # d mse / d z_e
    unit_e = torch.zeros(codebook.shape, dtype=torch.float64).index_add_(0, codes, -_rows(unit_z))  # d mse / d e
    g_z, g_e = _grads(loss, (z, codebook))
    if not (g_z.any() or g_e.any()):
        raise ExerciseError(f"{where}: the loss carries no gradient: build it from z and the codebook with autograd on "
                            "(no .item(), .detach() of both, or torch.no_grad()).")
    hint = _loss_hint(loss.item() / mse, _coefficient(g_z, unit_z), _coefficient(g_e, unit_e), quantizer.beta, C, N)
    if hint:
        raise ExerciseError(f"{where}: the loss is wrong: {hint}.")


def _check_straight_through(where: str, z_q: torch.Tensor, z: torch.Tensor, codebook: torch.Tensor) -> None:
    """Step 4: the decoder's gradient reaches z_e unchanged and never the codebook."""
    upstream = randn(*z.shape, seed=55)  # any gradient a decoder might send back
    g_z, g_e = _grads((z_q * upstream).sum(), (z, codebook))
    if not g_z.any():
        raise ExerciseError(f"{where}: no straight-through gradient: d z_q / d z_e is zero, so the encoder would learn "
                            "nothing from the decoder. Return z_q = z + (z_q - z).detach(): the value of z_q, the "
                            "gradient of z_e.")
    if not torch.allclose(g_z, upstream, atol=TOL, rtol=TOL):
        raise ExerciseError(f"{where}: the gradient through z_q should reach z_e unchanged (straight-through, identity); "
                            f"it differs by up to {(g_z - upstream).abs().max().item():.3g}: z + (z_q - z).detach().")
    if g_e.any():
        raise ExerciseError(f"{where}: the decoder's gradient also reaches the codebook through z_q; only the codebook "
                            "term of the loss may move it. Detach the whole difference: z + (z_q - z).detach().")


def check_vector_quantize(fn: Callable) -> Callable:
    """Check ``fn(quantizer, z)`` -> (z_q, loss, codes) against ``VectorQuantizer.forward``, step by step:
    codes (nearest entry, pixel order), z_q's value, the loss's value and gradients (autograd), straight-through."""
    name = "vector_quantize"
    cases = [("z of shape (2, 3, 3, 4), 6 entries, β = 0.25", dict(seed=51, B=2, C=3, H=3, W=4, K=6, beta=0.25)),
             ("z of shape (3, 4, 2, 5), 9 entries, β = 0.4", dict(seed=52, B=3, C=4, H=2, W=5, K=9, beta=0.4))]
    for label, spec in cases:
        quantizer, z = _quantizer_case(**spec)
        z = z.requires_grad_(True)
        where = f"`{name}` on {label}"
        try:
            got = fn(quantizer, z)
        except NotImplementedError:
            print(f"📝 `{name}` is not written yet: using minisd's reference so the lesson can go on.")
            return reference_vector_quantize
        except Exception as error:
            raise ExerciseError(f"`{name}` raised {type(error).__name__}: {error}\n  on {label}") from error
        if got is None:
            raise ExerciseError(f"{where} returned None: did you forget the `return`?")
        z_q, loss, codes = _unpack(where, got, tuple(z.shape))
        right_codes = _check_codes(where, codes, z, quantizer.embedding.weight)
        right_z_q = _check_z_q(where, z_q, z, quantizer.embedding.weight, right_codes)
        _check_loss(where, loss, quantizer, z, right_z_q, right_codes)
        _check_straight_through(where, z_q, z, quantizer.embedding.weight)
    print(f"✅ `{name}` matches VectorQuantizer on {len(cases)} inputs: codes, z_q, the loss and its gradients, "
          "the straight-through gradient.")
    return fn
