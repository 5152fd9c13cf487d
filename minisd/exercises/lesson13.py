"""Checks for lesson 13: the real thing (Stable Diffusion's own checkpoints, sizes and memory).

Each answer has many parts (686 keys, dozens of blocks, five memory figures), so each check walks
through them in a fixed order and names the first part that differs, with what that difference
usually means:

* ``check_unet_key_to_compvis``: every U-Net key of two configs, in classes (input/output layers,
  down-path ResNets, transformers, downsamplers, middle block, up path, upsamplers); the first
  class with a wrong key, which part of the name is wrong, and the rule for that part.
* ``check_count_unet_parameters``: one count per block, against the same model built on PyTorch's
  meta device; the first block that is off, its type, and the layer(s) the difference matches.
* ``check_latent_memory``: latent shape, its bytes, the tokens at the first level, one attention
  matrix, fused attention, in that order.
"""

from __future__ import annotations

import numbers
from itertools import combinations
from typing import Any, Callable

import torch
from torch import nn

from .. import convert
from ..nn.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from ..nn.transformer import Transformer2DModel
from ..nn.unet import UNet, UNetConfig
from .core import Case, ExerciseError, check_parts, not_written

__all__ = ["check_unet_key_to_compvis", "check_count_unet_parameters", "check_latent_memory"]

COURSE_SHAPE = UNetConfig(in_channels=4, out_channels=4, sample_size=8, block_out_channels=(32, 64, 128),
                          layers_per_block=1, attention=(True, True, False), attention_head_dim=16, norm_num_groups=8,
                          cross_attention_dim=384)  # the course's text-to-image U-Net: one ResNet per level


def _run(name: str, fn: Callable, reference: Callable, cases: list[Case],
         diagnose: Callable[[str, Case, Any, Any], None]) -> Callable:
    """``core.check`` with a part-by-part ``diagnose(where, case, expected, got)`` for wrong answers."""
    return check_parts(name, fn, reference, cases, diagnose, describe=lambda case: case.label)


def _config_name(config: UNetConfig) -> str:
    if config == UNetConfig.stable_diffusion_v1():
        return "SD v1.5"
    if config == UNetConfig.stable_diffusion_v2():
        return "SD 2.1"
    return "the course's shape" if config == COURSE_SHAPE else "a U-Net config"


def _meta_unet(config: UNetConfig) -> UNet:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return UNet(config)


# ----------------------------------------------------------------------------- the CompVis key map

KEY_CLASSES = ("input and output layers", "down-path ResNet blocks", "down-path transformers", "downsamplers",
               "the middle block", "up-path ResNet blocks", "up-path transformers", "upsamplers")
RESNET_RULE = ("a ResNet block's parts are renamed: norm1 → in_layers.0, conv1 → in_layers.2, time_emb_proj → "
               "emb_layers.1, norm2 → out_layers.0, conv2 → out_layers.3, conv_shortcut → skip_connection")


def key_class(key: str) -> str:
    """Which of ``KEY_CLASSES`` a minisd/diffusers U-Net key belongs to."""
    parts = key.split(".")
    if parts[0] == "mid_block":
        return "the middle block"
    if parts[0] not in ("down_blocks", "up_blocks"):
        return "input and output layers"
    side = "down" if parts[0] == "down_blocks" else "up"
    return {"resnets": f"{side}-path ResNet blocks", "attentions": f"{side}-path transformers"}.get(parts[2], f"{side}samplers")


def _key_rule(kind: str, part: str, n: int) -> str:
    """The rule a learner needs when ``part`` of a key of class ``kind`` is wrong; n = layers_per_block."""
    down_block = f"input_blocks.0 is conv_in, and each level holds {n} ResNet block(s) and a downsampler, so level l's " \
                 f"block j is input_blocks.(1 + l·(n + 1) + j), n = layers_per_block = {n}"
    up_block = f"each up level holds n + 1 = {n + 1} blocks (the upsampler rides in the last one), so level l's block j " \
               f"is output_blocks.(l·(n + 1) + j), n = {n}"
    rules = {
        ("input and output layers", "rest"): "conv_in → input_blocks.0.0, time_embedding.linear_1/linear_2 → time_embed.0/"
                                             "time_embed.2 (index 1 is the SiLU), conv_norm_out → out.0, conv_out → out.2",
        ("the middle block", "index"): "resnets.0, attentions.0, resnets.1 become middle_block.0, .1, .2",
        ("the middle block", "rest"): RESNET_RULE + " (in middle_block.0 and .2; the transformer keeps its names)",
        ("downsamplers", "index"): down_block + "; the downsampler sits in block j = n",
        ("downsamplers", "sub"): "a downsampler is module 0 of its own block",
        ("downsamplers", "rest"): "the downsampler's conv is called op: downsamplers.0.conv.weight → op.weight",
        ("upsamplers", "index"): up_block + "; the upsampler shares the last block, j = n",
        ("upsamplers", "sub"): "in the last block of an up level the upsampler follows the ResNet block (0) and, at "
                               "levels with attention, the transformer (1): it is module 2 there, module 1 elsewhere",
    }
    for side, block_rule in (("down", down_block), ("up", up_block)):
        rules[(f"{side}-path ResNet blocks", "index")] = block_rule
        rules[(f"{side}-path ResNet blocks", "sub")] = "the ResNet block is module 0 of its block"
        rules[(f"{side}-path ResNet blocks", "rest")] = RESNET_RULE
        rules[(f"{side}-path transformers", "index")] = block_rule + "; a transformer shares its ResNet block's index j"
        rules[(f"{side}-path transformers", "sub")] = "the transformer is module 1 of its block, after the ResNet block"
        rules[(f"{side}-path transformers", "rest")] = "inside a transformer the names stay as they are"
    group = ("down-path blocks live in input_blocks, the middle in middle_block, up-path blocks in output_blocks; "
             "all under model.diffusion_model.")
    return rules.get((kind, part), group)


def _which_part(expected: str, got: str) -> str:
    """"group", "index", "sub" or "rest": the first part of a CompVis key that differs."""
    e, g = expected.split("."), got.split(".")
    if len(g) < 4 or g[:3] != e[:3]:  # model.diffusion_model.<input_blocks|middle_block|output_blocks>
        return "group"
    if g[3] != e[3]:
        return "index"
    if e[2] in ("input_blocks", "output_blocks") and (len(g) < 5 or g[4] != e[4]):
        return "sub"
    return "rest"


def _diagnose_keys(name: str, fn: Callable, config: UNetConfig) -> int:
    """Compare ``fn`` with the reference on every key of ``config``; raise at the first class with a wrong key."""
    keys = list(_meta_unet(config).state_dict())
    wrong: dict[str, tuple[str, str, str]] = {}
    for key in keys:
        try:
            got = fn(key, config)
        except NotImplementedError:
            raise
        except Exception as error:
            raise ExerciseError(f"`{name}` raised {type(error).__name__}: {error}\n  on key {key!r} "
                                f"({key_class(key)}) of {_config_name(config)}") from error
        expected = convert.unet_key_to_compvis(key, config)
        if got != expected and key_class(key) not in wrong:
            wrong[key_class(key)] = (key, expected, got)
    for kind in KEY_CLASSES:
        if kind in wrong:
            key, expected, got = wrong[kind]
            if got is None:
                raise ExerciseError(f"`{name}` returned None for {key!r}: did you forget a `return`?")
            if not isinstance(got, str):
                raise ExerciseError(f"`{name}` returned a {type(got).__name__} for {key!r}; return the CompVis key as a str.")
            part = "rest" if kind == KEY_CLASSES[0] else _which_part(expected, got)
            what = {"group": "the block list", "index": "the block index", "sub": "the module index inside the block",
                    "rest": "the names after the block"}[part]
            correct = [k for k in KEY_CLASSES if k not in wrong]
            raise ExerciseError(
                f"`{name}` on {_config_name(config)} ({config.layers_per_block} ResNet block(s) per level): the first "
                f"class with a wrong key is {kind}.\n  key:      {key}\n  expected: {expected}\n  got:      {got}\n"
                f"  wrong part: {what}. The rule: {_key_rule(kind, part, config.layers_per_block)}.\n"
                f"  (classes with every key right: {', '.join(correct) or 'none yet'})")
    return len(keys)


def check_unet_key_to_compvis(fn: Callable) -> Callable:
    """Check ``fn(key, config)`` -> SD's ``model.diffusion_model.*`` name, on every key of SD v1.5 and of the
    course's shape (one ResNet block per level)."""
    reference = convert.unet_key_to_compvis
    counted = []
    for config in (UNetConfig.stable_diffusion_v1(), COURSE_SHAPE):
        try:
            counted.append(_diagnose_keys("unet_key_to_compvis", fn, config))
        except NotImplementedError:
            return not_written("unet_key_to_compvis", reference)
    print(f"✅ `unet_key_to_compvis` gives SD's name for all {counted[0]} keys of SD v1.5 and all {counted[1]} "
          "of the course's shape.")
    return fn


# ----------------------------------------------------------------------------- counting parameters


def block_name(key: str) -> str:
    """The block a parameter belongs to: "down_blocks.1.resnets.0", "mid_block.attentions.0", "conv_in" …"""
    parts = key.split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        return ".".join(parts[:4])
    return ".".join(parts[:3]) if parts[0] == "mid_block" else parts[0]


def reference_count_unet_parameters(config: UNetConfig) -> dict[str, int]:
    """Parameters per block of ``UNet(config)``, counted on the meta device (the oracle of the exercise)."""
    counts: dict[str, int] = {}
    for key, p in _meta_unet(config).named_parameters():
        counts[block_name(key)] = counts.get(block_name(key), 0) + p.numel()
    return counts


def _leaves(module: nn.Module) -> dict[str, nn.Module]:
    """The layers of a block that hold parameters themselves: {"conv1": Conv2d, "transformer_blocks.0.attn2.to_k": …}."""
    return {name: m for name, m in module.named_modules() if any(True for _ in m.parameters(recurse=False))}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _describe_block(name: str, block: nn.Module) -> str:
    if isinstance(block, ResnetBlock2D):
        temb = block.time_emb_proj.in_features
        return f"a ResNet block, {block.conv1.in_channels} → {block.conv1.out_channels} channels, temb {temb}"
    if isinstance(block, Transformer2DModel):
        attn2 = block.transformer_blocks[0].attn2
        return f"a transformer, C = {block.norm.num_channels}, text width D = {attn2.to_k.in_features}"
    if isinstance(block, (Downsample2D, Upsample2D)):
        return f"{'a downsampler' if isinstance(block, Downsample2D) else 'an upsampler'}: a 3×3 conv at C = {block.conv.in_channels}"
    return {"conv_in": "the input conv", "time_embedding": "the timestep MLP", "conv_norm_out": "the last GroupNorm",
            "conv_out": "the output conv"}.get(name, type(block).__name__)


def _resnet_count(cin: int, cout: int, temb: int) -> int:
    """SD's ResnetBlock2D: GroupNorms, two 3×3 convs, the time projection, a 1×1 shortcut when cin ≠ cout."""
    shortcut = cin * cout + cout if cin != cout else 0
    return 2 * cin + (9 * cin * cout + cout) + (temb * cout + cout) + 2 * cout + (9 * cout * cout + cout) + shortcut


def _resnet_slip(block: nn.Module, delta: int, got: int, config: UNetConfig) -> str | None:
    cin, cout, temb = block.conv1.in_channels, block.conv1.out_channels, block.time_emb_proj.in_features
    if cin == cout and delta == cin * cout + cout:
        return f"there is no conv_shortcut here: in_channels = out_channels = {cin}, so x is added as it is."
    widths = set(config.block_out_channels)
    for other in sorted(widths | {a + b for a in widths for b in widths}):
        if other != cin and _resnet_count(other, cout, temb) == got:
            return (f"your count fits in_channels = {other}; this block reads {cin} channels. On the up path each "
                    "ResNet block takes the running features concatenated with one skip from the down path.")
    return None


def _transformer_slip(block: nn.Module, delta: int) -> str | None:
    C, D = block.norm.num_channels, block.transformer_blocks[0].attn2.to_k.in_features
    if delta == 2 * C * C - 2 * D * C:
        return f"cross-attention's to_k and to_v read the text states: D = {D} inputs each, not C = {C}."
    if delta in (3 * C, 6 * C):
        return "you gave to_q, to_k, to_v biases: in SD's transformers they have none (bias=False)."
    if delta == -(4 * C * C + 4 * C):
        return f"GEGLU's proj makes two halves (value and gate): C → 2 · 4C = {8 * C}, then net.2 maps 4C → C."
    return None


def _leaf_slip(name: str, block: nn.Module, delta: int) -> str:
    leaves = {leaf or name: _count(m) for leaf, m in _leaves(block).items()}  # a bare layer is its own leaf ""
    for r in (1, 2, 3):
        for names in combinations(leaves, r):
            if sum(leaves[n] for n in names) == abs(delta):
                verb = "leaves out" if delta < 0 else "counts twice"
                return f"your count {verb} {' + '.join(names)} ({abs(delta):,} parameters)."
    table = ", ".join(f"{n} {c:,}" for n, c in leaves.items())
    return f"the difference is {delta:+,}. The block's layers hold: {table}."


def _slip(name: str, block: nn.Module, expected: int, got: int, config: UNetConfig) -> str:
    """What the difference between the right count and the learner's most likely comes from."""
    delta = got - expected
    specific = None
    if isinstance(block, ResnetBlock2D):
        specific = _resnet_slip(block, delta, got, config)
    elif isinstance(block, Transformer2DModel):
        specific = _transformer_slip(block, delta)
    return specific or _leaf_slip(name, block, delta)


def _diagnose_counts(where: str, case: Case, expected: dict, got: Any) -> None:
    if not isinstance(got, dict):
        raise ExerciseError(f"{where} returned a {type(got).__name__}; return a dict {{block name: count}}.")
    config = case.kwargs["config"]
    missing, extra = [k for k in expected if k not in got], [k for k in got if k not in expected]
    if missing or extra:
        raise ExerciseError(f"{where}: the blocks differ. Missing: {missing[:4]}{' …' if len(missing) > 4 else ''}; "
                            f"not in this U-Net: {extra[:4]}{' …' if len(extra) > 4 else ''}. Name blocks as the "
                            "model's keys do, e.g. 'conv_in', 'down_blocks.0.resnets.1', 'mid_block.attentions.0'.")
    model = _meta_unet(config)
    for name, count in expected.items():  # model order: conv_in, time_embedding, down, mid, up, conv_out
        if got[name] != count:
            block = model.get_submodule(name)
            raise ExerciseError(f"{where}: the first block that is off is {name} ({_describe_block(name, block)}): expected "
                                f"{count:,}, got {got[name]:,}; {_slip(name, block, count, got[name], config)}")


def check_count_unet_parameters(fn: Callable) -> Callable:
    """Check ``fn(config)`` -> {block name: parameter count}, against ``UNet(config)`` on the meta device."""
    cases = [Case({"config": config}, _config_name(config))
             for config in (COURSE_SHAPE, UNetConfig.stable_diffusion_v1(), UNetConfig.stable_diffusion_v2())]
    return _run("count_unet_parameters", fn, reference_count_unet_parameters, cases, _diagnose_counts)


# ----------------------------------------------------------------------------- latents and attention memory

MEMORY_PARTS = ("latent_shape", "latent_bytes", "tokens", "attention_bytes", "fused_attention_bytes")


def reference_latent_memory(height: int, width: int, batch_size: int, dtype: torch.dtype, config: UNetConfig,
                            vae_scale_factor: int = 8) -> dict:
    """Latent shape and bytes, and the memory of one self-attention at the U-Net's first level."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    h, w = height // vae_scale_factor, width // vae_scale_factor
    shape = (batch_size, config.in_channels, h, w)
    tokens, C = h * w, config.block_out_channels[0]  # the first level works at the latents' own size
    return {"latent_shape": shape, "latent_bytes": batch_size * config.in_channels * h * w * itemsize, "tokens": tokens,
            "attention_bytes": batch_size * config.heads(C) * tokens * tokens * itemsize,  # (B, heads, N, N)
            "fused_attention_bytes": batch_size * tokens * C * itemsize}  # (B, N, C): Q, K, V or the output


def _memory_hint(part: str, kwargs: dict, got: Any, expected: dict) -> str:
    """What a wrong value of ``part`` most often means."""
    B, H, W, f = kwargs["batch_size"], kwargs["height"], kwargs["width"], kwargs["vae_scale_factor"]
    config, dtype = kwargs["config"], kwargs["dtype"]
    itemsize, C = torch.empty((), dtype=dtype).element_size(), config.block_out_channels[0]
    e, N, heads = expected[part], expected["tokens"], config.heads(C)
    if part == "latent_shape":
        return (f"(batch_size, latent channels = config.in_channels = {config.in_channels}, height / f, width / f) with "
                f"f = vae_scale_factor = {f}, height first")
    if part in ("latent_bytes", "attention_bytes", "fused_attention_bytes") and isinstance(got, numbers.Real):
        for size in (1, 2, 4, 8):
            if size != itemsize and got * itemsize == e * size:
                return f"{dtype} takes {itemsize} byte(s) per element (torch.empty((), dtype=dtype).element_size())"
        if got * B == e:
            return f"count the whole batch (batch_size = {B}: with CFG the U-Net sees two copies of each latent)"
    if part == "tokens":
        if got == H * W:
            return "tokens are latent pixels, not image pixels: N = (height / f) · (width / f)"
        return "the first level works at the latents' own size: N = (height / f) · (width / f)"
    if part == "attention_bytes":
        if got * heads == e:
            return f"each of the {heads} heads has its own N × N matrix: (B, heads, N, N), heads = config.heads({C})"
        if got == B * heads * N * C * itemsize or got == B * N * C * itemsize:
            return "the attention matrix is N × N (every token with every token), not N × C"
        return "softmax(QKᵀ/√d) is (B, heads, N, N)"
    if part == "fused_attention_bytes":
        if got == expected["attention_bytes"]:
            return "fused attention never stores the N × N matrix: its largest tensor is Q, K, V or the output, (B, N, C)"
        return f"Q, K, V and the output are each (B, N, C), C = {C} = heads · d"
    return ""


def _plain(value: Any) -> Any:
    """Tensors, NumPy numbers and torch.Size as plain Python ints and tuples, so that any correct form compares."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(value)
    if isinstance(value, (tuple, list, torch.Size)) and all(isinstance(v, numbers.Integral) for v in value):
        return tuple(int(v) for v in value)
    return value


def _diagnose_memory(where: str, case: Case, expected: dict, got: Any) -> None:
    if not isinstance(got, dict):
        raise ExerciseError(f"{where} returned a {type(got).__name__}; return a dict with keys {MEMORY_PARTS}.")
    for part in MEMORY_PARTS:
        if part not in got:
            raise ExerciseError(f"{where}: no {part!r} in the result; return all of {MEMORY_PARTS}.")
        value, right = _plain(got[part]), expected[part]
        same = value == right
        if not same:
            raise ExerciseError(f"{where}: the first part that differs is {part}: expected {right!r}, got {value!r}. "
                                f"Hint: {_memory_hint(part, case.kwargs, value, expected)}.")


def check_latent_memory(fn: Callable) -> Callable:
    """Check ``fn(height, width, batch_size, dtype, config, vae_scale_factor)`` -> dict of ``MEMORY_PARTS``."""
    v1, v2 = UNetConfig.stable_diffusion_v1(), UNetConfig.stable_diffusion_v2()
    cases = [Case(dict(height=512, width=512, batch_size=2, dtype=torch.float32, config=v1, vae_scale_factor=8),
                  "SD v1.5, 512², CFG batch, float32"),
             Case(dict(height=768, width=512, batch_size=1, dtype=torch.float16, config=v1, vae_scale_factor=8),
                  "SD v1.5, 768×512, float16"),
             Case(dict(height=768, width=768, batch_size=2, dtype=torch.float16, config=v2, vae_scale_factor=8),
                  "SD 2.1, 768², CFG batch, float16")]
    return _run("latent_memory", fn, reference_latent_memory, cases, _diagnose_memory)
