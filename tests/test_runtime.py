"""The NVML probe fix: only where the library is missing, and with the same CUDA answer."""

from __future__ import annotations

import ctypes

import pytest
import torch

from vae.training import runtime


def _missing(name):
    raise OSError(f"{name}: cannot open shared object file")


def test_turns_the_check_off_only_where_nvml_cannot_load(monkeypatch):
    monkeypatch.setenv(runtime.NVML_CHECK, "1")
    monkeypatch.setattr(runtime.ctypes, "CDLL", _missing)
    assert runtime.skip_failing_nvml_probe() is True
    assert runtime.os.environ[runtime.NVML_CHECK] == "0"

    monkeypatch.setenv(runtime.NVML_CHECK, "1")
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: object())  # NVML present
    assert runtime.skip_failing_nvml_probe() is False
    assert runtime.os.environ[runtime.NVML_CHECK] == "1"


@pytest.mark.parametrize("value", [None, "0"])
def test_leaves_a_check_it_did_not_find_alone(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(runtime.NVML_CHECK, raising=False)
    else:
        monkeypatch.setenv(runtime.NVML_CHECK, value)
    assert runtime.skip_failing_nvml_probe() is False
    assert runtime.os.environ.get(runtime.NVML_CHECK) == value


def test_cuda_availability_is_the_same_either_way(monkeypatch):
    try:
        ctypes.CDLL(runtime.NVML_LIBRARY)
        pytest.skip("NVML is installed here: the fix does nothing")
    except OSError:
        pass
    monkeypatch.setenv(runtime.NVML_CHECK, "1")
    before = (torch.cuda.is_available(), torch.cuda.device_count())
    assert runtime.skip_failing_nvml_probe() is True
    assert (torch.cuda.is_available(), torch.cuda.device_count()) == before
