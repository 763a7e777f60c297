"""Huginn-0125, the recurrent-depth ("latent reasoning") language model, for transformers 5.

Loads the published checkpoint (`tomg-group-umd/huginn-0125`, model_type `huginn_raven`) without
`trust_remote_code`, honours padding masks, trains with QLoRA (NF4 base + PEFT LoRA) and generates with a
preallocated KV cache whose recurrent-step slots can be shared.

    from modeling_huginn_qlora import HuginnForCausalLM          # registers the Auto classes
    model = AutoModelForCausalLM.from_pretrained("tomg-group-umd/huginn-0125", dtype=torch.bfloat16)
    out = model(input_ids, attention_mask=mask, labels=labels, num_steps=(24, 8))
    tokens = model.generate(input_ids, attention_mask=mask, num_steps=32, max_new_tokens=256)

The model: embed -> prelude blocks -> e; state s0 (random, zero or given);
s <- core_blocks(adapter([s, e])) repeated `num_steps` times; ln_f -> coda blocks -> ln_f -> tied head.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    GenerationConfig,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.utils import ModelOutput

# Huginn's special tokens, ids 65504..65509 of the published vocabulary in this order (the tiny default's tokenizer
# puts them after its byte and word tokens).
BOS, EOS, BEGIN_HEADER, END_HEADER, END_TURN, PAD = (
    "<|begin_text|>", "<|end_text|>", "<|begin_header|>", "<|end_header|>", "<|end_turn|>", "<|pad|>")
SPECIAL_TOKENS = [BOS, EOS, BEGIN_HEADER, END_HEADER, END_TURN, PAD]

# Huginn's chat format, as the authors' checkpoint converter writes it: the first message opens with <|begin_text|>;
# each message is <|begin_header|>{role}<|end_header|>\n\n{content, stripped}<|end_turn|>, the assistant's role
# rendered as "Huginn"; the assistant's content and <|end_turn|> sit in `{% generation %}` (the tokens an
# assistant-only loss trains on); then either the generation prompt or, closing a finished conversation,
# <|end_text|> (outside the generation block: not trained on). Literal tokens, not `bos_token`, so the rendering does
# not depend on how a checkpoint's tokenizer names its special tokens.
HUGINN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first %}{{ '<|begin_text|>' }}{% endif %}"
    "{% set is_huginn = message['role'] in ('assistant', 'Huginn') %}"
    "{{ '<|begin_header|>' + ('Huginn' if is_huginn else message['role']) + '<|end_header|>\n\n' }}"
    "{% if is_huginn %}{% generation %}{{ message['content'] | trim + '<|end_turn|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|end_turn|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|begin_header|>Huginn<|end_header|>\n\n' }}"
    "{% else %}{{ '<|end_text|>' }}{% endif %}"
)


class HuginnConfig(PreTrainedConfig):
    """Reads the published `config.json` field names; `auto_map` and bookkeeping fields are kept but unused."""

    model_type = "huginn_raven"

    vocab_size: int = 65536
    padding_multiple: int = 4096
    padded_vocab_size: int | None = None
    block_size: int = 4096
    n_embd: int = 5280
    num_attention_heads: int = 55
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int = 17920
    n_layers_in_prelude: int = 2
    n_layers_in_recurrent_block: int = 4
    n_layers_in_coda: int = 2
    norm_eps: float = 1e-6
    rope_base: int | float = 50000
    qk_bias: bool = True
    bias: bool = False
    mean_recurrence: int = 32
    mean_backprop_depth: int = 8
    tie_embeddings: bool = True
    tie_word_embeddings: bool = True
    init_values: dict | None = None
    bos_token_id: int | None = 65504
    eos_token_id: int | list[int] | None = 65505
    pad_token_id: int | None = 65509

    def __post_init__(self, **kwargs):
        # The reference writes `n_heads` next to (or instead of) `num_attention_heads`.
        self.num_attention_heads = kwargs.pop("n_heads", self.num_attention_heads)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.n_embd // self.num_attention_heads
        if self.padded_vocab_size is None:
            self.padded_vocab_size = math.ceil(self.vocab_size / self.padding_multiple) * self.padding_multiple
        self.tie_word_embeddings = self.tie_embeddings
        if self.init_values is None:
            std = math.sqrt(2 / (5 * self.n_embd))  # "takase" init, also the scale of the random initial state
            self.init_values = {"std": std, "embedding": std, "embed_scale": math.sqrt(self.n_embd)}
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        if self.n_embd % self.num_attention_heads:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by num_attention_heads={self.num_attention_heads}")
        if self.head_dim * self.num_attention_heads != self.n_embd:
            raise ValueError(f"head_dim={self.head_dim} x {self.num_attention_heads} heads != n_embd={self.n_embd}")
        if self.num_key_value_heads != self.num_attention_heads:
            raise ValueError(
                "Huginn has no grouped-query attention: num_key_value_heads must equal num_attention_heads")


def nf4_quantization_config(compute_dtype: torch.dtype = torch.bfloat16) -> BitsAndBytesConfig:
    """QLoRA's NF4 + double quantization. The tied embedding/head stays in `compute_dtype` (it is an Embedding and
    the largest matrix the loss reads); norms and qk_bias are not Linear layers and are never quantized. The
    adapter, which re-injects the prelude output into the state at every recurrent step, stays unquantized too:
    its error would be added 32 times per token, and it is only 2% of the weights."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=["lm_head", "transformer.adapter"],
    )


def use_plain_nf4_cpu_path(model: nn.Module) -> None:
    """bitsandbytes (0.50) repacks an NF4 weight in place for its AVX512-BF16 CPU kernel at the first eval-mode
    forward without grad. On such CPUs that breaks two ways: the repacking fails when in_features is not a multiple
    of the 64-weight block (huginn-0125's 5280-wide Wqkv, attn.proj and mlp.fc: "shape '[15840, 82]' is invalid"),
    and a repacked layer passes no gradient to its input (that kernel has no backward), so training after an
    evaluation would silently lose gradients. Every 4-bit layer keeps the dequantize-and-matmul path training uses."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes' Linear4bit
            module.support_avx512bf16_for_cpu = False


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------


class HuginnRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # statistics in fp32, weight applied after casting back (as the checkpoint was trained)
        # the gain in x's dtype too: a trained fp32 gain (ln_f kept fp32 for the optimizer) must not turn a bf16
        # forward into fp32 from here on
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight.type_as(x)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of RoPE angles for interleaved pairs, in fp32, each (batch, seq, 1, head_dim // 2).

    Computed from per-row positions (not a shared table) so a left-padded row sees the same angles as alone."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    angles = position_ids.float()[..., None] * inv_freq  # (batch, seq, head_dim // 2)
    return angles.cos()[:, :, None], angles.sin()[:, :, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (2i, 2i+1) of x (batch, seq, heads, head_dim) in fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (batch, seq, heads, head_dim // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
    return rotated.flatten(-2).type_as(x)


class HuginnKVCache:
    """Preallocated keys/values for every cached block pass of a batch.

    Layer slots: prelude blocks, then `num_step_slots` copies of the core blocks, then coda blocks. Recurrent step
    `s` writes core slot `s % num_step_slots`: with `num_step_slots == num_steps` each step keeps its own cache
    (exact); with fewer, later steps overwrite earlier ones and a token attends to the most recent step of the same
    slot for earlier tokens (the authors' cache sharing), so cache memory does not grow with depth.
    """

    def __init__(self, config: HuginnConfig, batch_size: int, max_length: int, num_step_slots: int,
                 dtype: torch.dtype, device: torch.device):
        self.num_prelude = config.n_layers_in_prelude
        self.num_core = config.n_layers_in_recurrent_block
        self.num_step_slots = num_step_slots
        num_layers = self.num_prelude + self.num_core * num_step_slots + config.n_layers_in_coda
        shape = (num_layers, batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # (layers, batch, heads, max_len, head_dim)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # tokens already stored; advanced by the model after a whole forward

    def prelude_layer(self, block: int) -> int:
        return block

    def core_layer(self, step: int, block: int) -> int:
        return self.num_prelude + (step % self.num_step_slots) * self.num_core + block

    def coda_layer(self, block: int) -> int:
        return self.num_prelude + self.num_step_slots * self.num_core + block

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (batch, heads, new, head_dim) at the current offset; return all keys/values up to it."""
        end = self.length + keys.shape[2]
        if end > self.keys.shape[3]:
            raise ValueError(f"KV cache holds {self.keys.shape[3]} tokens, {end} requested")
        self.keys[layer, :, :, self.length:end] = keys
        self.values[layer, :, :, self.length:end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def repeat_rows(self, times: int) -> None:
        """Every row `times` times in a row (like repeat_interleave): samples of one prompt share its prefill."""
        self.keys = self.keys.repeat_interleave(times, dim=1)
        self.values = self.values.repeat_interleave(times, dim=1)

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only the batch rows `index` (ascending), moved to the front one layer at a time, so dropping finished
        rows never holds a second cache in memory; later passes see the smaller batch."""
        for cache in (self.keys, self.values):
            for layer in range(cache.shape[0]):
                cache[layer, :len(index), :, :self.length] = cache[layer, index, :, :self.length]
        self.keys, self.values = self.keys[:, :len(index)], self.values[:, :len(index)]

    def nbytes_per_token(self) -> int:
        per_layer_token = self.keys.shape[2] * self.keys.shape[4] * self.keys.element_size() * 2  # keys + values
        return self.keys.shape[0] * per_layer_token


class HuginnAttention(nn.Module):
    def __init__(self, config: HuginnConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.Wqkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        if config.qk_bias:
            self.qk_bias = nn.Parameter(torch.zeros(2, 1, self.num_heads, self.head_dim))
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, rope, attn_mask, cache: HuginnKVCache | None, layer: int) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.Wqkv(x).view(batch, seq, 3, self.num_heads, self.head_dim).unbind(2)  # (batch, seq, heads, hd)
        if hasattr(self, "qk_bias"):
            q, k = q + self.qk_bias[0], k + self.qk_bias[1]
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (batch, heads, seq, head_dim)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, dim))


class HuginnMLP(nn.Module):
    def __init__(self, config: HuginnConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 2 * config.intermediate_size, bias=False)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class HuginnBlock(nn.Module):
    """The "sandwich" block: a norm after each residual sum as well as before each sub-layer."""

    def __init__(self, config: HuginnConfig):
        super().__init__()
        self.norm_1, self.norm_2, self.norm_3, self.norm_4 = (
            HuginnRMSNorm(config.n_embd, config.norm_eps) for _ in range(4))
        self.attn = HuginnAttention(config)
        self.mlp = HuginnMLP(config)

    def forward(self, x, rope, attn_mask, cache, layer):
        x = self.norm_2(self.attn(self.norm_1(x), rope, attn_mask, cache, layer) + x)
        return self.norm_4(self.mlp(self.norm_3(x)) + x)


# ---------------------------------------------------------------------------------------------------------------
# Recurrence control: depth sampling and initial states
# ---------------------------------------------------------------------------------------------------------------


class HuginnDepthSampler:
    """Pretraining's depth distribution: total steps ~ 1 + Poisson(LogNormal) with mean `mean_recurrence`, of which
    the last min(total, `mean_backprop_depth`) carry gradient. Own generator, so runs are reproducible and a
    checkpoint can save and restore it (`state_dict` / `load_state_dict`)."""

    sigma = 0.5

    def __init__(self, mean_recurrence: int, mean_backprop_depth: int, seed: int = 0):
        self.mean_recurrence, self.mean_backprop_depth = mean_recurrence, mean_backprop_depth
        self.generator = torch.Generator().manual_seed(seed)

    def manual_seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def sample(self) -> tuple[int, int]:
        mu = math.log(self.mean_recurrence) - self.sigma**2 / 2  # so that the lognormal's mean is mean_recurrence
        rate = torch.exp(mu + self.sigma * torch.randn((), generator=self.generator))
        total = int(torch.poisson(rate, generator=self.generator)) + 1
        with_grad = min(self.mean_backprop_depth, total)
        return total - with_grad, with_grad

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32) on int64 tensors holding values in [0, 2**32)."""
    mask = 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & mask
    x = ((x ^ (x >> 15)) * 0x846CA68B) & mask
    return x ^ (x >> 16)


def seeded_uniform(seeds: torch.Tensor, positions: torch.Tensor, width: int) -> torch.Tensor:
    """Uniform numbers in (0, 1), a pure function of (row seed, position, index < width): (*positions.shape, width),
    float64. A counter-based draw (no RNG state), so a row gets the same numbers in any batch, whole or token by
    token."""
    mask = 0xFFFFFFFF
    row = hash32(seeds.long() & mask).view(-1, *([1] * (positions.dim() - 1)))
    token = hash32(row ^ (positions.long() & mask))
    index = torch.arange(width, device=seeds.device, dtype=torch.long) * 0x9E3779B9 & mask
    return (hash32(token[..., None] ^ index).double() + 0.5) / 2**32


def seeded_truncated_normal(seeds: torch.Tensor, position_ids: torch.Tensor, dim: int) -> torch.Tensor:
    """Standard normal truncated at +-3 from `seeded_uniform` (inverse CDF): (batch, seq, dim). The initial state of
    a token is then the same whether its sequence runs whole (training, scoring) or token by token (generation),
    whatever the padding."""
    lo, hi = 0.5 * math.erfc(3 / math.sqrt(2)), 0.5 * math.erfc(-3 / math.sqrt(2))  # Phi(-3), Phi(3)
    uniform = seeded_uniform(seeds, position_ids, dim)
    return (math.sqrt(2) * torch.erfinv(2 * (lo + uniform * (hi - lo)) - 1)).float()


# Own output classes: transformers 5.x renames the cache field of its stock outputs between minor versions;
# `cache` is the HuginnKVCache a forward with `past_key_values` wrote to.
@dataclass
class HuginnModelOutput(ModelOutput):
    """`last_hidden_state` (batch, seq, n_embd) after the final norm; `latent_states`: the recurrent state after the
    last step, before `ln_f` (feed it back as `input_states`); `num_steps`: (steps without grad, steps with grad)."""

    last_hidden_state: torch.Tensor | None = None
    cache: "HuginnKVCache | None" = None
    latent_states: torch.Tensor | None = None
    num_steps: tuple[int, int] | None = None


@dataclass
class HuginnCausalLMOutput(ModelOutput):
    """`loss`: mean next-token cross entropy over supervised tokens; `logits` (batch, kept positions, vocab), fp32."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: "HuginnKVCache | None" = None
    latent_states: torch.Tensor | None = None
    num_steps: tuple[int, int] | None = None


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


class HuginnPreTrainedModel(PreTrainedModel):
    config_class = HuginnConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HuginnBlock"]
    _supports_sdpa = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`; 4-bit layers then keep bitsandbytes' plain CPU path
        (`use_plain_nf4_cpu_path`)."""
        loaded = super().from_pretrained(*args, **kwargs)
        use_plain_nf4_cpu_path(loaded[0] if isinstance(loaded, tuple) else loaded)  # (model, info) when asked
        return loaded

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The published "takase" init: std sqrt(2/(5 d)) everywhere, output projections scaled down by depth."""
        std = self.config.init_values["std"]
        out_std = std / math.sqrt(2 * (self.config.mean_recurrence * self.config.n_layers_in_recurrent_block
                                      + self.config.n_layers_in_prelude + self.config.n_layers_in_coda))
        if isinstance(module, (HuginnAttention, HuginnMLP)):
            nn.init.trunc_normal_(module.proj.weight, std=out_std, a=-3 * out_std, b=3 * out_std)
            first = module.Wqkv if isinstance(module, HuginnAttention) else module.fc
            nn.init.trunc_normal_(first.weight, std=std, a=-3 * std, b=3 * std)
            if isinstance(module, HuginnAttention) and hasattr(module, "qk_bias"):
                module.qk_bias.zero_()
        elif isinstance(module, nn.Embedding):
            emb_std = self.config.init_values["embedding"]
            nn.init.trunc_normal_(module.weight, std=emb_std, a=-3 * emb_std, b=3 * emb_std)
        elif isinstance(module, HuginnRMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, HuginnModel):
            nn.init.trunc_normal_(module.adapter.weight, std=std, a=-3 * std, b=3 * std)


class HuginnModel(HuginnPreTrainedModel):
    """The backbone: embedding, prelude, recurrent core, coda and final norm; returns normalised hidden states."""

    def __init__(self, config: HuginnConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.prelude = nn.ModuleList(HuginnBlock(config) for _ in range(config.n_layers_in_prelude))
        self.adapter = nn.Linear(2 * config.n_embd, config.n_embd, bias=config.bias)
        self.core_block = nn.ModuleList(HuginnBlock(config) for _ in range(config.n_layers_in_recurrent_block))
        self.coda = nn.ModuleList(HuginnBlock(config) for _ in range(config.n_layers_in_coda))
        self.ln_f = HuginnRMSNorm(config.n_embd, config.norm_eps)
        self.gradient_checkpointing = False
        self.depth_sampler = HuginnDepthSampler(config.mean_recurrence, config.mean_backprop_depth)
        self.default_num_steps, self.default_state_seed = None, None  # see `recurrence_defaults`
        self.post_init()

    @contextmanager
    def recurrence_defaults(self, num_steps=None, state_seed: int | None = None):
        """Within the block, forwards (and `generate`) that pass no `num_steps` use this depth instead of sampling
        one, and ones that pass no `state_seeds` start every row from the noise of `state_seed`. For trainers
        that call the model through generic code (TRL): they fix the depth and initial state of a phase."""
        previous = self.default_num_steps, self.default_state_seed
        self.default_num_steps, self.default_state_seed = num_steps, state_seed
        try:
            yield self
        finally:
            self.default_num_steps, self.default_state_seed = previous

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def resolve_num_steps(self, num_steps) -> tuple[int, int]:
        """(steps without grad, steps with grad) from an int, a pair, a tensor, or None (the default set by
        `recurrence_defaults`, else sampled when training and `mean_recurrence` in eval)."""
        num_steps = self.default_num_steps if num_steps is None else num_steps
        if num_steps is None:
            if self.training:
                return self.depth_sampler.sample()
            return 0, self.config.mean_recurrence
        if isinstance(num_steps, torch.Tensor):
            num_steps = num_steps.tolist()
        if isinstance(num_steps, int):
            return 0, num_steps
        no_grad, with_grad = (int(n) for n in num_steps)
        return no_grad, with_grad

    def initial_state(self, embedded, position_ids, init_state: str, state_seeds) -> torch.Tensor:
        """The state the recurrence starts from: "random" as published (std * embed_scale, truncated at 3 std;
        per-row reproducible when `state_seeds` (batch,) are given) or "zero"."""
        if init_state == "zero":
            return torch.zeros_like(embedded)
        if init_state != "random":
            raise ValueError(f"init_state must be 'random' or 'zero', got {init_state!r}")
        if state_seeds is None and self.default_state_seed is not None:
            state_seeds = torch.full(embedded.shape[:1], self.default_state_seed, device=embedded.device)
        if state_seeds is not None:
            noise = seeded_truncated_normal(state_seeds.to(embedded.device), position_ids, embedded.shape[-1])
        else:
            noise = nn.init.trunc_normal_(torch.empty(embedded.shape, device=embedded.device), a=-3.0, b=3.0)
        scale = self.config.init_values["std"] * self.config.init_values["embed_scale"]
        return (noise * scale).to(embedded.dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations run in: the frozen prelude norms'. A trained copy of wte (a PEFT module to save, kept
        in fp32 for the optimizer) would otherwise send fp32 activations into bf16 Linears."""
        return self.prelude[0].norm_1.weight.dtype

    # The three stages of a forward. HuginnModel.forward and generation.HuginnEngine's decode phases both run them,
    # so the recurrence has one implementation. Shapes: (batch, seq, n_embd); rope and attn_mask as in forward.

    def prelude_pass(self, inputs_embeds, rope, attn_mask, cache) -> torch.Tensor:
        """Scaled embeddings through the prelude blocks: the input `embedded` that every recurrent step re-reads."""
        x = (inputs_embeds * self.config.init_values["embed_scale"]).to(self.compute_dtype)
        for block_idx, block in enumerate(self.prelude):
            x = block(x, rope, attn_mask, cache, cache.prelude_layer(block_idx) if cache is not None else 0)
        return x

    def coda_pass(self, state, rope, attn_mask, cache) -> torch.Tensor:
        """The final recurrent state, normalised, through the coda blocks and the final norm again."""
        x = self.ln_f(state)
        for block_idx, block in enumerate(self.coda):
            x = block(x, rope, attn_mask, cache, cache.coda_layer(block_idx) if cache is not None else 0)
        return self.ln_f(x)

    def core_step(self, state, embedded, rope, attn_mask, cache, step: int) -> torch.Tensor:
        """One recurrent step: the adapter mixes state and input, then the core blocks (cache slot of `step`)."""
        state = self.adapter(torch.cat([state, embedded], dim=-1))
        for block_idx, block in enumerate(self.core_block):
            layer = cache.core_layer(step, block_idx) if cache is not None else 0
            state = block(state, rope, attn_mask, cache, layer)
        return state

    def recur(self, state, embedded, rope, attn_mask, cache, steps_no_grad: int, steps_with_grad: int,
              readout_steps: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The heart of Huginn: apply the core `steps_no_grad + steps_with_grad` times; only the last
        `steps_with_grad` steps are recorded for backprop (truncated BPTT), each checkpointed when enabled. Returns the
        final state and the states after each of `readout_steps` (counts of steps done), in that order."""
        kept = {}
        with torch.no_grad():
            for step in range(steps_no_grad):
                state = self.core_step(state, embedded, rope, attn_mask, cache, step)
                if step + 1 in readout_steps:
                    kept[step + 1] = state
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for step in range(steps_no_grad, steps_no_grad + steps_with_grad):
            if checkpointed:  # keep only the step's input; recompute its blocks in backward
                state = checkpoint(self.core_step, state, embedded, rope, attn_mask, cache, step, use_reentrant=False)
            else:
                state = self.core_step(state, embedded, rope, attn_mask, cache, step)
            if step + 1 in readout_steps:
                kept[step + 1] = state
        return state, [kept[step] for step in readout_steps]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: HuginnKVCache | None = None,
        use_cache: bool | None = None,
        num_steps: int | tuple[int, int] | None = None,
        input_states: torch.Tensor | None = None,
        init_state: str = "random",
        state_seeds: torch.LongTensor | None = None,
        readout_steps: tuple[int, ...] | None = None,
        **kwargs,
    ) -> HuginnModelOutput:
        """input_ids (batch, seq); attention_mask (batch, past + seq), 1 = real token, any padding side, or a boolean
        (batch, 1, seq, past + seq) matrix of the keys each query may see (e.g. packed sequences; needs position_ids);
        num_steps: int n (n steps), (no_grad, with_grad), or None (sampled in training, mean_recurrence in eval);
        input_states (batch, seq, n_embd) starts the recurrence instead of `init_state` ("random" or "zero");
        readout_steps: earlier steps (each below the depth) whose states also go through the coda: last_hidden_state
        is then (len(readout_steps) + 1) * batch rows, the read-out after readout_steps[i] in rows
        [i * batch, (i + 1) * batch) and the final one last (depth-aware GRPO scores them all in one forward)."""
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        batch, seq = inputs_embeds.shape[:2]
        cache = past_key_values if use_cache is not False else None
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, batch, past, seq, inputs_embeds.device)
        rope = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_base)
        attn_mask = build_attention_mask(attention_mask, past, seq, inputs_embeds.device)

        embedded = self.prelude_pass(inputs_embeds, rope, attn_mask, cache)
        state = input_states if input_states is not None else self.initial_state(
            embedded, position_ids, init_state, state_seeds)
        steps = self.resolve_num_steps(num_steps)
        readout_steps = tuple(readout_steps or ())
        if readout_steps and (cache is not None or not all(0 < k < sum(steps) for k in readout_steps)):
            raise ValueError(f"readout_steps {readout_steps}: each must lie in [1, {sum(steps) - 1}] (the depth is "
                             f"{sum(steps)}), without a KV cache")
        state, earlier = self.recur(state.to(embedded.dtype), embedded, rope, attn_mask, cache, *steps, readout_steps)
        x = self.coda_pass(state, rope, attn_mask, cache)
        if earlier:
            x = torch.cat([*(self.coda_pass(s, rope, attn_mask, cache) for s in earlier), x])
        if cache is not None:
            cache.length += seq
        self.last_num_steps = steps  # read by training callbacks that log the sampled depth
        return HuginnModelOutput(last_hidden_state=x, cache=cache, latent_states=state, num_steps=steps)


def default_position_ids(attention_mask, batch: int, past: int, seq: int, device) -> torch.LongTensor:
    """Positions count real tokens only, so a left-padded row gets the positions it has when run alone."""
    if attention_mask is not None and attention_mask.dim() == 4:
        raise ValueError("a 4D attention_mask (which keys each query sees) needs explicit position_ids")
    if attention_mask is None:
        return torch.arange(past, past + seq, device=device).expand(batch, seq)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]


def build_attention_mask(attention_mask, past: int, seq: int, device) -> torch.Tensor | None:
    """Boolean (batch, 1, seq, past + seq) mask: causal and not padding. None means plain causal attention, used
    when nothing is padded or padding is only on the right of an uncached batch (real tokens never see it)."""
    if attention_mask is None:
        return None if past == 0 else torch.ones(1, 1, seq, past + seq, dtype=torch.bool, device=device)
    if attention_mask.dim() == 4:  # already the matrix
        if tuple(attention_mask.shape[-2:]) != (seq, past + seq):
            raise ValueError(
                f"4D attention_mask {tuple(attention_mask.shape)}: expected (batch, 1, {seq}, {past + seq})")
        return attention_mask.bool()
    keys_valid = attention_mask.bool()  # (batch, past + seq)
    if past == 0 and not (keys_valid[:, 1:] & ~keys_valid[:, :-1]).any():  # no real token after a pad: right padding
        return None
    query_pos = torch.arange(past, past + seq, device=device)[:, None]
    key_pos = torch.arange(past + seq, device=device)[None, :]
    allowed = (key_pos <= query_pos)[None] & keys_valid[:, None, :]  # (batch, seq, past + seq)
    allowed = allowed | (key_pos == query_pos)[None]  # a pad query sees itself, so softmax never gets an empty row
    return allowed[:, None]


def chunked_causal_lm_loss(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor,
                           num_items_in_batch=None, chunk_tokens: int = 1024) -> torch.Tensor:
    """Next-token cross entropy over supervised tokens (labels != -100, shifted here), mean over them (or sum /
    `num_items_in_batch` when the trainer counts tokens across accumulation steps).

    Only supervised positions go through the head, `chunk_tokens` at a time, each chunk checkpointed: the
    fp32 logits of at most one chunk ever exist, in forward and in backward."""
    shifted = labels[:, 1:].to(hidden.device)
    keep = shifted != -100
    states, targets = hidden[:, :-1][keep], shifted[keep]  # (tokens, n_embd), (tokens,)
    total = hidden.new_zeros((), dtype=torch.float32) + 0.0 * hidden.sum()  # stays in the graph with no targets

    def chunk_nll(h, y):
        return F.cross_entropy(lm_head(h).float(), y, reduction="sum")

    for start in range(0, targets.numel(), chunk_tokens):
        h, y = states[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        total = total + (checkpoint(chunk_nll, h, y, use_reentrant=False) if h.requires_grad else chunk_nll(h, y))
    denominator = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
    return total / denominator


class HuginnForCausalLM(HuginnPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: HuginnConfig):
        super().__init__(config)
        self.transformer = HuginnModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # The published state dict holds the RoPE table; we keep the key so checkpoints round-trip, but compute the
        # angles from positions in fp32 (a bf16 load would round the table; padded rows need per-row positions).
        self.register_buffer("freqs_cis", self._rope_table(), persistent=True)
        self.post_init()

    def _rope_table(self) -> torch.Tensor:
        cos, sin = rotary_cos_sin(torch.arange(self.config.block_size)[None], self.config.head_dim,
                                  self.config.rope_base)
        return torch.stack([cos, sin], dim=-1)  # (1, block_size, 1, head_dim // 2, 2)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: HuginnKVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        num_steps: int | tuple[int, int] | None = None,
        input_states: torch.Tensor | None = None,
        init_state: str = "random",
        state_seeds: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_logits: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> HuginnCausalLMOutput:
        """labels (batch, seq): the targets aligned with input_ids (shifted inside); -100 is not supervised; loss is
        the mean over supervised tokens. With labels, logits are not built unless `return_logits=True` (the loss
        never needs the full (batch, seq, vocab) tensor). `logits_to_keep`: last k positions (0 = all) or indices."""
        out = self.transformer(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, past_key_values=past_key_values, use_cache=use_cache,
            num_steps=num_steps, input_states=input_states, init_state=init_state, state_seeds=state_seeds,
        )
        hidden = out.last_hidden_state
        loss = None
        if labels is not None:
            loss = chunked_causal_lm_loss(hidden, self.lm_head, labels, num_items_in_batch)
        logits = None
        if return_logits or (return_logits is None and labels is None):
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep]).float()
        return HuginnCausalLMOutput(loss=loss, logits=logits, cache=out.cache,
                                    latent_states=out.latent_states, num_steps=out.num_steps)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        num_steps: int | tuple[int, int] | None = None,
        kv_cache_slots: int | None = None,
        init_state: str = "random",
        state_seeds: torch.LongTensor | None = None,
        generator: torch.Generator | None = None,
        num_return_sequences: int = 1,
        **kwargs,
    ) -> "torch.LongTensor | HuginnGenerateOutput":
        """Cached, batched decoding of (left-)padded prompts; returns (batch, prompt + new) token ids, rows padded
        with pad_token_id after their end (with `return_dict_in_generate=True`: also each new token's
        log-probability at the sampling temperature). Greedy unless `do_sample`; `temperature`, `top_k`, `top_p`,
        `max_new_tokens` and `eos_token_id` (an int or a list: generation stops on any) come from
        `generation_config` or kwargs. `num_steps` recurrent steps per token (default: `recurrence_defaults`, else
        `mean_recurrence`; never sampled); `kv_cache_slots` k < num_steps (an argument or a generation-config
        attribute) shares core cache slots across steps (slot = step mod k). `num_return_sequences` n: n rows per
        prompt, consecutive, from one prefill of the prompt (its initial state and cache copied)."""
        config = _merge_generation_config(generation_config or self.generation_config, kwargs)
        kv_cache_slots = kv_cache_slots or getattr(config, "kv_cache_slots", None)  # e.g. from TRL generation_kwargs
        if num_steps is None:
            num_steps = self.transformer.default_num_steps or self.config.mean_recurrence
        steps = self.transformer.resolve_num_steps(num_steps)
        batch, prompt_len = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        eos_ids = torch.tensor(_as_list(config.eos_token_id), device=input_ids.device)
        pad_id = config.pad_token_id if config.pad_token_id is not None else int(eos_ids[0])
        warpers = sampling_warpers(config.temperature, config.top_k, config.top_p)
        temperature = config.temperature if config.do_sample and config.temperature else 1.0
        cache = HuginnKVCache(self.config, batch, prompt_len + config.max_new_tokens,
                              min(kv_cache_slots or sum(steps), sum(steps)), self.transformer.wte.weight.dtype,
                              input_ids.device)
        step_kwargs = dict(past_key_values=cache, use_cache=True, num_steps=steps, init_state=init_state,
                           state_seeds=state_seeds, logits_to_keep=1)
        logits = self(input_ids, attention_mask=attention_mask, **step_kwargs).logits[:, -1]
        if num_return_sequences > 1:
            cache.repeat_rows(num_return_sequences)
            input_ids, attention_mask, logits = (t.repeat_interleave(num_return_sequences, dim=0)
                                                 for t in (input_ids, attention_mask, logits))
            if state_seeds is not None:
                step_kwargs["state_seeds"] = state_seeds.repeat_interleave(num_return_sequences)
            batch *= num_return_sequences
        new_tokens = input_ids.new_full((batch, config.max_new_tokens), pad_id)
        scored = config.return_dict_in_generate  # only then: a log-softmax over the vocabulary per token and row
        logprobs = torch.zeros(batch, config.max_new_tokens if scored else 0, device=input_ids.device)
        rows = torch.arange(batch, device=input_ids.device)  # rows still decoding, in the order the cache holds them
        for position in range(config.max_new_tokens):
            if config.do_sample:
                probs = warpers(None, logits).softmax(-1)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                token = logits.argmax(-1)
            new_tokens[rows, position] = token
            if scored:  # at the sampling temperature, as TRL scores tokens in the loss (top-k/top-p left out there)
                logprobs[rows, position] = (logits / temperature).log_softmax(-1).gather(1, token[:, None]).squeeze(1)
            running = ~torch.isin(token, eos_ids)
            if not bool(running.any()) or position + 1 == config.max_new_tokens:
                break
            if not bool(running.all()):  # finished rows leave the batch: decoding them further is wasted compute
                keep = running.nonzero().squeeze(1)
                cache.keep_rows(keep)
                rows, token, attention_mask = rows[keep], token[keep], attention_mask[keep]
                if step_kwargs["state_seeds"] is not None:
                    step_kwargs["state_seeds"] = step_kwargs["state_seeds"][keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
            logits = self(token[:, None], attention_mask=attention_mask, **step_kwargs).logits[:, -1]
        new_tokens, logprobs = new_tokens[:, :position + 1], logprobs[:, :position + 1]
        sequences = torch.cat([input_ids, new_tokens], dim=1)
        if config.return_dict_in_generate:
            return HuginnGenerateOutput(sequences=sequences, logprobs=logprobs)
        return sequences


@dataclass
class HuginnGenerateOutput(ModelOutput):
    """`sequences` (batch, prompt + new); `logprobs` (batch, new): log p(token) at the sampling temperature (1 when
    greedy), before top-k / top-p."""

    sequences: torch.LongTensor | None = None
    logprobs: torch.Tensor | None = None


def _as_list(value) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _merge_generation_config(base: GenerationConfig, overrides: dict) -> GenerationConfig:
    config = GenerationConfig(**{**base.to_dict(), **overrides})
    if config.max_new_tokens is None:
        config.max_new_tokens = 256
    if config.eos_token_id is None:
        raise ValueError("generation needs eos_token_id (Huginn stops on <|end_text|> and <|end_turn|>)")
    return config


def sampling_warpers(temperature: float | None, top_k: int | None, top_p: float | None) -> LogitsProcessorList:
    """transformers' logits warpers for sampling; the identity ones are left out."""
    warpers = LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


AutoConfig.register("huginn_raven", HuginnConfig, exist_ok=True)
AutoModel.register(HuginnConfig, HuginnModel, exist_ok=True)
AutoModelForCausalLM.register(HuginnConfig, HuginnForCausalLM, exist_ok=True)
