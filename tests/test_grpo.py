"""train_grpo.py on the tiny default: rollout/loss consistency (ratio 1, sampler-mismatch weights), the policy's
fidelity at full size (fp32 LoRA weights under NF4, no dropout, stop tokens), reward fail-safety, prompt screening,
exact resume."""

import itertools
import json
import shutil

import pytest
import torch
from datasets import IterableDataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, GenerationConfig

import data
import tiny
import train_grpo
from training import HUGINN_LORA_TARGETS, parse_args


def grpo_args(tmp_path, *overrides):
    return parse_args(train_grpo.ScriptArguments, train_grpo.GRPOConfig, [
        "--config", "configs/grpo_tiny.yaml", "--output_dir", str(tmp_path / "out"), "--max_samples", "32",
        "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "8",
        "--report_to", "none", *overrides])


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory):
    """An adapter as train_sft.py leaves it with configs/sft_*.yaml: LoRA dropout 0.05, and weights far from zero
    (random B), so that dropout, if it stayed on, would change every forward."""
    model = AutoModelForCausalLM.from_pretrained(tiny.resolve_model_path("tiny-huginn"))
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=HUGINN_LORA_TARGETS,
                        init_lora_weights=False)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sft-adapter")
    get_peft_model(model, config).save_pretrained(path)
    return str(path)


def generation_round(trainer, num_prompts: int = 4) -> dict:
    """One rollout round as the training loop runs it (model in training mode, each prompt num_generations times)."""
    rows = [trainer.train_dataset[i] for i in range(num_prompts) for _ in range(trainer.num_generations)]
    trainer.model.train()
    return trainer._generate_and_score_completions(rows)


def test_exact_rollouts_from_a_dropout_adapter_have_sampler_weights_1(tmp_path, sft_adapter):
    """Rollouts in exact mode sample the very policy the loss scores: TRL's sampler-mismatch weights
    exp(logp_trained - logp_sampler) are 1, even from an SFT adapter saved with LoRA dropout 0.05 (GRPO turns it
    off)."""
    trainer = train_grpo.build_trainer(*grpo_args(tmp_path, "--sft_adapter", sft_adapter, "--rollout_num_steps", "6",
                                       "--vllm_importance_sampling_correction", "true"))
    output = generation_round(trainer)
    mask = output["completion_mask"].bool()
    weights = output["importance_sampling_ratio"][mask]
    assert (weights - 1).abs().max() <= 1e-5
    assert trainer._metrics["train"]["sampling/kl"][-1] <= 1e-9
    lora_dropouts = [m for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert lora_dropouts == []  # the check above could fail: with dropout on, rollout and loss differ


def test_kl_reference_from_an_sft_adapter_is_a_frozen_copy_of_it(tmp_path, sft_adapter):
    """beta > 0 from --sft_adapter: the KL is to the SFT policy (TRL's "ref" adapter, a copy), not to the base."""
    trainer = train_grpo.build_trainer(*grpo_args(tmp_path, "--sft_adapter", sft_adapter, "--beta", "0.04"))
    parameters = dict(trainer.model.named_parameters())
    copies = {name: name.replace(".default.", ".ref.") for name in parameters if ".lora_A.default." in name}
    assert copies and all(torch.equal(parameters[name], parameters[ref]) for name, ref in copies.items())
    assert not any(parameters[ref].requires_grad for ref in copies.values())


def test_shared_slot_rollouts_get_capped_sampler_weights(tmp_path):
    """kv_cache_slots 1 (the 24 GB config) makes rollout log-probs differ from the loss's exact forward: the weights
    that correct it differ from 1, are capped at vllm_importance_sampling_clip_max, and the mismatch is logged."""
    trainer = train_grpo.build_trainer(*grpo_args(tmp_path, "--rollout_num_steps", "6", "--generation_kwargs",
                                       '{"kv_cache_slots": 1}', "--vllm_importance_sampling_correction", "true",
                                       "--vllm_importance_sampling_mode", "token_truncate",
                                       "--vllm_importance_sampling_clip_max", "1.01"))
    output = generation_round(trainer)
    weights = output["importance_sampling_ratio"][output["completion_mask"].bool()]
    assert (weights - 1).abs().max() > 1e-3
    assert weights.max() <= 1.01
    assert trainer._metrics["train"]["sampling/kl"][-1] > 0
    assert trainer._metrics["train"]["sampling/sampling_logp_difference/mean"][-1] > 0


def test_lora_weights_stay_fp32_and_learn_at_rl_rates_under_nf4(tmp_path, sft_adapter):
    """TRL casts a quantized model's trainable weights to bf16, where an Adam step of 1e-6 on entries of ~1e-2
    rounds to nothing. They stay fp32, and one step at lr 1e-6 moves every LoRA weight that got a gradient."""
    def length_reward(completions, **kwargs):  # varies within groups, so advantages are not all 0
        return [float(len(c[0]["content"])) for c in completions]

    args = grpo_args(tmp_path, "--sft_adapter", sft_adapter, "--load_in_4bit", "true", "--learning_rate", "1e-6",
                     "--max_steps", "1", "--rollout_num_steps", "2", "--warmup_steps", "0", "--save_strategy", "no",
                     "--reward_weights", "1.0")
    trainer = train_grpo.build_trainer(*args, reward_funcs=[length_reward])
    lora = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    before = {name: p.detach().clone() for name, p in lora.items()}
    gradients = {}
    for name, p in lora.items():
        p.register_hook(lambda grad, name=name: gradients.__setitem__(name, gradients.get(name, 0) + grad.abs().sum()))
    trainer.train()
    moved = [name for name in gradients if gradients[name] > 0]
    assert len(moved) >= len(lora) // 2
    assert all(not torch.equal(lora[name].detach(), before[name]) for name in moved)


def test_final_norm_gain_trains_at_its_own_rate_and_is_saved_with_the_adapter(tmp_path, sft_adapter):
    """final_norm_learning_rate: the final RMSNorm's gain is trained in an optimizer group of that rate and saved
    with the adapter, so evaluation loads what GRPO learnt. learning_rate 0 holds the LoRA: no gradient for it."""
    def length_reward(completions, **kwargs):
        return [float(len(c[0]["content"])) for c in completions]

    script_args, training_args, model_args = grpo_args(
        tmp_path, "--sft_adapter", sft_adapter, "--final_norm_learning_rate", "0.05", "--learning_rate", "0",
        "--max_steps", "2", "--rollout_num_steps", "2", "--warmup_steps", "0", "--save_strategy", "no",
        "--reward_weights", "1.0")
    trainer = train_grpo.main(script_args, training_args, model_args, reward_funcs=[length_reward])
    assert [group["lr"] for group in trainer.optimizer.param_groups] == [0.05]
    assert [p.numel() for p in trainer.optimizer.param_groups[0]["params"]] == [128]
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" in n)
    trained = next(p for n, p in trainer.model.named_parameters() if ".ln_f.modules_to_save." in n).detach().clone()
    assert not torch.equal(trained, torch.ones_like(trained))  # it moved from the base's gain
    base = AutoModelForCausalLM.from_pretrained(tiny.resolve_model_path(model_args.model_name_or_path))
    reloaded = PeftModel.from_pretrained(base, training_args.output_dir).merge_and_unload()
    assert torch.equal(reloaded.transformer.ln_f.weight, trained)


def test_rollouts_stop_at_end_turn_when_the_generation_config_lists_only_end_text(tmp_path):
    """The published generation config lists only <|end_text|>; a chat turn ends at <|end_turn|>."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny.resolve_model_path("tiny-huginn"), model_dir)
    tokenizer = data.load_tokenizer(str(model_dir))
    end_text, end_turn = tokenizer.convert_tokens_to_ids(["<|end_text|>", "<|end_turn|>"])
    GenerationConfig(eos_token_id=end_text, pad_token_id=tokenizer.pad_token_id).save_pretrained(model_dir)
    trainer = train_grpo.build_trainer(*grpo_args(tmp_path, "--model_name_or_path", str(model_dir)))
    assert {end_text, end_turn} <= set(trainer.eos_token_ids)
    assert {end_text, end_turn} <= set(trainer.generation_config.eos_token_id)


def test_rollout_and_loss_log_probs_agree_before_any_update(tmp_path):
    """The importance ratio new/old is 1 for every token before the first update: TRL's loss path (PEFT, fused
    LM head) scores a rollout at the rollout's depth and initial state."""
    script_args, training_args, model_args = grpo_args(tmp_path, "--rollout_num_steps", "6")
    trainer = train_grpo.build_trainer(script_args, training_args, model_args)
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


def test_packed_prompt_groups_score_as_unpacked_rows(tmp_path):
    """The loss's packed rows (a prompt's samples share one pass over it, completions unpadded) give every completion
    token TRL's unpacked log-prob, entropy and gradient: prompts of different lengths (left-padded), groups of
    different sizes in shuffled order, completions of different lengths (right-padded)."""
    trainer = train_grpo.build_trainer(*grpo_args(tmp_path, "--rollout_num_steps", "4"))
    tokenizer, model = trainer.processing_class, trainer.model
    prompts = [tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                             return_dict=False) for row in trainer.train_dataset.select(range(3))]
    prompts[2] = prompts[2][:3] + prompts[2]  # a longer prompt: the others are left-padded
    order, lengths, width = [0, 1, 0, 2, 1, 0], [8, 3, 1, 6, 8, 5], 8
    batch = tokenizer.pad({"input_ids": [prompts[i] for i in order]}, return_tensors="pt", padding_side="left")
    completions = torch.randint(0, 300, (len(order), width), generator=torch.Generator().manual_seed(0))
    completion_mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    completions = completions.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    input_ids = torch.cat([batch.input_ids, completions], dim=1)
    attention_mask = torch.cat([batch.attention_mask, completion_mask], dim=1)
    packed = train_grpo.pack_shared_prompts(input_ids, attention_mask, width, tokenizer.pad_token_id)
    assert packed.input_ids.shape[0] == 3 and packed.input_ids.numel() < 0.7 * input_ids.numel()

    def scored(method):
        model.zero_grad()
        with trainer.recurrence(4):
            logps, entropy, _ = method(trainer, model, input_ids, attention_mask, width, compute_entropy=True)
        (logps * completion_mask).sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return logps.detach(), entropy.detach(), grads

    mask = completion_mask.bool()
    logps, entropy, grads = scored(train_grpo.HuginnGRPOTrainer._get_per_token_logps_and_entropies)
    trl_rows = train_grpo.GRPOTrainer._get_per_token_logps_and_entropies
    reference_logps, reference_entropy, reference_grads = scored(trl_rows)
    assert (logps - reference_logps)[mask].abs().max() <= 1e-5
    assert (entropy - reference_entropy)[mask].abs().max() <= 1e-5
    assert (logps[~mask] == 0).all()
    assert all(torch.allclose(g, r, rtol=1e-4, atol=1e-6) for g, r in zip(grads, reference_grads, strict=True))
    assert max(g.abs().max() for g in grads) > 0


def test_rollouts_are_a_function_of_seed_and_step(tmp_path):
    """The engine's samples depend on (seed, step, process) only: a resumed run redraws what an uninterrupted one
    drew. A prompt's samples differ from each other (one shared prefill, own sampling seeds)."""
    trainer = train_grpo.build_trainer(*grpo_args(tmp_path, "--rollout_num_steps", "2"))
    tokenizer = trainer.processing_class
    prompt_ids = [tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                                return_dict=False) for row in trainer.train_dataset.select(range(2))]
    grouped = [ids for ids in prompt_ids for _ in range(4)]
    with trainer.recurrence(2):
        first, logprobs = trainer._generate_single_turn(grouped, None, None, 4)
        again, _ = trainer._generate_single_turn(grouped, None, None, 4)
        trainer.state.global_step += 1
        later, _ = trainer._generate_single_turn(grouped, None, None, 4)
    assert first == again and first != later
    assert len({tuple(c) for c in first[:4]}) > 1 and [len(c) for c in first] == [len(lp) for lp in logprobs]
    assert all(c[-1] in trainer.eos_token_ids or len(c) == 8 for c in first)  # cut at a stop token or the budget


def test_unsupported_sampling_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="repetition_penalty"):
        train_grpo.build_trainer(*grpo_args(tmp_path, "--repetition_penalty", "1.1"))


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
            {"problem": "What is 1 + 1?", "solution": "$\\boxed{2}$", "answer": "}{"},  # a gold it cannot parse
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


def test_without_max_samples_the_prompts_read_are_the_prompts_the_run_draws(tmp_path):
    script_args, training_args, model_args = grpo_args(tmp_path, "--max_steps", "3", "--gradient_accumulation_steps",
                                                       "2", "--num_iterations", "2")
    script_args.max_samples = None
    # 16 completions per round (8 per micro-batch x 2) = 4 prompts x 4; a round per 2 x 2 micro-batches: 6 of them
    # take 2 rounds, 8 prompts
    assert train_grpo.prompts_per_run(training_args) == 8
    trainer = train_grpo.build_trainer(script_args, training_args, model_args)
    assert len(trainer.train_dataset) == 8
    micro_batches = training_args.max_steps * training_args.gradient_accumulation_steps
    per_micro_batch = training_args.per_device_train_batch_size * training_args.steps_per_generation  # TRL's loader
    drawn = list(itertools.islice(trainer._get_train_sampler(), micro_batches * per_micro_batch))
    assert len(drawn) == micro_batches * per_micro_batch  # one pass over the prompts lasts the run: none missing...
    assert set(drawn) == set(range(8))  # ...and none is read but never drawn


def test_hub_prompts_stream_in_a_seeded_shuffle_and_are_read_only_as_far_as_used(tmp_path, monkeypatch):
    generated = []

    def gsm8k_rows():
        for i in range(1000):
            generated.append(i)
            answer = f"{i} + 0 = {i}\n#### {i}" if i % 10 else "no answer line"  # every 10th row is malformed
            yield {"question": f"What is {i} + 0?", "answer": answer}

    def hub(path, name=None, split=None, streaming=False):
        assert (path, split, streaming) == ("openai/gsm8k", "train", True)  # never downloaded whole
        return IterableDataset.from_generator(gsm8k_rows)

    monkeypatch.setattr(data, "load_dataset", hub)
    monkeypatch.setattr(data, "SHUFFLE_BUFFER_SIZE", 16)
    script_args, _, _ = grpo_args(tmp_path, "--dataset_name", "openai/gsm8k")
    script_args.max_samples = None

    def answers(seed: int) -> list[str]:
        generated.clear()
        return train_grpo.build_prompt_dataset(script_args, num_prompts=50, seed=seed)["answer"]

    first = answers(0)
    assert len(first) == 50 and all(int(answer) % 10 for answer in first)  # the malformed rows are skipped
    # read: the 50 used, the malformed rows met (<= 1 in 10 rows generated, + 1) and at most the shuffle buffer
    assert len(generated) <= (50 + 1 + 16) / 0.9
    assert first != [str(i) for i in range(1000) if i % 10][:50]  # shuffled...
    assert answers(0) == first and answers(1) != first  # ...by the seed
