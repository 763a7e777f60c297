"""Installing the project adds one importable module, modeling_huginn_qlora: the scripts and helpers, whose names are
generic (evaluate, data, training, ...), run from the checkout and never shadow another package (Hugging Face's
`evaluate`, which lm-eval-harness needs, or a user's own `data`)."""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GENERIC_NAMES = ["evaluate", "data", "training", "rewards", "generation", "tiny", "pipeline", "train_sft",
                 "train_grpo"]


def origins_outside_checkout(names: list[str], cwd: Path) -> dict[str, str | None]:
    """Where each module would be imported from by a Python started outside the checkout (None: not found)."""
    code = ("import importlib.util, json, sys; "
            "print(json.dumps({n: getattr(importlib.util.find_spec(n), 'origin', None) for n in sys.argv[1:]}))")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    output = subprocess.run([sys.executable, "-c", code, *names], cwd=cwd, env=env, capture_output=True, text=True,
                            check=True, timeout=60).stdout
    return json.loads(output)


def test_the_installed_project_exposes_only_the_model_module(tmp_path):
    try:
        importlib.metadata.distribution("tinymath-huginn")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the project is not installed here (pip install -e .)")
    origins = origins_outside_checkout(["modeling_huginn_qlora", *GENERIC_NAMES], tmp_path)
    assert origins.pop("modeling_huginn_qlora") is not None  # the install is there and reaches the model
    reaching_the_project = {name: origin for name, origin in origins.items()
                            if origin is not None and Path(origin).resolve().is_relative_to(REPO)}
    assert not reaching_the_project
