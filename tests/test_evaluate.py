"""evaluate.py: the whole eval on the tiny default (offline), batch-size invariance, resume after a kill, sample keys
(a retrained adapter or changed setting gets new samples), data errors, compare mode with a LoRA adapter, metrics,
lm-eval's gsm8k_cot format, the memory plan (byte counts against real allocations, the published model at the
README's settings), and oracle / shuffled-solution runs on the real benchmark files (which test the pipeline and
the grader, not a model)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

import data
import evaluate
import modeling_huginn_qlora
from evaluate import EvalArguments, main, stand_in
from generation import (
    MEMORY_HEADROOM,
    HuginnEngine,
    kv_cache_bytes,
    model_weight_bytes,
    plan_generation_memory,
    prefill_activation_bytes,
)
from modeling_huginn_qlora import HuginnConfig
from tiny import build_tiny_default, resolve_model_path, write_tiny_datasets

REPO = Path(__file__).resolve().parents[1]
BENCHMARK_DIR = REPO.parent / "shared" / "benchmarks"
PUBLISHED_CONFIG = REPO.parent / "shared" / "reference" / "huginn-0125-config.json"
REAL_FILES = {"gsm8k": BENCHMARK_DIR / "gsm8k_test.jsonl", "math500": BENCHMARK_DIR / "math500_test.jsonl"}
METRICS = ("checkpoint", "benchmark", "num_steps", "n", "accuracy", "ci95_low", "ci95_high", "ungradable",
           "truncated", "mean_output_tokens", "lm_eval_strict", "lm_eval_flexible")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_tiny_datasets(tmp_path_factory.mktemp("tiny-data"))


def tiny_args(tiny_data: Path, output_dir: Path, **overrides) -> EvalArguments:
    settings = dict(model_name_or_path="tiny-huginn", limit=6, num_steps=[1, 4], max_new_tokens=12, batch_size=8,
                    benchmarks=[str(tiny_data / "gsm8k_test.jsonl"), str(tiny_data / "math_test.jsonl")],
                    dtype="float32", output_dir=str(output_dir))
    return EvalArguments(**{**settings, **overrides})


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def completions(output_dir: Path) -> dict:
    return {(r["checkpoint"], r["benchmark"], r["steps"], r["id"]): r["completion"]
            for r in read_lines(output_dir / "samples.jsonl")}


def metrics(output_dir: Path) -> list[dict]:
    cells = json.loads((output_dir / "results.json").read_text())["results"]
    return [{key: cell.get(key) for key in METRICS} for cell in cells]


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """One uninterrupted greedy run, batch size 8."""
    output_dir = tmp_path_factory.mktemp("eval-batch8")
    main(tiny_args(tiny_data, output_dir))
    return output_dir


def test_tiny_run_writes_results_samples_and_plot(tiny_run):
    results = json.loads((tiny_run / "results.json").read_text())
    cells = results["results"]
    assert [(c["benchmark"], c["num_steps"]) for c in cells] == [
        ("gsm8k_test", 1), ("gsm8k_test", 4), ("math_test", 1), ("math_test", 4)]
    for cell in cells:
        assert cell["n"] == 6 and 0 <= cell["ci95_low"] <= cell["accuracy"] <= cell["ci95_high"] <= 1
        assert 0 < cell["mean_output_tokens"] <= 12 and cell["tokens_per_s"] > 0
    assert not any("lm_eval_strict" in cell for cell in cells)  # \boxed{} prompts: lm-eval's strict would be ~0
    assert all(cell["batch_size"] == 8 and cell["kv_cache_slots"] is None for cell in cells)  # all fits: exact
    plan = results["memory_plan"]
    assert plan["budget_source"].endswith("at start") and set(plan["by_num_steps"]) == {"1", "4"}
    assert plan["by_num_steps"]["4"]["cache_bytes"] == kv_cache_bytes(
        AutoConfig.from_pretrained(resolve_model_path("tiny-huginn")), 8,
        plan["longest_prompt_tokens"] + 12 + 1, 4, torch.float32)  # the engine's scratch position per row
    example = results["prompt"]["examples"]["gsm8k_test"]
    assert example.startswith("<|begin_text|><|begin_header|>system<|end_header|>\n\n" + data.SYSTEM_PROMPT)
    assert example.endswith(data.ANSWER_INSTRUCTION + "<|end_turn|><|begin_header|>Huginn<|end_header|>\n\n")
    assert results["versions"]["torch"] == torch.__version__ and "git_commit" in results
    samples = read_lines(tiny_run / "samples.jsonl")
    assert len(samples) == 2 * 2 * 6
    assert {"id", "prompt", "completion", "extracted", "gold", "correct", "steps"} <= set(samples[0])
    assert (tiny_run / "accuracy_vs_steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by_steps = {steps: {k[1:]: v for k, v in completions(tiny_run).items() if k[2] == steps} for steps in (1, 4)}
    assert by_steps[1] != by_steps[4]  # num_steps reaches the model


def test_greedy_results_do_not_depend_on_batch_size(tiny_data, tiny_run, tmp_path):
    main(tiny_args(tiny_data, tmp_path, batch_size=1))
    assert completions(tmp_path) == completions(tiny_run)
    assert metrics(tmp_path) == metrics(tiny_run)


def test_resume_after_kill_gives_same_results(tiny_data, tiny_run, tmp_path):
    output_dir = tmp_path / "resumed"
    shutil.copytree(tiny_run, output_dir)
    (output_dir / "results.json").unlink()
    lines = (output_dir / "samples.jsonl").read_text().splitlines(keepends=True)
    kept = "".join(lines[:10]) + lines[10][: len(lines[10]) // 2]  # killed mid-write of line 11
    (output_dir / "samples.jsonl").write_text(kept)
    main(tiny_args(tiny_data, output_dir))
    resumed = (output_dir / "samples.jsonl").read_text()
    assert resumed.startswith("".join(lines[:10]))  # finished samples kept, not generated again
    assert len(read_lines(output_dir / "samples.jsonl")) == len(lines)  # no duplicates, no broken line
    assert completions(output_dir) == completions(tiny_run)
    assert metrics(output_dir) == metrics(tiny_run)


def test_an_interrupted_run_keeps_every_finished_batch_of_samples(tiny_data, tmp_path):
    """Samples are graded and written a batch at a time as the backend finishes them, in the order they finish."""
    def dies_after_five(requests, num_steps, kv_cache_slots, on_done):
        for index in reversed(range(5)):  # finishing in another order than requested
            on_done(index, {"completion": f"\\boxed{{{requests[index]['answer']}}}", "num_tokens": 1,
                            "finished": True})
        raise KeyboardInterrupt

    args = tiny_args(tiny_data, tmp_path, batch_size=2, benchmarks=[str(tiny_data / "math_test.jsonl")])
    with pytest.raises(KeyboardInterrupt):
        main(args, backends={"fake": dies_after_five})
    written = read_lines(tmp_path / "samples.jsonl")
    assert len(written) == 4 and all(r["correct"] for r in written)  # two batches of 2; the fifth was pending
    cells = main(args, backends={"fake": stand_in(lambda request: "\\boxed{-1}")})
    assert len(read_lines(tmp_path / "samples.jsonl")) == 2 * 6  # 6 problems x 2 depths, the 4 reused
    assert sum(cell["accuracy"] * cell["n"] for cell in cells) == 4


def test_changed_setting_generates_new_samples(tiny_data, tiny_run, tmp_path):
    output_dir = tmp_path / "other"
    shutil.copytree(tiny_run, output_dir)
    main(tiny_args(tiny_data, output_dir, max_new_tokens=20))
    samples = read_lines(output_dir / "samples.jsonl")
    assert len(samples) == 2 * 24 and len({r["key"] for r in samples}) == 48  # the old ones kept, none reused
    cells = json.loads((output_dir / "results.json").read_text())["results"]
    assert max(cell["mean_output_tokens"] for cell in cells) > 12  # the results are the new samples'


def save_lora(path: Path, seed: int) -> Path:
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-huginn"), dtype=torch.float32)
    torch.manual_seed(seed)
    lora = LoraConfig(r=4, target_modules=["Wqkv", "fc"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(path)
    return path


def test_retrained_adapter_gets_new_samples_unchanged_rerun_resumes(tiny_data, tmp_path):
    adapter = save_lora(tmp_path / "sft", seed=0)
    args = tiny_args(tiny_data, tmp_path / "eval", adapters=[f"sft={adapter}"], limit=3, num_steps=[2],
                     max_new_tokens=8, benchmarks=[str(tiny_data / "gsm8k_test.jsonl")])
    main(args)
    samples_path = tmp_path / "eval" / "samples.jsonl"
    first = samples_path.read_text()
    main(args)
    assert samples_path.read_text() == first  # unchanged adapter and settings: resumed, nothing generated
    save_lora(adapter, seed=1)  # retrained into the same directory
    main(args)
    old, new = read_lines(samples_path)[:3], read_lines(samples_path)[3:]
    assert len(new) == 3 and {r["key"] for r in old}.isdisjoint(r["key"] for r in new)
    assert [r["completion"] for r in old] != [r["completion"] for r in new]  # generated by the retrained adapter
    assert evaluate.adapter_fingerprint(str(adapter)) == json.loads(
        (tmp_path / "eval" / "results.json").read_text())["checkpoint_fingerprints"]["sft"]


def test_retrained_base_model_in_the_same_directory_gets_new_samples(tiny_data, tmp_path):
    base = tmp_path / "base"
    build_tiny_default(base, seed=0)
    args = tiny_args(tiny_data, tmp_path / "eval", model_name_or_path=str(base), limit=3, num_steps=[2],
                     max_new_tokens=8, benchmarks=[str(tiny_data / "gsm8k_test.jsonl")])
    main(args)
    samples_path = tmp_path / "eval" / "samples.jsonl"
    first = samples_path.read_text()
    main(args)
    assert samples_path.read_text() == first  # the same weights: resumed
    build_tiny_default(base, seed=1)  # other weights, same directory
    main(args)
    old, new = read_lines(samples_path)[:3], read_lines(samples_path)[3:]
    assert len(new) == 3 and {r["key"] for r in old}.isdisjoint(r["key"] for r in new)
    assert [r["completion"] for r in old] != [r["completion"] for r in new]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["model_fingerprint"] == evaluate.model_fingerprint(str(base)) != str(base)
    assert evaluate.model_fingerprint("tomg-group-umd/huginn-0125") == "tomg-group-umd/huginn-0125"


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["merged", "nf4-working-copy"])
def test_compare_mode_with_lora_adapter(tiny_data, tmp_path, load_in_4bit):
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-huginn"), dtype=torch.float32)
    torch.manual_seed(0)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["Wqkv", "fc"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    output_dir = tmp_path / "compare"
    cells = main(tiny_args(tiny_data, output_dir, adapters=["base", f"lora={tmp_path / 'adapter'}"], limit=3,
                           num_steps=[2], max_new_tokens=8, load_in_4bit=load_in_4bit,
                           benchmarks=[str(tiny_data / "gsm8k_test.jsonl")]))
    assert [c["checkpoint"] for c in cells] == ["base", "lora"]
    by_checkpoint = {name: {k[1:]: v for k, v in completions(output_dir).items() if k[0] == name}
                     for name in ("base", "lora")}
    assert by_checkpoint["base"] != by_checkpoint["lora"]  # the adapter is applied
    assert (output_dir / "accuracy_vs_steps.png").exists()


def test_nf4_decodes_from_a_working_copy_where_its_batch_is_large_enough(tiny_data, tmp_path):
    """--load_in_4bit decodes from a dense copy (NF4 dequantized, LoRA merged) where the copy's batch is at least
    1/NF4_DECODE_SLOWDOWN of the NF4 weights' batch: 3 rows against 4, not 2 against 4. Same greedy completions."""
    pytest.importorskip("bitsandbytes")
    adapter = save_lora(tmp_path / "adapter", seed=0)
    common = dict(adapters=[f"lora={adapter}"], limit=4, num_steps=[2], max_new_tokens=8, batch_size=4,
                  load_in_4bit=True, benchmarks=[str(tiny_data / "gsm8k_test.jsonl")])
    config, dtype = AutoConfig.from_pretrained(resolve_model_path("tiny-huginn")), torch.float32
    main(tiny_args(tiny_data, tmp_path / "ample", **common))
    results = json.loads((tmp_path / "ample" / "results.json").read_text())
    prompt_length = results["memory_plan"]["longest_prompt_tokens"]

    def dense_budget_gb(rows: int) -> float:  # the copy fits `rows` rows, the NF4 weights more
        row_bytes = (kv_cache_bytes(config, rows, prompt_length + 8 + 1, 2, dtype)
                     + prefill_activation_bytes(config, rows, prompt_length, dtype))
        return (model_weight_bytes(config, dtype) + row_bytes) / MEMORY_HEADROOM * 1.001 / 1e9

    plans = {}
    for rows in (3, 2):
        main(tiny_args(tiny_data, tmp_path / f"dense{rows}", max_memory_gb=dense_budget_gb(rows), **common))
        plans[rows] = json.loads((tmp_path / f"dense{rows}" / "results.json").read_text())["memory_plan"]
    assert (plans[3]["by_num_steps"]["2"]["working_copy"], plans[3]["by_num_steps"]["2"]["batch_size"]) == (True, 3)
    assert (plans[2]["by_num_steps"]["2"]["working_copy"], plans[2]["by_num_steps"]["2"]["batch_size"]) == (False, 4)
    assert completions(tmp_path / "dense3") == completions(tmp_path / "dense2") == completions(tmp_path / "ample")
    assert {r["key"] for r in read_lines(tmp_path / "dense3" / "samples.jsonl")}.isdisjoint(
        r["key"] for r in read_lines(tmp_path / "dense2" / "samples.jsonl"))  # not bit for bit: kept apart


@pytest.mark.parametrize("num_steps, budget_gb, working_copy", [(32, 24, True), (64, 24, True), (16, 24, False),
                                                                 (32, 80, True)])
def test_working_copy_decisions_at_full_size(published_config, tmp_path, num_steps, budget_gb, working_copy):
    """The README's second command (batch 16, 250-token prompts, 512 new tokens) on a GPU with NF4 weights: the bf16
    copy's 4.7 GB more of weights lower the batch (24 GB, 32 steps: 6 against 8) but pay for themselves; at 16 steps
    (11 against 15) they do not."""
    (tmp_path / "config.json").write_text(published_config.to_json_string())
    args = EvalArguments(model_name_or_path=str(tmp_path), load_in_4bit=True, dtype="bfloat16", batch_size=16,
                         max_new_tokens=512, num_steps=[num_steps], max_memory_gb=budget_gb, output_dir=str(tmp_path))
    plan = evaluate.memory_plans(args, 250)[0][num_steps]
    nf4 = plan_generation_memory(published_config, budget_gb * 1e9, 16, 250, 512, num_steps, load_in_4bit=True,
                                 engine=True)
    assert plan.working_copy == working_copy
    assert plan.batch_size * evaluate.NF4_DECODE_SLOWDOWN >= nf4.batch_size if working_copy else plan == nf4


def test_sampling_reports_pass_at_k_and_majority_vote(tiny_data, tmp_path):
    """A stand-in right on samples 0-2 and wrong on sample 3 of every problem: pass@1 0.75, pass@4 and maj@4 1."""
    def three_of_four(request):
        return f"\\boxed{{{request['answer']}}}" if request["sample"] < 3 else "\\boxed{-1}"

    args = tiny_args(tiny_data, tmp_path, do_sample=True, num_samples=4, num_steps=[8],
                     benchmarks=[str(tiny_data / "math_test.jsonl")])
    cells = main(args, backends={"fake": stand_in(three_of_four)})
    (cell,) = cells
    assert cell["accuracy"] == cell["pass@1"] == 0.75
    assert cell["pass@2"] == 1.0 and cell["pass@4"] == 1.0 and cell["maj@4"] == 1.0
    assert len(read_lines(tmp_path / "samples.jsonl")) == 6 * 4


def test_sampling_generates_different_samples(tiny_data, tmp_path):
    main(tiny_args(tiny_data, tmp_path, do_sample=True, num_samples=3, num_steps=[2], limit=2, max_new_tokens=8,
                   temperature=1.0, top_p=1.0, benchmarks=[str(tiny_data / "math_test.jsonl")]))
    samples = read_lines(tmp_path / "samples.jsonl")
    assert sorted(r["sample"] for r in samples) == [0, 0, 1, 1, 2, 2]
    assert len({r["completion"] for r in samples}) > 2


def test_fewshot_prompt_has_solved_exemplars_as_chat_turns(tiny_data, tmp_path):
    echo = stand_in(lambda request: request["prompt"])
    main(tiny_args(tiny_data, tmp_path, num_fewshot=2, fewshot_source=str(tiny_data / "gsm8k_train.jsonl"),
                   system_prompt="", benchmarks=[str(tiny_data / "gsm8k_test.jsonl")]), backends={"echo": echo})
    prompt = read_lines(tmp_path / "samples.jsonl")[0]["prompt"]
    assert "<|begin_header|>system" not in prompt
    assert prompt.count("<|begin_header|>user<|end_header|>") == 3
    turns = prompt.split("<|begin_header|>Huginn<|end_header|>\n\n")
    assert len(turns) == 4 and turns[-1] == ""  # two answered exemplars, then the generation prompt
    assert all("The final answer is \\boxed{" in turn and "<<" not in turn for turn in turns[1:3])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def gsm8k_rows(tiny_data) -> list[dict]:
    return read_lines(tiny_data / "gsm8k_test.jsonl")[:8]


def test_corrupt_data_file_names_file_and_row(gsm8k_rows, tmp_path):
    path = write_jsonl(tmp_path / "corrupt.jsonl", gsm8k_rows)
    lines = path.read_text().splitlines()
    lines[4] = lines[4][:15]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DataError, match=r"corrupt\.jsonl: row 4 \(line 5\): not valid JSON"):
        main(EvalArguments(benchmarks=[str(path)], output_dir=str(tmp_path / "out")), backends={"x": stand_in(str)})


def test_schema_mismatched_data_file_names_file_row_and_field(gsm8k_rows, tmp_path):
    path = write_jsonl(tmp_path / "missing.jsonl", gsm8k_rows[:3] + [{"question": "?"}] + gsm8k_rows[4:])
    with pytest.raises(data.DataError, match=r"missing\.jsonl: row 3: field 'answer' is missing"):
        main(EvalArguments(benchmarks=[str(path)], output_dir=str(tmp_path / "out")), backends={"x": stand_in(str)})
    path = write_jsonl(tmp_path / "renamed.jsonl", [{"query": r["question"], "response": r["answer"]}
                                                     for r in gsm8k_rows])
    with pytest.raises(data.DataError, match=r"renamed\.jsonl: columns \['query', 'response'\] match no known schema"):
        main(EvalArguments(benchmarks=[str(path)], output_dir=str(tmp_path / "out")), backends={"x": stand_in(str)})


def test_config_file_parses_and_unknown_keys_are_errors(tmp_path):
    args = evaluate.parse_args(["--config", str(REPO / "configs/eval_tiny.yaml")])
    assert args.model_name_or_path == "tiny-huginn" and args.num_steps == [1, 4, 8, 16]
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: tiny-huginn\nnum_step: [4]\n")
    with pytest.raises(ValueError, match="num_step"):
        evaluate.parse_args(["--config", str(bad)])
    with pytest.raises(ValueError, match="--num_step"):
        evaluate.parse_args(["--num_step", "4"])


def test_adaptive_exit_reports_steps_and_threshold_zero_is_fixed_depth(tiny_data, tmp_path):
    fixed = tiny_args(tiny_data, tmp_path / "fixed", num_steps=[8], kv_cache_slots=1)
    never_exits = tiny_args(tiny_data, tmp_path / "zero", num_steps=[8], kv_cache_slots=1, exit_threshold=0.0)
    adaptive = tiny_args(tiny_data, tmp_path / "adaptive", num_steps=[8], kv_cache_slots=1, exit_threshold=5e-2)
    main(fixed), main(never_exits), main(adaptive)
    assert completions(tmp_path / "zero") == completions(tmp_path / "fixed")
    assert all(cell["mean_steps_used"] == 8 for cell in json.loads((tmp_path / "zero" / "results.json").read_text())[
        "results"])
    cells = json.loads((tmp_path / "adaptive" / "results.json").read_text())["results"]
    assert all(1 <= cell["mean_steps_used"] < 8 for cell in cells)


def test_lm_eval_gsm8k_strict_and_flexible():
    assert evaluate.lm_eval_gsm8k("so 1,200 + 34 = 1,234\n#### 1,234", "1234") == (False, True)  # gsm8k_cot's strict
    assert evaluate.lm_eval_gsm8k("1,200 + 34 = 1,234. The answer is 1,234.", "1234") == (True, True)
    assert evaluate.lm_eval_gsm8k("3 + 4 = 7. The answer is 7.", "7") == (True, True)
    assert evaluate.lm_eval_gsm8k("She makes $18 every day.", "18") == (False, True)
    assert evaluate.lm_eval_gsm8k("The answer is 17. No wait, 18", "18") == (False, True)
    assert evaluate.lm_eval_gsm8k("\\boxed{18}", "18") == (False, True)
    assert evaluate.lm_eval_gsm8k("The answer is 18.5 dollars", "18") == (False, False)
    assert evaluate.lm_eval_gsm8k("The answer is 18", "18") == (False, True)  # lm-eval's regex wants a char after


def test_gsm8k_cot_format_is_lm_evals_and_reports_strict_and_flexible(tiny_data, tmp_path):
    """A completion '... The answer is N.' is strict-correct under the paper's format; lm-eval's stop sequence 'Q:'
    cuts what follows it (else the flexible score would take that turn's last number)."""
    prompts = []

    def answers(request):
        prompts.append(request["prompt"])
        return f"Some steps. The answer is {request['answer']}.\n\nQ: and 99999"

    cells = main(tiny_args(tiny_data, tmp_path, prompt_format="gsm8k_cot", num_fewshot=8, num_steps=[32],
                           benchmarks=[str(tiny_data / "gsm8k_test.jsonl"), str(tiny_data / "math_test.jsonl")]),
                 backends={"fake": stand_in(answers)})
    gsm8k, math_cell = cells
    assert gsm8k["accuracy"] == gsm8k["lm_eval_strict"] == gsm8k["lm_eval_flexible"] == 1.0
    assert "lm_eval_strict" not in math_cell  # GSM8K's scores only
    assert prompts[0].startswith("<|begin_text|><|begin_header|>system<|end_header|>\n\n" + data.SYSTEM_PROMPT)
    assert prompts[0].count("<|begin_header|>user<|end_header|>\n\nQ: ") == 9 and prompts[0].endswith(
        "\nA:<|end_turn|><|begin_header|>Huginn<|end_header|>\n\n")
    assert "There are 15 trees" in prompts[0] and "The answer is 8.<|end_turn|>" in prompts[0]
    assert data.ANSWER_INSTRUCTION not in prompts[0] and "\\boxed" not in prompts[0]
    assert all("99999" not in r["completion"] for r in read_lines(tmp_path / "samples.jsonl"))


def test_versions_record_torch_build(monkeypatch):
    """A pip CUDA wheel's metadata says '2.14.1' while torch.__version__ says '2.14.1+cu130': record the latter."""
    monkeypatch.setattr(torch, "__version__", "2.14.1+cu130")
    assert evaluate.versions()["torch"] == "2.14.1+cu130"


# ---------------------------------------------------------------------------------------------------------------
# Memory plan
# ---------------------------------------------------------------------------------------------------------------


def test_planned_bytes_equal_what_the_caches_and_weights_allocate(monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-huginn"), dtype=torch.float32).eval()
    config, allocated = model.config, []

    class RecordedCache(modeling_huginn_qlora.HuginnKVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            allocated.append(self.keys.nbytes + self.values.nbytes)

    monkeypatch.setattr(modeling_huginn_qlora, "HuginnKVCache", RecordedCache)
    batch, prompt_length, new_tokens, steps = 3, 7, 5, 4
    for slots in (None, 1, 3):
        model.generate(torch.ones(batch, prompt_length, dtype=torch.long), num_steps=steps, kv_cache_slots=slots,
                       max_new_tokens=new_tokens, eos_token_id=[10_000])
        plan = plan_generation_memory(config, 1e12, batch, prompt_length, new_tokens, steps, slots, torch.float32)
        assert plan.cache_bytes == allocated[-1] and plan.kv_cache_slots == (slots if slots != steps else None)
        engine = HuginnEngine(model, batch, prompt_length + new_tokens, kv_cache_slots=slots or steps)
        engine_plan = plan_generation_memory(config, 1e12, batch, prompt_length, new_tokens, steps, slots or steps,
                                             torch.float32, engine=True)
        assert engine_plan.cache_bytes == engine.cache.keys.nbytes + engine.cache.values.nbytes
    tensors = [*model.parameters(), *model.buffers()]
    assert plan.weight_bytes == sum(t.numel() * t.element_size() for t in tensors)


@pytest.fixture(scope="module")
def published_config() -> HuginnConfig:
    return HuginnConfig.from_json_file(PUBLISHED_CONFIG) if PUBLISHED_CONFIG.is_file() else HuginnConfig()


def test_weight_bytes_of_the_published_model(published_config):
    bf16 = model_weight_bytes(published_config, torch.bfloat16)
    assert 3.56e9 < bf16 / 2 < 3.57e9  # 3.565B parameters
    nf4 = model_weight_bytes(published_config, torch.bfloat16, load_in_4bit=True)
    assert abs(nf4 / 2**30 - 2.26) < 0.03  # the reference implementation measured 2.26 GiB of NF4 weights


@pytest.mark.parametrize("num_steps", [32, 64])
def test_readme_settings_fit_24_and_80_gb(published_config, num_steps):
    """batch 16, 512 new tokens, GSM8K prompts up to ~250 tokens, bf16: one exact cache per step at batch 16 needs
    34 GB (32 steps) / 67 GB (64 steps) plus 7 GB of weights. The plan keeps exact caches and lowers the batch."""
    config, length = published_config, 250 + 512
    for memory in (24e9, 80e9):
        plan = plan_generation_memory(config, memory, 16, 250, 512, num_steps)
        assert plan.kv_cache_slots is None and plan.total_bytes <= MEMORY_HEADROOM * memory
        assert plan.cache_bytes == kv_cache_bytes(config, plan.batch_size, length, num_steps)
        assert plan.activation_bytes == prefill_activation_bytes(config, plan.batch_size, 250, torch.bfloat16)
        one_more = kv_cache_bytes(config, plan.batch_size + 1, length, num_steps) + prefill_activation_bytes(
            config, plan.batch_size + 1, 250, torch.bfloat16)
        assert plan.batch_size == 16 or plan.weight_bytes + one_more > MEMORY_HEADROOM * memory  # the largest
    assert plan_generation_memory(config, 24e9, 16, 250, 512, num_steps).batch_size < 16  # batch 16 would not fit
    assert kv_cache_bytes(config, 16, length, num_steps) + plan.weight_bytes > 24e9


def test_shared_slots_only_when_one_exact_row_does_not_fit(published_config):
    plan = plan_generation_memory(published_config, 6e9, 16, 250, 512, 64, load_in_4bit=True)
    exact_row = kv_cache_bytes(published_config, 1, 762, 64) + prefill_activation_bytes(
        published_config, 1, 250, torch.bfloat16)
    assert plan.weight_bytes + exact_row > MEMORY_HEADROOM * 6e9
    assert plan.kv_cache_slots == 1 and 1 <= plan.batch_size and plan.total_bytes <= MEMORY_HEADROOM * 6e9
    with pytest.raises(ValueError, match="batch 1"):
        plan_generation_memory(published_config, 8e9, 16, 250, 512, 64)  # bf16 weights alone take 7.1 GB


def test_memory_budget_lowers_the_batch_and_keeps_greedy_completions(tiny_data, tiny_run, tmp_path):
    config = AutoConfig.from_pretrained(resolve_model_path("tiny-huginn"))
    prompt_length = json.loads((tiny_run / "results.json").read_text())["memory_plan"]["longest_prompt_tokens"]
    three_rows = (kv_cache_bytes(config, 3, prompt_length + 12 + 1, 4, torch.float32)
                  + prefill_activation_bytes(config, 3, prompt_length, torch.float32))
    budget = (model_weight_bytes(config, torch.float32) + three_rows) / MEMORY_HEADROOM
    main(tiny_args(tiny_data, tmp_path, max_memory_gb=budget / 1e9 * 1.001))
    results = json.loads((tmp_path / "results.json").read_text())
    assert {c["num_steps"]: c["batch_size"] for c in results["results"]}[4] == 3
    assert all(c["kv_cache_slots"] is None for c in results["results"])  # exactness kept, the batch lowered
    assert results["memory_plan"]["budget_source"] == "max_memory_gb"
    assert completions(tmp_path) == completions(tiny_run)


def test_wilson_interval_and_pass_at_k():
    low, high = evaluate.wilson_interval(0, 10)
    assert low == 0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = evaluate.wilson_interval(50, 100)
    assert (low, high) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert evaluate.pass_at_k(5, 1, 1) == pytest.approx(0.2) and evaluate.pass_at_k(5, 1, 5) == 1.0
    assert evaluate.pass_at_k(4, 0, 2) == 0.0 and evaluate.pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)


# ---------------------------------------------------------------------------------------------------------------
# Oracle runs on the real benchmark files: a stand-in returning each problem's gold solution must score ~100%,
# one returning another problem's solution (with a different gold answer) ~0%.
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle_cells(tmp_path_factory) -> dict:
    if not all(path.is_file() for path in REAL_FILES.values()):
        pytest.skip(f"real benchmark files not in {BENCHMARK_DIR}")
    other_solution = {}
    for label, path in REAL_FILES.items():
        rows, _ = evaluate.load_rows(str(path))
        for i, row in enumerate(rows):
            other = next(rows[(i + offset) % len(rows)] for offset in range(1, len(rows))
                         if rows[(i + offset) % len(rows)]["answer"].strip() != row["answer"].strip())
            other_solution[label, row["id"]] = other["solution"]
    backends = {"oracle": stand_in(lambda request: request["solution"]),
                "shuffled": stand_in(lambda request: other_solution[request["benchmark"], request["id"]])}
    args = EvalArguments(benchmarks=[f"{label}={path}" for label, path in REAL_FILES.items()], num_steps=[32],
                         batch_size=256, output_dir=str(tmp_path_factory.mktemp("oracle")))
    return {(c["checkpoint"], c["benchmark"]): c for c in main(args, backends=backends)}


@pytest.mark.parametrize("label, size", [("gsm8k", 1319), ("math500", 500)])
def test_oracle_gold_solutions_score_at_least_99_percent(oracle_cells, label, size):
    cell = oracle_cells["oracle", label]
    assert cell["n"] == size and cell["accuracy"] >= 0.99
    assert "lm_eval_strict" not in cell  # reported with gsm8k_cot prompts only


@pytest.mark.parametrize("label", ["gsm8k", "math500"])
def test_shuffled_solutions_score_at_most_half_a_percent(oracle_cells, label):
    assert oracle_cells["shuffled", label]["accuracy"] <= 0.005


# A completion in the Minerva form (a: the gold) -> (exact match, equivalent), as lm-eval scores it.
MINERVA_FORMS = {
    "So $\\boxed{{{a}}}$.\nFinal Answer: The final answer is ${a}$. I hope it is correct.": (True, True),
    "Final Answer: The final answer is ${a}$ units. I hope it is correct.": (True, True),  # units, which it drops
    "Final Answer: The final answer is $\\dfrac{{{a}}}{{1}}$. I hope it is correct.": (False, True),  # unnormalised
    "Final Answer: The final answer is ${a}1$. I hope it is correct.": (False, False),  # wrong
    "So $\\boxed{{{a}}}$.\nFinal Answer: The final answer is": (False, False),  # truncated before the answer
}


def test_minerva_math_format_is_lm_evals_and_reports_exact_match_and_equivalence(tiny_data, tmp_path):
    """Hand-written completions in the Minerva form score as lm-eval's minerva_math scores them; its stop sequence
    'Problem:' cuts the next problem a model makes up (else that problem's box would fail the strict score)."""
    prompts, forms = [], list(MINERVA_FORMS)

    def answers(request):
        prompts.append(request["prompt"])
        form = forms[int(request["id"]) % len(forms)]
        return form.format(a=request["answer"]) + "\n\nProblem:\nWhat is 1+1?\n\nSolution:\n$\\boxed{99999}$"

    (cell,) = main(tiny_args(tiny_data, tmp_path, prompt_format="minerva_math", num_fewshot=4, num_steps=[32],
                             system_prompt="", limit=None, benchmarks=[str(tiny_data / "math_test.jsonl")]),
                   backends={"fake": stand_in(answers)})
    records = read_lines(tmp_path / "samples.jsonl")
    expected = [MINERVA_FORMS[forms[int(r["id"]) % len(forms)]] for r in records]
    assert len(records) == 64 and {int(r["id"]) % len(forms) for r in records} == set(range(len(forms)))
    assert [(r["minerva_exact_match"], r["minerva_equivalent"]) for r in records] == expected
    assert cell["minerva_exact_match"] == sum(exact for exact, _ in expected) / len(records)
    assert cell["minerva_equivalent"] == sum(equivalent for _, equivalent in expected) / len(records)
    assert all(r["correct"] for r in records if r["completion"].startswith("So $\\boxed"))
    assert all("99999" not in r["completion"] for r in records) and "lm_eval_strict" not in cell
    assert prompts[0].startswith("<|begin_text|><|begin_header|>user<|end_header|>\n\nProblem:\nFind the domain")
    assert prompts[0].count("Problem:\n") == 5 and prompts[0].endswith(
        "\n\nSolution:<|end_turn|><|begin_header|>Huginn<|end_header|>\n\n")
    assert "Terrell usually lifts" in prompts[0] and "I hope it is correct.<|end_turn|>" in prompts[0]


def test_flexible_score_counts_answers_given_without_a_box(tiny_data, tmp_path):
    """A model that answers 'so it is $N$.' scores 0 under the strict extraction and 1 under the flexible one."""
    (cell,) = main(tiny_args(tiny_data, tmp_path, num_steps=[4], benchmarks=[str(tiny_data / "math_test.jsonl")]),
                   backends={"fake": stand_in(lambda request: f"Adding up, it is ${request['answer']}$.")})
    assert cell["accuracy"] == 0.0 and cell["correct_flexible"] == 1.0


def test_a_missing_adapter_is_an_error_before_any_model_loads(tiny_data, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    loaded = []
    monkeypatch.setattr(evaluate.data, "load_tokenizer", lambda *args: loaded.append(args))
    for adapter, found in [(tmp_path / "missing", "no such directory"), (empty, "no adapter_config.json")]:
        with pytest.raises(FileNotFoundError, match=f"adapter sft={adapter}: {found}"):
            main(tiny_args(tiny_data, tmp_path / "out", adapters=["base", f"sft={adapter}"]))
    assert not loaded and not (tmp_path / "out").exists()
