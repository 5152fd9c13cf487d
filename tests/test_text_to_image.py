"""Tests of minisd.text_to_image and scripts/train_text_to_image.py: data encoded once, the loss with
caption dropout, classifier-free guidance in one batched call, reworded and held-out prompts, exact
resume, and data-parallel training (2 processes = 1 process with twice the accumulation)."""

import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from minisd import text_to_image as t2i
from minisd.checkpoints import read_tensors, sha256
from minisd.config import asset_path
from minisd.data import CHARACTERS, COLOURS, GlyphDataset, all_combinations, glyph_caption, held_out_combinations
from minisd.nn.unet import UNet, UNetConfig
from minisd.nn.vae import AutoencoderKL
from minisd.schedules import NoiseSchedule
from minisd.train import Trainer, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SCHEDULE = NoiseSchedule.stable_diffusion()
D, L = 12, 5  # a tiny text width and window for stand-in encoders
TRAINING_CAPTION = re.compile(r"^(a|an) (\w+) (letter|digit) (\w) on (a|an) (\w+) background$")


class StubEncoder:
    """Stands in for TextEncoder: deterministic states per prompt, and a log of what it was asked."""

    max_length = L

    def __init__(self):
        self.calls: list[list[str]] = []

    def encode(self, prompts):
        self.calls.append(list(prompts))
        rows = [torch.randn(L, D, generator=torch.Generator().manual_seed(sum(map(ord, p)) + 7 * len(p))) for p in prompts]
        return torch.stack(rows)


class Recorder(torch.nn.Module):
    """ε_θ that predicts zeros and remembers the text states and batch size of every call."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, x_t, t, encoder_hidden_states=None):
        self.seen.append(encoder_hidden_states)
        return x_t * self.weight


def tiny_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(UNetConfig(in_channels=4, out_channels=4, sample_size=8, block_out_channels=(16, 16), layers_per_block=1,
                           attention=(True, False), attention_head_dim=8, norm_num_groups=8, cross_attention_dim=D))


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(asset_path("checkpoints", "vae_f4.safetensors"))


@pytest.fixture(scope="module")
def prepared(vae):
    encoder = StubEncoder()
    dataset = GlyphDataset(40, seed=0, exclude=held_out_combinations())
    return dataset, encoder, t2i.prepare_data(dataset, vae, encoder)


# ----------------------------------------------------------------------------- data


def test_each_unique_caption_is_encoded_once_and_indexed(prepared):
    dataset, encoder, data = prepared
    assert len(encoder.calls) == 1 and sorted(encoder.calls[0]) == sorted(set(encoder.calls[0]))
    assert data.prompts[0] == t2i.EMPTY_PROMPT and set(data.prompts[1:]) == set(dataset.captions)
    assert data.prompt_embeds.shape == (len(data.prompts), L, D)
    assert [data.prompts[i] for i in data.caption_index] == dataset.captions  # the index gives back each caption
    row = data.prompts.index(dataset.captions[3])
    torch.testing.assert_close(data.prompt_embeds[row], StubEncoder().encode([dataset.captions[3]])[0])


def test_latents_are_the_scaled_posterior_mean(prepared, vae):
    dataset, _, data = prepared
    assert data.latents.shape == (40, 4, 8, 8)
    with torch.no_grad():
        expected = vae.encode(dataset.images[:5]).mode() * vae.config.scaling_factor
    torch.testing.assert_close(data.latents[:5], expected, rtol=1e-4, atol=1e-5)


def test_prepared_data_holds_no_held_out_prompt(prepared):
    _, _, data = prepared
    held = {glyph_caption(*c) for c in held_out_combinations()}
    assert not set(data.prompts) & held and not set(data.combinations) & held_out_combinations()


def test_save_and_load_round_trip(prepared, tmp_path):
    _, _, data = prepared
    data.save(tmp_path / "d.safetensors", {"seed": 0})
    back, meta = t2i.TextToImageData.load(tmp_path / "d.safetensors")
    assert meta["seed"] == 0 and back.prompts == data.prompts and back.combinations == data.combinations
    for name in ("latents", "caption_index", "prompt_embeds"):
        assert torch.equal(getattr(back, name), getattr(data, name))


def test_grayscale_data_is_refused(vae):
    with pytest.raises(ValueError, match="grey-scale"):
        t2i.prepare_data(GlyphDataset(2, grayscale=True), vae, StubEncoder())


# ----------------------------------------------------------------------------- the loss


def loss_batch(B: int, U: int = 4):
    g = torch.Generator().manual_seed(1)
    table = torch.randn(U, L, D, generator=g)
    batch = {"latents": torch.randn(B, 4, 8, 8, generator=g), "caption_index": torch.randint(1, U, (B,), generator=g)}
    return table, batch


def test_caption_dropout_replaces_about_a_tenth_with_the_empty_prompt():
    table, batch = loss_batch(20_000)
    model = Recorder()
    t2i.text_to_image_loss(model, batch, torch.Generator().manual_seed(0), table, SCHEDULE)
    states = model.seen[0]  # (B, L, D)
    empty = (states == table[0]).flatten(1).all(1)
    kept = (states == table[batch["caption_index"]]).flatten(1).all(1)
    assert torch.equal(empty | kept, torch.ones_like(empty))  # each row is its caption or ""
    assert abs(empty.float().mean().item() - 0.1) < 0.01  # Binomial(20000, 0.1): σ = 0.002


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_no_dropout_keeps_every_caption_and_full_dropout_keeps_none(p):
    table, batch = loss_batch(64)
    model = Recorder()
    t2i.text_to_image_loss(model, batch, torch.Generator().manual_seed(0), table, SCHEDULE, caption_dropout=p)
    expected = table[batch["caption_index"]] if p == 0 else table[0].expand(64, L, D)
    assert torch.equal(model.seen[0], expected)


def test_loss_is_the_noise_mse_and_depends_only_on_the_generator():
    table, batch = loss_batch(4096)
    loss = t2i.text_to_image_loss(Recorder(), batch, torch.Generator().manual_seed(0), table, SCHEDULE)
    assert abs(loss.item() - 1.0) < 0.02  # predicting 0: E ε² = 1
    unet, small = tiny_unet(), {k: v[:8] for k, v in batch.items()}
    a, b, c = (t2i.text_to_image_loss(unet, small, torch.Generator().manual_seed(s), table, SCHEDULE) for s in (3, 3, 4))
    assert a.item() == b.item() != c.item()
    with pytest.raises(ValueError, match="caption_dropout"):
        t2i.text_to_image_loss(unet, small, torch.Generator(), table, SCHEDULE, caption_dropout=1.5)


def test_resume_continues_exactly(tmp_path):
    table, _ = loss_batch(1)
    g = torch.Generator().manual_seed(2)
    data = {"latents": torch.randn(32, 4, 8, 8, generator=g), "caption_index": torch.randint(1, 4, (32,), generator=g)}
    loss_fn = partial(t2i.text_to_image_loss, prompt_embeds=table, schedule=SCHEDULE)
    config = TrainConfig(steps=6, batch_size=4, warmup_steps=2)
    straight = Trainer(tiny_unet(), config, loss_fn, data)
    straight.fit(progress=False)
    first = Trainer(tiny_unet(), config, loss_fn, data)
    first.fit(3, progress=False)
    first.save(tmp_path / "c.safetensors")
    resumed = Trainer.resume(tmp_path / "c.safetensors", tiny_unet(seed=9), loss_fn, data)
    resumed.fit(progress=False)
    assert resumed.history == straight.history
    for a, b in zip(resumed.ema_model.state_dict().values(), straight.ema_model.state_dict().values()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- guidance


def test_guidance_formula_closed_forms():
    u, c = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.equal(t2i.classifier_free_guidance(u, c, 0.0), u)
    torch.testing.assert_close(t2i.classifier_free_guidance(u, c, 1.0), c)
    torch.testing.assert_close(t2i.classifier_free_guidance(u, c, 7.5), 7.5 * c - 6.5 * u)


def test_guided_model_is_one_batched_call_equal_to_two_separate_ones():
    unet = tiny_unet().eval()
    g = torch.Generator().manual_seed(5)
    x, cond, uncond = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, L, D, generator=g), torch.randn(3, L, D, generator=g)
    t = torch.tensor([10, 500, 990])
    calls = []
    unet.register_forward_hook(lambda module, args, kwargs, out: calls.append(args[0].shape[0]), with_kwargs=True)
    with torch.no_grad():
        guided = t2i.guided_model(unet, cond, uncond, 7.5)(x, t)
        assert calls == [6]  # [uncond, cond] in one call of batch 2B
        e_u, e_c = unet(x, t, encoder_hidden_states=uncond), unet(x, t, encoder_hidden_states=cond)
        torch.testing.assert_close(guided, e_u + 7.5 * (e_c - e_u), rtol=1e-5, atol=1e-5)
        calls.clear()
        torch.testing.assert_close(t2i.guided_model(unet, cond, uncond, 1.0)(x, t), e_c, rtol=1e-5, atol=1e-6)
        assert calls == [3]  # w = 1 needs only the conditional branch


def test_generate_is_seeded_and_independent_of_the_batch_size(vae):
    unet = tiny_unet().eval()
    states, empty = torch.randn(5, L, D), torch.randn(1, L, D)
    a = t2i.generate(unet, vae, states, empty, 3.0, num_inference_steps=3, seed=1, batch_size=5)
    b = t2i.generate(unet, vae, states, empty, 3.0, num_inference_steps=3, seed=1, batch_size=2)
    c = t2i.generate(unet, vae, states, empty, 3.0, num_inference_steps=3, seed=2, batch_size=5)
    assert a.shape == (5, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        t2i.generate(unet, vae, states, torch.randn(2, L, D), num_inference_steps=2)


# ----------------------------------------------------------------------------- evaluation prompts


def test_reworded_prompts_are_deterministic_and_never_training_captions():
    combos = t2i.evaluation_combinations(set(all_combinations()) - held_out_combinations(), 60, seed=1)
    prompts = t2i.reworded_prompts(combos)
    assert prompts == t2i.reworded_prompts(combos)
    assert t2i.reworded_caption("K", "red", "orange", 0) == "the letter K in red, orange background"
    assert t2i.reworded_caption("K", "red", "orange", 1) == "K, red on orange"
    training = {glyph_caption(*c) for c in all_combinations()}
    for (char, fg, bg), prompt in zip(combos, prompts):
        assert prompt not in training and not TRAINING_CAPTION.match(prompt)
        words = re.findall(r"\w+", prompt)
        assert char in words and fg in words and bg in words
        assert words.index(fg) < words.index(bg) or "background with" in prompt  # fg named first, or said to be on bg
    assert len({t2i.reworded_caption("A", "red", "blue", i) for i in range(len(t2i.REWORDINGS))}) == len(t2i.REWORDINGS)
    with pytest.raises(ValueError, match="not a glyph"):
        t2i.reworded_caption("k", "red", "blue")


def test_evaluation_combinations_cover_the_pool_before_repeating():
    held = held_out_combinations()
    many = t2i.evaluation_combinations(held, 512, seed=2)
    assert len(many) == 512 and set(many) == held  # 202 combinations, each 2-3 times
    few = t2i.evaluation_combinations(held, 50, seed=2)
    assert len(set(few)) == 50 and few == t2i.evaluation_combinations(held, 50, seed=2)
    assert set(CHARACTERS) >= {c for c, _, _ in many} and set(COLOURS) >= {fg for _, fg, _ in many}


# ----------------------------------------------------------------------------- the script, data-parallel


def run_script(tmp_path: Path, name: str, nproc: int, extra: list[str]) -> Path:
    run_dir = tmp_path / name
    args = ["--run-dir", str(run_dir), "--data-cache", str(tmp_path / "data.safetensors"), "--num-images", "48",
            "--steps", "3", "--warmup-steps", "2", "--batch-size", "4", "--block-out-channels", "16,16",
            "--attention", "1,0", "--norm-num-groups", "8", "--curve-every-min", "0", "--device", "cpu", *extra]
    if nproc == 1:  # in this process: the same main(), without paying for another interpreter start
        load_script().main(args)
        return run_dir / "checkpoint.safetensors"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(29500 + os.getpid() % 1000)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([*launcher, str(ROOT / "scripts" / "train_text_to_image.py"), *args], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return run_dir / "checkpoint.safetensors"


def test_two_processes_train_the_same_weights_as_one_with_twice_the_accumulation(tmp_path, vae):
    # the data cache, written here with the stub encoder (D = 12) so no process loads MiniLM
    dataset = GlyphDataset(48, seed=0, exclude=held_out_combinations())
    vae_path = asset_path("checkpoints", "vae_f4.safetensors")
    t2i.prepare_data(dataset, vae, StubEncoder()).save(tmp_path / "data.safetensors", {
        "num_images": 48, "seed": 0, "difficulty": "easy", "held_out_share": 0.1, "held_out_seed": 0,
        "vae": vae_path.name, "vae_sha256": sha256(vae_path)})
    one = read_tensors(run_script(tmp_path, "one", 1, ["--grad-accum-steps", "2"]))
    two = read_tensors(run_script(tmp_path, "two", 2, ["--grad-accum-steps", "1"]))
    assert one.keys() == two.keys()
    moved = 0
    for key in (k for k in one if k.startswith("model.")):
        # gloo averages the two gradients; one process sums the two halves: equal up to float rounding
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
        moved += 1
    assert moved > 10


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_text_to_image", ROOT / "scripts" / "train_text_to_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_budget_sizes_the_schedule_without_changing_the_steps_already_taken():
    script = load_script()
    table, _ = loss_batch(1)
    g = torch.Generator().manual_seed(3)
    data = {"latents": torch.randn(16, 4, 8, 8, generator=g), "caption_index": torch.randint(1, 4, (16,), generator=g)}
    loss_fn = partial(t2i.text_to_image_loss, prompt_embeds=table, schedule=SCHEDULE)
    config = TrainConfig(steps=10_000, batch_size=2, warmup_steps=script.PROBE_STEPS + 5)
    probed = Trainer(tiny_unet(), config, loss_fn, data)
    ticks = iter([0.0, 0.5 * (script.PROBE_STEPS - script.PROBE_SKIP)])  # a clock that says 0.5 s per timed step
    script.size_to_budget(probed, 1.0, 1, lambda msg: None, lambda: next(ticks))
    assert probed.config.steps == 120 and probed.step == script.PROBE_STEPS  # 60 s / 0.5 s
    planned = Trainer(tiny_unet(), TrainConfig(steps=120, batch_size=2, warmup_steps=config.warmup_steps), loss_fn, data)
    planned.fit(script.PROBE_STEPS, progress=False)
    assert planned.history == probed.history  # warm-up steps do not depend on the total
    with pytest.raises(ValueError, match="warmup"):
        script.size_to_budget(Trainer(tiny_unet(), TrainConfig(warmup_steps=5), loss_fn, data), 1.0, 1, print, time_clock)


def time_clock() -> float:
    return 0.0
