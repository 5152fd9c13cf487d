"""Device choice, fast mode and seeding."""

import random

import pytest
import torch

from minisd import config


def test_device_override_and_bad_values(monkeypatch):
    monkeypatch.setenv("MINISD_DEVICE", "cpu")
    assert config.get_device() == torch.device("cpu")
    monkeypatch.setenv("MINISD_DEVICE", "tpu")
    with pytest.raises(ValueError, match=r"MINISD_DEVICE='tpu'.*\('cpu', 'cuda', 'mps'\)"):
        config.get_device()


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_unset_device_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.delenv("MINISD_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert config.get_device() == torch.device(expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_says_so(monkeypatch):
    monkeypatch.setenv("MINISD_DEVICE", "cuda")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        config.get_device()


def test_fast_mode(monkeypatch):
    monkeypatch.setenv("MINISD_FAST", "1")
    assert config.is_fast() and config.fast_or_full(3, 300) == 3
    monkeypatch.setenv("MINISD_FAST", "0")
    assert not config.is_fast() and config.fast_or_full(3, 300) == 300
    monkeypatch.delenv("MINISD_FAST")
    assert not config.is_fast()
    monkeypatch.setenv("MINISD_FAST", "maybe")
    with pytest.raises(ValueError, match="MINISD_FAST='maybe'"):
        config.is_fast()


def test_seed_everything_repeats_every_source_of_randomness():
    g = config.seed_everything(7)
    first = (random.random(), torch.rand(3), torch.rand(3, generator=g))
    g = config.seed_everything(7)
    second = (random.random(), torch.rand(3), torch.rand(3, generator=g))
    assert first[0] == second[0] and torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])
    with pytest.raises(ValueError, match="seed"):
        config.seed_everything(-1)
