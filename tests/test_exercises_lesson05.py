"""Lesson 05's VQ quantiser check: right answers pass in any correct form, a stub falls back to VectorQuantizer,
and each slip is named at the first step that diverges (codes, z_q, loss, straight-through gradient)."""

import re

import pytest
import torch
import torch.nn.functional as F

from minisd import exercises
from minisd.exercises import ExerciseError
from minisd.nn.vq import VectorQuantizer

pytestmark = pytest.mark.usefixtures("one_thread")


def stub(*args, **kwargs):
    raise NotImplementedError


def quantize(quantizer, z, *, flatten="right", distance="right", pick="argmin", codes_out="right", back="right",
             loss="right", straight_through="right"):
    """A written-out VectorQuantizer forward, loop-free (‖z‖² − 2 z·e + ‖e‖²); the keywords make the slips."""
    B, C, H, W = z.shape
    e = quantizer.embedding.weight if loss != "codebook detached" else quantizer.embedding.weight.data  # (K, C)
    flat = {"right": lambda: z.permute(0, 2, 3, 1).reshape(-1, C),
            "no permute": lambda: z.reshape(-1, C),
            "columns": lambda: z.permute(0, 3, 2, 1).reshape(-1, C)}[flatten]()  # (B·H·W, C)
    zz, ze, ee = flat.pow(2).sum(1, keepdim=True), flat @ e.T, e.pow(2).sum(1)
    d = {"right": zz - 2 * ze + ee, "dot only": -ze, "plus": zz + 2 * ze + ee,
         "l1": (flat[:, None] - e[None]).abs().sum(-1)}[distance]  # (B·H·W, K)
    codes = d.argmin(1) if pick == "argmin" else d.argmax(1)
    entries = e[codes]  # (B·H·W, C)
    z_q = {"right": lambda: entries.reshape(B, H, W, C).permute(0, 3, 1, 2),
           "no permute": lambda: entries.reshape(B, C, H, W),
           "columns": lambda: entries.reshape(B, W, H, C).permute(0, 3, 2, 1),
           "z itself": lambda: z}[back]()
    if loss == "after straight-through":
        z_q = z + (z_q - z).detach()
    codebook_term, commitment_term = F.mse_loss(z_q, z.detach()), F.mse_loss(z, z_q.detach())
    beta = quantizer.beta
    value = {"right": lambda: codebook_term + beta * commitment_term,
             "swapped stop-gradients": lambda: F.mse_loss(z_q.detach(), z) + beta * F.mse_loss(z.detach(), z_q),
             "beta on the codebook term": lambda: beta * codebook_term + commitment_term,
             "no stop-gradients": lambda: F.mse_loss(z_q, z) + beta * F.mse_loss(z, z_q),
             "both detach z": lambda: codebook_term + beta * F.mse_loss(z.detach(), z_q),
             "both detach e": lambda: F.mse_loss(z, z_q.detach()) + beta * commitment_term,
             "codebook detached": lambda: codebook_term + beta * commitment_term,
             "after straight-through": lambda: codebook_term + beta * commitment_term,
             "no beta": lambda: codebook_term + commitment_term,
             "beta on both": lambda: beta * (codebook_term + commitment_term),
             "beta 0.25": lambda: codebook_term + 0.25 * commitment_term,
             "no commitment": lambda: codebook_term,
             "sum": lambda: F.mse_loss(z_q, z.detach(), reduction="sum") + beta * F.mse_loss(z, z_q.detach(), reduction="sum"),
             "sum over channels": lambda: (codebook_term + beta * commitment_term) * C,
             "per image": lambda: ((z_q - z.detach()).pow(2) + beta * (z - z_q.detach()).pow(2)).flatten(1).mean(1),
             "item": lambda: (codebook_term + beta * commitment_term).item(),
             "detached": lambda: (codebook_term + beta * commitment_term).detach()}[loss]()
    out = {"right": lambda: z + (z_q - z).detach(), "none": lambda: z_q, "detached": lambda: z_q.detach(),
           "codebook too": lambda: z + (z_q - z.detach())}[straight_through]()
    codes = {"right": lambda: codes.reshape(B, H, W), "flat": lambda: codes,
             "float": lambda: codes.reshape(B, H, W).float()}[codes_out]()
    return out, value, codes


def learner_cdist(quantizer, z):
    """Another correct form: channels moved last, torch.cdist, nn.Embedding lookup, the losses written out."""
    z_last = z.movedim(1, -1)  # (B, H, W, C)
    codes = torch.cdist(z_last.reshape(-1, z.shape[1]), quantizer.embedding.weight).argmin(-1).reshape(z_last.shape[:-1])
    z_q = quantizer.embedding(codes).movedim(-1, 1)  # (B, C, H, W)
    loss = ((z.detach() - z_q) ** 2).mean() + quantizer.beta * ((z - z_q.detach()) ** 2).mean()
    return z + (z_q - z).detach(), loss, codes


def learner_loop(quantizer, z):
    """A third: a loop over the latent pixels, broadcast distances, a one-hot matrix product for the lookup."""
    B, C, H, W = z.shape
    e = quantizer.embedding.weight
    codes = torch.empty(B, H, W, dtype=torch.long)
    for b in range(B):
        for y in range(H):
            for x in range(W):
                codes[b, y, x] = ((z[b, :, y, x] - e) ** 2).sum(1).argmin()
    z_q = torch.einsum("bhwk,kc->bchw", F.one_hot(codes, e.shape[0]).to(e.dtype), e)
    loss = F.mse_loss(z.detach(), z_q) + quantizer.beta * F.mse_loss(z_q.detach(), z)
    return z_q.detach() + z - z.detach(), loss, codes


@pytest.mark.parametrize("answer", [quantize, learner_cdist, learner_loop], ids=lambda f: f.__name__)
def test_right_answers_pass_and_a_stub_falls_back_to_a_reference_that_passes(answer, capsys):
    assert exercises.check_vector_quantize(answer) is answer
    reference = exercises.check_vector_quantize(stub)
    assert reference is exercises.reference_vector_quantize
    assert exercises.check_vector_quantize(reference) is reference
    out = capsys.readouterr().out
    assert "not written yet" in out and out.count("✅") == 2


def test_the_reference_is_the_library_quantizer():
    torch.manual_seed(0)
    quantizer, z = VectorQuantizer(7, 3, beta=0.3), torch.randn(2, 3, 4, 5)
    for got, expected in zip(exercises.check_vector_quantize(stub)(quantizer, z), quantizer(z)):
        torch.testing.assert_close(got, expected)
    for got, expected in zip(quantize(quantizer, z), quantizer(z)):
        torch.testing.assert_close(got, expected)


SLIPS = {
    # codes: nearest entry, in pixel order
    "farthest entry": (dict(pick="argmax"), "the codes are wrong: each pixel got its FARTHEST entry"),
    "dot product only": (dict(distance="dot only"), "ranked by z·e alone"),
    "wrong sign": (dict(distance="plus"), "the cross term has the wrong sign"),
    "reshape without permute": (dict(flatten="no permute"), re.escape("z.reshape(-1, C) on (B, C, H, W) mixes channels")),
    "column-major pixels": (dict(flatten="columns"), "the codes are the right entries on the wrong pixels"),
    "another distance": (dict(distance="l1"), r"at latent pixel \(b=\d, y=\d, x=\d\) you chose entry \d \(squared "
                                              r"distance [\d.]+\), but entry \d is nearer"),
    "codes not reshaped": (dict(codes_out="flat"), re.escape("codes has shape (24,), expected (B, H, W) = (2, 3, 4): "
                                                             "reshape them to (B, H, W)")),
    "float codes": (dict(codes_out="float"), "codes are entry indices, integers"),
    # z_q: the looked-up entries back in (B, C, H, W)
    "z_q without permute": (dict(back="no permute"), re.escape("reshaped straight to (B, C, H, W), which scatters")),
    "z_q column-major": (dict(back="columns"), "z_q holds the right entries on the wrong pixels"),
    "z_q is z": (dict(back="z itself"), "z_q is z_e unchanged"),
    # the loss, by its value and its gradients
    "swapped stop-gradients": (dict(loss="swapped stop-gradients"), "the codebook and commitment terms are swapped"),
    "beta on the codebook term": (dict(loss="beta on the codebook term"), "the codebook and commitment terms are swapped: "
                                                                          "β weighs the codebook term"),
    "no stop-gradients": (dict(loss="no stop-gradients"), "the stop-gradients are missing"),
    "both detach z": (dict(loss="both detach z"), "never moves the encoder output"),
    "both detach e": (dict(loss="both detach e"), "both terms detach e, so the loss never moves the codebook"),
    "codebook detached": (dict(loss="codebook detached"), "never moves the codebook: look the entries up in "
                                                          "quantizer.embedding.weight itself"),
    "loss after straight-through": (dict(loss="after straight-through"), "the loss was computed from the "
                                                                         "straight-through z_q"),
    "no beta": (dict(loss="no beta"), "the commitment term is not weighted"),
    "beta on both": (dict(loss="beta on both"), "β multiplies both terms"),
    "hard-coded beta": (dict(loss="beta 0.25"), re.escape("β is hard-coded as 0.25: use quantizer.beta (here β = 0.4)")),
    "no commitment": (dict(loss="no commitment"), "the commitment term β‖z_e − sg\\[e\\]‖² is missing"),
    "summed": (dict(loss="sum"), "it is 72 × VectorQuantizer's \\(a sum over all values\\)"),
    "summed over channels": (dict(loss="sum over channels"), "summed over the C channels"),
    "per image": (dict(loss="per image"), re.escape("loss has shape (2,); it must be one number")),
    "loss.item()": (dict(loss="item"), "loss is a float, expected a tensor \\(keep the loss a tensor"),
    "detached loss": (dict(loss="detached"), "the loss carries no gradient"),
    # the straight-through estimator
    "no straight-through": (dict(straight_through="none"), "no straight-through gradient: d z_q / d z_e is zero"),
    "detached z_q": (dict(straight_through="detached"), "no straight-through gradient"),
    "straight-through into the codebook": (dict(straight_through="codebook too"), "also reaches the codebook"),
}


@pytest.mark.parametrize("slip", SLIPS)
def test_slips_are_named_at_the_first_step_that_diverges(slip):
    options, message = SLIPS[slip]
    with pytest.raises(ExerciseError, match=message):
        exercises.check_vector_quantize(lambda q, z: quantize(q, z, **options))


def test_the_two_losses_that_swap_the_terms_are_the_same_function():
    """Why one hint covers both: β on the codebook term and swapped stop-gradients give the same value and gradients."""
    torch.manual_seed(0)
    quantizer, z = VectorQuantizer(5, 3, beta=0.3), torch.randn(2, 3, 2, 3, requires_grad=True)
    results = []
    for loss in ("swapped stop-gradients", "beta on the codebook term"):
        value = quantize(quantizer, z, loss=loss)[1]
        results.append((value, *torch.autograd.grad(value, (z, quantizer.embedding.weight))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_a_wrong_return_is_named():
    with pytest.raises(ExerciseError, match="return them in the order \\(z_q, loss, codes\\)"):
        exercises.check_vector_quantize(lambda q, z: quantize(q, z)[::-1])
    with pytest.raises(ExerciseError, match="should return three things"):
        exercises.check_vector_quantize(lambda q, z: quantize(q, z)[:2])
    with pytest.raises(ExerciseError, match="forget the `return`"):
        exercises.check_vector_quantize(lambda q, z: None)
    with pytest.raises(ExerciseError, match="raised IndexError"):
        exercises.check_vector_quantize(lambda q, z: q.embedding.weight[z.shape[0] * 100])
