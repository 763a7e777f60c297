"""The generation engine (generation.py) against the simple path (HuginnForCausalLM.generate): greedy tokens,
shared cache slots, continuous batching, sampling, adaptive exit, the dense copy of NF4 + LoRA models, cache size,
and the benchmark's smoke mode."""

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from generation import (
    DEFAULT_EXIT_THRESHOLD,
    EngineKVCache,
    HuginnEngine,
    free_memory_bytes,
    generation_copy,
    kv_cache_bytes_per_token,
    pick_generation_model,
    plan_generation_memory,
)
from modeling_huginn_qlora import HuginnConfig, HuginnForCausalLM
from tiny import build_tiny_default

NEVER = 10_000  # an end token id that never comes
LENGTHS = [9, 4, 6, 12, 7, 3, 5]
BUDGETS = [5, 9, 3, 12, 7, 1, 10]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_default(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def random_prompts(lengths, seed=0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=generator).tolist() for n in lengths]


def simple_greedy(model, prompt, seed, num_steps, max_new_tokens, eos, kv_cache_slots=None) -> list[int]:
    """model.generate on the prompt alone, cut after its first end token (it pads after it)."""
    out = model.generate(torch.tensor([prompt]), num_steps=num_steps, state_seeds=torch.tensor([seed]),
                         max_new_tokens=max_new_tokens, eos_token_id=eos, kv_cache_slots=kv_cache_slots)
    new = out[0, len(prompt):].tolist()
    ends = [i for i, token in enumerate(new) if token in eos]
    return new[:ends[0] + 1] if ends else new


# --- same outputs as the simple path ------------------------------------------------------------------------------


def test_greedy_equals_simple_path_exact_and_shared_slots(model):
    prompts, seeds = random_prompts(LENGTHS[:3]), [7, 8, 9]
    outputs = {}
    for slots, simple_slots in ((4, None), (1, 1)):  # 4 slots at 4 steps: exact; 1: one slot shared by all steps
        engine = HuginnEngine(model, max_batch_size=3, max_length=24, kv_cache_slots=slots)
        result = engine.generate(prompts, num_steps=4, max_new_tokens=10, eos_token_ids=[NEVER], state_seeds=seeds)
        for prompt, seed, tokens in zip(prompts, seeds, result.tokens, strict=True):
            assert tokens == simple_greedy(model, prompt, seed, 4, 10, [NEVER], simple_slots)
        assert all(steps == [4] * 10 for steps in result.steps_used)
        outputs[slots] = result.tokens
    assert outputs[1] != outputs[4]  # sharing really changes what later tokens attend to


def test_continuous_batching_equals_each_prompt_alone(model):
    """7 prompts of different lengths and budgets through 3 rows: each gets the tokens it gets alone."""
    prompts, seeds = random_prompts(LENGTHS, seed=1), list(range(10, 17))
    free = HuginnEngine(model, 3, 24).generate(prompts, num_steps=4, max_new_tokens=BUDGETS, eos_token_ids=[NEVER],
                                               state_seeds=seeds)
    eos = free.tokens[3][4]  # ends prompt 3 at its fifth token at the latest
    result = HuginnEngine(model, 3, 24).generate(prompts, num_steps=4, max_new_tokens=BUDGETS, eos_token_ids=[eos],
                                                 state_seeds=seeds)
    for prompt, seed, budget, tokens in zip(prompts, seeds, BUDGETS, result.tokens, strict=True):
        assert tokens == simple_greedy(model, prompt, seed, 4, budget, [eos], kv_cache_slots=1)
    assert result.tokens[3][-1] == eos and len(result.tokens[3]) <= 5
    assert all(len(tokens) == budget or tokens[-1] == eos
               for tokens, budget in zip(result.tokens, BUDGETS, strict=True))
    assert result.decode_tokens == sum(len(t) - 1 for t in result.tokens)


def test_sampling_is_independent_of_batch_and_seeded(model):
    prompts = random_prompts(LENGTHS, seed=2)
    kwargs = dict(num_steps=3, max_new_tokens=BUDGETS, eos_token_ids=[NEVER], state_seeds=list(range(7)),
                  do_sample=True, temperature=0.8, top_p=0.9)
    batched = HuginnEngine(model, 3, 24).generate(prompts, sampling_seeds=list(range(7)), **kwargs)
    alone = HuginnEngine(model, 1, 24).generate(prompts, sampling_seeds=list(range(7)), **kwargs)
    other_seeds = HuginnEngine(model, 3, 24).generate(prompts, sampling_seeds=list(range(7, 14)), **kwargs)
    greedy = HuginnEngine(model, 3, 24).generate(prompts, **{**kwargs, "do_sample": False})
    assert batched.tokens == alone.tokens
    assert batched.tokens != other_seeds.tokens and batched.tokens != greedy.tokens
    top_1 = HuginnEngine(model, 3, 24).generate(prompts, **{**kwargs, "top_k": 1, "top_p": 1.0})
    assert top_1.tokens == greedy.tokens


def test_logprobs_are_the_model_scores_at_the_sampling_temperature(model):
    """What GRPO's importance ratio needs: scoring the sampled sequence in one forward (same depth and seed; one
    cache slot per step, so decoding is exact) at the sampling temperature, as TRL's loss does, reproduces the
    log-probabilities the engine reports."""
    prompt, seed = random_prompts([6], seed=3)[0], 5
    result = HuginnEngine(model, 1, 16, kv_cache_slots=3).generate(
        [prompt], num_steps=3, max_new_tokens=6, eos_token_ids=[NEVER], state_seeds=[seed], do_sample=True,
        temperature=0.7, sampling_seeds=[0])
    sequence = torch.tensor([prompt + result.tokens[0]])
    with torch.no_grad():
        logits = model(sequence, num_steps=3, state_seeds=torch.tensor([seed])).logits[0]
    scored = (logits[len(prompt) - 1:-1] / 0.7).log_softmax(-1).gather(1, sequence[0, len(prompt):, None])[:, 0]
    assert torch.allclose(scored, torch.tensor(result.logprobs[0]), atol=1e-5)


def test_samples_of_one_prompt_share_its_prefill_and_equal_separate_runs(model, monkeypatch):
    """GRPO's rollouts: each prompt 4 times, with one initial-state seed and 4 sampling seeds. The engine prefills
    each prompt once (copying its cache rows), and every sample equals that prompt sampled alone."""
    prompts = random_prompts([6, 9], seed=11)
    repeated, sampling_seeds = [p for p in prompts for _ in range(4)], list(range(20, 28))
    kwargs = dict(num_steps=3, max_new_tokens=6, eos_token_ids=[NEVER], do_sample=True, temperature=1.0)
    prefilled = []
    forward = model.transformer.forward
    monkeypatch.setattr(model.transformer, "forward",
                        lambda *args, **kw: (prefilled.append(len(kw["state_seeds"])), forward(*args, **kw))[1])
    together = HuginnEngine(model, 8, 24).generate(repeated, state_seeds=[3] * 8, sampling_seeds=sampling_seeds,
                                                   **kwargs)
    assert prefilled == [2]  # one prefill of the two distinct prompts
    alone = [HuginnEngine(model, 1, 24).generate([prompt], state_seeds=[3], sampling_seeds=[seed], **kwargs)
             for prompt, seed in zip(repeated, sampling_seeds, strict=True)]
    assert together.tokens == [result.tokens[0] for result in alone]
    assert len({tuple(tokens) for tokens in together.tokens}) > 2  # the samples differ


def test_eager_passes_compute_only_busy_and_recurring_rows(model):
    """Finished prompts leave the computed rows (busy rows move to the front), and with adaptive exit each step
    computes only the rows still recurring; fixed-shape passes compute every row (what CUDA graphs replay)."""
    prompts, seeds = random_prompts(LENGTHS, seed=12), list(range(7))
    kwargs = dict(num_steps=4, max_new_tokens=BUDGETS, eos_token_ids=[NEVER], state_seeds=seeds)
    eager = HuginnEngine(model, 4, 24).generate(prompts, **kwargs)
    assert eager.computed_row_steps == 4 * eager.decode_tokens
    fixed_shape = HuginnEngine(model, 4, 24, cuda_graphs=True).generate(prompts, **kwargs)
    assert fixed_shape.tokens == eager.tokens and fixed_shape.computed_row_steps > eager.computed_row_steps
    assert fixed_shape.computed_row_steps % (4 * 4) == 0  # 4 rows x 4 steps per pass
    kwargs["num_steps"] = 16
    adaptive = HuginnEngine(model, 4, 32, exit_threshold=DEFAULT_EXIT_THRESHOLD).generate(prompts, **kwargs)
    assert adaptive.computed_row_steps == sum(sum(steps[1:]) for steps in adaptive.steps_used)
    assert adaptive.computed_row_steps < 0.8 * 16 * adaptive.decode_tokens


def test_fixed_shape_phases_equal_eager(model):
    """The code path CUDA graphs record (attention over the whole preallocated length), run eagerly on CPU."""
    prompts = random_prompts(LENGTHS, seed=4)
    results = [HuginnEngine(model, 3, 32, kv_cache_slots=2, exit_threshold=DEFAULT_EXIT_THRESHOLD,
                            cuda_graphs=graphs).generate(prompts, num_steps=12, max_new_tokens=BUDGETS,
                                                         eos_token_ids=[NEVER], state_seeds=list(range(7)))
               for graphs in (False, True)]
    assert results[0].tokens == results[1].tokens and results[0].steps_used == results[1].steps_used
    assert max(abs(a - b) for x, y in zip(results[0].logprobs, results[1].logprobs, strict=True)
               for a, b in zip(x, y, strict=True)) < 1e-5


# --- adaptive exit ------------------------------------------------------------------------------------------------


def test_exit_threshold_zero_is_fixed_depth(model):
    prompts = random_prompts(LENGTHS[:4], seed=5)
    kwargs = dict(num_steps=6, max_new_tokens=8, eos_token_ids=[NEVER], state_seeds=[1, 2, 3, 4])
    for slots in (1, 2):
        fixed = HuginnEngine(model, 2, 24, kv_cache_slots=slots).generate(prompts, **kwargs)
        never = HuginnEngine(model, 2, 24, kv_cache_slots=slots, exit_threshold=0.0).generate(prompts, **kwargs)
        assert never.tokens == fixed.tokens and never.logprobs == fixed.logprobs
        assert never.mean_steps == 6


def first_difference(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), min(len(a), len(b)))


def test_adaptive_exit_saves_steps_and_keeps_rows_independent(model):
    """At the default threshold rows exit early. An exited row's cache entries must not change while the rows
    beside it keep recurring: then a prompt's output in a batch matches its output alone (up to float rounding,
    which can flip a KL sitting at the threshold: so compare up to each prompt's first difference)."""
    prompts, seeds = random_prompts(LENGTHS, seed=6), list(range(7))
    kwargs = dict(num_steps=16, max_new_tokens=BUDGETS, eos_token_ids=[NEVER], state_seeds=seeds)
    batched = HuginnEngine(model, 3, 32, exit_threshold=DEFAULT_EXIT_THRESHOLD).generate(prompts, **kwargs)
    alone = HuginnEngine(model, 1, 32, exit_threshold=DEFAULT_EXIT_THRESHOLD).generate(prompts, **kwargs)
    fixed = HuginnEngine(model, 3, 32).generate(prompts, **kwargs)
    assert 1 < batched.mean_steps < 15
    assert all(row[0] == 16 and all(1 <= s <= 16 for s in row) for row in batched.steps_used)
    same = [min(first_difference(a, b), first_difference(steps_a, steps_b))  # tokens before a flip
            for a, b, steps_a, steps_b in zip(batched.tokens, alone.tokens, batched.steps_used, alone.steps_used,
                                              strict=True)]
    for n, a, b in zip(same, batched.logprobs, alone.logprobs, strict=True):
        assert all(abs(x - y) < 1e-4 for x, y in zip(a[:n], b[:n], strict=True))  # a bad cache shifts them at once
    assert sum(same) >= 0.8 * sum(len(t) for t in batched.tokens)
    agreement = sum(first_difference(a, b) for a, b in zip(batched.tokens, fixed.tokens, strict=True)) / sum(
        len(t) for t in fixed.tokens)
    print(f"random tiny model, 16 steps, threshold {DEFAULT_EXIT_THRESHOLD}: mean steps {batched.mean_steps:.2f}, "
          f"{agreement:.0%} of tokens before the first difference from fixed depth")


def test_repeat_latest_slot_fills_slots_a_token_never_reached():
    config = HuginnConfig(n_embd=8, num_attention_heads=2, intermediate_size=16, vocab_size=64, padding_multiple=64)
    positions, running = torch.tensor([1, 2, 0]), torch.ones(3, dtype=torch.bool)
    cache = EngineKVCache(config, 3, 4, 3, torch.float32, "cpu", positions, running)
    for slot in range(3):
        for block in range(cache.num_core):
            cache.keys[cache.core_layer(slot, block)] = slot + 1.0
            cache.values[cache.core_layer(slot, block)] = -(slot + 1.0)
    cache.repeat_latest_slot(torch.tensor([1, 2, 3]))  # row 0 ran 1 step, row 1 two, row 2 all three
    at = cache.keys[:, torch.arange(3), 0, positions, 0]  # (layers, batch)
    assert at[cache.core_layer(1, 0)].tolist() == [1.0, 2.0, 2.0]
    assert at[cache.core_layer(2, 3)].tolist() == [1.0, 2.0, 3.0]
    assert cache.keys[cache.core_layer(2, 0), 0, 0, 0, 0] == 3.0  # other positions untouched
    assert cache.values[cache.core_layer(2, 0), 0, 0, 1, 0] == -1.0


# --- memory and quantized models ----------------------------------------------------------------------------------


def test_kv_cache_bytes_per_token(model):
    assert kv_cache_bytes_per_token(HuginnConfig(), 1) == 168_960 <= 200_000  # 8 layers x 2 x 5280 x 2 bytes
    assert kv_cache_bytes_per_token(HuginnConfig(), 32) == 2_787_840  # one slot per step: 132 layers
    engine = HuginnEngine(model, 2, 8, kv_cache_slots=3)
    assert engine.cache.nbytes_per_token() == kv_cache_bytes_per_token(model.config, 3, torch.float32)
    plan = plan_generation_memory(model.config, 1e9, 2, 5, 3, num_steps=3, kv_cache_slots=3, dtype=torch.float32,
                                  engine=True)
    assert engine.cache_bytes == plan.cache_bytes  # what the memory plan counts for 2 rows of 5 + 3 tokens


@pytest.fixture(scope="module")
def nf4_lora_model(tiny_dir):
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    from modeling_huginn_qlora import nf4_quantization_config

    nf4 = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=nf4_quantization_config(torch.float32),
                                               device_map="cpu")
    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["Wqkv", "proj", "fc"], init_lora_weights=False)
    return get_peft_model(nf4, lora).eval()


def assert_same_function_unlike_base(dense, peft_model) -> None:
    """The dense copy's logits are the PEFT model's, which differ from its base's (so the check can fail)."""
    ids, seeds = torch.tensor(random_prompts([10, 10], seed=7)), torch.tensor([1, 2])
    with torch.no_grad():
        expected = peft_model(input_ids=ids, num_steps=4, state_seeds=seeds).logits
        copied = dense(ids, num_steps=4, state_seeds=seeds).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids, num_steps=4, state_seeds=seeds).logits
    assert (copied - expected).abs().max() < 1e-4 < (base - expected).abs().max()


def test_generation_copy_of_nf4_lora_model_matches_it(nf4_lora_model):
    import bitsandbytes as bnb

    dense = generation_copy(nf4_lora_model, dtype=torch.float32)
    assert isinstance(dense, HuginnForCausalLM) and dense.lm_head.weight is dense.transformer.wte.weight
    assert not any(isinstance(m, bnb.nn.Linear4bit) or "lora" in n for n, m in dense.named_modules())
    assert isinstance(nf4_lora_model.get_base_model().transformer.core_block[0].attn.Wqkv.base_layer,
                      bnb.nn.Linear4bit)  # the original is unchanged
    assert_same_function_unlike_base(dense, nf4_lora_model)
    kwargs = dict(num_steps=4, max_new_tokens=8, eos_token_ids=[NEVER], state_seeds=[1, 2, 3])
    prompts = random_prompts([5, 8, 3], seed=8)
    assert (HuginnEngine(nf4_lora_model, 3, 16).generate(prompts, **kwargs).tokens
            == HuginnEngine(dense, 3, 16).generate(prompts, **kwargs).tokens)


def test_generation_copy_runs_trained_module_copies(tiny_dir):
    """An adapter that trains whole modules (the tiny SFT trains the embeddings, GRPO the final norm): the copy
    computes with PEFT's trained copies, and keeps the LM head on the untrained embedding it is tied to in the
    model."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["Wqkv"], modules_to_save=["wte", "ln_f"], init_lora_weights=False)
    model = get_peft_model(base, lora).eval()
    backbone = model.get_base_model().transformer
    with torch.no_grad():  # trained: away from the originals
        backbone.wte.modules_to_save["default"].weight.mul_(1.5)
        backbone.ln_f.modules_to_save["default"].weight.add_(0.3)
    dense = generation_copy(model, dtype=torch.float32)
    assert dense.lm_head.weight is not dense.transformer.wte.weight
    assert_same_function_unlike_base(dense, model)


def test_pick_generation_model_by_free_memory(model, nf4_lora_model):
    assert pick_generation_model(model, 4, 64) is model  # dense already
    assert pick_generation_model(nf4_lora_model, 4, 64, free_bytes=0) is nf4_lora_model
    picked = pick_generation_model(nf4_lora_model, 4, 64, dtype=torch.float32, free_bytes=2**40)
    assert isinstance(picked, HuginnForCausalLM) and picked is not nf4_lora_model.get_base_model()


def test_free_gpu_memory_counts_what_the_allocator_holds_unused(monkeypatch):
    """From GRPO's second round on, PyTorch keeps the backward pass's memory cached: mem_get_info counts it as taken,
    yet the rollout copy's allocations reuse it. Counted as free, the copy (7.1 GB at full size) is still chosen."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 60 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 40 * gib)
    assert free_memory_bytes(torch.device("cuda")) == 22 * gib


# --- benchmark ----------------------------------------------------------------------------------------------------


def test_bench_smoke_prints_table_with_equal_tokens(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    table = bench.main(["--smoke", "--no_append"])
    rows = [line for line in table.splitlines() if line.startswith("| ") and "batch" not in line]
    assert [row.split(" | ")[:2] for row in rows] == [
        ["| float32", "1"], ["| float32", "4"], ["| float32", "1, prompt 32"],
        ["| NF4 (float32 compute)", "1"], ["| NF4 (float32 compute)", "4"],
        ["| NF4 (float32 compute)", "1, prompt 32"]]
    assert all(row.rstrip(" |").endswith("100%") for row in rows if "prompt" not in row)  # same greedy tokens
    assert "Adaptive exit" in table and table in capsys.readouterr().out


def test_phases_are_prepared_in_eval_mode_and_an_empty_end_phase_is_left_out(model, monkeypatch):
    """Phases are recorded (CUDA graphs on GPU) with the model in eval mode, or dropout would be replayed forever;
    with adaptive exit and one slot the end-of-token phase does nothing, so none is recorded."""
    modes = []
    original = HuginnEngine._prepare_phases
    monkeypatch.setattr(HuginnEngine, "_prepare_phases",
                        lambda self: (modes.append(self.model.training), original(self))[1])
    model.train()
    try:
        engine = HuginnEngine(model, max_batch_size=2, max_length=32, kv_cache_slots=1, exit_threshold=5e-4)
        engine.generate(random_prompts([4, 5]), num_steps=3, max_new_tokens=3, eos_token_ids=[10_000])
        assert modes == [False] and model.training  # recorded in eval mode, the caller's mode restored
        assert "end" not in engine._phases
        exact = HuginnEngine(model, max_batch_size=2, max_length=32, kv_cache_slots=1)
        exact.generate(random_prompts([4, 5]), num_steps=3, max_new_tokens=3, eos_token_ids=[10_000])
        assert "end" in exact._phases  # without adaptive exit it runs the coda and head
    finally:
        model.eval()
