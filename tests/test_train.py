"""minisd.train and diffusion.ddpm_loss: the loop learns, resumes exactly, and its pieces follow their formulas."""

import json
import struct

import matplotlib
import pytest
import torch
from safetensors import safe_open

from minisd.diffusion import ddpm_loss
from minisd.nn import UNet, UNetConfig
from minisd.schedules import NoiseSchedule
from minisd.checkpoints import load_weights, save_model
from minisd.train import Trainer, TrainConfig, ema_decay_at, ema_update, lr_at, plot_loss, read_metadata

matplotlib.use("Agg")

pytestmark = pytest.mark.usefixtures("one_thread")


TINY_UNET = UNetConfig(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, attention=(False, True),
                       attention_head_dim=8, norm_num_groups=4)
SCHEDULE = NoiseSchedule()


def ddpm_loss_fn(model, x0, generator):
    return ddpm_loss(model, SCHEDULE, x0, generator)


def regression_loss_fn(model, batch, generator):
    """Deterministic: a least-squares fit of batch["y"] from batch["x"] (the generator is unused)."""
    return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])


def regression_data(n: int = 96) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return {"x": x, "y": x @ torch.randn(4, 2, generator=g) + 0.5}


def linear_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 2)


def glyph_like_data(n: int = 32) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1


def unet_trainer(config: TrainConfig) -> Trainer:
    torch.manual_seed(0)
    return Trainer(UNet(TINY_UNET), config, ddpm_loss_fn, glyph_like_data())


# ----------------------------------------------------------------------------- learning


def test_loss_goes_down_on_a_tiny_regression():
    config = TrainConfig(steps=150, batch_size=16, lr=0.05, warmup_steps=10, lr_schedule="constant", seed=0)
    trainer = Trainer(linear_model(), config, regression_loss_fn, regression_data())
    history = trainer.fit(progress=False)
    assert len(history) == 150 and trainer.step == 150
    assert sum(history[-10:]) / 10 < 0.05 * sum(history[:10]) / 10


def test_ddpm_loss_goes_down_on_a_tiny_unet():
    trainer = unet_trainer(TrainConfig(steps=40, batch_size=8, lr=3e-3, warmup_steps=5))
    history = trainer.fit(progress=False)
    assert sum(history[-10:]) / 10 < 0.8 * sum(history[:10]) / 10


def test_ddpm_loss_is_zero_for_the_true_noise_and_one_for_predicting_zero():
    x0 = glyph_like_data(64)

    class Oracle(torch.nn.Module):  # knows x_0, so recovers ε = (x_t - √ᾱ_t x_0) / √(1 - ᾱ_t) exactly (eq. 4)
        def forward(self, x_t, t):
            return (x_t - SCHEDULE.gather(SCHEDULE.sqrt_alphas_cumprod, t, x_t) * x0) / SCHEDULE.gather(
                SCHEDULE.sqrt_one_minus_alphas_cumprod, t, x_t)

    class Zero(torch.nn.Module):
        def forward(self, x_t, t):
            return torch.zeros_like(x_t)

    g = torch.Generator().manual_seed(0)
    assert ddpm_loss(Oracle(), SCHEDULE, x0, g) < 1e-8
    assert abs(ddpm_loss(Zero(), SCHEDULE, x0, g).item() - 1.0) < 0.05  # E‖ε‖² / D = 1


def _x0_guesser(x0_of, prediction_type):
    """A model whose guess of x_0 is ``x0_of(x_t)``, reported as ε, x_0 or v (DDPM eq. 4; Salimans & Ho App. D)."""
    def model(x_t, t):
        a, b = SCHEDULE.gather(SCHEDULE.sqrt_alphas_cumprod, t, x_t), SCHEDULE.gather(SCHEDULE.sqrt_one_minus_alphas_cumprod, t, x_t)
        x0_hat = x0_of(x_t)
        return {"epsilon": (x_t - a * x0_hat) / b, "sample": x0_hat, "v_prediction": (a * x_t - x0_hat) / b}[prediction_type]
    return model


@pytest.mark.parametrize("gamma", [0.5, 5.0])
def test_min_snr_weighting_is_snr_gamma_times_the_x0_error_for_every_prediction_type(gamma):
    # Hang et al. 2023: the three weightings are one and the same loss on x_0, min(SNR_t, γ) ‖x̂_0 - x_0‖²
    x0 = glyph_like_data(64).double()
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, SCHEDULE.num_train_timesteps, (64,), generator=g)
    x_t = SCHEDULE.add_noise(x0, torch.randn(x0.shape, generator=g, dtype=x0.dtype), t)  # the draws ddpm_loss makes
    alpha_bar = SCHEDULE.alphas_cumprod.double()[t]
    snr = alpha_bar / (1 - alpha_bar)  # from ᾱ_t, not the schedule's stored SNR
    x0_error = (0.5 * x_t - x0).square().flatten(1).mean(1)
    expected = (snr.clamp(max=gamma) * x0_error).mean()
    for prediction_type in ("epsilon", "sample", "v_prediction"):
        got = ddpm_loss(_x0_guesser(lambda x: 0.5 * x, prediction_type), SCHEDULE, x0, torch.Generator().manual_seed(0),
                        prediction_type=prediction_type, snr_gamma=gamma)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0, msg=lambda m: f"{prediction_type}: {m}")


def test_min_snr_weighting_only_lowers_the_weight_of_nearly_clean_steps():
    x0 = glyph_like_data(64).double()
    model = _x0_guesser(lambda x: 0.5 * x, "epsilon")
    plain = ddpm_loss(model, SCHEDULE, x0, torch.Generator().manual_seed(0))
    # a γ above every SNR_t weights every step by 1: the plain loss, same draws
    huge = ddpm_loss(model, SCHEDULE, x0, torch.Generator().manual_seed(0), snr_gamma=1e9)
    torch.testing.assert_close(huge, plain, rtol=1e-12, atol=0)
    assert ddpm_loss(model, SCHEDULE, x0, torch.Generator().manual_seed(0), snr_gamma=5.0) < plain
    with pytest.raises(ValueError, match="snr_gamma=0"):
        ddpm_loss(model, SCHEDULE, x0, snr_gamma=0)


# ----------------------------------------------------------------------------- resume


def test_resume_equals_the_uninterrupted_run(tmp_path):
    config = TrainConfig(steps=6, batch_size=8, lr=2e-3, warmup_steps=2, ema_decay=0.9, seed=3)
    straight = unet_trainer(config)
    straight.fit(progress=False)

    first_half = unet_trainer(config)
    first_half.fit(3, progress=False)
    first_half.save(tmp_path / "half.safetensors")
    torch.manual_seed(123)  # a fresh process: other weights before loading
    resumed = Trainer.resume(tmp_path / "half.safetensors", UNet(TINY_UNET), ddpm_loss_fn, glyph_like_data())
    assert resumed.step == 3 and resumed.config == config
    resumed.fit(progress=False)

    assert resumed.step == straight.step == 6
    assert resumed.history == straight.history
    for name, ours, theirs in [("model", resumed.model, straight.model), ("ema", resumed.ema_model, straight.ema_model)]:
        for (key, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=f"{name}.{key} differs")
    state_a, state_b = resumed.optimizer.state_dict(), straight.optimizer.state_dict()
    assert state_a["param_groups"] == state_b["param_groups"]
    for index, tensors in state_b["state"].items():
        for key, value in tensors.items():
            torch.testing.assert_close(state_a["state"][index][key], value, rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------- pieces


def test_warmup_then_cosine_learning_rates():
    config = TrainConfig(steps=14, lr=1.0, warmup_steps=4, lr_schedule="cosine", min_lr=0.1)
    assert [lr_at(s, config) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, config) == 1.0  # cosine starts at the peak …
    assert lr_at(9, config) == pytest.approx(0.55)  # … is halfway down halfway through …
    assert lr_at(14, config) == pytest.approx(0.1) and lr_at(100, config) == pytest.approx(0.1)  # … and stays at min_lr
    constant = TrainConfig(steps=14, lr=1.0, warmup_steps=4, lr_schedule="constant")
    assert [lr_at(s, constant) for s in (3, 4, 13, 50)] == [1.0] * 4


def test_the_optimizer_uses_the_scheduled_learning_rate():
    config = TrainConfig(steps=10, batch_size=8, lr=0.4, warmup_steps=4)
    trainer = Trainer(linear_model(), config, regression_loss_fn, regression_data())
    for step in range(3):
        trainer.train_step()
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(step, config))


def test_gradient_accumulation_equals_one_larger_batch():
    grads = []
    for batch_size, accum in [(4, 3), (12, 1)]:
        config = TrainConfig(batch_size=batch_size, grad_accum_steps=accum, seed=5)
        trainer = Trainer(linear_model(), config, regression_loss_fn, regression_data())
        loss = trainer.compute_gradients(step=7)
        grads.append((loss, [p.grad.clone() for p in trainer.model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ema_update_formula():
    ema, model = linear_model(0), linear_model(1)
    before = [p.detach().clone() for p in ema.parameters()]
    ema_update(ema, model, decay=0.9)
    for p_ema, old, p in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(p_ema, 0.9 * old + 0.1 * p.detach(), rtol=0, atol=1e-7)


def test_trainer_ema_warms_up_after_one_step():
    # diffusers' EMAModel: the first update uses decay min(0.99, (1 + 0) / (10 + 0)) = 0.1
    config = TrainConfig(batch_size=8, ema_decay=0.99)
    trainer = Trainer(linear_model(), config, regression_loss_fn, regression_data())
    start = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train_step()
    for p_ema, p0, p in zip(trainer.ema_model.parameters(), start, trainer.model.parameters()):
        torch.testing.assert_close(p_ema, 0.1 * p0 + 0.9 * p.detach(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("updates", [1, 20, 1500])
def test_ema_forgets_the_random_start_when_weights_jump_to_a_constant(updates):
    # Weights jump from 0 to 1 and stay: after k updates the EMA holds ∏_{j<k} d_j of the start.
    # With d_j = min(0.999, (1 + j) / (10 + j)) that product is 1 / C(k + 9, 9) for k ≤ 8990
    # (a fixed 0.999 would keep 0.999^k: 22 % at k = 1500).
    import math

    ema, model = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(ema.weight)
    torch.nn.init.ones_(model.weight)
    for step in range(updates):
        ema_update(ema, model, ema_decay_at(step, 0.999))
    expected = 1.0 - 1.0 / math.comb(updates + 9, 9)
    assert ema.weight.item() == pytest.approx(expected, abs=1e-6)
    assert ema_decay_at(10_000, 0.999) == 0.999  # the cap: late in training the decay is the configured one


def test_same_seed_same_run_other_seed_other_run():
    runs = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        trainer = Trainer(linear_model(), TrainConfig(batch_size=8, seed=seed), regression_loss_fn, regression_data())
        trainer.fit(5, progress=False)
        runs[name] = trainer.history
    assert runs["a"] == runs["b"] != runs["c"]


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_is_plain_safetensors_with_json_metadata(tmp_path):
    trainer = unet_trainer(TrainConfig(steps=2, batch_size=4))
    trainer.fit(progress=False)
    path = tmp_path / "run.safetensors"
    trainer.save(path, {"note": "hello"})

    raw = path.read_bytes()
    (header_size,) = struct.unpack("<Q", raw[:8])  # safetensors: 8-byte length, JSON header, raw data
    header = json.loads(raw[8:8 + header_size])
    assert header["__metadata__"]["format"] == json.dumps("minisd.train/1")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert {f"model.{k}" for k in trainer.model.state_dict()} <= keys
    assert {f"ema.{k}" for k in trainer.model.state_dict()} <= keys
    assert any(k.startswith("optimizer.0.exp_avg") for k in keys)
    meta = read_metadata(path)
    assert meta["step"] == 2 and meta["note"] == "hello" and len(meta["history"]) == 2
    assert UNetConfig.from_dict(meta["model_config"]) == TINY_UNET
    assert TrainConfig.from_dict(meta["train_config"]) == trainer.config


def test_loading_into_a_model_with_another_config_names_the_mismatch(tmp_path):
    trainer = unet_trainer(TrainConfig(steps=1, batch_size=4))
    path = tmp_path / "run.safetensors"
    trainer.save(path)
    wider = UNet(UNetConfig(sample_size=8, block_out_channels=(8, 24), layers_per_block=1, attention=(False, True),
                            attention_head_dim=8, norm_num_groups=4))
    with pytest.raises(ValueError, match=r"shape mismatches: .*model \(24"):
        Trainer.resume(path, wider, ddpm_loss_fn, glyph_like_data())
    no_attention = UNet(UNetConfig(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
                                   attention=(False, False), attention_head_dim=8, norm_num_groups=4))
    with pytest.raises(ValueError, match=r"unexpected keys: .*attentions"):
        Trainer.resume(path, no_attention, ddpm_loss_fn, glyph_like_data())


def test_weights_only_file_round_trips_and_is_not_a_trainer_checkpoint(tmp_path):
    trainer = unet_trainer(TrainConfig(steps=1, batch_size=4))
    path = tmp_path / "ema.safetensors"
    save_model(trainer.ema_model, path, {"step": 1})
    model = load_weights(UNet(TINY_UNET), path)
    for a, b in zip(model.state_dict().values(), trainer.ema_model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="not a Trainer checkpoint"):
        trainer.load(path)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"lr_schedule='linear' .* \('constant', 'cosine'\)"):
        TrainConfig(lr_schedule="linear")
    with pytest.raises(ValueError, match="same first dimension"):
        Trainer(linear_model(), TrainConfig(), regression_loss_fn, {"x": torch.zeros(3, 4), "y": torch.zeros(2, 2)})
    with pytest.raises(TypeError, match="tensor"):
        Trainer(linear_model(), TrainConfig(), regression_loss_fn, [1, 2, 3])


def test_plot_loss_draws_raw_and_smoothed_curves():
    ax = plot_loss([1.0 / (i + 1) for i in range(50)])
    assert len(ax.get_lines()) == 2


# ----------------------------------------------------------------------------- data-parallel


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        config = TrainConfig(steps=4, batch_size=4, grad_accum_steps=1, lr=2e-3, warmup_steps=2, seed=7)
        trainer = unet_trainer(config)
        trainer.fit(progress=False)
        if rank == 0:
            torch.save({"model": trainer.model.state_dict(), "history": trainer.history}, f"{out_dir}/ddp.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_take_the_same_steps_as_one_with_the_same_global_batch(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free port for the process group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)  # our own file, tensors only

    # one process, 2 micro-batches of 4: the same global batch of 8 per step
    single = unet_trainer(TrainConfig(steps=4, batch_size=4, grad_accum_steps=2, lr=2e-3, warmup_steps=2, seed=7))
    single.fit(progress=False)
    assert ddp["history"] == pytest.approx(single.history, rel=1e-5)
    for key, value in single.model.state_dict().items():  # only summation order differs: float32 rounding
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-4, atol=1e-5, msg=f"{key} differs")
