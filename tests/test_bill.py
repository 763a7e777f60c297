"""benchmarks/bill.py: its arithmetic against hand-computed figures on small configs and a small costs file, its
errors, and the two recipes it prices (stages wired to each other's folders, batch shapes, budgets)."""

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

from generation import kv_cache_bytes, model_weight_bytes, prefill_activation_bytes
from modeling_huginn_qlora import HuginnConfig

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bill", ROOT / "benchmarks" / "bill.py")
bill = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bill)

GIB = 2**30
# A costs file with round numbers: "ref" measured everything; "half" has half its bandwidth and TFLOPS.
SMALL_COSTS = {
    "cards": {"ref": {"memory_gb": 100, "bandwidth_tb_s": 2.0, "bf16_tflops": 100, "source": "test"},
              "half": {"memory_gb": 100, "bandwidth_tb_s": 1.0, "bf16_tflops": 50, "source": "test"}},
    "figures": [
        {"what": "train", "weights": "bf16", "checkpointing": False, "tokens": 1000, "num_steps": [24, 8],
         "tok_s": 1000.0, "peak_gib": 11.0, "weights_gib": 1.0, "card": "ref", "origin": "reference", "source": "t"},
        {"what": "train", "weights": "nf4", "checkpointing": True, "tokens": 1000, "num_steps": [24, 8],
         "tok_s": 500.0, "peak_gib": 3.0, "weights_gib": 1.0, "card": "ref", "origin": "reference", "source": "t"},
        {"what": "train", "weights": "nf4", "checkpointing": True, "tokens": 2000, "num_steps": [24, 8],
         "tok_s": 800.0, "peak_gib": 4.0, "weights_gib": 1.0, "card": "ref", "origin": "reference", "source": "t"},
        {"what": "decode", "weights": "bf16", "batch": 1, "context": 512, "step_ms": 13.3, "card": "ref",
         "origin": "reference", "source": "t"},
        {"what": "decode", "weights": "bf16", "batch": 11, "context": 512, "step_ms": 26.6, "card": "ref",
         "origin": "reference", "source": "t"},
    ],
    "assumptions": {"prompt_tokens": {"gsm8k": {"mean": 50, "max": 99}, "math500": {"mean": 50, "max": 99}},
                    "benchmark_problems": {"gsm8k": 1319},
                    "load_allowance_s": 100},
}
SFT = """model_name_or_path: tomg-group-umd/huginn-0125
load_in_4bit: false
use_peft: true
dataset_name: [nvidia/OpenMathInstruct-2]
num_steps: [24, 8]
max_steps: 10
per_device_train_batch_size: 2
gradient_accumulation_steps: 3
max_length: 100
activation_checkpointing: false
report_to: none
"""
GRPO = """model_name_or_path: tomg-group-umd/huginn-0125
load_in_4bit: false
rollout_num_steps: [32]
max_steps: 2
num_generations: 4
per_device_train_batch_size: 4
gradient_accumulation_steps: 2
max_completion_length: 100
generation_kwargs: {kv_cache_slots: 1}
vllm_importance_sampling_correction: true
beta: 0.1
activation_checkpointing: false
report_to: none
"""
EVAL = """adapters: [base]
benchmarks: [gsm8k]
limit: 10
num_steps: [8]
batch_size: 4
max_new_tokens: 100
kv_cache_slots: 1
max_memory_gb: 100
"""


@pytest.fixture
def costs(tmp_path):
    path = tmp_path / "costs.yaml"
    path.write_text(yaml.safe_dump(SMALL_COSTS))
    return bill.Costs(path)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_decode_step_interpolates_scales_and_adds_context(costs):
    config = HuginnConfig()  # 133 block passes at 32 steps (2 + 4 x 32 + 2 + the head), 37 at 8
    step, figure = bill.decode_step_seconds(costs, "ref", config, "bf16", 6, 512, 32)
    assert step == pytest.approx(0.01995)  # 13.3 + 5 x (26.6 - 13.3) / 10 ms
    step, figure = bill.decode_step_seconds(costs, "half", config, "bf16", 6, 512, 32)
    assert step == pytest.approx(0.0399) and figure.scale == 0.5  # half the bandwidth: twice the time
    # 100 tokens past the measured 512: 6 rows x 100 x 21,120 bytes per block pass at 2 TB/s, 133 passes
    step, _ = bill.decode_step_seconds(costs, "ref", config, "bf16", 6, 612, 32)
    assert step == pytest.approx(0.01995 + 133 * 6 * 100 * 21120 / 2e12)
    step, _ = bill.decode_step_seconds(costs, "ref", config, "bf16", 6, 512, 8)
    assert step == pytest.approx(0.01995 * 37 / 133)
    step, _ = bill.decode_step_seconds(costs, "ref", config, "bf16", 21, 512, 32)  # beyond: the last slope
    assert step == pytest.approx(0.0399)


def test_train_rate_and_peak_memory(costs):
    config = HuginnConfig()
    figure = bill.train_figure(costs, "half", "nf4", True, 4000)  # the largest measured micro-batch <= 4,000
    assert figure.entry["tokens"] == 2000 and figure.scale == 0.5
    assert bill.train_seconds(config, figure, 8000, 32) == pytest.approx(20.0)  # 8,000 / 800 tok/s, / 0.5
    assert bill.train_figure(costs, "ref", "nf4", True, 500).entry["tokens"] == 1000  # below: the smallest
    # two sizes: activations 2 GiB at 1,000 and 3 at 2,000 tokens -> 5 at 4,000; half of them at 4 grad steps
    assert bill.train_peak_gib(costs, "nf4", True, 4000, 8) == pytest.approx(6.0)
    assert bill.train_peak_gib(costs, "nf4", True, 4000, 4) == pytest.approx(3.5)
    assert bill.train_peak_gib(costs, "bf16", False, 500, 8) == pytest.approx(6.0)  # one size: proportional


def test_sft_bill_by_hand(costs, tmp_path):
    stage = bill.bill_stage(costs, "ref", "train_sft.py", write(tmp_path, "sft_small.yaml", SFT), [])
    assert stage.tokens == {"trained": 10 * 2 * 3 * 100}  # steps x sequences per step x max_length
    assert stage.gpu_seconds == pytest.approx(6000 / 1000 + 100)  # 1,000 tok/s, + the load allowance
    assert stage.peak_gib == pytest.approx(1 + 10 * 200 / 1000)  # weights + activations of 2 x 100 tokens
    two = bill.bill_stage(costs, "ref", "train_sft.py", write(tmp_path, "sft_small.yaml", SFT), [], num_gpus=2)
    assert two.tokens == {"trained": 12000} and two.gpu_seconds == pytest.approx(12 + 200)


def test_grpo_bill_by_hand(costs, tmp_path):
    stage = bill.bill_stage(costs, "ref", "train_grpo.py", write(tmp_path, "grpo_small.yaml", GRPO), [])
    # A round: 4 x 2 = 8 completions (2 prompts x 4), one per optimizer step, decoded in one wave of 8 rows for
    # 100 steps at 13.3 + 7 x 1.33 ms (199 + 1 preallocated tokens: no extra context). The sampler scoring and
    # KL reference forwards over 8 x (50 + 100) tokens and the loss over 2 x 4 x 150, all at 1,000 tok/s; the
    # prefill of 2 prompts x 50 tokens.
    per_step = 100 * 0.02261 + 2 * 1.2 + 0.1 + 1.2
    assert stage.gpu_seconds == pytest.approx(2 * per_step + 100)
    assert stage.tokens == {"decoded": 2 * 8 * 100, "trained": 2 * 8 * 150}
    config = HuginnConfig()
    rollout = (2 * model_weight_bytes(config, torch.bfloat16) + kv_cache_bytes(config, 8, 200, 1)
               + prefill_activation_bytes(config, 2, 99, torch.bfloat16))  # base + dense copy + cache + prefill
    assert stage.peak_gib == pytest.approx(max(rollout / GIB, 1 + 10 * 4 * 199 / 1000))
    cheaper = bill.bill_stage(costs, "ref", "train_grpo.py", write(tmp_path, "grpo_small.yaml", GRPO),
                              ["--beta", "0.0"])
    assert stage.gpu_seconds - cheaper.gpu_seconds == pytest.approx(2 * 1.2)  # no KL reference forward


def test_eval_bill_by_hand(costs, tmp_path):
    stage = bill.bill_stage(costs, "ref", "evaluate.py", write(tmp_path, "eval_small.yaml", EVAL), [])
    # 10 problems x 100 tokens at batch 4, 8 steps (37 of 133 block passes per token); prefill 10 x 50 tokens
    decode = 10 * 100 / 4 * (0.0133 + 3 * 0.00133) * 37 / 133
    assert stage.gpu_seconds == pytest.approx(decode + 10 * 50 / 1000 * 37 / 133 + 100)
    assert stage.tokens == {"decoded": 1000}


def test_project_figures_replace_reference_ones(costs):
    measured = {**SMALL_COSTS["figures"][0], "origin": "project", "tok_s": 2000.0, "card": "half"}
    costs.figures.append(measured)
    figure = bill.train_figure(costs, "half", "bf16", False, 1000)
    assert figure.entry is measured and figure.scale == 1.0  # measured on the billed card: unscaled
    assert "project, half" in figure.describe()


def test_errors_are_clear(costs, tmp_path):
    sft = write(tmp_path, "sft_small.yaml", SFT)
    with pytest.raises(bill.BillError, match="unknown card 'tpu'"):
        bill.bill_stage(costs, "tpu", "train_sft.py", sft, [])
    with pytest.raises(bill.BillError, match="bogus_key"):
        bill.bill_stage(costs, "ref", "train_sft.py", write(tmp_path, "sft_bad.yaml", SFT + "bogus_key: 1\n"), [])
    with pytest.raises(bill.BillError, match="--no_such_flag"):
        bill.bill_stage(costs, "ref", "train_sft.py", sft, ["--no_such_flag", "1"])
    with pytest.raises(bill.BillError, match="max_steps > 0"):
        bill.bill_stage(costs, "ref", "train_sft.py", sft, ["--max_steps", "-1"])
    with pytest.raises(bill.BillError, match="cannot tell its stage"):
        bill.script_for("configs/accelerate_ddp.yaml")
    with pytest.raises(bill.BillError, match="unknown recipe"):
        bill.bill_recipe(costs, "ref", "8gb")
    unlimited = write(tmp_path, "eval_all.yaml", EVAL.replace("limit: 10\n", ""))
    with pytest.raises(bill.BillError, match="no prompt-length assumption for 'data/mine.jsonl'"):
        bill.bill_stage(costs, "ref", "evaluate.py", unlimited, ["--benchmarks", "mine=data/mine.jsonl"])
    with pytest.raises(bill.BillError, match="how many problems 'math500'"):
        bill.bill_stage(costs, "ref", "evaluate.py", unlimited, ["--benchmarks", "math500"])


@pytest.mark.parametrize("recipe, card, budget_hours", [("80gb", "h100-80gb", 8.0), ("24gb", "rtx4090-24gb", 24.0)])
def test_recipes(recipe, card, budget_hours):
    """The recipe's stages point at each other's folders, GRPO has the batch shape asked for, every stage fits
    its card and the whole recipe its budget (by the bill's own arithmetic)."""
    stages = bill.RECIPES[recipe]
    (sft_stage, gap_stage, grpo_stage, *eval_stages) = stages
    assert [stage[0] for stage in stages] == ["train_sft.py", "sampling_gap.py", "train_grpo.py", *["evaluate.py"] * 3]
    sft = bill.parse_stage(*sft_stage)
    grpo_script_args, grpo, _ = bill.parse_stage(*grpo_stage)
    assert grpo_script_args.sft_adapter == bill.parse_stage(*gap_stage).adapter == sft[1].output_dir
    assert grpo.num_generations >= 8 and grpo.per_device_train_batch_size * grpo.gradient_accumulation_steps \
        >= 16 * grpo.num_generations
    assert grpo.steps_per_generation == grpo.gradient_accumulation_steps  # one round, decoded together, per step
    assert grpo.epsilon_high == 0.28 and grpo.mask_truncated_completions and grpo.loss_type == "dapo"
    paper, headline, sweep = (bill.parse_stage(*stage) for stage in eval_stages)
    assert paper.adapters == ["base"] and (paper.prompt_format, paper.num_fewshot) == ("gsm8k_cot", 8)
    assert paper.limit in (None, 1319) and paper.num_steps == [32]  # the paper's setting: all problems, 32 steps
    assert headline.adapters == sweep.adapters == [f"sft={sft[1].output_dir}", f"grpo={grpo.output_dir}"]
    assert headline.num_steps == [32] and headline.kv_cache_slots is None  # the headline: exact, the paper's depth
    assert len({paper.output_dir, headline.output_dir, sweep.output_dir}) == 3
    bills = bill.bill_recipe(bill.Costs(), card, recipe)
    usable = bill.MEMORY_HEADROOM * bill.Costs().card(card)["memory_gb"] * 1e9 / GIB
    assert all(stage.peak_gib <= usable for stage in bills)
    assert sum(stage.gpu_seconds for stage in bills) / 3600 <= budget_hours
