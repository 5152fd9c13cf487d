"""Lesson 09's checks: right answers pass in any correct form, stubs fall back, slips are named."""

import math

import pytest
import torch
import torch.nn.functional as F

from minisd import exercises, text_to_image, train
from minisd.exercises import ExerciseError


def stub(*args, **kwargs):
    raise NotImplementedError


# ----------------------------------------------------------------------------- the loss


def loss_other_order(model, batch, generator, prompt_embeds, schedule, caption_dropout=0.1):
    """Correct, but draws in another order (mask, ε, t), with bernoulli, and noises by hand."""
    latents, index = batch["latents"], batch["caption_index"]
    B = latents.shape[0]
    keep = torch.bernoulli(torch.full((B,), 1 - caption_dropout), generator=generator).bool()
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(0, schedule.num_train_timesteps, (B,), generator=generator)
    a = schedule.alphas_cumprod[t].view(B, 1, 1, 1)
    x_t = a.sqrt() * latents + (1 - a).sqrt() * noise
    states = torch.where(keep[:, None, None], prompt_embeds[index], prompt_embeds[0].expand(B, -1, -1))
    return ((model(x_t, t, states) - noise) ** 2).mean()


def make_loss(**slip):
    """The reference recipe with one sub-step replaced by a slip."""
    def loss(model, batch, generator, prompt_embeds, schedule, caption_dropout=0.1):
        latents, index = batch["latents"], batch["caption_index"]
        B = latents.shape[0]
        t = slip.get("t", lambda: torch.randint(0, 1000, (B,), generator=generator))()
        noise = slip.get("noise", lambda: torch.randn(latents.shape, generator=generator))()
        drop = slip.get("drop", lambda: torch.rand(B, generator=generator) < caption_dropout)()
        a = schedule.alphas_cumprod[t.long().clamp(0, 999)].view(-1, 1, 1, 1)  # the slips' t may be out of range
        x_t = slip["x_t"](latents, noise, a) if "x_t" in slip else a.sqrt() * latents + (1 - a).sqrt() * noise
        empty = slip.get("empty", prompt_embeds[0])
        states = torch.where(drop[:, None, None], empty, prompt_embeds[index])
        eps_pred = model(x_t, t, encoder_hidden_states=states)
        return slip["reduce"](eps_pred, noise, latents) if "reduce" in slip else F.mse_loss(eps_pred, noise)
    return loss


def test_right_losses_pass_whatever_their_draw_order(capsys):
    assert exercises.check_text_to_image_loss(text_to_image.text_to_image_loss) is text_to_image.text_to_image_loss
    assert exercises.check_text_to_image_loss(loss_other_order) is loss_other_order
    reference = exercises.check_text_to_image_loss(stub)
    assert reference is text_to_image.text_to_image_loss
    out = capsys.readouterr().out
    assert out.count("✅") == 2 and "not written yet" in out


B = 512


@pytest.mark.parametrize("slip, words", [
    ({"t": lambda: torch.randint(0, 1000, (1,))}, "step 1, t: the U-Net got t = (1,)"),
    ({"t": lambda: torch.arange(B) * 2}, "must lie in 0 … 999"),
    ({"t": lambda: torch.rand(B) * 999}, "fractional timesteps"),
    ({"t": lambda: torch.randint(0, 100, (B,))}, "uniformly from all 1000"),
    ({"noise": lambda: torch.randn(B, 4, 8, 8)}, "step 2, randomness: two calls with the same generator state did not draw the same noise"),
    ({"drop": lambda: torch.rand(B) < 0.1}, "did not draw the same captions to drop"),
    ({"x_t": lambda z, e, a: a * z + (1 - a).sqrt() * e}, "ᾱ_t instead of √ᾱ_t"),
    ({"x_t": lambda z, e, a: z + (1 - a).sqrt() * e}, "z_0 is not scaled"),
    ({"x_t": lambda z, e, a: a.sqrt() * z + (1 - a) * e}, "scaled by (1 − ᾱ_t)"),
    ({"empty": torch.zeros(5, 6)}, "step 4, caption dropout: row"),
])
def test_loss_slips_are_named_at_their_sub_step(slip, words):
    with pytest.raises(ExerciseError) as error:
        exercises.check_text_to_image_loss(make_loss(**slip))
    assert words in str(error.value)


def test_inverted_dropout_and_wrong_reductions_are_named():
    def inverted(model, batch, generator, prompt_embeds, schedule, caption_dropout=0.1):
        return make_loss()(model, batch, generator, prompt_embeds, schedule, 1 - caption_dropout)
    cases = [(inverted, "keep a caption when its coin is ≥ caption_dropout"),
             (make_loss(reduce=lambda p, e, z: ((p - e) ** 2).sum()), "a sum, not a mean"),
             (make_loss(reduce=lambda p, e, z: F.mse_loss(p, z)), "the target is the noise ε"),
             (make_loss(reduce=lambda p, e, z: (p - e).abs().mean()), "square the differences"),
             (make_loss(reduce=lambda p, e, z: F.mse_loss(p, e).item()), "returned a Python number"),
             (make_loss(reduce=lambda p, e, z: F.mse_loss(p.detach(), e)), "the loss has no gradient")]
    for fn, words in cases:
        with pytest.raises(ExerciseError) as error:
            exercises.check_text_to_image_loss(fn)
        assert words in str(error.value), (words, str(error.value))


def test_a_second_unet_call_and_an_exception_are_reported():
    def twice(model, batch, generator, prompt_embeds, schedule, caption_dropout=0.1):
        loss = make_loss()(model, batch, generator, prompt_embeds, schedule, caption_dropout)
        model(batch["latents"], torch.zeros(B, dtype=torch.long), prompt_embeds[batch["caption_index"]])
        return loss
    with pytest.raises(ExerciseError, match="called 2 times"):
        exercises.check_text_to_image_loss(twice)
    with pytest.raises(ExerciseError, match="raised KeyError"):
        exercises.check_text_to_image_loss(lambda model, batch, *a, **k: batch["images"])


# ----------------------------------------------------------------------------- learning rate


def lr_other_form(step, lr, warmup_steps, total_steps, min_lr=0.0):
    if step < warmup_steps:
        return torch.tensor(lr * (step + 1) / warmup_steps)  # a tensor is a number too
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (lr - min_lr) * (math.cos(math.pi * progress) + 1) / 2


@pytest.mark.parametrize("slip, words", [
    (lambda s, lr, W, S, m=0.0: lr * s / W if s < W else lr_other_form(s, lr, W, S, m), "use (step + 1) / warmup_steps"),
    (lambda s, lr, W, S, m=0.0: lr_other_form(s, lr, W, S, m) if s < W else
     m + (lr - m) * 0.5 * (1 + math.cos(math.pi * s / S)), "count it from the end of the warm-up"),
    (lambda s, lr, W, S, m=0.0: lr_other_form(s, lr, W, S, 0.0), "it should end at min_lr"),
    (lambda s, lr, W, S, m=0.0: lr_other_form(s, lr, W, S, m) if s < W else lr, "stays at lr after the warm-up"),
])
def test_lr_slips_are_named(slip, words):
    with pytest.raises(ExerciseError) as error:
        exercises.check_lr_at(slip)
    assert words in str(error.value)


def test_lr_right_answer_and_stub():
    assert exercises.check_lr_at(lr_other_form) is lr_other_form
    reference = exercises.check_lr_at(stub)
    config = train.TrainConfig(steps=1000, lr=1e-3, warmup_steps=200)
    assert [reference(s, 1e-3, 200, 1000) for s in (0, 199, 600)] == [train.lr_at(s, config) for s in (0, 199, 600)]


# ----------------------------------------------------------------------------- gradient accumulation


def accumulate_with_set_to_none(model, loss_fn, micro_batches):
    for p in model.parameters():
        p.grad = None
    losses = []
    for batch in micro_batches:
        loss = loss_fn(model, batch)
        (loss / len(micro_batches)).backward()
        losses.append(loss.item())
    return sum(losses) / len(losses)  # a float is fine


def test_accumulation_right_answer_stub_and_slips():
    assert exercises.check_accumulate_gradients(accumulate_with_set_to_none) is accumulate_with_set_to_none
    reference = exercises.check_accumulate_gradients(stub)
    assert exercises.check_accumulate_gradients(reference) is reference

    def no_zero(model, loss_fn, micro_batches):
        for batch in micro_batches:
            (loss_fn(model, batch) / len(micro_batches)).backward()
        return 0.0

    def no_divide(model, loss_fn, micro_batches):
        model.zero_grad()
        for batch in micro_batches:
            loss_fn(model, batch).backward()

    def zero_each(model, loss_fn, micro_batches):
        for batch in micro_batches:
            model.zero_grad()
            (loss_fn(model, batch) / len(micro_batches)).backward()

    for fn, words in [(no_zero, "zero them first"), (no_divide, "divide each micro-batch's loss by 4"),
                      (zero_each, "only the last micro-batch counts")]:
        with pytest.raises(ExerciseError) as error:
            exercises.check_accumulate_gradients(fn)
        assert words in str(error.value)


# ----------------------------------------------------------------------------- EMA


def ema_other_form(ema_model, model, step, decay=0.999):
    d = min(decay, (1 + step) / (10 + step))
    for p_ema, p in zip(ema_model.parameters(), model.parameters()):
        p_ema.data = d * p_ema.data + (1 - d) * p.data
    for b_ema, b in zip(ema_model.buffers(), model.buffers()):
        b_ema.data.copy_(b.data)


def ema_with(decay_fn, buffers=True, swap=False):
    def update(ema_model, model, step, decay=0.999):
        d = decay_fn(step, decay)
        with torch.no_grad():
            for p_ema, p in zip(ema_model.parameters(), model.parameters()):
                p_ema.copy_((1 - d) * p_ema + d * p if swap else d * p_ema + (1 - d) * p)
            if buffers:
                for b_ema, b in zip(ema_model.buffers(), model.buffers()):
                    b_ema.copy_(b)
    return update


def test_ema_right_answer_stub_and_slips():
    assert exercises.check_ema_update(ema_other_form) is ema_other_form
    reference = exercises.check_ema_update(stub)
    assert exercises.check_ema_update(reference) is reference
    warm = lambda k, d: min(d, (1 + k) / (10 + k))  # noqa: E731
    cases = [(ema_with(lambda k, d: d), "the fixed decay 0.999: warm it up"),
             (ema_with(warm, swap=True), "the two weights swapped"),
             (ema_with(lambda k, d: min(d, k / (10 + k))), "the warm-up shifted by one step"),
             (ema_with(warm, buffers=False), "running_mean was not copied"),
             (lambda ema_model, model, step, decay=0.999: train.ema_decay_at(step, decay), "did not change")]
    for fn, words in cases:
        with pytest.raises(ExerciseError) as error:
            exercises.check_ema_update(fn)
        assert words in str(error.value), (words, str(error.value))
