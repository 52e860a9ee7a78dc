import pytest
import torch

from kernels import backend


def test_auto_picks_torch_on_cpu(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert backend.select(torch.zeros(2)) == "torch"


def test_env_var_forces_torch(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "torch")
    assert backend.select(torch.zeros(2)) == "torch"


def test_forced_triton_on_cpu_means_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with backend.forced("triton"):
        assert backend.select(torch.zeros(2)) == "interpret"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with backend.forced("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        backend.select(torch.zeros(2))


def test_bad_choice_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="FORGETLESS_BACKEND"):
        backend.select(torch.zeros(2))
