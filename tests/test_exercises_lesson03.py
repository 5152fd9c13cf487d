"""Lesson 03's mechanism checks: the ResNet block's forward and the DDPM sampling loop. Right answers pass in
any correct form, stubs fall back to a reference that works where the lesson uses it, and each typical slip is
named at the first step that diverges. (The formula checks of lesson 03 are tested in test_exercises.py.)"""

import functools

import pytest
import torch
import torch.nn.functional as F

from minisd import exercises, samplers
from minisd.exercises import ExerciseError
from minisd.nn import ResnetBlock2D, UNet, UNetConfig
from minisd.schedules import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")


def stub(*args, **kwargs):
    raise NotImplementedError


# ----------------------------------------------------------------------------- the ResNet block


def resnet_block(block, x, temb, *, act_first=False, act=F.silu, temb_act=True, act_after_proj=False, time="shift",
                 norm2="norm2", act_first2=False, dropout="module", skip="right"):
    """A written-out ResnetBlock2D forward with its sub-modules; the keyword arguments make learners' slips."""
    h = block.conv1(block.norm1(act(x)) if act_first else act(block.norm1(x)))
    proj = block.time_emb_proj(act(temb) if temb_act else temb)
    proj = act(proj) if act_after_proj else proj
    h = {"shift": lambda: h + proj[:, :, None, None], "none": lambda: h, "last_dim": lambda: h + proj[:, None, None, :],
         "unreshaped": lambda: h + proj, "times": lambda: h * proj[:, :, None, None]}[time]()
    norm = getattr(block, norm2)
    h = norm(act(h)) if act_first2 else act(norm(h))
    h = {"module": block.dropout, "none": lambda v: v, "always": lambda v: F.dropout(v, block.dropout.p)}[dropout](h)
    h = block.conv2(h)
    if skip == "none":
        return h
    if skip == "x":
        return x + h
    return (block.conv_shortcut(x) if block.conv_shortcut is not None else x) + h


def resnet_block_functional(block, x, temb, *, time_scale=1.0, skip_scale=1.0, bias_only=False):
    """Another correct form (with the defaults): no sub-module is called, the weights are used directly."""
    n1, n2 = block.norm1, block.norm2
    h = F.conv2d(F.silu(F.group_norm(x, n1.num_groups, n1.weight, n1.bias, n1.eps)), block.conv1.weight,
                 block.conv1.bias, padding=1)
    lin = block.time_emb_proj
    proj = lin.bias.expand(temb.shape[0], -1) if bias_only else F.linear(temb * torch.sigmoid(temb), lin.weight, lin.bias)
    h = h + time_scale * proj.view(*proj.shape, 1, 1)
    h = F.silu(F.group_norm(h, n2.num_groups, n2.weight, n2.bias, n2.eps))
    h = F.conv2d(F.dropout(h, block.dropout.p, training=block.training), block.conv2.weight, block.conv2.bias, padding=1)
    shortcut = x if block.conv_shortcut is None else F.conv2d(x, block.conv_shortcut.weight, block.conv_shortcut.bias)
    return skip_scale * shortcut + h


def test_resnet_block_check_accepts_module_calls_and_functional_forms(capsys):
    assert exercises.check_resnet_block(resnet_block) is resnet_block
    assert exercises.check_resnet_block(resnet_block_functional) is resnet_block_functional
    assert capsys.readouterr().out.count("✅") == 2


def test_resnet_block_stub_falls_back_to_a_reference_usable_inside_a_unet(capsys):
    reference = exercises.check_resnet_block(stub)
    assert reference is not stub and "not written yet" in capsys.readouterr().out
    assert exercises.check_resnet_block(reference) is reference
    # The lesson swaps the answer into every block of a U-Net: the reference must not call the block's own
    # (replaced) forward, or it would recurse.
    model = UNet(UNetConfig(block_out_channels=(16, 32), attention=(False, True), attention_head_dim=16))
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([3, 700])
    with torch.no_grad():
        expected = model(x, t)
        blocks = [m for m in model.modules() if isinstance(m, ResnetBlock2D)]
        for block in blocks:
            block.forward = functools.partial(reference, block)
        got = model(x, t)
    torch.testing.assert_close(got, expected)


def test_resnet_block_check_leaves_the_global_rng_as_it_was():
    state = torch.random.get_rng_state()
    exercises.check_resnet_block(resnet_block)
    assert torch.equal(torch.random.get_rng_state(), state)


RESNET_SLIPS = {
    "SiLU before the norm": (dict(act_first=True), "norm before the activation"),
    "SiLU before norm2": (dict(act_first2=True), "norm before the activation"),
    "ReLU": (dict(act=F.relu), "SiLU \\(block.nonlinearity\\), not ReLU"),
    "time embedding without SiLU": (dict(temb_act=False), "must go through SiLU before time_emb_proj"),
    "SiLU after time_emb_proj": (dict(act_after_proj=True), "SiLU goes before time_emb_proj, not after"),
    "time embedding never added": (dict(time="none"), "never added to conv1's output"),
    "broadcast along the width": (dict(time="last_dim"), "wrong broadcasting: \\[:, None, None, :\\]"),
    "no broadcasting at all": (dict(time="unreshaped"), "(?s)while adding the time embedding.*wrong broadcasting shape"),
    "multiplied": (dict(time="times"), "added, not multiplied"),
    "norm1 twice": (dict(norm2="norm1"), "norm1 is used where norm2 belongs"),
    "no dropout": (dict(dropout="none"), "the dropout is missing"),
    "dropout in eval mode": (dict(dropout="always"), "active in eval mode"),
    "no skip": (dict(skip="none"), "the skip connection is missing"),
    "skip without conv_shortcut": (dict(skip="x"), "(?s)the channels change \\(8 -> 16\\).*conv_shortcut"),
}


@pytest.mark.parametrize("name", RESNET_SLIPS)
def test_resnet_block_slips_are_named(name):
    slip, words = RESNET_SLIPS[name]
    with pytest.raises(ExerciseError, match=words):
        exercises.check_resnet_block(functools.partial(resnet_block, **slip))


def test_resnet_block_without_hooks_is_localised_by_probes():
    # The time term scaled: right when time_emb_proj is zeroed, wrong otherwise.
    with pytest.raises(ExerciseError, match="right when its time term is zero.*check where you add the time embedding"):
        exercises.check_resnet_block(functools.partial(resnet_block_functional, time_scale=0.5))
    # Only the bias of time_emb_proj: the output does not change with the time embedding.
    with pytest.raises(ExerciseError, match="same output for two different time embeddings"):
        exercises.check_resnet_block(functools.partial(resnet_block_functional, bias_only=True))
    # The skip halved: wrong even with the time term zeroed, so the image path is to blame.
    with pytest.raises(ExerciseError, match="even with time_emb_proj set to 0 it differs: check the image path"):
        exercises.check_resnet_block(functools.partial(resnet_block_functional, skip_scale=0.5))


def test_resnet_block_calling_a_missing_shortcut_is_explained():
    def always_shortcut(block, x, temb):
        return block.conv_shortcut(x) + resnet_block(block, x, temb, skip="none")

    with pytest.raises(ExerciseError, match="conv_shortcut is None here: the channels do not change"):
        exercises.check_resnet_block(always_shortcut)


# ----------------------------------------------------------------------------- the sampling loop


def ddpm_step(schedule, eps_pred, x_t, t, noise):
    """The lesson's exercise 4 (DDPM eq. 11 with σ_t² = β̃_t), as a learner writes it."""
    beta_t, alpha_bar_t = schedule.betas[t], schedule.alphas_cumprod[t]
    alpha_bar_prev = schedule.alphas_cumprod[t - 1] if t > 0 else torch.tensor(1.0)
    mean = (x_t - beta_t / (1 - alpha_bar_t).sqrt() * eps_pred) / (1 - beta_t).sqrt()
    return mean + ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t).sqrt() * noise


def ddpm_sample(model, schedule, shape, generator, t_start=None, *, T=None, ignore_start=False, steps=None,
                uniform_x_T=False, reuse_noise=False, no_generator=False, no_noise=False, freeze=False):
    """Algorithm 2 as a learner writes it; the keyword arguments make the slips."""
    T = schedule.num_train_timesteps if T is None else T
    t_start = T - 1 if t_start is None or ignore_start else t_start
    x = torch.rand(shape, generator=generator) if uniform_x_T else torch.randn(shape, generator=generator)
    once = torch.randn(shape, generator=generator) if reuse_noise else None
    for t in steps(t_start) if steps else range(t_start, -1, -1):
        eps_pred = model(x, t)
        noise = once if reuse_noise else torch.randn(shape) if no_generator else torch.randn(shape, generator=generator)
        new = ddpm_step(schedule, eps_pred, x, t, torch.zeros(shape) if no_noise else noise)
        x = x if freeze else new
    return x


def ddpm_sample_other_order(model, schedule, shape, generator, t_start=None):
    """Another correct form: a while loop, every z drawn before x_T, z = 0 at the last step, t as a (B,) tensor."""
    t = schedule.num_train_timesteps - 1 if t_start is None else t_start
    noises = [torch.randn(shape, generator=generator) for _ in range(t)]
    x = torch.randn(shape, generator=generator)
    while t >= 0:
        z = noises[t - 1] if t > 0 else torch.zeros(shape)
        x = ddpm_step(schedule, model(x, torch.full((shape[0],), t)), x, t, z)
        t -= 1
    return x


def test_ddpm_sample_check_accepts_any_correct_loop(capsys):
    assert exercises.check_ddpm_sample(ddpm_sample) is ddpm_sample
    assert "another order" not in capsys.readouterr().out
    assert exercises.check_ddpm_sample(ddpm_sample_other_order) is ddpm_sample_other_order
    out = capsys.readouterr().out
    assert "✅" in out and "another order than the reference's" in out and "that is fine" in out


def test_ddpm_sample_stub_falls_back_to_algorithm_2_as_the_lesson_calls_it(capsys):
    reference = exercises.check_ddpm_sample(stub)
    assert reference is not stub and "not written yet" in capsys.readouterr().out
    assert exercises.check_ddpm_sample(reference) is reference
    schedule, calls = NoiseSchedule(), []

    def model(x, t):
        calls.append(t)
        return torch.zeros_like(x)

    x = reference(model, schedule, (2, 1, 4, 4), torch.Generator().manual_seed(0), 9)  # positional, as the lesson
    assert calls == list(range(9, -1, -1)) and x.shape == (2, 1, 4, 4)
    # eq. 11 at every training timestep, x_T first and then one z per step from the same generator
    ours = reference(lambda x, t: 0.1 * x, schedule, (2, 1, 4, 4), torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    theirs = torch.randn(2, 1, 4, 4, generator=g)
    for t in range(999, -1, -1):
        theirs = samplers.ddpm_step(schedule, 0.1 * theirs, theirs, t, t - 1, noise=torch.randn(2, 1, 4, 4, generator=g))
    torch.testing.assert_close(ours, theirs)


SAMPLE_SLIPS = {
    "a fixed T = 1000": (dict(T=1000), "schedule's own T, schedule.num_train_timesteps = 20"),
    "t_start ignored": (dict(ignore_start=True), "start at t_start = 49"),
    "last step missing": (dict(steps=lambda t_start: range(t_start, 0, -1)), "the last step, t = 0, is missing"),
    "counting up": (dict(steps=lambda t_start: range(t_start + 1)), "t must count down"),
    "starting at T": (dict(steps=lambda t_start: range(t_start + 1, 0, -1)), "the first step is t = 999"),
    "uniform x_T": (dict(uniform_x_T=True), "x_T ~ N\\(0, I\\)"),
    "the same z": (dict(reuse_noise=True), "the same z at every step"),
    "z without the generator": (dict(no_generator=True), "draw x_T and every z with generator=generator"),
    "no noise": (dict(no_noise=True), "no noise was added"),
    "x never updated": (dict(freeze=True), "the model sees the same x at every step"),
}


@pytest.mark.parametrize("name", SAMPLE_SLIPS)
def test_ddpm_sample_slips_are_named(name):
    slip, words = SAMPLE_SLIPS[name]
    with pytest.raises(ExerciseError, match=words):
        exercises.check_ddpm_sample(functools.partial(ddpm_sample, **slip))


def test_ddpm_sample_wrong_noise_in_another_draw_order_is_caught_by_its_statistics():
    def scaled_other_order(model, schedule, shape, generator, t_start=None):
        t = schedule.num_train_timesteps - 1 if t_start is None else t_start
        noises = [torch.randn(shape, generator=generator) for _ in range(t)]
        x = torch.randn(shape, generator=generator)
        for s in range(t, -1, -1):
            x = ddpm_step(schedule, model(x, s), x, s, 3 * noises[s - 1] if s > 0 else torch.zeros(shape))
        return x

    with pytest.raises(ExerciseError, match=r"the z it implies has mean -?0\.\d+, std [23]\.\d+"):
        exercises.check_ddpm_sample(scaled_other_order)
