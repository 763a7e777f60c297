"""train_sft.py on the tiny default: data rendering and counting, config errors, the fused-head path, resume after
SIGTERM / a kill while saving, the NaN guard, NF4, two-process DDP and a learning check."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from trl import SFTConfig

import data
import tiny
from data import load_tokenizer
from train_sft import HuginnSFTTrainer, ScriptArguments, main
from training import STAGING_DIR, huginn_backbone, load_model, lora_config, parse_args

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "sft_tiny.yaml"
# Small and quick: 64 rows, batch 4, fp32, LoRA with dropout (so RNG state matters), random depth (sampler state).
QUICK = ["--max_samples", "64", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--report_to", "none",
         "--disable_tqdm", "true", "--save_total_limit", "2"]


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory):
    """The tiny model and data are built once into a private cache (also for subprocesses)."""
    cache = tmp_path_factory.mktemp("tinymath-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiny, "CACHE_DIR", cache)
        patch.setenv("TINYMATH_CACHE", str(cache))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield cache


def sft_args(output_dir, *overrides):
    return parse_args(ScriptArguments, SFTConfig,
                      ["--config", str(TINY_CONFIG), "--output_dir", str(output_dir), *QUICK, *overrides])


def losses(trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters() if "lora_" in name}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def omi2_rows(count: int) -> list[dict]:
    return [{"problem": f"What is {i} + 1?", "generated_solution": f"{i} + 1 = \\boxed{{{i + 1}}}",
             "expected_answer": str(i + 1)} for i in range(count)]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(sft_args("unused")[2].model_name_or_path)


# --- data ---------------------------------------------------------------------------------------------------------


def test_example_trains_on_the_answer_after_the_prompt_evaluation_asks(tokenizer):
    row = {"problem": "What is 2 + 3?", "solution": "2 + 3 = <<2+3=5>>5\n#### 5", "answer": "5"}
    example = data.tokenize_sft_row(row, tokenizer)
    prompt = tokenizer.apply_chat_template(data.prompt_messages(row["problem"]), add_generation_prompt=True,
                                           return_dict=True)["input_ids"]
    assert example["input_ids"][:len(prompt)] == prompt
    assert set(example["labels"][:len(prompt)]) == {-100}
    answer = [token for token in example["labels"] if token != -100]
    assert answer == example["input_ids"][len(prompt):-1]  # the closing <|end_text|> is not trained on
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer) == "2 + 3 = 5\nThe final answer is \\boxed{5}.<|end_turn|>"


def test_bad_incorrect_code_and_overlong_rows_are_skipped_and_counted(tmp_path, tokenizer):
    rows = omi2_rows(40)
    rows[3]["expected_answer"] = ""
    del rows[7]["problem"]
    source = str(write_jsonl(tmp_path / "omi2.jsonl", rows))
    examples, counts = data.build_sft_source(source, tokenizer, 512, max_bad_fraction=0.1)
    assert (counts["read"], counts["malformed"], counts["kept"], len(examples)) == (40, 2, 38, 38)

    omi1 = [{"question": "What is 1 + 1?", "generated_solution": "1 + 1 = \\boxed{2}", "expected_answer": "2",
             "is_correct": True}] * 6
    omi1[1] = {**omi1[1], "is_correct": False}
    omi1[2] = {**omi1[2], "generated_solution": "<llm-code>print(1 + 1)</llm-code>\\boxed{2}"}
    source = str(write_jsonl(tmp_path / "omi1.jsonl", omi1))
    _, counts = data.build_sft_source(source, tokenizer, 512)
    assert (counts["incorrect"], counts["code"], counts["kept"]) == (1, 1, 4)
    _, counts = data.build_sft_source(source, tokenizer, 512, keep_code=True)
    assert (counts["code"], counts["kept"]) == (0, 5)

    long_solution = {**omi1[0], "generated_solution": "Add. " * 80 + "\\boxed{2}"}
    long_question = {**omi1[0], "question": "What is 1 + 1?" + " Think." * 60}
    source = str(write_jsonl(tmp_path / "long.jsonl", [omi1[0], long_solution, long_question]))
    examples, counts = data.build_sft_source(source, tokenizer, 300)
    assert (counts["overlong"], counts["overlong_dropped"], counts["kept"]) == (2, 2, 1)
    examples, counts = data.build_sft_source(source, tokenizer, 300, overlong="truncate")
    assert (counts["overlong"], counts["overlong_dropped"], counts["kept"]) == (2, 1, 2)  # the question fills 300
    assert max(len(ids) for ids in examples["input_ids"]) == 300


def test_run_with_too_many_bad_rows_fails_naming_file_row_and_field(tmp_path):
    rows = omi2_rows(10)
    rows[4]["expected_answer"] = None
    source = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(data.DataError, match=rf"{source}: row 4: field 'expected_answer' is missing or empty"):
        main(*sft_args(tmp_path / "out", "--dataset_name", str(source), "--max_bad_fraction", "0.05"))


def test_unknown_config_keys_are_errors(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text(TINY_CONFIG.read_text() + "lora_rank: 8\n")
    with pytest.raises(ValueError, match="lora_rank"):
        parse_args(ScriptArguments, SFTConfig, ["--config", str(config)])
    with pytest.raises(ValueError, match="--lora_rnk"):
        parse_args(ScriptArguments, SFTConfig, ["--config", str(TINY_CONFIG), "--lora_rnk", "8"])


@pytest.mark.parametrize("name", ["sft_tiny", "sft_huginn_24gb", "sft_huginn_multigpu"])
def test_configs_parse(name):
    script_args, training_args, model_args = parse_args(
        ScriptArguments, SFTConfig, ["--config", str(REPO / "configs" / f"{name}.yaml"), "--use_cpu", "true"])
    assert model_args.use_peft and model_args.lora_target_modules == ["Wqkv", "proj", "fc"]
    if name != "sft_tiny":
        assert model_args.load_in_4bit and training_args.bf16 and training_args.activation_checkpointing
        assert model_args.model_name_or_path == "tomg-group-umd/huginn-0125"


# --- model path ---------------------------------------------------------------------------------------------------


def test_trainer_loss_is_the_models_loss_at_the_configured_depth(tmp_path, tokenizer):
    """TRL computes the loss with its fused LM head on the PEFT-wrapped backbone: it must equal the model's own
    (chunked) loss, and `num_steps` must reach the recurrence."""
    _, training_args, model_args = sft_args(tmp_path)
    dataset, _ = data.build_sft_dataset(["tiny:openmathinstruct2_train"], tokenizer, 512, max_samples=8)
    trainer = HuginnSFTTrainer(model=load_model(model_args, training_args), args=training_args, train_dataset=dataset,
                               processing_class=tokenizer, peft_config=lora_config(model_args), num_steps=(1, 2))
    assert isinstance(trainer.model, PeftModel)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()  # no LoRA dropout, so both passes compute the same function
    with torch.no_grad():
        torch.manual_seed(0)  # the same random initial state for both
        trainer_loss = trainer.compute_loss(trainer.model, dict(batch))
        assert huginn_backbone(trainer.model).last_num_steps == (1, 2)
        torch.manual_seed(0)
        model_loss = trainer.model(**batch, num_steps=(1, 2)).loss
    assert torch.isfinite(trainer_loss) and abs(trainer_loss.item() - model_loss.item()) < 1e-5


# --- interruption safety ------------------------------------------------------------------------------------------


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout_s} s")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_then_kill_while_saving_then_resume_matches_an_uninterrupted_run(tmp_path):
    """SIGTERM (subprocess) leaves a loadable checkpoint and exit code 0; a later kill -9 while saving leaves a
    partial checkpoint and a staging dir, which resuming ignores; the resumed run's per-step losses and final
    adapter equal an uninterrupted run's (random depth and LoRA dropout included)."""
    run = ["--max_steps", "8", "--save_steps", "2"]
    reference = main(*sft_args(tmp_path / "reference", *run))

    output_dir = tmp_path / "interrupted"
    command = [sys.executable, str(REPO / "train_sft.py"), "--config", str(TINY_CONFIG), "--output_dir",
               str(output_dir), *QUICK, *run]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (output_dir / "checkpoint-2").is_dir() or process.poll() is not None, 300, "checkpoint-2")
        process.send_signal(signal.SIGTERM)
        log, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, log[-3000:]
    stopped_at = json.loads((output_dir / "checkpoint-3" / "trainer_state.json").read_text())["global_step"]
    assert stopped_at == 3 and not (output_dir / "checkpoint-4").exists(), log[-3000:]
    assert not (output_dir / "adapter_model.safetensors").exists()  # no "final" model after a SIGTERM
    base = AutoModelForCausalLM.from_pretrained(tiny.resolve_model_path("tiny-huginn"), dtype=torch.float32)
    reloaded = lora_weights(PeftModel.from_pretrained(base, output_dir / "checkpoint-3"))
    assert reloaded and all(torch.isfinite(weight).all() for weight in reloaded.values())

    # kill -9 while writing checkpoint-4: a half-written directory, or one still in staging (how this code writes).
    (output_dir / "checkpoint-4").mkdir()
    (output_dir / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"truncat")
    (output_dir / STAGING_DIR / "checkpoint-4").mkdir(parents=True)
    (output_dir / STAGING_DIR / "checkpoint-4" / "optimizer.pt").write_bytes(b"truncat")

    resumed = main(*sft_args(output_dir, *run))
    expected, got = losses(reference), losses(resumed)
    assert sorted(got) == list(range(1, 9))
    assert max(abs(expected[step] - got[step]) for step in expected) <= 1e-6
    expected_weights, got_weights = lora_weights(reference.model), lora_weights(resumed.model)
    assert max((expected_weights[name] - got_weights[name]).abs().max().item() for name in expected_weights) <= 1e-6
    assert sorted(path.name for path in output_dir.iterdir() if "checkpoint" in path.name) == [
        "checkpoint-6", "checkpoint-8"]  # save_total_limit 2; the partial checkpoint and staging dir are gone


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    """From step 3 on the loss is NaN: steps 3 and 4 leave the weights and optimizer untouched, step 5 (the third in
    a row) stops the run with an error."""
    compute_loss = HuginnSFTTrainer.compute_loss

    def poisoned_after_step_2(self, *args, **kwargs):
        loss = compute_loss(self, *args, **kwargs)
        return loss * float("nan") if self.state.global_step >= 2 else loss

    monkeypatch.setattr(HuginnSFTTrainer, "compute_loss", poisoned_after_step_2)
    output_dir = tmp_path / "out"
    with pytest.raises(RuntimeError, match="3 steps in a row had a NaN/Inf loss or gradient"):
        main(*sft_args(output_dir, "--max_steps", "10", "--save_steps", "1", "--save_total_limit", "10",
                       "--max_consecutive_nonfinite", "3", "--num_steps", "1", "1"))
    before, after = (load_file(output_dir / f"checkpoint-{step}" / "adapter_model.safetensors") for step in (2, 4))
    assert all(torch.equal(before[name], after[name]) for name in before)
    optimizer_state = torch.load(output_dir / "checkpoint-4" / "optimizer.pt", weights_only=True)["state"]
    assert {int(state["step"]) for state in optimizer_state.values()} == {2}  # AdamW took 2 steps, not 4
    log = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert [entry["nonfinite_skipped_steps"] for entry in log if "loss" in entry] == [0, 0, 1, 2]


# --- NF4, several processes, learning -----------------------------------------------------------------------------


def test_qlora_nf4_trains_only_the_adapters(tmp_path):
    """The GPU recipe's model path on CPU: NF4 Linears (the adapter Linear and tied head stay unquantized)."""
    import bitsandbytes as bnb

    trainer = main(*sft_args(tmp_path, "--load_in_4bit", "true", "--max_steps", "2", "--num_steps", "1", "1",
                             "--save_strategy", "no"))
    backbone = huginn_backbone(trainer.model)
    assert sum(isinstance(module, bnb.nn.Linear4bit) for module in backbone.modules()) == 4 * 8  # 4 per block
    assert not isinstance(backbone.adapter, bnb.nn.Linear4bit)
    trainable = {name for name, param in trainer.model.named_parameters() if param.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert all(weight.abs().sum() > 0 for name, weight in lora_weights(trainer.model).items() if "lora_B" in name)


DDP_DRIVER = """
import torch
from trl import SFTConfig
from train_sft import ScriptArguments, main
from training import parse_args

trainer = main(*parse_args(ScriptArguments, SFTConfig))
weights = {name: param.detach() for name, param in trainer.model.named_parameters() if "lora_" in name}
torch.save(weights, f"{trainer.args.output_dir}/lora_rank{trainer.args.process_index}.pt")
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_ends_with_identical_adapters(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DDP_DRIVER)
    output_dir = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate_ddp.yaml"), "--num_processes", "2", "--main_process_port",
               str(free_port()), str(driver), "--config", str(TINY_CONFIG), "--use_cpu", "true", "--output_dir",
               str(output_dir), *QUICK, "--max_steps", "3", "--save_steps", "2", "--num_steps", "2", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0, rank1 = (torch.load(output_dir / f"lora_rank{rank}.pt") for rank in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    assert all(rank0[name].abs().sum() > 0 for name in rank0 if "lora_B" in name)  # trained (lora_B starts at 0)
    assert {"rng_state_0.pth", "rng_state_1.pth", "depth_sampler.pt"} <= set(os.listdir(output_dir / "checkpoint-2"))
    assert not (output_dir / STAGING_DIR).exists()


def test_streamed_subset_is_a_seeded_shuffle_and_counts_the_problem_sources_kept(tmp_path, tokenizer, caplog):
    rows = omi2_rows(200)
    for i, row in enumerate(rows):  # sorted by source, as a dump may be: gsm8k's rows first, then math's
        row["problem_source"] = "gsm8k" if i < 100 else "math"
        if i >= 100:  # too long for max_length 300, so dropped: the counts must be of the rows kept
            row["generated_solution"] = "Add. " * 80 + row["generated_solution"]
    source = str(write_jsonl(tmp_path / "omi2.jsonl", rows))

    def problems(streaming: bool, seed: int) -> list[str]:
        return data.read_sft_source(source, None, streaming, 40, seed)[0]["problem"]

    in_file_order = [row["problem"] for row in rows[:40]]
    assert problems(False, 0) == in_file_order  # read whole (the tiny default): the first rows, as before
    subset = problems(True, 0)
    assert len(set(subset)) == 40 and not set(subset) <= set(in_file_order)  # drawn from the whole file
    assert problems(True, 0) == subset and problems(True, 1) != subset
    from_math = len(set(subset) & {row["problem"] for row in rows[100:]})
    assert 0 < from_math < 40

    with caplog.at_level(logging.INFO, logger="data"):
        examples, counts = data.build_sft_dataset([source], tokenizer, 300, streaming=True, max_samples=40, seed=0)
    counts = counts[source]
    assert counts["problem_source=gsm8k"] == counts["kept"] == len(examples) == 40 - from_math
    assert counts["overlong_dropped"] == from_math and "problem_source=math" not in counts
    assert f"problem_source=gsm8k {40 - from_math}" in caplog.text
