"""The tiny pipeline end to end (pretraining, SFT, GRPO, evaluation, report) shows the method's learning effects,
and its config and stage bookkeeping behave."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

import data
import pipeline
import sampling_gap
import train_grpo
from training import parse_args

spec = importlib.util.spec_from_file_location(
    "grpo_variants", Path(__file__).resolve().parents[1] / "benchmarks" / "grpo_variants.py")
grpo_variants = importlib.util.module_from_spec(spec)
spec.loader.exec_module(grpo_variants)

# Margins set from the measured spread (README, "The tiny pipeline": seeds 0-2, one and two threads, torch 2.13 CPU
# and 2.14 CUDA builds; benchmarks/pipeline_spread.py). Measured: SFT - base +0.49..+0.58, 8 - 1 steps
# +0.28..+0.37; GRPO - SFT mean reward at temperature 1 +0.145..+0.295; GRPO's training reward, last 5 steps - first
# 5, +0.19..+0.26; greedy problems GRPO broke minus those it fixed, of 128: -3..+1 here, +8 in the one run reported
# from another machine. A GRPO stage that keeps SFT's model fails the reward and training-reward margins (an
# unchanged policy: 0 within ~0.03 and ~0.04); one that wrecks greedy answers (the final norm's gain trained alone:
# -14 problems net) fails the greedy one.
MIN_SFT_OVER_BASE = 0.30
MIN_DEEP_OVER_SHALLOW = 0.10
MIN_GRPO_OVER_SFT_REWARD = 0.08
MIN_GRPO_TRAINING_REWARD_RISE = 0.10
MAX_GRPO_NET_BROKEN_GREEDY = 12  # problems of 128: paired, so problems both get right or wrong add no noise


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """The default pipeline (seed 0). It runs alone for minutes, so it gets both cores (conftest keeps the other
    tests at one thread each): 1.5x faster pretraining."""
    output_dir = tmp_path_factory.mktemp("pipeline")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        report_dir = pipeline.main(pipeline.parse_args(["--output_dir", str(output_dir)]))
    finally:
        torch.set_num_threads(threads)
    return output_dir, report_dir


def missed_margins(run: dict) -> list[str]:
    """The learning effects of a pipeline run (pipeline.run_effects) that miss their margins."""
    effects, changes = run["effects"], run["changes"]
    checks = {"SFT over base": effects["sft_over_base"] >= MIN_SFT_OVER_BASE,
              "depth": effects["deep_over_shallow"] >= MIN_DEEP_OVER_SHALLOW,
              "GRPO reward": effects["grpo_over_sft_reward"] >= MIN_GRPO_OVER_SFT_REWARD,
              "GRPO training reward": effects["grpo_training_reward_rise"] >= MIN_GRPO_TRAINING_REWARD_RISE,
              "GRPO greedy": changes["broken"] - changes["fixed"] <= MAX_GRPO_NET_BROKEN_GREEDY}
    return [name for name, held in checks.items() if not held]


def test_a_grpo_stage_that_keeps_the_sft_model_misses_the_margins():
    """What an unchanged policy measures (sampled accuracy and training reward as noisy as SFT's, the same greedy
    answers) fails the GRPO margins; the worst measured value of every effect at once passes them (8 problems
    broken net: the run reported from another machine)."""
    unchanged = {"effects": {"sft_over_base": 0.49, "deep_over_shallow": 0.28, "grpo_over_sft_reward": 0.03,
                             "grpo_training_reward_rise": 0.04}, "changes": {"fixed": 0, "broken": 0}}
    assert missed_margins(unchanged) == ["GRPO reward", "GRPO training reward"]
    worst_measured = {"effects": {"sft_over_base": 0.492, "deep_over_shallow": 0.281, "grpo_over_sft_reward": 0.145,
                                  "grpo_training_reward_rise": 0.194}, "changes": {"fixed": 5, "broken": 13}}
    assert missed_margins(worst_measured) == []


@pytest.mark.slow
def test_pipeline_shows_sft_depth_and_grpo_effects(pipeline_run):
    output_dir, report_dir = pipeline_run
    run = pipeline.run_effects(output_dir)
    print(run)
    assert run["changes"]["n"] == 128 and missed_margins(run) == []
    report = (report_dir / "results.md").read_text()
    assert "| grpo | gsm8k_test | 64 |" in report and "Stage wall times" in report and "fixed" in report
    for plot in ("accuracy_vs_steps.png", "training_curves.png"):
        assert (report_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_rerun_with_the_same_settings_skips_every_stage(pipeline_run, capsys):
    output_dir, _ = pipeline_run
    before = {path: path.stat().st_mtime_ns for path in output_dir.glob("*/stage.json")}
    pipeline.main(pipeline.parse_args(["--output_dir", str(output_dir)]))
    assert capsys.readouterr().out.count("done before with the same settings, skipped") == len(pipeline.STAGES)
    assert {path: path.stat().st_mtime_ns for path in output_dir.glob("*/stage.json")} == before


def test_unknown_section_or_pretrain_key_is_an_error(tmp_path):
    settings = yaml.safe_load(pipeline.DEFAULT_CONFIG.read_text())
    for broken, message in [({**settings, "sfft": {}}, "unknown sections \\['sfft'\\]"),
                            ({**settings, "pretrain": {**settings["pretrain"], "lr": 1.0}}, "pretrain: .*lr")]:
        path = tmp_path / "pipeline.yaml"
        path.write_text(yaml.safe_dump(broken))
        with pytest.raises(ValueError, match=message):
            pipeline.main(pipeline.parse_args(["--output_dir", str(tmp_path / "out"), "--config", str(path)]))
    assert not (tmp_path / "out").exists()


def test_report_has_adaptive_exit_and_variants_compare_seed_by_seed(pipeline_run, tmp_path):
    """Adaptive exit is reported per checkpoint (accuracy, and mean steps used within the depth); the variant table
    pairs runs by seed: a run against itself differs by 0 everywhere."""
    output_dir, report_dir = pipeline_run
    run = pipeline.run_effects(output_dir)
    for checkpoint in ("sft", "grpo"):
        assert 1 < run["adaptive"][checkpoint]["mean_steps_used"] < 8
        assert abs(run["adaptive"][checkpoint]["accuracy"] - run["greedy"][checkpoint][8]) < 0.2
    assert "adaptive exit (≤ 8): accuracy, mean steps" in (report_dir / "results.md").read_text()
    for name in ("plain-seed0", "same-seed0"):
        (tmp_path / name).symlink_to(output_dir)
    text = grpo_variants.compare([tmp_path / "plain-seed0", tmp_path / "same-seed0"], "plain")
    assert "| Δ same (seeds 0) | +0.0 [+0.0, +0.0] | +0.0 [+0.0, +0.0] |" in text


def test_grpo_variants_override_the_grpo_section_in_order(tmp_path):
    """Every variant in the config names real train_grpo.py arguments; variants apply in order; unknown names fail
    before any stage runs."""
    plain = pipeline.load_settings(pipeline.DEFAULT_CONFIG)
    variants = yaml.safe_load(pipeline.DEFAULT_CONFIG.read_text())["grpo_variants"]
    for name in variants:
        settings = pipeline.load_settings(pipeline.DEFAULT_CONFIG, [name])
        assert settings["grpo"] == {**plain["grpo"], **variants[name]}
        argv = ["--config", "configs/grpo_tiny.yaml", "--output_dir", str(tmp_path)]
        for key, value in settings["grpo"].items():
            argv += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
        script_args, training_args, _ = parse_args(train_grpo.ScriptArguments, train_grpo.GRPOConfig, argv)
        for key, value in variants[name].items():  # each key reached a real argument
            assert getattr(script_args, key, getattr(training_args, key, None)) == value, key
    both = pipeline.load_settings(pipeline.DEFAULT_CONFIG, ["depth_credit", "lora_only"])["grpo"]
    assert both["final_norm_learning_rate"] == 0.0 and both["depth_credit_fractions"]
    with pytest.raises(ValueError, match="unknown grpo_variants \\['deep'\\]"):
        pipeline.main(pipeline.parse_args(["--output_dir", str(tmp_path / "out"), "--grpo_variant", "deep"]))
    assert not (tmp_path / "out").exists()


BANDIT_STEPS = 30
BANDIT_DIGITS = "1234"  # the SFT model starts its answer by restating the question's first digit: ~4 in 9 of these


def first_token_bandit(digit_ids: set[int], sign: float):
    """A reward GRPO cannot earn by accident: sign * 1 when the completion's first token is one of `digit_ids`."""
    def bandit_reward(completions, completion_ids, **kwargs):
        return [sign * float(bool(ids) and ids[0] in digit_ids) for ids in completion_ids]
    return bandit_reward


def bandit_rates(output_dir, sign: float) -> list[float]:
    """Per step, the fraction of rollouts whose first token is a bandit digit, training on sign * that (the
    pipeline's GRPO settings, but LoRA at 2e-3 and no KL term)."""
    stage_dir = output_dir / f"bandit{sign:+.0f}"
    script_args, training_args, model_args = parse_args(train_grpo.ScriptArguments, train_grpo.GRPOConfig, [
        "--config", str(output_dir / "grpo" / "config.yaml"), "--output_dir", str(stage_dir),
        "--max_steps", str(BANDIT_STEPS), "--max_completion_length", "2", "--reward_weights", "1.0",
        "--learning_rate", "2e-3", "--beta", "0", "--logging_steps", "1"])  # no KL: it would hold the policy near SFT
    tokenizer = data.load_tokenizer(model_args.model_name_or_path)
    digit_ids = set(tokenizer.convert_tokens_to_ids(list(BANDIT_DIGITS)))
    trainer = train_grpo.main(script_args, training_args, model_args,
                              reward_funcs=[first_token_bandit(digit_ids, sign)])
    return [sign * entry["reward"] for entry in trainer.state.log_history if "reward" in entry]


@pytest.mark.slow
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_grpo_bandit_moves_the_rewarded_first_token_both_ways(pipeline_run, sign):
    """From the tiny SFT model, GRPO pushes the rate of a rewarded first token from its start (~0.4) to >= 0.9 in
    30 steps, and with the reward negated down to <= 0.1: the sign of the update, the advantages, the completion
    masks and the optimizer plumbing all work. (A sign error, a mask that dropped the first token or an update that
    never reached the LoRA weights would leave the rate where it started or move it the wrong way.)"""
    output_dir, _ = pipeline_run
    rates = bandit_rates(output_dir, sign)
    print(f"sign {sign:+.0f}: rates {[round(r, 2) for r in rates]}")
    assert 0.2 <= rates[0] <= 0.8  # neither target is reached at the start
    final = sum(rates[-5:]) / 5
    assert final >= 0.9 if sign > 0 else final <= 0.1


def test_greedy_changes_pairs_problems_and_takes_the_latest_sample(tmp_path):
    def record(checkpoint, id_, correct, steps=8, benchmark="gsm8k_test"):
        return {"checkpoint": checkpoint, "benchmark": benchmark, "steps": steps, "id": id_, "correct": correct}

    sft = [True, True, False, False, True, False]
    grpo = [True, False, True, True, True, False]  # problem 1 broken, problems 2 and 3 fixed
    records = [record("grpo", 0, False), record("sft", 9, True, steps=1)]  # superseded, and another depth
    records += [record("sft", i, c) for i, c in enumerate(sft)] + [record("grpo", i, c) for i, c in enumerate(grpo)]
    records.append(record("base", 0, False))
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    changes = pipeline.greedy_changes(path, "sft", "grpo", 8)
    assert (changes["fixed"], changes["broken"], changes["n"]) == (2, 1, 6)
    assert changes["difference"] == pytest.approx(1 / 6)
    # matched pairs: var = (b + c - (b - c)^2 / n) / n^2 = (3 - 1/6) / 36
    assert changes["ci95_high"] - changes["difference"] == pytest.approx(1.96 * (17 / 6) ** 0.5 / 6)
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:-3]))  # grpo lacks problems 4 and 5
    with pytest.raises(ValueError, match="grpo lacks"):
        pipeline.greedy_changes(path, "sft", "grpo", 8)


@pytest.mark.slow
def test_sampling_gap_finds_the_tiny_sft_models_large_gap(pipeline_run, tmp_path):
    """On the tiny SFT adapter, whose samples at temperature 1 are far worse than its greedy answers (README), the
    command measures that and recommends sharpening the policy, as the tiny recipe does."""
    output_dir, _ = pipeline_run
    result = sampling_gap.main(sampling_gap.parse_args([
        "--model_name_or_path", str(output_dir / "base"), "--adapter", str(output_dir / "sft"),
        "--dataset", str(output_dir / "data" / "gsm8k_train.jsonl"), "--limit", "64", "--num_steps", "8",
        "--num_samples", "4", "--temperatures", "1.0", "--max_new_tokens", "24", "--system_prompt", "",
        "--kv_cache_slots", "0",  # exact caches, as the tiny GRPO's rollouts
        "--output_dir", str(tmp_path)]))
    print(result)
    assert result["greedy_accuracy"] >= 0.4 and result["ratio"][1.0] < 0.6
    assert result["recommendation"].startswith("large gap")
