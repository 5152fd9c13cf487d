"""Lesson 06's training scripts, run small: the autoencoder's reconstruction curve, and the LDM's
equal-compute budget, its KID and floors in the card, and its resumption."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AE_F4 = ROOT / "assets" / "checkpoints" / "ae_f4.safetensors"


def run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, f"scripts/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_autoencoder_card_has_a_held_out_reconstruction_curve(tmp_path):
    out = tmp_path / "ae.safetensors"
    run("train_autoencoder.py", "--name", "ae_tiny", "--block-out-channels", "16,16", "--layers-per-block", "1",
        "--norm-num-groups", "8", "--steps", "4", "--batch-size", "8", "--num-images", "64", "--curve-every", "2",
        "--run-dir", str(tmp_path / "run"), "--export", str(out))
    card = json.loads(out.with_suffix(".json").read_text())
    points = card["curve"]["points"]
    assert [p["step"] for p in points] == [2, 4]
    assert all(5 < p["psnr_glyphs"] < 60 and 5 < p["psnr_photos"] < 60 for p in points)


def test_ldm_trains_for_a_compute_budget_scores_kid_and_resumes(tmp_path):
    out, run_dir = tmp_path / "ldm.safetensors", tmp_path / "run"
    args = ["--autoencoder", str(AE_F4), "--train-tflops", "0.012", "--batch-size", "4", "--num-images", "64",
            "--num-eval-samples", "80", "--num-curve-samples", "70", "--eval-fractions", "0.5",
            "--run-dir", str(run_dir), "--export", str(out)]
    log = run("train_latent_diffusion.py", *args)
    card = json.loads(out.with_suffix(".json").read_text())
    flops = card["train_flops_per_step"]
    assert card["steps"] == round(0.012e12 / flops) > 1, log
    assert card["loss"]["snr_gamma"] is None  # L_simple unless asked
    assert [p["n"] for p in card["curve"]] == [70, 80]  # the intermediate point at half the compute, then the end
    assert card["curve"][-1]["train_flops"] == card["steps"] * flops
    for point in (card["curve"][-1], *card["floors"].values()):
        assert {"glyph_fid", "kid", "kid_std", "recognisable"} <= set(point)
    floors = card["floors"]
    assert floors["real_vs_real"]["recognisable"] > 0.9 > floors["uniform_noise"]["recognisable"]
    assert floors["uniform_noise"]["kid"] > 10 * abs(floors["real_vs_real"]["kid"])
    log = run("train_latent_diffusion.py", *args, "--resume")  # nothing left to train: it picks up the end state
    assert f"resumed at step {card['steps']}" in log
    again = json.loads(out.with_suffix(".json").read_text())
    assert again["steps"] == card["steps"] and again["curve"] == card["curve"] and len(again["command"]) == 2


def test_f1_is_pixel_space_diffusion(tmp_path):
    out = tmp_path / "ldm_f1.safetensors"
    run("train_latent_diffusion.py", "--autoencoder", "pixels", "--name", "ldm_f1", "--train-tflops", "0.01",
        "--batch-size", "2", "--num-images", "16", "--num-eval-samples", "66", "--eval-fractions", "",
        "--snr-gamma", "5", "--run-dir", str(tmp_path / "run"), "--export", str(out))
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["loss"]["snr_gamma"] == 5.0 and "Min-SNR-5" in card["loss"]["kind"]
    assert card["autoencoder"] == {"file": None, "pixels": True, "scaling_factor": 1.0}
    config = card["model_config"]
    assert (config["in_channels"], config["out_channels"], config["sample_size"]) == (3, 3, 32)  # the pixels themselves
    assert card["steps"] == round(0.01e12 / card["train_flops_per_step"]) >= 1
