"""benchmarks/gpu_check.py's dry run (tiny model, CPU): one record per part with its figures, a failing part recorded
while the later parts still run, and the per-part time limit."""

import importlib.util
import json
import signal
import time
from numbers import Number
from pathlib import Path

import pytest

import train_sft

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)

FIGURES = {  # numeric fields each part must record
    "load": ["build_s", "save_s", "nf4_load_s", "parameters_b", "checkpoint_gib", "linear4bit_layers"],
    "decode": [],  # per row, below
    "sft": ["step_s", "tok_s", "tokens_per_step", "loss"],
    "grpo": ["step_s", "rollout_s", "loss_s", "mean_completion_tokens"],
    "eval": ["problems_per_s", "generation_s", "problems"],
}


def read_records(output_dir: Path) -> dict:
    lines = (output_dir / "gpu_check.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len({r["part"] for r in records}) == len(records)  # one record per part
    return {r["part"]: r for r in records}


def test_dry_run_records_every_part_with_its_figures(tmp_path):
    results_before = gpu_check.RESULTS.read_text()
    gpu_check.main(["--dry_run", "--output_dir", str(tmp_path)])
    records = read_records(tmp_path)
    assert list(records) == list(gpu_check.PARTS)
    for name, record in records.items():
        assert record["ok"], record["traceback"]
        assert record["error"] is None and record["mode"] == "dry_run"
        assert all(isinstance(record[key], Number) and record[key] > 0 for key in FIGURES[name]), (name, record)
        assert "peak_gib" in record or name == "decode"  # None on CPU
    sizes = gpu_check.DRY
    rows = records["decode"]["rows"]
    assert [(r["weights"], r["cuda_graphs"], r["batch"]) for r in rows] == [
        (weights, graphs, batch) for weights in ("dense", "nf4") for graphs in (True, False)
        for batch in sizes.decode_batches]
    assert all(r["tok_s"] > 0 and r["prefill_s"] > 0 and r["graph_fallbacks"] == 0 for r in rows)
    diffusion = records["decode"]["diffusion"]  # 1 inner step per wave at 4 steps of depth
    assert [r["batch"] for r in diffusion] == list(sizes.decode_batches[:2])
    sequential_passes = 2 + 4 * sizes.num_steps + 2  # prelude, core blocks per step, coda
    assert all(r["tok_s"] > 0 and r["graph_fallbacks"] == 0 for r in diffusion)
    assert all(r["block_passes_per_token"] < sequential_passes for r in diffusion)  # 3 tokens: mostly warm-up
    for parity in records["decode"]["greedy"].values():  # fp32 on CPU: the engine equals the simple path exactly
        assert parity["rows_equal"] == 1.0
        assert parity["tokens_before_first_difference"] == [sizes.parity_new_tokens] * sizes.parity_batch
    sft = records["sft"]
    assert sft["tokens_per_step"] == sizes.sft_seq  # every row cut to exactly the sequence length, batch 1
    assert sft["timed_steps"] == sizes.sft_train_steps - 1 and sft["checkpointed"] is True
    assert sft["depth"] == [sum(sizes.sft_num_steps), sizes.sft_num_steps[1]]
    assert records["grpo"]["completions"] == sizes.grpo_prompts * sizes.grpo_generations
    assert records["eval"]["problems"] == sizes.eval_problems
    assert isinstance(records["eval"]["memory_plan"], dict)
    section = (tmp_path / "gpu_check.md").read_text()
    assert section.startswith("## dry run") and "not judged (dry run)" in section
    assert "| diffusion forcing (CUDA graphs on GPU) |" in section
    assert all(f"| {name} | yes |" in section for name in gpu_check.PARTS)
    assert gpu_check.RESULTS.read_text() == results_before  # a dry run never appends to the results file


def test_failing_part_is_recorded_and_later_parts_still_run(tmp_path, monkeypatch):
    def broken_main(*args):
        raise RuntimeError("injected SFT failure")

    monkeypatch.setattr(train_sft, "main", broken_main)
    gpu_check.main(["--dry_run", "--output_dir", str(tmp_path), "--parts", "sft", "grpo"])
    records = read_records(tmp_path)
    assert list(records) == ["load", "sft", "grpo"]  # load always runs: it writes the checkpoint
    sft = records["sft"]
    assert not sft["ok"] and sft["error"] == "RuntimeError: injected SFT failure"
    assert "broken_main" in sft["traceback"] and "step_s" not in sft
    assert records["load"]["ok"] and records["grpo"]["ok"] and records["grpo"]["step_s"] > 0
    section = (tmp_path / "gpu_check.md").read_text()
    assert "| sft | no |" in section and "injected SFT failure" in section and "| grpo | yes |" in section


@pytest.mark.parametrize("inherited_sigint", [signal.default_int_handler, signal.SIG_IGN])
def test_time_limit_interrupts_a_running_part(inherited_sigint):
    """Also where the parent ignores SIGINT (a background job of a non-interactive shell: Python then installs no
    handler of its own), and the handler is restored afterwards."""
    previous = signal.signal(signal.SIGINT, inherited_sigint)
    try:
        start = time.perf_counter()
        with pytest.raises(gpu_check.PartTimeout):
            with gpu_check.time_limit(0.2):
                while time.perf_counter() - start < 60:
                    pass
        assert time.perf_counter() - start < 30
        assert signal.getsignal(signal.SIGINT) is inherited_sigint
    finally:
        signal.signal(signal.SIGINT, previous)
