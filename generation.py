"""Fast recurrent-depth generation, the decode path of GRPO rollouts (train_grpo.py) and evaluation (evaluate.py):
`HuginnEngine`. It runs the model's own prelude, core step and coda (HuginnModel.prelude_pass / core_step /
coda_pass) on its own cache layout; `HuginnForCausalLM.generate` stays the small exact reference.

    from generation import HuginnEngine, pick_generation_model
    model = pick_generation_model(qlora_model, max_batch_size=64, max_length=512)  # dense bf16 copy if it fits
    engine = HuginnEngine(model, max_batch_size=64, max_length=512)  # kv_cache_slots=1, no early exit
    result = engine.generate(prompts, num_steps=32, max_new_tokens=256, eos_token_ids=[65505, 65508])
    result.tokens[i], result.logprobs[i], result.steps_used[i]  # per prompt, one entry per new token

What it adds to `HuginnForCausalLM.generate` (the simple path, which the tests hold it equal to):
- Continuous batching: every cache row is its own sequence with its own length, RoPE positions and key-validity
  mask, so when a row finishes the next prompt is prefilled into it while the other rows keep decoding. Rows with
  the same prompt and initial-state seed (a GRPO group) share one prefill.
- One preallocated KV cache whose core layers have `kv_cache_slots` k slots shared across recurrent steps
  (slot = step mod k). The default k=1 is the authors' "compress-s4" (their cache indexes block passes modulo 4,
  i.e. one recurrent step of the 4 core blocks): 8 layer entries per token, 169 KB per token at full size in bf16,
  instead of 2.8 MB for one slot per step at 32 steps.
- Adaptive per-token exit (`exit_threshold`; the authors use 5e-4): a row stops recurring once the KL divergence
  KL(previous || current) between successive steps' next-token distributions drops below the threshold. Its state
  and its cache entries then stay as they were at its exit, whatever the rows beside it still do.
- On CUDA each phase of a decode pass (prelude, one recurrent step per slot, coda + head) is replayed as a recorded
  CUDA graph at fixed shapes (attention reads the whole preallocated length under the validity mask), so the ~2,000
  kernel launches of a 32-step token cost no CPU time, at the full batch. Eager (CPU), a pass computes only the
  busy rows, and with adaptive exit only the rows still recurring.
- Per-prompt seeds: the initial state is a function of (state seed, position), the sampling noise of (sampling
  seed, position), so a prompt's tokens do not depend on the batch or row it ran in.
"""

import math
import os
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.generation.logits_process import LogitsProcessorList

from modeling_huginn_qlora import (
    HuginnConfig,
    HuginnForCausalLM,
    HuginnKVCache,
    nf4_quantization_config,
    rotary_cos_sin,
    sampling_warpers,
    seeded_uniform,
)

DEFAULT_EXIT_THRESHOLD = 5e-4  # the authors' KL threshold: ~13-16 of 32 steps on average, almost no loss
REFILL_FRACTION = 4  # prompts start once a quarter of the rows are free (or the queue fits the free rows)
_SAMPLING_SALT = 0x5BD1E995  # keeps sampling noise apart from initial-state noise drawn with the same seed


def kv_cache_bytes_per_token(config: HuginnConfig, kv_cache_slots: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Keys + values of one token in every cached layer: prelude, k core slots, coda."""
    layers = config.n_layers_in_prelude + kv_cache_slots * config.n_layers_in_recurrent_block + config.n_layers_in_coda
    return layers * 2 * config.num_key_value_heads * config.head_dim * dtype.itemsize


# ---------------------------------------------------------------------------------------------------------------
# Memory plan: batch size and KV cache mode that fit a memory budget
# ---------------------------------------------------------------------------------------------------------------

MEMORY_HEADROOM = 0.9  # of the budget: allocator fragmentation, cuBLAS workspaces, the CUDA context's growth


def model_weight_bytes(config: HuginnConfig, dtype: torch.dtype, load_in_4bit: bool = False) -> int:
    """Resident bytes of the weights (and buffers) in `dtype`. NF4 (`nf4_quantization_config`): every Linear but
    the skipped ones holds 4 bits per weight plus one 8-bit absmax per 64 weights (double quantization)."""
    with torch.device("meta"):
        model = HuginnForCausalLM(config)
    total = sum(p.numel() * dtype.itemsize for p in model.parameters())  # the tied head counted once
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    if load_in_4bit:
        skipped = nf4_quantization_config(dtype).llm_int8_skip_modules
        quantized = sum(m.weight.numel() for name, m in model.named_modules()
                        if isinstance(m, nn.Linear) and name not in skipped)
        total -= quantized * dtype.itemsize - quantized // 2 - quantized // 64
    return total


def kv_cache_bytes(config: HuginnConfig, batch_size: int, length: int, kv_cache_slots: int,
                   dtype: torch.dtype = torch.bfloat16) -> int:
    """What HuginnKVCache(config, batch_size, length, kv_cache_slots, dtype) allocates."""
    return kv_cache_bytes_per_token(config, kv_cache_slots, dtype) * batch_size * length


def prefill_activation_bytes(config: HuginnConfig, batch_size: int, prompt_length: int, dtype: torch.dtype) -> int:
    """A bound on the transient memory of prefilling a batch, the largest of a generate call. Per prompt token: the
    MLP's fused `fc` output with its gated product (4 x intermediate_size in `dtype`), fp32 RoPE copies of q and k
    with the residual stream, state and adapter input (16 x n_embd in fp32), and fp32 attention scores over the
    prompt (SDPA's math fallback materialises them); per row, fp32 next-token logits and their log-softmax copies."""
    per_token = (4 * config.intermediate_size * dtype.itemsize + 16 * config.n_embd * 4
                 + config.num_attention_heads * prompt_length * 4)
    return batch_size * (prompt_length * per_token + 4 * config.padded_vocab_size * 4)


@dataclass
class MemoryPlan:
    """A batch size and KV cache mode (`kv_cache_slots` None: one cache slot per recurrent step, exact) and the
    bytes they need, all fitting MEMORY_HEADROOM of `budget_bytes`. `working_copy`: NF4 weights decoded from their
    dense `generation_copy`, whose bytes `weight_bytes` counts."""

    batch_size: int
    kv_cache_slots: int | None
    weight_bytes: int
    cache_bytes: int
    activation_bytes: int
    budget_bytes: int
    working_copy: bool = False

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.cache_bytes + self.activation_bytes


def plan_generation_memory(config: HuginnConfig, budget_bytes: float, batch_size: int, prompt_length: int,
                           max_new_tokens: int, num_steps: int, kv_cache_slots: int | None = None,
                           dtype: torch.dtype = torch.bfloat16, load_in_4bit: bool = False,
                           engine: bool = False) -> MemoryPlan:
    """The largest batch (at most `batch_size`) whose weights, KV cache for `prompt_length + max_new_tokens` tokens
    per row, and prefill activations fit. `kv_cache_slots` None: exact caches (one slot per step) at whatever batch
    fits, since a smaller batch leaves greedy completions unchanged while shared slots change them; one slot shared
    by all steps (k=1, the authors' compress-s4) only if not even one exact row fits. An int k: that mode (k >=
    num_steps is exact). `engine`: sized for HuginnEngine (one scratch position per row) instead of
    `model.generate`. Raises ValueError when not even one row fits."""
    weights = model_weight_bytes(config, dtype, load_in_4bit)
    length = prompt_length + max_new_tokens + int(engine)
    usable = MEMORY_HEADROOM * budget_bytes - weights
    for slots in [min(kv_cache_slots, num_steps)] if kv_cache_slots else [num_steps, 1]:
        for batch in range(batch_size, 0, -1):
            cache = kv_cache_bytes(config, batch, length, slots, dtype)
            activations = prefill_activation_bytes(config, batch, prompt_length, dtype)
            if cache + activations <= usable:
                return MemoryPlan(batch, None if slots == num_steps else slots, weights, cache, activations,
                                  int(budget_bytes))
    one_row = kv_cache_bytes(config, 1, length, 1, dtype) + prefill_activation_bytes(config, 1, prompt_length, dtype)
    raise ValueError(f"generation needs {(weights + one_row) / 1e9:.2f} GB at batch 1 (weights {weights / 1e9:.2f} "
                     f"GB, {length} tokens of KV cache) but {MEMORY_HEADROOM:.0%} of the budget is "
                     f"{MEMORY_HEADROOM * budget_bytes / 1e9:.2f} GB: use NF4 weights, fewer new tokens or more "
                     "memory")


class EngineKVCache(HuginnKVCache):
    """HuginnKVCache's layout (prelude layers, k slots of core layers, coda layers) in which every row is its own
    sequence. A decode pass computes the cache rows `rows` (a slice, or an index tensor of the rows still recurring)
    and writes row r's new key at `positions[r]`, only where `write_rows[r]` (a row that exited early keeps its
    entries); it reads the first `kv_len` positions of those rows. Key j is valid for row r iff j <= positions[r]
    (the engine's attention mask). `positions` and `write_rows` are the engine's step buffers."""

    def __init__(self, config, batch_size, max_length, num_step_slots, dtype, device, positions, write_rows):
        # One extra position per row, never read: the writes of rows that must not write land there.
        super().__init__(config, batch_size, max_length + 1, num_step_slots, dtype, device)
        self.positions, self.write_rows = positions, write_rows
        self.row_ids = torch.arange(batch_size, device=device)
        self.rows: slice | torch.Tensor = slice(None)
        self.kv_len = self.scratch = max_length

    def _targets(self, rows_to_write: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where `rows`' new entries go: (cache row ids, positions), each (rows,); a row not in rows_to_write (rows,)
        writes to the scratch position."""
        return self.row_ids[self.rows], torch.where(rows_to_write, self.positions[self.rows], self.scratch)

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values (rows, heads, 1, head_dim) -> cached (rows, heads, kv_len, head_dim)."""
        rows, positions = self._targets(self.write_rows[self.rows])
        self.keys[layer, rows, :, positions] = keys[:, :, 0]
        self.values[layer, rows, :, positions] = values[:, :, 0]
        return self.keys[layer, self.rows, :, :self.kv_len], self.values[layer, self.rows, :, :self.kv_len]

    def copy_row(self, source: int, target: int, length: int) -> None:
        """Row `target` gets the first `length` cached positions of row `source`, in every layer."""
        for cache in (self.keys, self.values):
            cache[:, target, :, :length] = cache[:, source, :, :length]

    def repeat_latest_slot(self, steps_done: torch.Tensor) -> None:
        """After early exits (k > 1): a token that ran s < k steps never wrote slots s..k-1; they get its latest
        step's entries, so a later token reading slot j sees this token's final recurrence (the authors' "latest"
        lookup), never a stale entry of the row's previous occupant. `steps_done` (rows,)."""
        rows, positions = self.row_ids[self.rows], self.positions[self.rows]
        for slot in range(1, self.num_step_slots):
            _, targets = self._targets(steps_done <= slot)  # only rows that never reached this slot write
            for block in range(self.num_core):
                src, dst = self.core_layer(slot - 1, block), self.core_layer(slot, block)
                for cache in (self.keys, self.values):
                    cache[dst, rows, :, targets] = cache[src, rows, :, positions]


class _PrefillView:
    """The cache interface `HuginnModel.forward` expects, writing a right-padded batch of new prompts into chosen
    rows of an EngineKVCache at positions 0..seq-1. Attention reads only the prompts themselves: the rows start empty
    (pads sit after every real token, so causal attention never sees them, and decoding overwrites them)."""

    length = 0  # tokens cached before the prompt

    def __init__(self, cache: EngineKVCache, rows: torch.Tensor):
        self.cache, self.rows = cache, rows
        self.prelude_layer, self.core_layer, self.coda_layer = cache.prelude_layer, cache.core_layer, cache.coda_layer

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq = keys.shape[2]
        self.cache.keys[layer, self.rows, :, :seq] = keys  # (rows, heads, seq, head_dim)
        self.cache.values[layer, self.rows, :, :seq] = values
        return keys, values


@dataclass
class _StepBuffers:
    """The tensors a decode pass reads and writes, allocated once (CUDA graphs replay on their addresses)."""

    tokens: torch.Tensor  # (batch,) token each row feeds
    positions: torch.Tensor  # (batch,) its position = tokens the row has cached
    state_seeds: torch.Tensor  # (batch,)
    occupied: torch.Tensor  # (batch,) rows holding a prompt
    running: torch.Tensor  # (batch,) rows still recurring on this token (occupied, not exited)
    steps: torch.Tensor  # (batch,) recurrent steps run on this token
    embedded: torch.Tensor  # (batch, 1, n_embd) prelude output
    state: torch.Tensor  # (batch, 1, n_embd) recurrent state
    cos: torch.Tensor  # (batch, 1, 1, head_dim // 2)
    sin: torch.Tensor
    mask: torch.Tensor  # (batch, 1, 1, max_length) key validity
    logits: torch.Tensor  # (batch, vocab) fp32
    log_probs: torch.Tensor  # (batch, vocab) fp32, previous step's (adaptive exit)

    @classmethod
    def allocate(cls, config: HuginnConfig, batch: int, max_length: int, dtype, device) -> "_StepBuffers":
        def zeros(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(
            tokens=zeros(batch), positions=zeros(batch), state_seeds=zeros(batch),
            occupied=zeros(batch, dtype=torch.bool), running=zeros(batch, dtype=torch.bool), steps=zeros(batch),
            embedded=zeros(batch, 1, config.n_embd, dtype=dtype), state=zeros(batch, 1, config.n_embd, dtype=dtype),
            cos=zeros(batch, 1, 1, config.head_dim // 2, dtype=torch.float32),
            sin=zeros(batch, 1, 1, config.head_dim // 2, dtype=torch.float32),
            mask=zeros(batch, 1, 1, max_length, dtype=torch.bool),
            logits=zeros(batch, config.padded_vocab_size, dtype=torch.float32),
            log_probs=zeros(batch, config.padded_vocab_size, dtype=torch.float32),
        )


@dataclass
class GenerationResult:
    """Per prompt, one entry per new token: `tokens` (up to and including its end token), `logprobs` (log p of the
    token at the sampling temperature, before top-k / top-p, as GRPO's loss scores it; 1 when greedy; with adaptive
    exit, at the exit step) and `steps_used` (recurrent steps behind it; a prompt's first token comes from its
    prefill, always at full depth). Per prompt, `block_passes`: the block passes its decoded tokens waited for one
    after another (prelude + core steps + coda of each decode pass or wave it was in; the prefill left out).
    Wall-clock seconds of prefills and of decode passes, the number of tokens the decode passes produced and the
    row-passes they computed (a row per busy row and recurrent step; diffusion: per row, slot and step)."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    steps_used: list[list[int]]
    block_passes: list[int]
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_tokens: int = 0
    computed_row_steps: int = 0

    @property
    def mean_steps(self) -> float:
        """Mean recurrent steps per decoded token (each prompt's first token, from its prefill, left out)."""
        decoded = [steps for row in self.steps_used for steps in row[1:]]
        return sum(decoded) / len(decoded) if decoded else float("nan")

    @property
    def block_passes_per_token(self) -> float:
        """Sequential block passes per decoded token (each prompt's first token, from its prefill, left out)."""
        decoded = sum(max(len(tokens) - 1, 0) for tokens in self.tokens)
        return sum(self.block_passes) / decoded if decoded else float("nan")


@dataclass
class _Run:
    """Host-side bookkeeping of one `generate` call: prompts, their settings and outputs, and each cache row's
    prompt (None: free), cached length and pending token."""

    prompts: list[list[int]]
    budgets: list[int]
    eos: set[int]
    state_seeds: list[int]
    sampling_seeds: list[int]
    sampling: LogitsProcessorList | None
    temperature: float  # of the reported log-probs: the sampling temperature, 1 when greedy
    num_steps: int
    on_finish: Callable[[int, list[int], list[int]], None] | None
    row_prompt: list[int | None]
    row_length: list[int]
    row_token: list[int]
    result: GenerationResult = field(init=False)

    def __post_init__(self):
        self.result = GenerationResult([[] for _ in self.prompts], [[] for _ in self.prompts],
                                       [[] for _ in self.prompts], [0] * len(self.prompts))

    def busy_rows(self) -> list[int]:
        return [row for row, prompt in enumerate(self.row_prompt) if prompt is not None]


class HuginnEngine:
    """Batched, continuously refilled, optionally early-exiting decoding of a HuginnForCausalLM (plain, NF4 and/or
    PEFT LoRA). The engine owns a KV cache of `max_batch_size` rows x `max_length` tokens with `kv_cache_slots` core
    slots, and step buffers; `generate` can be called many times. `exit_threshold`: None runs every token at full
    depth; a float enables the KL exit (0 never exits and gives the fixed-depth tokens exactly). `cuda_graphs`:
    default on CUDA; True on a CPU runs the same fixed-shape phases without recording them (tests use it).

    Eager (no graphs), a pass computes only the busy rows: when no prompt is left to start, busy rows move to the
    front of the cache, and with adaptive exit each step computes only the rows still recurring. Graphs replay at
    the full batch, so there exited and free rows cost as much as busy ones; adaptive exit then saves time only when
    every row of a pass has exited.

    `diffusion` (DiffusionSettings): decode by diffusion forcing instead, a wave of positions recurring together
    per pass (see DiffusionSettings); the prefill, cache, seeds, sampling and outputs stay the engine's."""

    def __init__(self, model, max_batch_size: int, max_length: int, kv_cache_slots: int = 1,
                 exit_threshold: float | None = None, cuda_graphs: bool | None = None, init_state: str = "random",
                 diffusion: "DiffusionSettings | None" = None):
        if diffusion is not None and exit_threshold is not None:
            raise ValueError("diffusion decoding freezes positions by its own rule: leave exit_threshold None")
        self.model = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: LoRA stays active
        self.config = self.model.config
        dtype, self.device = self.model.transformer.compute_dtype, self.model.transformer.wte.weight.device
        self.max_batch_size, self.max_length = max_batch_size, max_length
        self.exit_threshold, self.init_state = exit_threshold, init_state
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.buf = _StepBuffers.allocate(self.config, max_batch_size, max_length, dtype, self.device)
        self.cache = EngineKVCache(self.config, max_batch_size, max_length, kv_cache_slots, dtype, self.device,
                                   positions=self.buf.positions, write_rows=self.buf.running)
        self.width = max_batch_size  # a pass computes rows [0, width): all of them with graphs, the busy ones eager
        self.rows: slice | torch.Tensor = slice(None)  # the rows the current phase computes (see EngineKVCache)
        self._phases = None  # name -> callable running one phase of a decode pass (a graph replay on CUDA)
        self.diffusion = None if diffusion is None else _DiffusionDecoder(self, diffusion)

    def close(self) -> None:
        """Frees the KV cache, step buffers and recorded phases now; the engine is unusable after. (The phases refer
        back to the engine, so without this only the garbage collector frees them, a slow full collection.)"""
        self._phases = self.buf = self.cache = self.diffusion = None

    @property
    def cache_bytes(self) -> int:
        """Bytes of the KV cache this engine allocated (keys and values)."""
        return 2 * self.cache.keys.numel() * self.cache.keys.element_size()

    # --- one decode pass, in phases that read and write only the step buffers and the cache ---------------------

    def _select(self, rows: slice | torch.Tensor) -> None:
        self.rows = self.cache.rows = rows

    @property
    def _rope(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.buf.cos[self.rows], self.buf.sin[self.rows]

    @property
    def _mask(self) -> torch.Tensor:
        return self.buf.mask[self.rows, ..., :self.cache.kv_len]  # (rows, 1, 1, kv_len)

    def _begin_token(self) -> None:
        """Embed each row's token, run the prelude (caching it), draw each row's initial state."""
        buf, rows, transformer = self.buf, self.rows, self.model.transformer
        positions = buf.positions[rows, None]  # (rows, 1)
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_base)
        buf.cos[rows], buf.sin[rows] = cos, sin
        key_positions = torch.arange(self.max_length, device=self.device)
        buf.mask[rows] = (key_positions <= positions)[:, None, None]  # (rows, 1, 1, max_length)
        buf.running[rows] = buf.occupied[rows]
        buf.steps[rows] = 0
        buf.log_probs[rows] = -math.log(self.config.padded_vocab_size)  # uniform before the first step, as the authors
        token_embeddings = transformer.wte(buf.tokens[rows, None])
        embedded = transformer.prelude_pass(token_embeddings, self._rope, self._mask, self.cache)
        buf.embedded[rows] = embedded  # (rows, 1, n_embd)
        buf.state[rows] = transformer.initial_state(embedded, positions, self.init_state, buf.state_seeds[rows])

    def _core_step(self, slot: int) -> None:
        """One recurrent step for the running rows (it writes core slot `slot`); exited rows keep their state."""
        buf, rows = self.buf, self.rows
        state = buf.state[rows]
        new_state = self.model.transformer.core_step(state, buf.embedded[rows], self._rope, self._mask, self.cache,
                                                     slot)
        running = buf.running[rows]
        buf.state[rows] = torch.where(running[:, None, None], new_state, state)
        buf.steps[rows] = buf.steps[rows] + running
        if self.exit_threshold is not None:
            self._check_exit()

    def _check_exit(self) -> None:
        """Coda and head on the new states; a row whose next-token distribution moved less than the threshold stops.
        Its logits and coda cache entries (written only while it runs) are those of its final state."""
        buf, rows = self.buf, self.rows
        logits = self._coda_head()
        log_probs, previous, running = logits.log_softmax(-1), buf.log_probs[rows], buf.running[rows]
        kl = (previous.exp() * (previous - log_probs)).sum(-1).clamp(min=0)  # (rows,) KL(previous || new)
        buf.logits[rows] = torch.where(running[:, None], logits, buf.logits[rows])
        buf.log_probs[rows] = log_probs
        buf.running[rows] = running & (kl >= self.exit_threshold)

    def _coda_head(self) -> torch.Tensor:
        hidden = self.model.transformer.coda_pass(self.buf.state[self.rows], self._rope, self._mask, self.cache)
        return self.model.lm_head(hidden)[:, 0].float()  # (rows, vocab)

    def _end_token(self) -> None:
        if self.exit_threshold is None:
            self.buf.logits[self.rows] = self._coda_head()
        else:  # _check_exit ran the coda and head; with several slots, fill the slots early exits skipped
            self.cache.repeat_latest_slot(self.buf.steps[self.rows])

    def _prepare_phases(self) -> None:
        """The phases as callables (in the model's eval mode: dropout would be recorded into every replay); on CUDA,
        recorded once as graphs sharing one memory pool, while no row is occupied (every cache write is masked and no
        state changes, so the warm-up and recording runs leave nothing behind). If any phase fails to record, every
        phase runs eagerly: one fallback for the whole engine, decided once."""
        phases = {"begin": self._begin_token}
        phases |= {slot: (lambda slot=slot: self._core_step(slot)) for slot in range(self.cache.num_step_slots)}
        if self.exit_threshold is None or self.cache.num_step_slots > 1:  # else it would do nothing
            phases["end"] = self._end_token
        if self.cuda_graphs and self.device.type == "cuda":
            self.buf.occupied.zero_()
            self._select(slice(None))
            phases = _record_cuda_graphs(phases)
        self._phases = phases

    def _decode_pass(self, num_steps: int) -> int:
        """One token for rows [0, width); returns the row-steps computed."""
        prefix = slice(None) if self.cuda_graphs else slice(0, self.width)
        self._select(prefix)
        self._phases["begin"]()
        computed = 0
        for step in range(num_steps):
            self._phases[step % self.cache.num_step_slots]()
            computed += self.width if isinstance(self.rows, slice) else len(self.rows)
            if self.exit_threshold is not None:  # one host sync per step, only with adaptive exit
                running = self.buf.running[prefix]
                if not bool(running.any()):
                    break
                if not self.cuda_graphs and not bool(running.all()):
                    self._select(running.nonzero()[:, 0])  # exited rows cost nothing more
        self._select(prefix)
        if "end" in self._phases:
            self._phases["end"]()
        return computed

    # --- scheduling -------------------------------------------------------------------------------------------

    def _prefill(self, run: _Run, rows: list[int]) -> torch.Tensor:
        """Run the prompts of `rows` through the model's own forward (right-padded, full depth), caching them in
        their rows at positions 0..len-1; returns their next-token logits (len(rows), vocab). Rows with the same
        prompt and initial-state seed (e.g. GRPO's samples of one prompt) share one prefill, copied."""
        keys = [(tuple(run.prompts[run.row_prompt[row]]), run.state_seeds[run.row_prompt[row]]) for row in rows]
        first = {}  # (prompt, state seed) -> the row that prefills it
        for row, key in zip(rows, keys, strict=True):
            first.setdefault(key, row)
        unique = list(first)
        lengths = torch.tensor([len(prompt) for prompt, _ in unique], device=self.device)
        ids = nn.utils.rnn.pad_sequence([torch.tensor(prompt) for prompt, _ in unique], batch_first=True)
        attention_mask = torch.arange(ids.shape[1], device=self.device) < lengths[:, None]  # (unique, width)
        seeds = torch.tensor([seed for _, seed in unique], device=self.device)
        view = _PrefillView(self.cache, torch.tensor(list(first.values()), device=self.device))
        hidden = self.model.transformer(ids.to(self.device), attention_mask=attention_mask.long(),
                                        past_key_values=view, use_cache=True, num_steps=run.num_steps,
                                        init_state=self.init_state, state_seeds=seeds).last_hidden_state
        logits = self.model.lm_head(hidden[torch.arange(len(unique), device=self.device), lengths - 1]).float()
        index = {key: i for i, key in enumerate(unique)}
        for row, key in zip(rows, keys, strict=True):
            if first[key] != row:
                self.cache.copy_row(first[key], row, len(key[0]))
        return logits[[index[key] for key in keys]]

    def _decode(self, run: _Run, rows: list[int]) -> tuple[torch.Tensor, list[int]]:
        """One token for every busy row; returns their logits (len(rows), vocab) and recurrent steps."""
        buf = self.buf
        buf.tokens.copy_(torch.tensor(run.row_token))
        buf.positions.copy_(torch.tensor(run.row_length))
        buf.state_seeds.copy_(torch.tensor([run.state_seeds[p] if p is not None else 0 for p in run.row_prompt]))
        buf.occupied.copy_(torch.tensor([p is not None for p in run.row_prompt]))
        if not self.cuda_graphs:  # eager: the busy rows only, attending over the longest of them
            self.width = rows[-1] + 1
            self.cache.kv_len = max(run.row_length[row] for row in rows) + 1
        run.result.computed_row_steps += self._decode_pass(run.num_steps)
        steps = buf.steps[rows].tolist()
        for row, used in zip(rows, steps, strict=True):
            run.row_length[row] += 1
            run.result.block_passes[run.row_prompt[row]] += block_passes(self.config, used)
        return buf.logits[rows], steps

    def _compact(self, run: _Run) -> None:
        """The busy rows move to the front (each move copies one row's cache), so eager passes compute only as many
        rows as are busy."""
        busy = run.busy_rows()
        free = [row for row in range(len(busy)) if run.row_prompt[row] is None]
        for target, source in zip(free, [row for row in busy if row >= len(busy)], strict=True):
            self.cache.copy_row(source, target, run.row_length[source])
            for column in (run.row_prompt, run.row_length, run.row_token):
                column[target], column[source] = column[source], column[target]

    def _emit(self, run: _Run, rows: list[int], logits: torch.Tensor, steps: list[int]) -> int:
        """Choose and record the next token of each of `rows`; free the rows whose prompt is done. Returns how many
        prompts finished."""
        positions = torch.tensor([run.row_length[row] for row in rows], device=self.device)
        if run.sampling is None:
            chosen = logits.argmax(-1)
        else:
            seeds = torch.tensor([run.sampling_seeds[run.row_prompt[row]] for row in rows], device=self.device)
            chosen = (run.sampling(None, logits) + gumbel_noise(seeds, positions, logits.shape[-1])).argmax(-1)
        logprobs = (logits / run.temperature).log_softmax(-1).gather(1, chosen[:, None])[:, 0]
        finished = 0
        for row, token, logprob, used in zip(rows, chosen.tolist(), logprobs.tolist(), steps, strict=True):
            finished += _record(run, row, token, logprob, used)
        return finished

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], num_steps: int | None = None, max_new_tokens: int | list[int] = 256,
                 eos_token_ids: list[int] | None = None, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, state_seeds: list[int] | None = None,
                 sampling_seeds: list[int] | None = None, generator: torch.Generator | None = None,
                 progress: bool = False, on_finish: Callable[[int, list[int], list[int]], None] | None = None,
                 ) -> GenerationResult:
        """New tokens for each prompt (token id lists, any lengths), greedy unless `do_sample`. `num_steps`: recurrent
        steps per token (default: the model's `recurrence_defaults`, else `mean_recurrence`). `max_new_tokens`: one
        budget or one per prompt; prompt + budget must fit `max_length`. `eos_token_ids` (default: the model's
        generation config): a prompt stops at the first. `state_seeds` (initial states; default: the model's
        `recurrence_defaults` seed, else drawn from `generator`) and `sampling_seeds` (default: drawn from
        `generator`) make each prompt's tokens independent of its batch and row. `on_finish(index, tokens,
        steps_used)` is called as each prompt finishes (e.g. to write its result before the others end)."""
        transformer = self.model.transformer
        num_steps = sum(transformer.resolve_num_steps(
            num_steps or transformer.default_num_steps or self.config.mean_recurrence))
        budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
        for prompt, budget in zip(prompts, budgets, strict=True):
            if not prompt or len(prompt) + budget > self.max_length:
                raise ValueError(f"prompt of {len(prompt)} + {budget} new tokens does not fit max_length "
                                 f"{self.max_length} (or is empty)")
        eos = eos_token_ids if eos_token_ids is not None else self.model.generation_config.eos_token_id
        default_seed = transformer.default_state_seed
        run = _Run(
            prompts=prompts, budgets=budgets, eos=set(eos if isinstance(eos, list) else [eos]),
            state_seeds=state_seeds or _seeds(len(prompts), generator, default_seed),
            sampling_seeds=sampling_seeds or _seeds(len(prompts), generator),
            sampling=sampling_warpers(temperature, top_k, top_p) if do_sample else None,
            temperature=temperature if do_sample and temperature else 1.0, num_steps=num_steps, on_finish=on_finish,
            row_prompt=[None] * self.max_batch_size, row_length=[0] * self.max_batch_size,
            row_token=[0] * self.max_batch_size,
        )
        queue = deque(range(len(prompts)))
        # Free rows wait for a few more before new prompts are prefilled together: one prefill per freed row would
        # cost a whole-depth forward's overhead each time, while a waiting free row costs nothing (eager: compacted
        # away) or little (graphs: masked).
        refill_rows = max(1, self.max_batch_size // REFILL_FRACTION)
        was_training = self.model.training
        self.model.eval()  # no LoRA dropout, in the phases recorded below too
        try:
            if self.diffusion is not None:
                self.diffusion.prepare(run, (do_sample, temperature, top_k, top_p))
            elif self._phases is None:
                self._prepare_phases()
            with tqdm(total=len(prompts), disable=not progress, desc="generate") as bar:
                while queue or run.busy_rows():
                    start = time.perf_counter()
                    free = [row for row, prompt in enumerate(run.row_prompt) if prompt is None][:len(queue)]
                    if free and (len(free) >= refill_rows or len(free) == len(queue) or not run.busy_rows()):
                        for row in free:
                            run.row_prompt[row] = queue.popleft()
                            run.row_length[row] = len(prompts[run.row_prompt[row]])
                        bar.update(self._emit(run, free, self._prefill(run, free), [num_steps] * len(free)))
                        if self.diffusion is not None:
                            self.diffusion.start_rows(run, [row for row in free if run.row_prompt[row] is not None])
                        run.result.prefill_seconds += time.perf_counter() - start  # _emit ends in a host sync
                        continue
                    if self.diffusion is not None:  # no compaction: eager waves compute up to the last busy row
                        bar.update(self.diffusion.wave(run, run.busy_rows()))
                        run.result.decode_seconds += time.perf_counter() - start
                        continue
                    if not self.cuda_graphs:
                        self._compact(run)
                    rows = run.busy_rows()
                    bar.update(self._emit(run, rows, *self._decode(run, rows)))
                    run.result.decode_seconds += time.perf_counter() - start
                    run.result.decode_tokens += len(rows)
        finally:
            self.model.train(was_training)
        return run.result


def _record(run: _Run, row: int, token: int, logprob: float, used: int) -> bool:
    """Append one new token to the prompt of `row`; if it ends the prompt (an end token or its budget), free the row
    and report the prompt. Returns whether it ended."""
    prompt = run.row_prompt[row]
    for output, value in zip((run.result.tokens, run.result.logprobs, run.result.steps_used),
                             (token, logprob, used), strict=True):
        output[prompt].append(value)
    if token in run.eos or len(run.result.tokens[prompt]) == run.budgets[prompt]:
        run.row_prompt[row], run.row_length[row] = None, 0
        if run.on_finish is not None:
            run.on_finish(prompt, run.result.tokens[prompt], run.result.steps_used[prompt])
        return True
    run.row_token[row] = token
    return False


def block_passes(config: HuginnConfig, core_steps: int) -> int:
    """Block passes of one forward of the model at `core_steps` recurrent steps: prelude, core blocks, coda."""
    return config.n_layers_in_prelude + core_steps * config.n_layers_in_recurrent_block + config.n_layers_in_coda


def _seeds(count: int, generator: torch.Generator | None, fixed: int | None = None) -> list[int]:
    if fixed is not None:
        return [fixed] * count
    return torch.randint(0, 2**31, (count,), generator=generator).tolist()


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise, a pure function of (row seed, token position, vocab id): (batch, vocab).
    argmax(scores + noise) samples softmax(scores), the same whatever batch or row the prompt runs in."""
    uniform = seeded_uniform(seeds.long() ^ _SAMPLING_SALT, positions, vocab)  # (batch, vocab) in (0, 1)
    return -torch.log(-torch.log(uniform)).float()


def _record_cuda_graphs(phases: dict) -> dict:
    """Each phase (a callable that only reads and writes preallocated tensors) recorded as a CUDA graph, all graphs
    in one memory pool (a pool per graph would hold, e.g., bitsandbytes' dequantized weights once per phase); the
    replays, in the same order. If recording fails anywhere (e.g. a kernel that syncs with the host), the eager
    callables for every phase, with one warning."""
    side_stream = torch.cuda.Stream()
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream):
        for fn in phases.values():
            fn()  # warm-up: lazy initialisation (cuBLAS handles, bitsandbytes state) must not land in a graph
    torch.cuda.current_stream().wait_stream(side_stream)
    pool, graphs = torch.cuda.graph_pool_handle(), {}
    try:
        for name, fn in phases.items():
            graphs[name] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graphs[name], pool=pool):
                fn()
    except RuntimeError as error:
        torch.cuda.synchronize()
        warnings.warn(f"CUDA graph recording failed, every decode phase runs eagerly: {error}", stacklevel=2)
        return phases
    return {name: graph.replay for name, graph in graphs.items()}


# ---------------------------------------------------------------------------------------------------------------
# Diffusion forcing: the recurrence run in parallel over a wave of positions (Geiping, Yang, Su, arXiv 2510.14961)
# ---------------------------------------------------------------------------------------------------------------

FREEZE_RULES = ("latent-diff", "budget")
NEW_POSITION_STATES = ("fresh", "previous")


@dataclass(frozen=True)
class DiffusionSettings:
    """Knobs of diffusion-forcing decoding. Each row keeps a wavefront of up to `max_wavefront` positions past its
    final tokens; a wave runs `inner_steps` recurrent steps on all of them at once (one batched block pass per block),
    proposes the next token at every position, and appends `new_positions` positions (fewer at the cap). A position
    freezes, emitting its proposal, once its state is done and every position before it froze: done is `num_steps`
    steps run (its budget) or, with `freeze="latent-diff"`, a relative state change ||s - s_before|| / ||s|| over
    the wave under `freeze_threshold`; and its input token must be the one the position before it now proposes (else
    it recurs one more wave on the corrected token). `new_position_state`: a new position starts from the engine's
    initial state ("fresh", what sequential decoding starts from) or from the state of the last position of the
    wavefront ("previous"). `max_wavefront=1, inner_steps=num_steps` is sequential decoding, token for token.
    Defaults: the reference implementation's inner steps, freeze rule and threshold; a cap of 16 instead of its 128,
    since CUDA graphs compute every slot of the cap. Its state-noise mixing and embedding averaging are left out."""

    inner_steps: int = 4
    new_positions: int = 1
    max_wavefront: int = 16
    freeze: str = "latent-diff"
    freeze_threshold: float = 0.03
    new_position_state: str = "fresh"

    def __post_init__(self):
        for name in ("inner_steps", "new_positions", "max_wavefront"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"diffusion {name} must be an integer >= 1, got {value!r}")
        if self.freeze not in FREEZE_RULES:
            raise ValueError(f"diffusion freeze must be one of {FREEZE_RULES}, got {self.freeze!r}")
        if not math.isfinite(self.freeze_threshold) or self.freeze_threshold < 0:
            raise ValueError(f"diffusion freeze_threshold must be a finite number >= 0, got {self.freeze_threshold!r}")
        if self.new_position_state not in NEW_POSITION_STATES:
            raise ValueError(f"diffusion new_position_state must be one of {NEW_POSITION_STATES}, "
                             f"got {self.new_position_state!r}")

    def check_depth(self, num_steps: int) -> None:
        if self.inner_steps > num_steps:
            raise ValueError(f"diffusion inner_steps {self.inner_steps} exceeds the {num_steps} steps per token")


@dataclass
class _WaveBuffers:
    """What a wave reads and writes, allocated once (CUDA graphs replay on their addresses). Slot i of row r is
    position start[r] + i; slots from width[r] on are idle (they compute, but write only the scratch position)."""

    tokens: torch.Tensor  # (batch, slots) each slot's input token: slot 0's is final, the others proposals
    state: torch.Tensor  # (batch, slots, n_embd)
    steps: torch.Tensor  # (batch, slots) recurrent steps each slot's state has run
    start: torch.Tensor  # (batch,) the row's first position not frozen
    width: torch.Tensor  # (batch,) slots in use
    end: torch.Tensor  # (batch,) positions from here on are never needed: prompt + budget - 1; 0 on a free row
    state_seeds: torch.Tensor  # (batch,)
    sampling_seeds: torch.Tensor  # (batch,)
    logits: torch.Tensor  # (batch, slots, vocab) fp32, next-token logits of every slot
    change: torch.Tensor  # (batch, slots) fp32 relative state change over the wave
    proposed: torch.Tensor  # (batch, slots) the wave's proposal at every slot; the first `frozen` are final
    logprobs: torch.Tensor  # (batch, slots) fp32, of the proposals at the sampling temperature
    used_steps: torch.Tensor  # (batch, slots) steps behind each proposal
    frozen: torch.Tensor  # (batch,) slots the wave froze

    @classmethod
    def allocate(cls, config: HuginnConfig, batch: int, slots: int, dtype, device) -> "_WaveBuffers":
        def zeros(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(
            tokens=zeros(batch, slots), state=zeros(batch, slots, config.n_embd, dtype=dtype),
            steps=zeros(batch, slots), start=zeros(batch), width=zeros(batch), end=zeros(batch),
            state_seeds=zeros(batch), sampling_seeds=zeros(batch),
            logits=zeros(batch, slots, config.padded_vocab_size, dtype=torch.float32),
            change=zeros(batch, slots, dtype=torch.float32), proposed=zeros(batch, slots),
            logprobs=zeros(batch, slots, dtype=torch.float32), used_steps=zeros(batch, slots), frozen=zeros(batch),
        )


class _WaveView:
    """The cache interface `HuginnModel`'s phases expect, for a wave: slot i of row r writes its keys and values at
    `positions[r, i]` of cache row `rows[r]` (idle slots at the scratch position) and reads the first `kv_len`."""

    def __init__(self, cache: EngineKVCache, rows, positions: torch.Tensor, writes: torch.Tensor):
        self.cache, self.rows = cache, rows
        self.row_ids = cache.row_ids[rows][:, None]  # (rows, 1)
        self.targets = torch.where(writes, positions, cache.scratch)  # (rows, slots)
        self.prelude_layer, self.core_layer, self.coda_layer = cache.prelude_layer, cache.core_layer, cache.coda_layer

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values (rows, heads, slots, head_dim) -> cached (rows, heads, kv_len, head_dim)."""
        cache = self.cache
        cache.keys[layer, self.row_ids, :, self.targets] = keys.transpose(1, 2)  # indexed as (rows, slots, heads, hd)
        cache.values[layer, self.row_ids, :, self.targets] = values.transpose(1, 2)
        return cache.keys[layer, self.rows, :, :cache.kv_len], cache.values[layer, self.rows, :, :cache.kv_len]


class _DiffusionDecoder:
    """HuginnEngine's diffusion-forcing decode: a wave over every busy row's wavefront per pass, in two phases that
    only read and write the wave buffers and the engine's cache (no host sync): "wave" (prelude, `inner_steps` core
    steps, coda and head over all slots) and "advance" (proposals, freezing, moving the wavefront on). The host then
    reads the frozen tokens once per wave. On CUDA both are recorded as graphs at the full batch and wavefront, once
    per depth (and "advance" per sampling setting). Eager, a wave computes rows up to the last busy one, the slots in
    use and keys up to the longest extent."""

    def __init__(self, engine: HuginnEngine, settings: DiffusionSettings):
        self.engine, self.settings = engine, settings
        self.wave_buf = _WaveBuffers.allocate(engine.config, engine.max_batch_size, settings.max_wavefront,
                                              engine.model.transformer.compute_dtype, engine.device)
        self.slots = torch.arange(settings.max_wavefront, device=engine.device)
        self.rows: slice | torch.Tensor = slice(None)
        self._phases = {}  # ("wave", depth) and ("advance", depth, sampling setting) -> the phase for them
        self.num_steps, self.temperature, self.sampling = 0, 1.0, None
        self.num_slots = settings.max_wavefront  # slots a wave computes: all of them with graphs, those in use eager

    def prepare(self, run: _Run, sampling_key: tuple) -> None:
        """The run's depth and sampling; phases recorded on first use (on CUDA while no row is busy, so their
        warm-up and recording runs leave nothing behind: every cache write goes to the scratch position)."""
        self.settings.check_depth(run.num_steps)
        self.num_steps, self.temperature, self.sampling = run.num_steps, run.temperature, run.sampling
        self.wave_buf.width.zero_()  # no row is busy yet
        self.wave_buf.end.zero_()
        wanted = {("wave", run.num_steps): self._run_wave,
                  ("advance", run.num_steps, *sampling_key): self._run_advance}
        missing = {key: phase for key, phase in wanted.items() if key not in self._phases}
        if missing and self.engine.cuda_graphs and self.engine.device.type == "cuda":
            self._select(slice(None))
            self.engine.cache.kv_len, self.num_slots = self.engine.max_length, self.settings.max_wavefront
            missing = _record_cuda_graphs(missing)
        self._phases |= missing
        self._wave_phase, self._advance = (self._phases[key] for key in wanted)

    def _select(self, rows: slice | torch.Tensor) -> None:
        self.rows = self.engine.cache.rows = rows

    def start_rows(self, run: _Run, rows: list[int]) -> None:
        """Rows whose prompt was just prefilled (and whose first token did not end it): a wavefront of one position,
        the first new token's, from the initial state."""
        if not rows:
            return
        wave, device = self.wave_buf, self.engine.device
        index = torch.tensor(rows, device=device)
        prompts = [run.row_prompt[row] for row in rows]
        start = torch.tensor([run.row_length[row] for row in rows], device=device)
        seeds = torch.tensor([run.state_seeds[p] for p in prompts], device=device)
        wave.start[index], wave.width[index], wave.steps[index] = start, 1, 0
        wave.end[index] = torch.tensor([len(run.prompts[p]) + run.budgets[p] - 1 for p in prompts], device=device)
        wave.tokens[index, 0] = torch.tensor([run.row_token[row] for row in rows], device=device)
        wave.state_seeds[index] = seeds
        wave.sampling_seeds[index] = torch.tensor([run.sampling_seeds[p] for p in prompts], device=device)
        template = wave.state[index, :1]  # (rows, 1, n_embd)
        wave.state[index, :1] = self.engine.model.transformer.initial_state(template, start[:, None],
                                                                          self.engine.init_state, seeds)

    def _run_wave(self) -> None:
        """Prelude, `inner_steps` recurrent steps and coda + head on the first `num_slots` slots of the rows."""
        wave, rows, transformer, config = self.wave_buf, self.rows, self.engine.model.transformer, self.engine.config
        slots = self.slots[:self.num_slots]
        positions = wave.start[rows, None] + slots  # (rows, slots)
        view = _WaveView(self.engine.cache, rows, positions, slots < wave.width[rows, None])
        rope = rotary_cos_sin(positions, config.head_dim, config.rope_base)  # each (rows, slots, 1, head_dim // 2)
        key_positions = torch.arange(self.engine.cache.kv_len, device=positions.device)
        mask = (key_positions <= positions[..., None])[:, None]  # (rows, 1, slots, kv_len)
        embedded = transformer.prelude_pass(transformer.wte(wave.tokens[rows, :len(slots)]), rope, mask, view)
        state = before = wave.state[rows, :len(slots)]
        # A wave's steps use the cache slots of the depth's last `inner_steps` steps (slot = step mod k), the ones
        # holding the prompt's final keys; with inner_steps = num_steps that is sequential decoding's mapping.
        first_step = self.num_steps - self.settings.inner_steps
        for step in range(first_step, self.num_steps):
            state = transformer.core_step(state, embedded, rope, mask, view, step)
        hidden = transformer.coda_pass(state, rope, mask, view)
        wave.logits[rows, :len(slots)] = self.engine.model.lm_head(hidden).float()
        # before the state is written back: `before` may be a view of the buffer
        wave.change[rows, :len(slots)] = (state - before).float().norm(dim=-1) / state.float().norm(dim=-1).clamp(
            min=1e-12)
        wave.state[rows, :len(slots)] = state
        wave.steps[rows, :len(slots)] += self.settings.inner_steps

    def _propose(self, logits: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """logits (n, vocab), seeds and positions of the proposed tokens (n,) -> tokens (n,): greedy, or sampled
        with the engine's per-(seed, position) Gumbel noise (the token a position proposes is then the same at each
        wave while its logits stay the same)."""
        if self.sampling is None:
            return logits.argmax(-1)
        return (self.sampling(None, logits) + gumbel_noise(seeds, positions, logits.shape[-1])).argmax(-1)

    def _run_advance(self) -> None:
        """Proposals at the wave's slots, the frozen prefix of each row (recorded for the host), and the wavefront
        moved past it, extended by `new_positions` (within the cap and the row's budget)."""
        wave, rows, settings, used = self.wave_buf, self.rows, self.settings, self.num_slots
        logits, tokens, steps = wave.logits[rows, :used], wave.tokens[rows, :used], wave.steps[rows, :used]
        start, width, end = wave.start[rows], wave.width[rows], wave.end[rows]
        num_rows, slots = tokens.shape[0], self.slots[:used]
        positions = start[:, None] + slots  # (rows, slots)
        proposed = self._propose(logits.flatten(0, 1), wave.sampling_seeds[rows].repeat_interleave(used),
                                 (positions + 1).flatten()).view(num_rows, used)
        logprobs = (logits / self.temperature).log_softmax(-1).gather(-1, proposed[..., None])[..., 0]
        done = steps >= self.num_steps
        if settings.freeze == "latent-diff":
            done |= wave.change[rows, :used] < settings.freeze_threshold
        # a slot's input token is final if it is slot 0 or the proposal the slot before it makes now
        settled = torch.cat([torch.ones_like(done[:, :1]), tokens[:, 1:] == proposed[:, :-1]], dim=1)
        frozen = (done & settled & (slots < width[:, None])).long().cumprod(1).sum(1)  # (rows,)
        wave.proposed[rows, :used], wave.logprobs[rows, :used], wave.used_steps[rows, :used] = (
            proposed, logprobs, steps)
        wave.frozen[rows] = frozen

        # New slot j is old slot j + frozen; the first slot past the old wavefront takes the last proposal as its
        # token (so does any further new slot: no position proposes a token for it yet).
        reach = min(used + settings.new_positions, settings.max_wavefront)  # slots the new wavefront may use
        source = self.slots[:reach] + frozen[:, None]  # (rows, reach)
        kept = source < width[:, None]
        guesses = torch.cat([tokens[:, :1], proposed], dim=1)  # (rows, used + 1): slot i's newest input token
        wave.tokens[rows, :reach] = guesses.gather(1, torch.minimum(source, width[:, None]))
        old_slot = source.clamp(max=used - 1)
        state = wave.state[rows, :used]
        kept_state = state.gather(1, old_slot[..., None].expand(-1, -1, state.shape[-1]))
        new_start = start + frozen
        wave.state[rows, :reach] = torch.where(kept[..., None], kept_state, self._new_state(state, width, new_start,
                                                                                               reach))
        wave.steps[rows, :reach] = torch.where(kept, steps.gather(1, old_slot), 0)
        wave.start[rows] = new_start
        wave.width[rows] = torch.minimum(width - frozen + settings.new_positions,
                                         (end - new_start).clamp(min=0)).clamp(max=settings.max_wavefront)

    def _new_state(self, state: torch.Tensor, width: torch.Tensor, new_start: torch.Tensor,
                   reach: int) -> torch.Tensor:
        """The state (rows, reach, n_embd) of a position new to the wavefront at each of the first `reach` slots:
        the engine's initial state at its position, or a copy of the wavefront's last state."""
        if self.settings.new_position_state == "previous":
            last = (width - 1).clamp(min=0)[:, None, None].expand(-1, 1, state.shape[-1])
            return state.gather(1, last).expand(-1, reach, -1)
        positions = new_start[:, None] + self.slots[:reach]
        template = state[:, :1].expand(-1, reach, -1)
        return self.engine.model.transformer.initial_state(template, positions, self.engine.init_state,
                                                           self.wave_buf.state_seeds[self.rows])

    def wave(self, run: _Run, rows: list[int]) -> int:
        """One wave for the busy `rows`; records the tokens it froze. Returns how many prompts finished. Eager, it
        computes rows up to the last busy one (free rows between them write nothing) and the slots in use."""
        wave, engine = self.wave_buf, self.engine
        index = torch.tensor(rows, device=engine.device)
        if engine.cuda_graphs:
            self._select(slice(None))
            engine.cache.kv_len, self.num_slots = engine.max_length, self.settings.max_wavefront
        else:
            self._select(slice(0, rows[-1] + 1))
            extent, width = (wave.start[index] + wave.width[index]).max(), wave.width[index].max()
            engine.cache.kv_len, self.num_slots = int(extent), int(width)
        self._wave_phase()
        self._advance()
        frozen, proposed, used, logprobs = (t[index].tolist() for t in (wave.frozen, wave.proposed, wave.used_steps,
                                                                        wave.logprobs))
        passes = block_passes(engine.config, self.settings.inner_steps)
        run.result.computed_row_steps += len(rows) * self.num_slots * self.settings.inner_steps
        finished = []
        for row, count, row_tokens, row_logprobs, row_steps in zip(rows, frozen, proposed, logprobs, used,
                                                                   strict=True):
            run.result.block_passes[run.row_prompt[row]] += passes
            for token, logprob, steps in zip(row_tokens[:count], row_logprobs[:count], row_steps[:count],
                                             strict=True):
                run.result.decode_tokens += 1
                if _record(run, row, token, logprob, steps):
                    finished.append(row)
                    break
        if finished:  # their wavefronts go idle
            index = torch.tensor(finished, device=engine.device)
            wave.start[index], wave.width[index], wave.end[index] = 0, 0, 0
        return len(finished)


# ---------------------------------------------------------------------------------------------------------------
# A dense working copy of a quantized and/or LoRA model
# ---------------------------------------------------------------------------------------------------------------


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) matrix a Linear, a bitsandbytes Linear4bit or a PEFT LoRA layer applies."""
    if hasattr(module, "get_delta_weight"):  # PEFT LoRA: base weight + B A * scaling of each active adapter
        weight = _dense_weight(module.get_base_layer()).float()
        if module.merged or module.disable_adapters:
            return weight
        for adapter in module.active_adapters:
            weight = weight + module.get_delta_weight(adapter).float()
        return weight
    if getattr(module.weight, "quant_state", None) is not None:  # NF4 / FP4
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(module.weight.data, module.weight.quant_state)
    return module.weight


def _running_module(module: nn.Module) -> nn.Module:
    """The module that computes in `module`'s place: a PEFT modules_to_save wrapper (e.g. trained embeddings or a
    trained final norm) runs its active adapter's copy, or the original when adapters are off."""
    if not (hasattr(module, "original_module") and hasattr(module, "modules_to_save")):
        return module
    active = [name for name in module.active_adapters if name in module.modules_to_save]
    return module.original_module if module.disable_adapters or not active else module.modules_to_save[active[0]]


def generation_copy(model, dtype: torch.dtype = torch.bfloat16) -> HuginnForCausalLM:
    """A plain dense HuginnForCausalLM with the same function as `model` (NF4 weights dequantized, LoRA adapters
    merged, PEFT's trained module copies in place), in `dtype` on the model's device, in eval mode; `model` is left
    unchanged. While LoRA trains, the copy is stale after every optimizer step: make a new one per rollout phase."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.device("meta"):
        dense = HuginnForCausalLM(base.config)
    state, running = {}, {}  # dense parameter or buffer name -> the tensor `model` computes with there (in `dtype`)
    for name, module in dense.named_modules():
        source = _running_module(base.get_submodule(name)) if name else base
        for key, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            full_name = f"{name}.{key}" if name else key
            dense_linear = isinstance(module, nn.Linear) and key == "weight"
            tensor = _dense_weight(source) if dense_linear else getattr(source, key)
            if full_name in ("lm_head.weight", "transformer.wte.weight"):
                running[full_name] = tensor
            tensor = tensor.detach()
            # Cast as collected: a merged weight is fp32 (2x bf16) and only one may exist at a time, else the
            # full-size copy's peak holds 12.6 GB of fp32 weights beside the bf16 ones.
            state[full_name] = tensor if key == "freqs_cis" else tensor.to(dtype)
    dense.load_state_dict(state, strict=True, assign=True)  # assigning unties lm_head from wte ...
    if running["lm_head.weight"] is running["transformer.wte.weight"]:  # ... so tie them again where `model` does
        dense.lm_head.weight = dense.transformer.wte.weight
    dense.generation_config = base.generation_config
    return dense.eval()


def _needs_copy(model) -> bool:
    return any(hasattr(m, "get_delta_weight") or getattr(getattr(m, "weight", None), "quant_state", None) is not None
               for m in model.modules())


def free_memory_bytes(device: torch.device) -> int:
    """What new allocations can take. GPU: the free memory plus what PyTorch's allocator holds cached but unused
    (after a backward pass that is most of the activations' memory, which mem_get_info counts as taken). CPU: the
    kernel's MemAvailable (free RAM plus the page cache it can reclaim: free RAM alone shrinks to little on a
    machine that has read large files), else free RAM."""
    if device.type == "cuda":
        cached_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached_unused
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def pick_generation_model(model, max_batch_size: int, max_length: int, kv_cache_slots: int = 1,
                          dtype: torch.dtype = torch.bfloat16, free_bytes: int | None = None, headroom: float = 0.8):
    """The model to generate with. For an NF4 and/or LoRA model: its dense `generation_copy` when the copy (7 GB at
    full size in bf16) plus the engine's KV cache fit in `headroom` of the free memory (free_memory_bytes),
    since NF4 decoding runs ~2x slower than bf16 at every batch size; else the model itself (slower, no extra
    memory). A plain dense model is returned as is."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not _needs_copy(base):
        return model
    copy_bytes = model_weight_bytes(base.config, dtype)
    cache_bytes = kv_cache_bytes(base.config, max_batch_size, max_length, kv_cache_slots, dtype)
    if free_bytes is None:
        free_bytes = free_memory_bytes(base.transformer.wte.weight.device)
    return generation_copy(model, dtype) if copy_bytes + cache_bytes <= headroom * free_bytes else model
