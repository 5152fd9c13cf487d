"""minisd.nn.vae: shapes, the Gaussian posterior's maths, VQ's straight-through gradient, losses,
checkpoints, error messages, and parity with diffusers' AutoencoderKL and VQModel."""

import re

import pytest
import torch

from helpers import randomize
from minisd.convert import diffusers_vae_config
from minisd.checkpoints import load_weights, save_model
from minisd.nn.vae import AutoencoderConfig, AutoencoderKL, DiagonalGaussianDistribution, kl_vae_loss, scaling_factor_from_latents
from minisd.nn.vq import VectorQuantizer, VQModel, vq_loss

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = AutoencoderConfig(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=16)



# ----------------------------------------------------------------------------- shapes and config


@pytest.mark.parametrize("widths, f", [((16,), 1), ((16, 16), 2), ((16, 32, 32), 4), ((16, 16, 16, 16), 8)])
def test_latent_grid_is_image_over_f(widths, f):
    config = AutoencoderConfig(block_out_channels=widths, layers_per_block=1, norm_num_groups=8, sample_size=16)
    assert config.downsample_factor == f and config.latent_shape == (4, 16 // f, 16 // f)
    vae = AutoencoderKL(config).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    posterior = vae.encode(x)
    assert posterior.mean.shape == (2, 4, 16 // f, 16 // f)
    assert vae.decode(posterior.mode()).shape == x.shape
    assert VQModel(config).eval()(x)[0].shape == x.shape


def test_config_round_trips_and_bad_configs_name_the_field():
    assert AutoencoderConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="norm_num_groups"):
        AutoencoderConfig(block_out_channels=(12, 24), norm_num_groups=8)
    with pytest.raises(ValueError, match="sample_size"):
        AutoencoderConfig(block_out_channels=(8, 8, 8, 8), norm_num_groups=8, sample_size=12)
    with pytest.raises(ValueError, match="scaling_factor"):
        AutoencoderConfig(scaling_factor=0.0)


def test_bad_inputs_name_the_argument_and_the_rule():
    vae = AutoencoderKL(TINY)
    with pytest.raises(ValueError, match=r"multiples of f = 4"):
        vae.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(ValueError, match=r"in_channels"):
        vae.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"latent_channels"):
        vae.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="kl_weight"):
        kl_vae_loss(vae, torch.zeros(1, 3, 16, 16), kl_weight=-1.0)


# ----------------------------------------------------------------------------- the posterior


def test_posterior_sample_is_mean_plus_std_times_noise_and_kl_matches_torch_distributions():
    moments = torch.randn(3, 8, 4, 4)
    q = DiagonalGaussianDistribution(moments)
    g = torch.Generator().manual_seed(5)
    eps = torch.randn(q.mean.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(q.sample(g), q.mean + torch.exp(0.5 * moments[:, 4:]) * eps)
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(q.mean, q.std), torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(q.kl(), reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(q.mode(), moments[:, :4])


def test_kl_is_zero_exactly_for_the_standard_normal_and_logvar_is_clamped():
    assert torch.all(DiagonalGaussianDistribution(torch.zeros(2, 8, 3, 3)).kl() == 0)
    q = DiagonalGaussianDistribution(torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), -100.0)], 1))
    assert q.logvar.min() == -30.0 and torch.isfinite(q.kl()).all()


def test_kl_weight_changes_the_loss_by_weight_times_kl_per_pixel():
    vae = randomize(AutoencoderKL(TINY))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    loss0, parts0 = kl_vae_loss(vae, x, 0.0, torch.Generator().manual_seed(0))
    loss1, parts1 = kl_vae_loss(vae, x, 0.5, torch.Generator().manual_seed(0))
    assert parts0 == parts1 and loss0.item() == pytest.approx(parts0["l1"], rel=1e-6)
    assert (loss1 - loss0).item() == pytest.approx(0.5 * parts0["kl"] / (3 * 16 * 16), rel=1e-4)


def test_scaling_factor_is_one_over_the_std():
    z = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 5.0
    assert scaling_factor_from_latents(z) == pytest.approx(1 / z.std().item())
    assert scaling_factor_from_latents(z) == pytest.approx(0.2, rel=0.02)
    with pytest.raises(ValueError, match="latents"):
        scaling_factor_from_latents(torch.ones(1))


def test_scaled_latent_helpers_undo_each_other():
    config = AutoencoderConfig(**{**TINY.to_dict(), "block_out_channels": (16, 32, 32), "scaling_factor": 0.25})
    vae = randomize(AutoencoderKL(config)).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = vae.encode_latents(x)
    torch.testing.assert_close(latents, vae.encode(x).mean * 0.25)
    torch.testing.assert_close(vae.decode_latents(latents), vae.decode(vae.encode(x).mean).clamp(-1, 1))


# ----------------------------------------------------------------------------- vector quantisation


def test_vector_quantizer_picks_the_nearest_code_and_passes_gradients_straight_through():
    vq = VectorQuantizer(num_embeddings=5, embedding_dim=2)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    z = torch.tensor([[0.9, 0.2], [-0.1, -0.7], [0.1, 0.1]]).T.reshape(1, 2, 1, 3).requires_grad_(True)
    z_q, loss, codes = vq(z)
    assert codes.tolist() == [[[1, 4, 0]]]
    torch.testing.assert_close(z_q.detach(), vq.embedding.weight[codes[0, 0]].T.reshape(1, 2, 1, 3))
    (z_q * torch.arange(6.0).reshape(1, 2, 1, 3)).sum().backward()
    torch.testing.assert_close(z.grad, torch.arange(6.0).reshape(1, 2, 1, 3))  # identity gradient
    squared = (z.detach() - z_q.detach()).pow(2).mean()
    assert loss.item() == pytest.approx((1 + 0.25) * squared.item(), rel=1e-5)


def test_vector_quantizer_refuses_latents_of_the_wrong_shape():
    vq = VectorQuantizer(num_embeddings=5, embedding_dim=2)
    with pytest.raises(ValueError, match=re.escape("z must be (B, 2, h, w) (embedding_dim channels); got (1, 3, 4, 4)")):
        vq(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="got \\(2, 4, 4\\)"):
        vq(torch.zeros(2, 4, 4))


def test_vq_loss_reports_codebook_usage_as_the_share_of_codes_used():
    model = randomize(VQModel(AutoencoderConfig(**{**TINY.to_dict(), "num_vq_embeddings": 16})))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z_e = model.encode(x)  # (2, c, 8, 8)
        codes = torch.cdist(z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1]), model.quantize.embedding.weight).argmin(1)
    _, parts = vq_loss(model, x)
    assert parts["codebook_usage"] == codes.unique().numel() / 16
    with torch.no_grad():  # every entry but one pushed far away: a single code is used
        model.quantize.embedding.weight[1:] = 1e4
        model.quantize.embedding.weight[0] = 0.0
    _, parts = vq_loss(model, x)
    assert parts["codebook_usage"] == 1 / 16
    assert parts["vq"] == pytest.approx(1.25 * z_e.pow(2).mean().item(), rel=1e-4)  # (1 + β) ‖z_e − 0‖²


def test_training_a_few_steps_lowers_the_reconstruction_loss():
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY)
    coarse = torch.rand(8, 3, 4, 4) * 2 - 1  # smooth images: learnable in a few steps, unlike white noise
    x = torch.nn.functional.interpolate(coarse, size=16, mode="bilinear")
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    losses = []
    for step in range(40):
        loss, parts = kl_vae_loss(vae, x, 1e-6, torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(parts["l1"])
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("cls", [AutoencoderKL, VQModel])
def test_from_pretrained_round_trips_in_float16(tmp_path, cls):
    model = randomize(cls(TINY)).eval()
    path = tmp_path / "ae.safetensors"
    save_model(model, path, dtype=torch.float16)
    loaded = cls.from_pretrained(path)
    assert loaded.config == TINY and next(loaded.parameters()).dtype == torch.float32
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded.encode_latents(x), model.encode_latents(x), atol=5e-2, rtol=5e-2)


def test_from_pretrained_refuses_the_other_class_and_mismatched_weights(tmp_path):
    path = tmp_path / "kl.safetensors"
    save_model(AutoencoderKL(TINY), path)
    with pytest.raises(ValueError, match="holds a AutoencoderKL, not a VQModel"):
        VQModel.from_pretrained(path)
    with pytest.raises(ValueError, match="does not fit"):
        load_weights(AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 8), norm_num_groups=8, sample_size=16)), path)


# ----------------------------------------------------------------------------- parity with diffusers


SD_SHAPED = [
    AutoencoderConfig(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=16, sample_size=32),
    AutoencoderConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=2, norm_num_groups=32, sample_size=32),
]


@pytest.mark.parametrize("config", SD_SHAPED, ids=["f4", "f8-sd-groups"])
def test_autoencoder_kl_equals_diffusers(config):
    DiffusersAutoencoderKL = pytest.importorskip("diffusers").AutoencoderKL  # a test extra

    theirs = randomize(DiffusersAutoencoderKL(**diffusers_vae_config(config)), scale=0.05).eval()
    ours = AutoencoderKL(config).eval()
    ours.load_state_dict(theirs.state_dict())  # strict: every key and shape is diffusers'
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        q_theirs, q_ours = theirs.encode(x).latent_dist, ours.encode(x)
        torch.testing.assert_close(q_ours.mean, q_theirs.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(q_ours.logvar, q_theirs.logvar, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(q_ours.kl(), q_theirs.kl(), atol=1e-4, rtol=1e-5)
        z_theirs = q_theirs.sample(generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(q_ours.sample(torch.Generator().manual_seed(3)), z_theirs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.decode(z_theirs), theirs.decode(z_theirs).sample, atol=1e-5, rtol=1e-5)


def test_vq_model_equals_diffusers():
    DiffusersVQModel = pytest.importorskip("diffusers").VQModel  # a test extra

    config = SD_SHAPED[0]
    theirs = randomize(DiffusersVQModel(**diffusers_vae_config(config), num_vq_embeddings=config.num_vq_embeddings,
                                       vq_embed_dim=config.latent_channels), scale=0.05).eval()
    ours = VQModel(config).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        h = theirs.encode(x).latents
        torch.testing.assert_close(ours.encode(x), h, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.decode(h), theirs.decode(h).sample, atol=1e-5, rtol=1e-5)



@pytest.mark.parametrize("cls", [AutoencoderKL, VQModel])
def test_reconstruct_is_decode_of_encode_in_batches(cls):
    model = randomize(cls(TINY)).eval()
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(model.reconstruct(x, batch_size=2), model.decode_latents(model.encode_latents(x)))


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_the_vae_runs_in_half_precision_on_the_cpu(dtype):
    """bfloat16 on a CPU (float16 on a GPU): the posterior's noise is drawn in the latents' dtype."""
    vae = randomize(AutoencoderKL(TINY)).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        reference, _ = vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(0))
        half = vae.to(dtype)
        out, posterior = half(x.to(dtype), sample_posterior=True, generator=torch.Generator().manual_seed(0))
    assert out.dtype == dtype and posterior.sample(torch.Generator().manual_seed(0)).dtype == dtype
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.1)  # bf16 keeps ~3 significant digits


def test_pixel_space_is_the_identity_autoencoder_of_ldm_1():
    from minisd.nn.vae import PixelSpace

    pixels = PixelSpace()
    assert pixels.config.downsample_factor == 1 and pixels.config.latent_shape == (3, 32, 32)
    assert pixels.num_parameters == 0
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    assert torch.equal(pixels.reconstruct(x), x)
    assert pixels.decode_latents(torch.full((1, 3, 32, 32), 3.0)).max() == 1.0  # clamped like every decoder's output
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\)"):
        pixels.encode_latents(torch.zeros(1, 4, 32, 32))
