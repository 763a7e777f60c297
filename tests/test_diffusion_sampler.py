"""Diffusion-forcing decoding (generation.DiffusionSettings in HuginnEngine): its sequential limit against sequential
greedy decoding, log-probs of sampled tokens, end tokens, the freeze rules, the fixed-shape (CUDA graph) path, the
errors bad knobs raise, evaluate.py's --sampler diffusion and train_grpo.py's rollout_sampler: diffusion."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import evaluate
import train_grpo
from generation import DiffusionSettings, HuginnEngine
from tiny import build_tiny_default, write_tiny_datasets
from training import parse_args

NEVER = 10_000  # an end token id that never comes
LENGTHS = [9, 4, 6, 12, 7]
STEPS = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = build_tiny_default(tmp_path_factory.mktemp("tiny") / "model", seed=0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def random_prompts(lengths, seed=0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=generator).tolist() for n in lengths]


def left_padded_greedy(model, prompts, seeds, num_steps, new_tokens, kv_cache_slots) -> list[list[int]]:
    """model.generate, the simple sequential decode, on one left-padded batch of all prompts."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, num_steps=num_steps, state_seeds=torch.tensor(seeds),
                         max_new_tokens=new_tokens, eos_token_id=[NEVER], kv_cache_slots=kv_cache_slots)
    return out[:, width:].tolist()


def diffusion_engine(model, batch, max_length, settings, **kwargs) -> HuginnEngine:
    return HuginnEngine(model, batch, max_length, diffusion=settings, **kwargs)


PARALLEL = DiffusionSettings(inner_steps=2, max_wavefront=4)


@pytest.mark.parametrize("kv_cache_slots", [STEPS, 1])  # exact caches; one slot shared by all steps
@pytest.mark.parametrize("cuda_graphs", [False, True])  # True on CPU: the fixed shapes CUDA graphs replay, eagerly
def test_sequential_settings_reproduce_sequential_greedy(model, kv_cache_slots, cuda_graphs):
    """A wavefront of one position with inner steps equal to the depth is sequential decoding: the same tokens as
    model.generate on a left-padded batch, with 5 prompts continuously batched through 3 rows."""
    prompts, seeds = random_prompts(LENGTHS), [11, 12, 13, 14, 15]
    expected = left_padded_greedy(model, prompts, seeds, STEPS, 10, kv_cache_slots)
    sequential = DiffusionSettings(inner_steps=STEPS, max_wavefront=1)
    result = diffusion_engine(model, 3, 24, sequential, kv_cache_slots=kv_cache_slots, cuda_graphs=cuda_graphs
                              ).generate(prompts, num_steps=STEPS, max_new_tokens=10, eos_token_ids=[NEVER],
                                         state_seeds=seeds)
    assert result.tokens == expected
    assert result.block_passes_per_token == 2 + 4 * STEPS + 2  # prelude, 4 core blocks per step, coda
    parallel = diffusion_engine(model, 3, 24, PARALLEL, kv_cache_slots=kv_cache_slots).generate(
        prompts, num_steps=STEPS, max_new_tokens=10, eos_token_ids=[NEVER], state_seeds=seeds)
    assert parallel.tokens != expected  # the knobs do change decoding: the equality above is not vacuous


def test_sampled_logprobs_are_log_softmax_at_temperature(model):
    """Sampled, sequential settings, exact caches: each token's reported log-prob is the model's own log-softmax at
    the temperature (a full forward over prompt + completion), and the tokens are the sequential engine's samples."""
    prompts, seeds, temperature = random_prompts([5, 8], seed=3), [4, 5], 0.7
    kwargs = dict(num_steps=STEPS, max_new_tokens=8, eos_token_ids=[NEVER], state_seeds=seeds, do_sample=True,
                  temperature=temperature, sampling_seeds=[21, 22])
    sequential = DiffusionSettings(inner_steps=STEPS, max_wavefront=1)
    result = diffusion_engine(model, 2, 16, sequential, kv_cache_slots=STEPS).generate(prompts, **kwargs)
    assert result.tokens == HuginnEngine(model, 2, 16, kv_cache_slots=STEPS).generate(prompts, **kwargs).tokens
    greedy = diffusion_engine(model, 2, 16, sequential, kv_cache_slots=STEPS).generate(
        prompts, **{**kwargs, "do_sample": False})
    assert result.tokens != greedy.tokens  # it did sample
    for prompt, seed, tokens, logprobs in zip(prompts, seeds, result.tokens, result.logprobs, strict=True):
        ids = torch.tensor([prompt + tokens[:-1]])
        logits = model(ids, num_steps=STEPS, state_seeds=torch.tensor([seed])).logits[0, len(prompt) - 1:]
        expected = (logits / temperature).log_softmax(-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(logprobs), expected, atol=1e-4, rtol=0)


def test_parallel_logprobs_are_those_of_the_wave_that_froze_the_token(model):
    """With a wider wavefront, each decoded token and its log-prob are what the wave that froze it computed: the
    log-softmax at the temperature of that wave's logits at the token's slot; and a frozen slot past the first ran
    on the token the slot before it proposed in that wave (else it saw a context that is not the final one)."""
    temperature, frozen_tokens, frozen_logprobs, counts, unsettled = 1.3, [], [], [], 0
    quick_freeze = DiffusionSettings(inner_steps=2, new_positions=3, max_wavefront=4, freeze_threshold=1e9)
    engine = diffusion_engine(model, 1, 24, quick_freeze)
    decoder, wave = engine.diffusion, engine.diffusion.wave_buf
    advance = decoder._run_advance

    def spy():
        nonlocal unsettled
        logits, inputs = wave.logits[0].clone(), wave.tokens[0].clone()  # this wave's (slots, vocab), (slots,)
        advance()
        count = int(wave.frozen[0])
        counts.append(count)
        tokens = wave.proposed[0, :count]
        unsettled += int((inputs[1:count] != tokens[:count - 1]).sum()) if count > 1 else 0
        frozen_tokens.extend(tokens.tolist())
        frozen_logprobs.extend((logits[:count] / temperature).log_softmax(-1).gather(1, tokens[:, None])[:, 0])

    decoder._run_advance = spy
    result = engine.generate(random_prompts([7], seed=5), num_steps=STEPS, max_new_tokens=12, eos_token_ids=[NEVER],
                             do_sample=True, temperature=temperature, state_seeds=[1], sampling_seeds=[2])
    assert result.tokens[0][1:] == frozen_tokens[:11] and unsettled == 0
    assert max(counts) > 1  # some wave froze several positions
    torch.testing.assert_close(torch.tensor(result.logprobs[0][1:]), torch.stack(frozen_logprobs[:11]), atol=1e-5,
                               rtol=0)


def test_stop_tokens_end_rows(model):
    """An end token ends its row (included, as sequential decoding does) and the row takes the next prompt; without
    end tokens every prompt gets its whole budget."""
    prompts, seeds = random_prompts(LENGTHS, seed=7), list(range(5))
    budgets = [10, 7, 12, 9, 11]
    kwargs = dict(num_steps=STEPS, max_new_tokens=budgets, state_seeds=seeds)
    free = diffusion_engine(model, 2, 24, PARALLEL).generate(prompts, eos_token_ids=[NEVER], **kwargs)
    assert [len(tokens) for tokens in free.tokens] == budgets
    eos = next(token for tokens in free.tokens for token in tokens[2:-1])  # a token some completion has mid-way
    stopped = diffusion_engine(model, 2, 24, PARALLEL).generate(prompts, eos_token_ids=[eos], **kwargs)
    for tokens, full in zip(stopped.tokens, free.tokens, strict=True):
        expected = full[:full.index(eos) + 1] if eos in full else full
        assert tokens == expected
    assert sum(map(len, stopped.tokens)) < sum(budgets)


def test_freeze_rules(model):
    """"budget": every decoded token ran at least the depth; "latent-diff" at threshold 0 is the same decode, and
    at a threshold every change passes, positions freeze after fewer steps than the depth."""
    prompts, seeds = random_prompts(LENGTHS[:3], seed=9), [1, 2, 3]
    kwargs = dict(num_steps=STEPS, max_new_tokens=10, eos_token_ids=[NEVER], state_seeds=seeds)

    def decode(**knobs):
        return diffusion_engine(model, 3, 24, DiffusionSettings(inner_steps=2, max_wavefront=4, **knobs)).generate(
            prompts, **kwargs)

    budget = decode(freeze="budget")
    assert all(steps >= STEPS for row in budget.steps_used for steps in row[1:])
    sequential_passes = 2 + 4 * STEPS + 2
    assert budget.block_passes_per_token < 0.7 * sequential_passes  # waves of 2 + 4 x 2 + 2 block passes
    never_converged = decode(freeze="latent-diff", freeze_threshold=0.0)
    assert never_converged.tokens == budget.tokens and never_converged.steps_used == budget.steps_used
    eager = decode(freeze="latent-diff", freeze_threshold=1e9)
    assert max(steps for row in eager.steps_used for steps in row[1:]) < STEPS
    assert eager.block_passes_per_token < budget.block_passes_per_token


def test_waves_use_the_cache_slots_of_the_last_steps(model):
    """A wave's inner steps use the slots of the depth's last steps, which hold the prompt's final keys: one slot
    per step (6) and one per inner step (2, the last writes of the prompt's steps 4 and 5) decode alike."""
    prompts, seeds = random_prompts(LENGTHS[:3], seed=13), [1, 2, 3]
    kwargs = dict(num_steps=STEPS, max_new_tokens=10, eos_token_ids=[NEVER], state_seeds=seeds)
    exact, per_inner_step = (diffusion_engine(model, 3, 24, PARALLEL, kv_cache_slots=slots).generate(prompts, **kwargs)
                             for slots in (STEPS, 2))
    assert exact.tokens == per_inner_step.tokens
    differences = [abs(a - b) for x, y in zip(exact.logprobs, per_inner_step.logprobs, strict=True)
                   for a, b in zip(x, y, strict=True)]
    assert max(differences) < 1e-5


@pytest.mark.parametrize("new_position_state", ["fresh", "previous"])
def test_fixed_shape_path_equals_eager(model, new_position_state):
    """The full-batch, full-wavefront shapes CUDA graphs replay give the eager path's tokens and log-probs."""
    prompts, seeds = random_prompts(LENGTHS, seed=11), list(range(5))
    settings = DiffusionSettings(inner_steps=2, max_wavefront=4, new_positions=2, freeze_threshold=0.2,
                                 new_position_state=new_position_state)
    kwargs = dict(num_steps=STEPS, max_new_tokens=9, eos_token_ids=[NEVER], state_seeds=seeds, do_sample=True,
                  temperature=0.8, top_k=20, sampling_seeds=seeds)
    eager, fixed = (diffusion_engine(model, 3, 24, settings, cuda_graphs=graphs).generate(prompts, **kwargs)
                    for graphs in (False, True))
    assert eager.tokens == fixed.tokens and eager.steps_used == fixed.steps_used
    differences = [abs(a - b) for x, y in zip(eager.logprobs, fixed.logprobs, strict=True)
                   for a, b in zip(x, y, strict=True)]
    assert max(differences) < 1e-5


@pytest.mark.parametrize(("knobs", "message"), [
    (dict(inner_steps=0), "inner_steps must be an integer >= 1"),
    (dict(inner_steps=2.5), "inner_steps must be an integer >= 1"),
    (dict(new_positions=0), "new_positions must be an integer >= 1"),
    (dict(max_wavefront=-1), "max_wavefront must be an integer >= 1"),
    (dict(freeze="kl"), "freeze must be one of"),
    (dict(freeze_threshold=-0.1), "freeze_threshold must be a finite number >= 0"),
    (dict(freeze_threshold=float("nan")), "freeze_threshold must be a finite number >= 0"),
    (dict(new_position_state="zero"), "new_position_state must be one of"),
])
def test_bad_knobs_raise(knobs, message):
    with pytest.raises(ValueError, match=message):
        DiffusionSettings(**knobs)


def test_bad_combinations_raise(model):
    with pytest.raises(ValueError, match="leave exit_threshold None"):
        HuginnEngine(model, 2, 16, exit_threshold=5e-4, diffusion=DiffusionSettings())
    engine = diffusion_engine(model, 2, 16, DiffusionSettings(inner_steps=8))
    with pytest.raises(ValueError, match="inner_steps 8 exceeds the 4 steps per token"):
        engine.generate(random_prompts([4]), num_steps=4, max_new_tokens=3)


# --- evaluate.py --sampler diffusion ------------------------------------------------------------------------------


def eval_args(data_dir, output_dir, **overrides) -> evaluate.EvalArguments:
    settings = dict(model_name_or_path="tiny-huginn", limit=4, num_steps=[4], max_new_tokens=10, batch_size=4,
                    benchmarks=[str(data_dir / "gsm8k_test.jsonl")], dtype="float32", output_dir=str(output_dir))
    return evaluate.EvalArguments(**{**settings, **overrides})


def samples(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "samples.jsonl").read_text().splitlines()]


def test_evaluate_sampler_diffusion(tmp_path):
    """At its sequential settings the diffusion sampler's completions are sequential decoding's; the sampler and its
    knobs are in results.json and in each sample's resume key (a changed knob gets new samples)."""
    data_dir = write_tiny_datasets(tmp_path / "data")
    sequential = dict(sampler="diffusion", diffusion_inner_steps=4, diffusion_max_wavefront=1)
    evaluate.main(eval_args(data_dir, tmp_path / "sequential"))
    evaluate.main(eval_args(data_dir, tmp_path / "diffusion", **sequential))
    plain, diffusion = samples(tmp_path / "sequential"), samples(tmp_path / "diffusion")
    assert [s["completion"] for s in diffusion] == [s["completion"] for s in plain]
    assert not {s["key"] for s in diffusion} & {s["key"] for s in plain}
    config = json.loads((tmp_path / "diffusion" / "results.json").read_text())["config"]
    assert config["sampler"] == "diffusion" and config["diffusion_max_wavefront"] == 1
    evaluate.main(eval_args(data_dir, tmp_path / "diffusion", **{**sequential, "diffusion_inner_steps": 2}))
    rerun = samples(tmp_path / "diffusion")[len(diffusion):]  # appended: none of the earlier samples was reused
    assert len(rerun) == len(diffusion) and not {s["key"] for s in rerun} & {s["key"] for s in diffusion}


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(sampler="parallel"), "sampler must be one of"),
    (dict(sampler="diffusion", exit_threshold=5e-4), "leave exit_threshold unset"),
    (dict(sampler="diffusion", diffusion_inner_steps=8), "inner_steps 8 exceeds the 4 steps"),
    (dict(sampler="diffusion", diffusion_freeze="never"), "freeze must be one of"),
])
def test_evaluate_rejects_bad_sampler_settings(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        evaluate.check_arguments(eval_args(tmp_path, tmp_path / "out", **overrides))


# --- train_grpo.py rollout_sampler: diffusion ---------------------------------------------------------------------


def grpo_trainer(tmp_path, *overrides):
    args = parse_args(train_grpo.ScriptArguments, train_grpo.GRPOConfig, [
        "--config", "configs/grpo_tiny.yaml", "--output_dir", str(tmp_path / "out"), "--max_samples", "32",
        "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "8",
        "--report_to", "none", "--rollout_num_steps", "6", "--vllm_importance_sampling_correction", "true",
        "--rollout_sampler", "diffusion", *overrides])
    return train_grpo.build_trainer(*args)


def rollout_weights(trainer) -> torch.Tensor:
    """TRL's sampler-mismatch weights p_trained / p_sampler of one rollout round's tokens."""
    rows = [trainer.train_dataset[i] for i in range(2) for _ in range(trainer.num_generations)]
    trainer.model.train()
    output = trainer._generate_and_score_completions(rows)
    return output["importance_sampling_ratio"][output["completion_mask"].bool()]


def test_grpo_rollouts_by_diffusion_are_scored_and_corrected(tmp_path):
    """Diffusion rollouts at the sequential settings sample the trained policy exactly (weights 1); at 2 inner steps
    they are an approximate sampler whose tokens get correction weights != 1, capped."""
    exact = grpo_trainer(tmp_path / "exact", "--rollout_diffusion_inner_steps", "6",
                         "--rollout_diffusion_max_wavefront", "1")
    assert (rollout_weights(exact) - 1).abs().max() <= 1e-5
    parallel = grpo_trainer(tmp_path / "parallel", "--rollout_diffusion_inner_steps", "2",
                            "--vllm_importance_sampling_mode", "token_truncate",
                            "--vllm_importance_sampling_clip_max", "1.01")
    weights = rollout_weights(parallel)
    assert (weights - 1).abs().max() > 1e-3 and weights.max() <= 1.01
    assert parallel._metrics["train"]["sampling/kl"][-1] > 0


def test_grpo_rejects_bad_rollout_sampler_settings(tmp_path):
    with pytest.raises(ValueError, match="rollout_sampler must be"):
        grpo_trainer(tmp_path / "a", "--rollout_sampler", "parallel")
    with pytest.raises(ValueError, match="inner_steps 8 exceeds the 6 steps"):
        grpo_trainer(tmp_path / "b", "--rollout_diffusion_inner_steps", "8")
