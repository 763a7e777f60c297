"""train_grpo.py on the tiny default: rollout/loss consistency (ratio 1), reward fail-safety, prompt screening,
exact resume."""

import json

import pytest
import torch

import data
import train_grpo
from training import parse_args


def grpo_args(tmp_path, *overrides):
    return parse_args(train_grpo.ScriptArguments, train_grpo.GRPOConfig, [
        "--config", "configs/grpo_tiny.yaml", "--output_dir", str(tmp_path / "out"), "--max_samples", "32",
        "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "8",
        "--report_to", "none", *overrides])


def build_trainer(script_args, training_args, model_args):
    model, peft_config = train_grpo.load_policy(script_args, model_args, training_args)
    return train_grpo.HuginnGRPOTrainer(
        model=model, args=training_args, train_dataset=train_grpo.build_prompt_dataset(script_args),
        processing_class=data.load_tokenizer(model_args.model_name_or_path), peft_config=peft_config,
        reward_funcs=train_grpo.build_reward_funcs(script_args.reward_funcs, 8, 4),
        rollout_num_steps=script_args.rollout_num_steps, backprop_steps=script_args.backprop_steps,
        state_seed=script_args.state_seed)


def test_rollout_and_loss_log_probs_agree_before_any_update(tmp_path):
    """The importance ratio new/old is 1 for every token before the first update: TRL's loss path (PEFT, fused
    LM head) scores a rollout at the rollout's depth and initial state."""
    script_args, training_args, model_args = grpo_args(tmp_path, "--rollout_num_steps", "6")
    trainer = build_trainer(script_args, training_args, model_args)
    tokenizer = trainer.processing_class
    prompts = [tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
               for row in trainer.train_dataset.select(range(4))]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    model = trainer.model
    with trainer.recurrence(6):
        rollout = model.generate(**batch, generation_config=trainer.generation_config, return_dict_in_generate=True,
                                 generator=torch.Generator().manual_seed(0))
        completion = rollout.sequences[:, batch.input_ids.shape[1]:]
        mask = torch.cat([batch.attention_mask, torch.ones_like(completion)], dim=1)
        scored, _, _ = trainer._get_per_token_logps_and_entropies(model, rollout.sequences, mask, completion.shape[1])
    assert train_grpo.huginn_backbone(model).last_num_steps == (2, 4)  # depth 6, gradient through the last 4
    ratio = (scored - rollout.logprobs).exp()
    assert (ratio - 1).abs().max() <= 1e-5
    with train_grpo.huginn_backbone(model).recurrence_defaults((2, 4), state_seed=1):  # another initial state
        other, _, _ = trainer._get_per_token_logps_and_entropies(model, rollout.sequences, mask, completion.shape[1])
    assert (other - rollout.logprobs).abs().max() > 1e-3  # the check above can fail


def test_failing_reward_scores_zero_and_is_counted():
    def flaky_reward(completions, answer, **kwargs):
        if any("boom" in c for c in completions):
            raise RuntimeError("bug")
        return [1.0] * len(completions)

    guarded = train_grpo.fail_safe(flaky_reward)
    assert guarded.__name__ == "flaky_reward"
    assert guarded(["ok", "boom", "fine"], answer=["1", "2", "3"]) == [1.0, 0.0, 1.0]
    assert train_grpo.REWARD_FAILURES["flaky_reward"] >= 1


def test_prompt_rows_with_unparsable_gold_are_skipped(tmp_path):
    rows = [{"problem": "What is 2 + 3?", "solution": "$\\boxed{5}$", "answer": "5"},
            {"problem": "What is 1 + 1?", "solution": "$\\boxed{2}$", "answer": "}{"},  # a gold the grader cannot parse
            {"problem": "What is 4 + 4?", "solution": "", "answer": "8"}]  # malformed: empty solution
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    script_args, _, _ = grpo_args(tmp_path, "--dataset_name", str(source))
    dataset = train_grpo.build_prompt_dataset(script_args)
    assert dataset["answer"] == ["5"]
    assert dataset[0]["prompt"][-1]["content"].startswith("What is 2 + 3?")


def logged_steps(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "reward" in entry]


@pytest.mark.slow
def test_resume_continues_with_the_same_prompts_and_steps(tmp_path):
    common = ["--max_steps", "4", "--save_steps", "2", "--logging_steps", "1", "--rollout_num_steps", "2", "4"]
    straight = train_grpo.main(*grpo_args(tmp_path / "straight", *common))
    train_grpo.main(*grpo_args(tmp_path / "resumed", *common, "--max_steps", "2"))  # "killed" after step 2
    resumed = train_grpo.main(*grpo_args(tmp_path / "resumed", *common))  # reruns the command: resumes
    assert resumed.state.global_step == straight.state.global_step == 4
    # depth drawn per round, and the entropy of the sampled completions: a fingerprint of which prompts were
    # drawn and what was sampled (the random tiny model earns no reward yet, so losses are all 0)
    keys = ("rollout/num_steps", "entropy", "completions/mean_length")
    expected = [entry[k] for entry in logged_steps(straight)[2:] for k in keys]
    assert [entry[k] for entry in logged_steps(resumed)[-2:] for k in keys] == pytest.approx(expected, abs=1e-6)
    assert len({entry["entropy"] for entry in logged_steps(straight)}) == 4  # steps differ: the check can fail
