"""GPU-only settings on a torch that sees no GPU fail at once with the likely cause, instead of training on the CPU
for days or failing deep inside bitsandbytes."""

from pathlib import Path

import pytest
import torch
from trl import SFTConfig

import train_sft
import training
from train_sft import ScriptArguments

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sft_tiny.yaml"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


@pytest.mark.parametrize("cuda_build, has_driver, cause", [
    (None, True, "is a CPU build"),
    ("13.0", False, "no NVIDIA driver found"),
    ("13.0", True, "built for CUDA 13.0; if the CUDA version `nvidia-smi` shows is older"),
])
def test_the_error_names_the_likely_cause(monkeypatch, cuda_build, has_driver, cause):
    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    monkeypatch.setattr(training.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if has_driver else None)
    with pytest.raises(RuntimeError, match="bf16, load_in_4bit asked for, but torch sees no GPU") as error:
        training.require_gpu(["bf16", "load_in_4bit"], cpu_switch="use_cpu: true")
    assert cause in str(error.value) and "set use_cpu: true" in str(error.value)


@pytest.mark.parametrize("setting", [["--bf16", "true"], ["--load_in_4bit", "true"]])
def test_training_asks_for_use_cpu_before_loading_anything(tmp_path, setting):
    argv = ["--config", str(TINY_CONFIG), "--use_cpu", "false", "--output_dir", str(tmp_path), *setting]
    with pytest.raises(RuntimeError, match=f"{setting[0][2:]} asked for, but torch sees no GPU"):
        train_sft.main(*training.parse_args(ScriptArguments, SFTConfig, argv))  # bf16: parsing raises already
    assert not any(tmp_path.iterdir())
