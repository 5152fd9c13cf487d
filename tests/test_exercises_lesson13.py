"""Lesson 13's checks: right answers pass in any correct form, stubs fall back, slips are named."""

import math

import numpy as np
import pytest
import torch

from minisd import exercises
from minisd.exercises import ExerciseError

pytestmark = pytest.mark.usefixtures("one_thread")

PREFIX = "model.diffusion_model."
RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
TOP_NAMES = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def stub(*args, **kwargs):
    raise NotImplementedError


# ----------------------------------------------------------------------------- a learner's key map, and slips


def learner_key(key, config, *, n_fixed=None, upsampler_after_attention=2, rename_resnets=True, down_offset=1,
                downsampler_name="op", mid_order=("resnets.0", "attentions.0", "resnets.1")):
    """A right answer written independently of minisd's; each keyword turns one rule into a common slip."""
    for ours, theirs in TOP_NAMES.items():
        if key.startswith(ours + "."):
            return PREFIX + theirs + key[len(ours):]
    n = n_fixed or config.layers_per_block
    parts = key.split(".")

    def resnet(rest):
        name, tail = rest.split(".", 1)
        return f"{RESNET_NAMES[name]}.{tail}" if rename_resnets else rest

    if parts[0] == "mid_block":
        index = mid_order.index(".".join(parts[1:3]))
        rest = ".".join(parts[3:])
        return f"{PREFIX}middle_block.{index}." + (rest if parts[1] == "attentions" else resnet(rest))
    level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
    if parts[0] == "down_blocks":
        if kind == "downsamplers":
            return f"{PREFIX}input_blocks.{down_offset + level * (n + 1) + n}.0.{downsampler_name}.{parts[-1]}"
        sub = "0." + resnet(rest) if kind == "resnets" else "1." + rest
        return f"{PREFIX}input_blocks.{down_offset + level * (n + 1) + j}.{sub}"
    if kind == "upsamplers":
        after = upsampler_after_attention if config.attention[::-1][level] else 1
        return f"{PREFIX}output_blocks.{level * (n + 1) + n}.{after}.{rest}"
    sub = "0." + resnet(rest) if kind == "resnets" else "1." + rest
    return f"{PREFIX}output_blocks.{level * (n + 1) + j}.{sub}"


def test_the_key_map_check_passes_a_right_answer_and_falls_back_from_a_stub(capsys):
    assert exercises.check_unet_key_to_compvis(learner_key) is learner_key
    reference = exercises.check_unet_key_to_compvis(stub)
    assert reference is not stub and exercises.check_unet_key_to_compvis(reference) is reference
    out = capsys.readouterr().out
    assert "not written yet" in out and out.count("✅") == 2 and "686" in out


@pytest.mark.parametrize("slip, words", [
    (dict(rename_resnets=False), ["down-path ResNet blocks", "wrong part: the names after the block", "conv1 → in_layers.2"]),
    (dict(down_offset=0), ["down-path ResNet blocks", "wrong part: the block index", "input_blocks.0 is conv_in"]),
    (dict(upsampler_after_attention=1), ["upsamplers", "module index inside the block", "module 2 there"]),
    (dict(downsampler_name="conv"), ["downsamplers", "the names after the block", "called op"]),
    (dict(mid_order=("attentions.0", "resnets.0", "resnets.1")), ["the middle block", "the block index"]),
    (dict(n_fixed=2), ["the course's shape", "n = layers_per_block = 1"]),  # SD's 2 written in: the course's 1 fails
])
def test_key_map_slips_name_the_first_class_and_part(slip, words):
    with pytest.raises(ExerciseError) as error:
        exercises.check_unet_key_to_compvis(lambda key, config: learner_key(key, config, **slip))
    message = str(error.value)
    assert "`unet_key_to_compvis`" in message and all(w in message for w in words), message


def test_key_map_errors_in_learner_code_name_the_key():
    with pytest.raises(ExerciseError, match=r"(?s)raised ValueError.*on key .mid_block.resnets.0.norm1.weight. \(the middle block\) of SD v1.5"):
        exercises.check_unet_key_to_compvis(lambda key, config: learner_key(key, config, mid_order=("x",))
                                            if key.startswith("mid") else learner_key(key, config))


# ----------------------------------------------------------------------------- counting parameters by hand


def learner_counts(config, *, shortcut_always=False, skip=True, qkv_bias=False, kv_width=None, geglu=2, temb_proj=True):
    widths, n, C0 = config.block_out_channels, config.layers_per_block, config.block_out_channels[0]
    temb, D = 4 * C0, config.cross_attention_dim

    def resnet(cin, cout):
        total = 2 * cin + 9 * cin * cout + cout + 2 * cout + 9 * cout * cout + cout
        total += (temb * cout + cout) if temb_proj else 0
        return total + (cin * cout + cout if cin != cout or shortcut_always else 0)

    def transformer(c):
        qkv = 3 * (c * c + (c if qkv_bias else 0))
        cross = c * c + 2 * (kv_width or D) * c + (3 * c if qkv_bias else 0)
        return 2 * c + 2 * (c * c + c) + 6 * c + qkv + cross + 2 * (c * c + c) + c * geglu * 4 * c + geglu * 4 * c + 4 * c * c + c

    counts = {"conv_in": 9 * config.in_channels * C0 + C0, "time_embedding": C0 * temb + temb + temb * temb + temb}
    for i, (c, attn) in enumerate(zip(widths, config.attention)):
        for j in range(n):
            counts[f"down_blocks.{i}.resnets.{j}"] = resnet(widths[max(i - 1, 0)] if j == 0 else c, c)
            if attn:
                counts[f"down_blocks.{i}.attentions.{j}"] = transformer(c)
        if i < len(widths) - 1:
            counts[f"down_blocks.{i}.downsamplers.0"] = 9 * c * c + c
    counts |= {"mid_block.resnets.0": resnet(widths[-1], widths[-1]), "mid_block.attentions.0": transformer(widths[-1]),
               "mid_block.resnets.1": resnet(widths[-1], widths[-1])}
    rev, rev_attention, L = widths[::-1], config.attention[::-1], len(widths)
    for i in range(L):
        prev, c, skip_next = rev[max(i - 1, 0)], rev[i], rev[min(i + 1, L - 1)]
        for j in range(n + 1):
            cin = (prev if j == 0 else c) + ((skip_next if j == n else c) if skip else 0)
            counts[f"up_blocks.{i}.resnets.{j}"] = resnet(cin, c)
            if rev_attention[i]:
                counts[f"up_blocks.{i}.attentions.{j}"] = transformer(c)
        if i < L - 1:
            counts[f"up_blocks.{i}.upsamplers.0"] = 9 * c * c + c
    return counts | {"conv_norm_out": 2 * C0, "conv_out": 9 * C0 * config.out_channels + config.out_channels}


def test_the_count_check_passes_a_right_answer_and_its_reference_is_sd_size(capsys):
    assert exercises.check_count_unet_parameters(learner_counts) is learner_counts
    reference = exercises.check_count_unet_parameters(stub)
    assert reference is not stub and exercises.check_count_unet_parameters(reference) is reference
    assert sum(reference(exercises.lesson13.UNetConfig.stable_diffusion_v1()).values()) == 859_520_964
    out = capsys.readouterr().out
    assert "not written yet" in out and out.count("✅") == 2


@pytest.mark.parametrize("slip, words", [
    (dict(skip=False), ["up_blocks.0.resnets.0", "fits in_channels = 128", "reads 256", "skip"]),
    (dict(shortcut_always=True), ["down_blocks.0.resnets.0", "no conv_shortcut here"]),
    (dict(temb_proj=False), ["down_blocks.0.resnets.0", "leaves out time_emb_proj"]),
    (dict(qkv_bias=True), ["down_blocks.0.attentions.0", "a transformer", "biases"]),
    (dict(kv_width=32), ["down_blocks.0.attentions.0", "D = 384 inputs"]),
    (dict(geglu=1), ["down_blocks.0.attentions.0", "GEGLU"]),
])
def test_count_slips_name_the_first_block_and_the_layer(slip, words):
    with pytest.raises(ExerciseError) as error:
        exercises.check_count_unet_parameters(lambda config: learner_counts(config, **slip))
    message = str(error.value)
    assert "`count_unet_parameters` on the course's shape" in message and all(w in message for w in words), message


def test_count_blocks_missing_or_a_bare_total_are_explained():
    with pytest.raises(ExerciseError, match=r"Missing: \['down_blocks.0.downsamplers.0'"):
        exercises.check_count_unet_parameters(
            lambda config: {k: v for k, v in learner_counts(config).items() if "downsamplers" not in k})
    with pytest.raises(ExerciseError, match="returned a int; return a dict"):
        exercises.check_count_unet_parameters(lambda config: sum(learner_counts(config).values()))


# ----------------------------------------------------------------------------- latents and attention memory


def learner_memory(height, width, batch_size, dtype, config, vae_scale_factor=8):
    """Right, in other forms: torch.Size, NumPy and tensor numbers."""
    bytes_per = torch.finfo(dtype).bits // 8
    latents = torch.empty(batch_size, config.in_channels, height // vae_scale_factor, width // vae_scale_factor, device="meta")
    N = latents.shape[-1] * latents.shape[-2]
    C = config.block_out_channels[0]
    return {"latent_shape": latents.shape, "latent_bytes": np.int64(latents.numel() * bytes_per), "tokens": N,
            "attention_bytes": torch.tensor(batch_size * config.heads(C) * N**2 * bytes_per),
            "fused_attention_bytes": float(batch_size * N * C * bytes_per)}


def test_the_memory_check_passes_other_forms_and_falls_back(capsys):
    assert exercises.check_latent_memory(learner_memory) is learner_memory
    reference = exercises.check_latent_memory(stub)
    v1 = exercises.lesson13.UNetConfig.stable_diffusion_v1()
    figures = reference(512, 512, 2, torch.float32, v1, 8)
    assert figures["latent_shape"] == (2, 4, 64, 64) and figures["attention_bytes"] == 2 * 8 * 4096**2 * 4
    assert "not written yet" in capsys.readouterr().out


def _with(**changes):
    def slip(height, width, batch_size, dtype, config, vae_scale_factor=8):
        out = learner_memory(height, width, batch_size, dtype, config, vae_scale_factor)
        N, C = out["tokens"], config.block_out_channels[0]
        values = {"itemsize4": {"latent_bytes": math.prod(out["latent_shape"]) * 4},
                  "hw": {"latent_shape": (batch_size, 3, height // 8, width // 8)},
                  "swap": {"latent_shape": (batch_size, config.in_channels, width // 8, height // 8)},
                  "image_tokens": {"tokens": height * width},
                  "no_heads": {"attention_bytes": int(out["attention_bytes"]) // config.heads(C)},
                  "fused_is_matrix": {"fused_attention_bytes": int(out["attention_bytes"])}}
        return out | values[changes["name"]]
    return slip


@pytest.mark.parametrize("name, words", [
    ("itemsize4", ["latent_bytes", "takes 2 byte(s) per element"]),
    ("hw", ["latent_shape", "config.in_channels = 4"]),
    ("swap", ["SD v1.5, 768×512", "latent_shape", "height first"]),
    ("image_tokens", ["tokens", "not image pixels"]),
    ("no_heads", ["attention_bytes", "each of the 8 heads"]),
    ("fused_is_matrix", ["fused_attention_bytes", "never stores the N × N matrix"]),
])
def test_memory_slips_name_the_first_part(name, words):
    with pytest.raises(ExerciseError) as error:
        exercises.check_latent_memory(_with(name=name))
    message = str(error.value)
    assert "`latent_memory`" in message and all(w in message for w in words), message
