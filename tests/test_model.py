"""The Huginn model: checkpoint compatibility, golden parity, HF conventions, padding, recurrence control,
memory behaviour, generation, PEFT and NF4."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from modeling_huginn_qlora import (
    HuginnConfig,
    HuginnDepthSampler,
    HuginnForCausalLM,
    HuginnKVCache,
    seeded_truncated_normal,
)
from tiny import build_tiny_default

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(), reason="../shared/reference not present")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_default(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture()
def model(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def random_ids(batch, seq, seed=0, vocab=256):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# --- checkpoint compatibility -------------------------------------------------------------------------------------


@needs_reference
@pytest.mark.parametrize("steps", [1, 4, 16])
def test_golden_parity(steps):
    model = AutoModelForCausalLM.from_pretrained(REFERENCE / "huginn-tiny-parity", dtype=torch.float32).eval()
    golden = load_file(REFERENCE / "huginn-tiny-parity" / "golden.safetensors")
    with torch.no_grad():
        given = model(golden["input_ids"], input_states=golden["input_states"], num_steps=steps).logits
        zero = model(golden["input_ids"], init_state="zero", num_steps=steps).logits
    assert (given - golden[f"logits_steps{steps}_given_state"]).abs().max() <= 1e-4
    assert (zero - golden[f"logits_steps{steps}_zero_state"]).abs().max() <= 1e-4


@needs_reference
def test_state_dict_keys_match_reference():
    model = AutoModelForCausalLM.from_pretrained(REFERENCE / "huginn-tiny-parity", dtype=torch.float32)
    expected = json.loads((REFERENCE / "huginn-tiny-parity" / "state_dict_keys.json").read_text())["state_dict_keys"]
    assert sorted(model.state_dict()) == sorted(expected)
    assert model.lm_head.weight is model.transformer.wte.weight


@needs_reference
def test_published_config_reads_and_sizes_match():
    config = AutoConfig.for_model(**json.loads((REFERENCE / "huginn-0125-config.json").read_text()))
    assert isinstance(config, HuginnConfig)
    widths = (config.n_embd, config.num_attention_heads, config.head_dim, config.padded_vocab_size)
    assert widths == (5280, 55, 96, 65536)
    with torch.device("meta"):
        model = HuginnForCausalLM(config)
    num_params = sum(p.numel() for p in model.parameters())  # tied head counted once
    assert abs(num_params / 1e9 - 3.565) < 0.01  # the reference's measured 3.565B


def test_save_load_round_trip_keeps_ties(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    ids = random_ids(2, 10)
    with torch.no_grad():
        assert torch.equal(model(ids, init_state="zero", num_steps=3).logits,
                           loaded(ids, init_state="zero", num_steps=3).logits)


def test_tiny_default_is_deterministic(tiny_dir, tmp_path):
    again = build_tiny_default(tmp_path / "again", seed=0)
    first, second = load_file(tiny_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# --- HF conventions -------------------------------------------------------------------------------------------------


def test_labels_are_shifted_inside_and_ignore_index(model):
    ids = random_ids(2, 12)
    labels = ids.clone()
    labels[0, :5] = -100
    out = model(ids, labels=labels, init_state="zero", num_steps=2, return_logits=True)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, expected, atol=1e-5)
    summed = model(ids, labels=labels, init_state="zero", num_steps=2, num_items_in_batch=7).loss
    assert torch.allclose(summed, expected * (labels[:, 1:] != -100).sum() / 7, atol=1e-5)


def test_loss_without_labels_builds_no_logits_and_logits_to_keep(model):
    ids = random_ids(2, 12)
    assert model(ids, labels=ids, num_steps=1).logits is None
    full = model(ids, init_state="zero", num_steps=2).logits
    last = model(ids, init_state="zero", num_steps=2, logits_to_keep=3).logits
    assert last.shape == (2, 3, full.shape[-1]) and torch.allclose(last, full[:, -3:], atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("init_state", ["zero", "seeded"])
def test_padded_rows_equal_rows_run_alone(model, side, init_state):
    rows = [random_ids(1, 9, seed=1)[0], random_ids(1, 5, seed=2)[0]]
    width = max(len(r) for r in rows)
    ids = torch.full((2, width), 261)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span], mask[i, span] = row, 1
    seeds = torch.tensor([11, 12])
    kwargs = dict(init_state="zero") if init_state == "zero" else dict(state_seeds=seeds)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, num_steps=4, **kwargs).logits
        for i, row in enumerate(rows):
            alone_kwargs = dict(init_state="zero") if init_state == "zero" else dict(state_seeds=seeds[i:i + 1])
            alone = model(row[None], num_steps=4, **alone_kwargs).logits[0]
            assert (batch[i][mask[i].bool()] - alone).abs().max() <= 1e-5


def test_input_embeddings_and_latent_state_round_trip(model):
    ids = random_ids(1, 6)
    assert model.get_input_embeddings() is model.transformer.wte
    with torch.no_grad():
        first = model(ids, init_state="zero", num_steps=2)
        resumed = model(ids, input_states=first.latent_states, num_steps=3).logits
        straight = model(ids, init_state="zero", num_steps=5).logits
    assert torch.allclose(resumed, straight, atol=1e-5)


# --- recurrence control ---------------------------------------------------------------------------------------------


def test_num_steps_int_equals_split_and_reports_steps(model):
    ids = random_ids(1, 8)
    as_int = model(ids, init_state="zero", num_steps=5)
    as_pair = model(ids, init_state="zero", num_steps=(3, 2))
    assert as_int.num_steps == (0, 5) and as_pair.num_steps == (3, 2)
    assert torch.allclose(as_int.logits, as_pair.logits, atol=1e-6)
    assert model(ids).num_steps == (0, model.config.mean_recurrence)  # eval default


def test_depth_sampler_distribution_and_state():
    sampler = HuginnDepthSampler(mean_recurrence=32, mean_backprop_depth=8, seed=3)
    draws = [sampler.sample() for _ in range(4000)]
    totals = torch.tensor([a + b for a, b in draws], dtype=torch.float)
    assert all(b == min(8, a + b) and a >= 0 for a, b in draws)
    assert abs(totals.mean().item() - 33) < 1.0  # 1 + Poisson(LogNormal with mean 32)
    assert totals.std().item() > 10  # heavy spread, as in pretraining (not a fixed depth)
    state = sampler.state_dict()
    continued = [sampler.sample() for _ in range(20)]
    sampler.load_state_dict(state)
    assert [sampler.sample() for _ in range(20)] == continued


def test_training_mode_samples_depth_from_seeded_generator(model):
    model.train()
    model.transformer.depth_sampler.manual_seed(5)
    first = [model(random_ids(1, 4), labels=random_ids(1, 4)).num_steps for _ in range(3)]
    model.transformer.depth_sampler.manual_seed(5)
    again = [model(random_ids(1, 4), labels=random_ids(1, 4)).num_steps for _ in range(3)]
    assert first == again and all(grad <= model.config.mean_backprop_depth for _, grad in first)


def test_seeded_state_is_a_function_of_seed_and_position():
    a = seeded_truncated_normal(torch.tensor([1, 2]), torch.arange(6).expand(2, 6), 64)
    b = seeded_truncated_normal(torch.tensor([2]), torch.arange(3, 6)[None], 64)
    assert torch.equal(a[1, 3:], b[0]) and not torch.equal(a[0], a[1])
    big = seeded_truncated_normal(torch.arange(64), torch.arange(64).expand(64, 64), 128)
    assert big.abs().max() <= 3.0 and abs(big.mean()) < 0.01
    assert abs(big.std() - 0.9866) < 0.01  # the std of N(0, 1) cut at 3


def test_random_state_follows_published_scale(model):
    embedded = torch.zeros(4, 32, model.config.n_embd)
    state = model.transformer.initial_state(embedded, torch.arange(32).expand(4, 32), "random", None)
    expected_std = model.config.init_values["std"] * model.config.init_values["embed_scale"] * 0.986  # cut at 3 std
    assert abs(state.std().item() / expected_std - 1) < 0.05


# --- gradients and memory -------------------------------------------------------------------------------------------


def saved_tensors(fn) -> list[torch.Size]:
    """Shapes of the tensors autograd saves for backward while fn runs."""
    shapes = []

    def pack(tensor):
        shapes.append((tensor.shape, tensor.numel() * tensor.element_size()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_checkpointing_keeps_activation_memory_flat_and_gradients_equal(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).train()
    ids = random_ids(2, 32)

    def loss_and_grads(steps):
        model.zero_grad()
        model(ids, labels=ids, init_state="zero", num_steps=steps).loss.backward()
        return [p.grad.clone() for p in model.transformer.core_block.parameters()]

    def grown(steps_short, steps_long):
        short = saved_tensors(lambda: model(ids, labels=ids, init_state="zero", num_steps=steps_short).loss)
        long = saved_tensors(lambda: model(ids, labels=ids, init_state="zero", num_steps=steps_long).loss)
        return sum(size for _, size in long) - sum(size for _, size in short)

    plain_grads, plain_growth = loss_and_grads((2, 3)), grown((0, 2), (0, 8))
    model.gradient_checkpointing_enable()
    ckpt_grads, ckpt_growth = loss_and_grads((2, 3)), grown((0, 2), (0, 8))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain_grads, ckpt_grads, strict=True))
    assert all(g.abs().sum() > 0 and torch.isfinite(g).all() for g in ckpt_grads)
    assert ckpt_growth < 0.1 * plain_growth  # six more grad steps cost only their inputs


def test_loss_never_holds_full_logits(tiny_dir):
    # a vocabulary size no activation width or chunk length shares (the tiny one pads to 384, Wqkv's output width)
    config = AutoConfig.from_pretrained(tiny_dir, vocab_size=1000, padded_vocab_size=1088)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()
    assert model.config.padded_vocab_size == 1088
    ids = random_ids(4, 600)
    saved = saved_tensors(lambda: model(ids, labels=ids, init_state="zero", num_steps=(0, 1)).loss)
    vocab_sized = [shape for shape, _ in saved if len(shape) and shape[-1] == model.config.padded_vocab_size]
    assert not vocab_sized  # logits chunks are recomputed in backward, never kept


# --- generation -----------------------------------------------------------------------------------------------------


def greedy_without_cache(model, ids, num_steps, max_new_tokens, seeds):
    """Independent truth: re-run the whole sequence for every new token."""
    for _ in range(max_new_tokens):
        logits = model(ids, num_steps=num_steps, state_seeds=seeds).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def test_cached_greedy_equals_uncached(model):
    ids, seeds = random_ids(1, 7), torch.tensor([3])
    cached = model.generate(ids, num_steps=3, max_new_tokens=8, state_seeds=seeds, eos_token_id=[10_000])
    assert torch.equal(cached, greedy_without_cache(model, ids, 3, 8, seeds))


def test_padded_batch_generation_equals_rows_alone(model):
    rows = [random_ids(1, 9, seed=4)[0], random_ids(1, 4, seed=5)[0], random_ids(1, 6, seed=6)[0]]
    width = max(len(r) for r in rows)
    ids, mask = torch.full((3, width), 261), torch.zeros(3, width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    seeds = torch.tensor([7, 8, 9])
    batch = model.generate(ids, attention_mask=mask, num_steps=4, max_new_tokens=10, state_seeds=seeds,
                           eos_token_id=[10_000])
    for i, row in enumerate(rows):
        alone = model.generate(row[None], num_steps=4, max_new_tokens=10, state_seeds=seeds[i:i + 1],
                               eos_token_id=[10_000])
        assert torch.equal(batch[i, width - len(row):], alone[0])


def test_generation_stops_on_any_eos_and_pads_after(model):
    ids, seeds = random_ids(2, 5), torch.tensor([1, 2])
    free = model.generate(ids, num_steps=2, max_new_tokens=12, state_seeds=seeds, eos_token_id=[10_000])
    stop = int(free[0, 5 + 2])  # make the third new token of row 0 an end token
    out = model.generate(ids, num_steps=2, max_new_tokens=12, state_seeds=seeds, eos_token_id=[10_001, stop],
                         pad_token_id=261)
    first_end = (out[0, 5:] == stop).nonzero()[0].item()
    assert first_end <= 2 and (out[0, 5 + first_end + 1:] == 261).all()


def test_rows_that_finish_early_leave_the_batch_without_changing_the_others(model):
    """Finished rows are dropped from the batch (their cache rows too): the rows still decoding get exactly what
    they get alone, with the same log-probs."""
    ids, seeds = random_ids(3, 6, seed=2), torch.tensor([4, 5, 6])
    kwargs = dict(num_steps=3, max_new_tokens=10, return_dict_in_generate=True)
    alone = [model.generate(ids[i:i + 1], state_seeds=seeds[i:i + 1], eos_token_id=[10_000], **kwargs)
             for i in range(3)]
    stop = int(alone[1].sequences[0, 6 + 1])  # row 1 ends at its second new token
    batch = model.generate(ids, state_seeds=seeds, eos_token_id=[10_000, stop], pad_token_id=261, **kwargs)
    for i in (0, 2):
        if stop in alone[i].sequences[0, 6:].tolist():
            continue  # that row would stop too; the others still show the check
        assert torch.equal(batch.sequences[i], alone[i].sequences[0])
        assert torch.allclose(batch.logprobs[i], alone[i].logprobs[0], atol=1e-5)
    assert (batch.sequences[1, 6 + 2:] == 261).all()


def test_samples_of_one_prompt_share_its_prefill(model):
    """num_return_sequences n: n consecutive rows per prompt; greedy, each equals the prompt decoded alone."""
    ids, seeds = random_ids(2, 5, seed=3), torch.tensor([1, 2])
    kwargs = dict(num_steps=3, max_new_tokens=6, eos_token_id=[10_000], return_dict_in_generate=True)
    shared = model.generate(ids, state_seeds=seeds, num_return_sequences=3, **kwargs)
    repeated = model.generate(ids.repeat_interleave(3, dim=0), state_seeds=seeds.repeat_interleave(3), **kwargs)
    assert torch.equal(shared.sequences, repeated.sequences)
    assert torch.allclose(shared.logprobs, repeated.logprobs, atol=1e-5)


def test_sampling_is_reproducible_and_top_k_one_is_greedy(model):
    ids, seeds = random_ids(2, 5), torch.tensor([1, 2])
    kwargs = dict(num_steps=2, max_new_tokens=8, state_seeds=seeds, eos_token_id=[10_000])
    first = model.generate(ids, do_sample=True, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(0),
                           **kwargs)
    again = model.generate(ids, do_sample=True, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(0),
                           **kwargs)
    assert torch.equal(first, again)
    assert torch.equal(model.generate(ids, do_sample=True, top_k=1, **kwargs), model.generate(ids, **kwargs))


def test_shared_cache_slots_bound_memory(model):
    ids, seeds = random_ids(2, 6), torch.tensor([1, 2])
    kwargs = dict(num_steps=8, max_new_tokens=6, state_seeds=seeds, eos_token_id=[10_000])
    exact = model.generate(ids, **kwargs)
    assert torch.equal(model.generate(ids, kv_cache_slots=8, **kwargs), exact)  # one slot per step: exact
    shared = model.generate(ids, kv_cache_slots=1, return_dict_in_generate=True, **kwargs)
    exact_logprobs = model.generate(ids, return_dict_in_generate=True, **kwargs).logprobs
    assert not torch.allclose(shared.logprobs, exact_logprobs)  # sharing really changes what tokens attend to
    from_config = model.generate(ids, generation_config=GenerationConfig(  # as TRL passes generation_kwargs
        kv_cache_slots=1, max_new_tokens=6, eos_token_id=[10_000], return_dict_in_generate=True),
        num_steps=8, state_seeds=seeds)
    assert torch.equal(from_config.logprobs, shared.logprobs)
    config = model.config
    full = HuginnKVCache(config, 1, 4, 32, torch.bfloat16, "cpu").nbytes_per_token()
    one = HuginnKVCache(config, 1, 4, 1, torch.bfloat16, "cpu").nbytes_per_token()
    layer_bytes = 2 * config.n_embd * 2  # keys + values, bf16
    assert (full, one) == (layer_bytes * (4 + 4 * 32), layer_bytes * (4 + 4))


# --- PEFT and NF4 ---------------------------------------------------------------------------------------------------


def test_lora_on_core_gets_gradients_with_truncated_backprop(model):
    from peft import LoraConfig, get_peft_model

    model.train()
    model.gradient_checkpointing_enable()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["Wqkv", "proj", "fc"], init_lora_weights=False))
    ids = random_ids(2, 10)
    peft_model(ids, labels=ids, num_steps=(3, 2)).loss.backward()
    core = [p.grad for n, p in peft_model.named_parameters() if "core_block" in n and "lora_" in n]
    assert core and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in core)
    frozen = [p for n, p in peft_model.named_parameters() if "lora_" not in n]
    assert all(p.grad is None for p in frozen)


def test_fp32_trained_copies_of_wte_and_ln_f_keep_a_bf16_base_in_bf16(tiny_dir):
    """On a bf16 base, PEFT's trained copies of wte and ln_f (modules to save) stay fp32 for the optimizer
    (keep_trainable_weights_fp32). Their outputs must not send fp32 activations into the bf16 Linears (a dtype error)
    nor change the forward beyond the copies' own rounding; generation through the PEFT model works too."""
    from peft import LoraConfig, get_peft_model

    from generation import HuginnEngine
    from training import keep_trainable_weights_fp32

    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16).eval()
    ids = random_ids(2, 10)
    with torch.no_grad():
        expected = base(ids, num_steps=3, init_state="zero").logits
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["Wqkv"], modules_to_save=["wte", "ln_f"]))
    keep_trainable_weights_fp32(peft_model)
    copies = [p for n, p in peft_model.named_parameters() if ".modules_to_save." in n]
    assert len(copies) == 2 and all(p.dtype == torch.float32 for p in copies)
    with torch.no_grad():
        logits = peft_model(input_ids=ids, num_steps=3, init_state="zero").logits
    assert torch.equal(logits, expected)  # fp32 copies of bf16 weights, LoRA B = 0: the same bf16 forward
    output = HuginnEngine(peft_model.get_base_model(), max_batch_size=2, max_length=16).generate(
        [[1, 2, 3], [4, 5]], num_steps=2, max_new_tokens=4, eos_token_ids=[])
    assert [len(tokens) for tokens in output.tokens] == [4, 4]


@pytest.fixture(scope="module")
def nf4_model(tiny_dir):
    pytest.importorskip("bitsandbytes")
    from modeling_huginn_qlora import nf4_quantization_config

    return AutoModelForCausalLM.from_pretrained(
        tiny_dir, quantization_config=nf4_quantization_config(torch.float32), device_map="cpu")


def test_nf4_error_is_bounded_in_depth(nf4_model, tiny_dir):
    import bitsandbytes as bnb

    full = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    linear4bit = [n for n, m in nf4_model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4bit) == 4 * 8  # Wqkv, proj, fc, proj in each of the 8 blocks
    assert not isinstance(nf4_model.transformer.adapter, bnb.nn.Linear4bit)
    assert not isinstance(nf4_model.lm_head, bnb.nn.Linear4bit)
    ids = random_ids(2, 16)
    errors = {}
    with torch.no_grad():
        for steps in (1, 4, 16, 32, 64):
            quantized = nf4_model.eval()(ids, init_state="zero", num_steps=steps).logits
            reference = full(ids, init_state="zero", num_steps=steps).logits
            errors[steps] = ((quantized - reference).abs().max() / reference.abs().max()).item()
    print("NF4 vs fp32 max |logit error| / max |logit|, by steps:", {k: round(v, 4) for k, v in errors.items()})
    assert all(0 < e < 0.25 for e in errors.values())  # finite, non-trivial (really quantized), bounded
    assert errors[64] < 2 * errors[4]  # no growth with depth


def test_qlora_step_trains_lora_and_leaves_4bit_weights(nf4_model):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(nf4_model)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["Wqkv", "proj", "fc"], init_lora_weights=False))
    quantized_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = random_ids(2, 12)
    model(ids, labels=ids, num_steps=(2, 2)).loss.backward()
    core = [p.grad for n, p in model.named_parameters() if "core_block" in n and "lora_" in n]
    assert core and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in core)
    optimizer.step()
    assert all(torch.equal(p, quantized_before[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_rollout_logprobs_equal_full_sequence_scoring(model):
    """What GRPO's importance ratio needs: scoring a sampled sequence in one forward, at the rollout's depth and
    initial-state seed, reproduces the log-probabilities the rollout sampled with (ratio 1 before any update)."""
    prompts, mask = random_ids(2, 6), torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # a left-padded row
    with model.transformer.recurrence_defaults(num_steps=(2, 3), state_seed=17):
        rollout = model.generate(prompts, attention_mask=mask, do_sample=True, max_new_tokens=8,
                                 eos_token_id=[10_000], return_dict_in_generate=True,
                                 generator=torch.Generator().manual_seed(1))
        full_mask = torch.cat([mask, torch.ones(2, 8, dtype=torch.long)], dim=1)
        logits = model(rollout.sequences, attention_mask=full_mask).logits
    scored = logits[:, 5:-1].log_softmax(-1).gather(2, rollout.sequences[:, 6:, None]).squeeze(2)
    assert (scored - rollout.logprobs).abs().max() <= 1e-5


def test_recurrence_defaults_fix_depth_in_training_mode(model):
    model.train()
    with model.transformer.recurrence_defaults(num_steps=(3, 1), state_seed=4):
        assert model(random_ids(1, 4)).num_steps == (3, 1)
        first = model(random_ids(1, 4)).logits
        assert torch.equal(first, model(random_ids(1, 4)).logits)  # same seed: same initial state
    assert model.transformer.default_num_steps is None
