"""GRPO reinforcement learning of huginn-0125 (QLoRA) with answer-correctness rewards, on TRL's GRPOTrainer.

    # tiny offline default, CPU (starts from the tiny SFT adapter when present, else from the base)
    python train_grpo.py --config configs/grpo_tiny.yaml
    # huginn-0125 on one 80 GB or one 24 GB GPU, from the SFT adapter of the same recipe
    python train_grpo.py --config configs/grpo_huginn_80gb.yaml --sft_adapter outputs/sft-huginn-80gb
    python train_grpo.py --config configs/grpo_huginn_24gb.yaml --sft_adapter outputs/sft-huginn-24gb
    # several GPUs
    accelerate launch --config_file configs/accelerate_ddp.yaml train_grpo.py --config configs/grpo_huginn_24gb.yaml \
        --sft_adapter outputs/sft-huginn-multigpu

How this departs from GRPO as published (DeepSeekMath, then DeepSeek-R1-Zero):
- Depth is part of the policy. Each generation round draws one recurrence depth from `rollout_num_steps`
  (default: always 32); the rollout and every later log-probability of its sequences use that depth, with
  gradient through the last `backprop_steps` recurrent steps only (truncated backprop, as in pretraining).
- The initial latent state is random as in pretraining but seeded (`state_seed`): a token's initial state is a
  function of the seed and its position, identical in the rollout and in the loss, so the importance ratio is
  exactly 1 before the first update. Exploration comes from sampling, not from the state noise.
- The KL reference (`beta > 0`): from `--sft_adapter`, the SFT policy (TRL keeps a frozen copy of the adapter, a
  few MB, as its "ref" adapter); from a fresh LoRA, the base model with the adapter disabled.
- Rollouts decode with generation.HuginnEngine (continuous batching, a group's samples share their prompt's
  prefill, CUDA graphs on GPU), from a dense copy of the policy (LoRA merged, NF4 dequantized) when it fits in
  memory, and return their own per-token log-probs. Where rollouts only approximate the trained forward (shared
  KV slots, `generation_kwargs: {kv_cache_slots: k}`), each token's loss is weighted by p_trained / p_sampler,
  capped (TRL's truncated importance sampling, its `vllm_importance_sampling_*` knobs); the mismatch is logged
  (sampling/kl). The loss packs a group's samples into one row that computes their prompt once
  (`pack_shared_prompts`). `rollout_sampler: diffusion` rolls out by diffusion forcing instead (positions recur
  together, fewer sequential block passes), an approximate sampler corrected the same way.
- The policy has no dropout: rollouts sample, and the loss scores, one deterministic policy (an SFT adapter's
  `lora_dropout` is switched off). Trainable weights stay fp32 under an NF4 base (TRL would cast them to bf16).
- Loss and advantage defaults are TRL's (`loss_type: dapo`-style token-level normalisation, group-scaled
  rewards); `beta: 0.0` by default as in DAPO / Dr. GRPO, set it > 0 for the KL term.
- Depth credit (`depth_credit_fractions`, off by default): GRPO credits only the distribution read out after the
  last recurrent step. With depth credit the loss also scores every completion token read out (coda and head) from
  the states after earlier steps, with the same advantages, weighted by `depth_credit_weights` relative to the
  final read-out's 1. Those tokens were sampled from the final read-out, so the earlier terms are not the policy
  gradient of the earlier read-outs' own reward (that would need their ratio to the final read-out, p_k / p_final,
  whose variance at shallow depths is unbounded): they carry the final read-out's importance ratio, clipping and
  sampler weight, and push the earlier read-outs toward the group's above-average completions and away from its
  below-average ones. The KL term (beta > 0) reaches them the same way. The loss value reported is the final
  read-out's. A read-out before the backprop window trains only what comes after the recurrence (coda, norm,
  head): set `backprop_steps` to cover the credited steps.
- Rewards: math-verify correctness (1/0) plus a small format reward; optionally `step_saving`, a bonus for a right
  answer in fewer recurrent steps, with rollouts that decode with adaptive exit (`rollout_exit_threshold`: an
  approximate sampler, corrected as above). A reward function that raises or times out gives that completion 0 and
  a counted warning instead of stopping the run.
"""

import itertools
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from peft import PeftModel
from peft.utils.other import _set_trainable  # private: fenced, see training.LIBRARY_INTERNALS
from transformers import set_seed
from trl import GRPOConfig, GRPOTrainer, ModelConfig
from trl.models import unwrap_model_for_generation

import data
import rewards
from generation import DiffusionSettings, HuginnEngine, pick_generation_model
from training import (
    SafeTrainerMixin,
    SafetyArguments,
    huginn_backbone,
    load_model,
    lora_config,
    parse_args,
    setup_logging,
    train_and_save,
)

logger = logging.getLogger(__name__)
# The RMSNorm in front of the tied LM head: its gain alone sets the logits' scale, which LoRA cannot change (the
# norm undoes any growth of the hidden state), so sharpening the sampling distribution needs it trained.
FINAL_NORM = "ln_f"
REWARD_FAILURES: dict[str, int] = {}  # reward function name -> completions scored 0 because it raised


@dataclass
class ScriptArguments(SafetyArguments):
    dataset_name: list[str] = field(
        default_factory=lambda: ["openai/gsm8k"],
        metadata={"help": "prompt sources: hub ids, local files in their schemas, or tiny:<name>; concatenated"})
    dataset_split: str | None = field(default=None, metadata={"help": "split of every hub source (default: train)"})
    max_samples: int | None = field(
        default=None, metadata={"help": "usable prompts taken from each source; unset: as many as max_steps draws"})
    system_prompt: str = field(default=data.SYSTEM_PROMPT, metadata={"help": "'' for none; match SFT and evaluate.py"})
    sft_adapter: str | None = field(default=None, metadata={"help": "LoRA adapter dir to start from (train_sft.py)"})
    rollout_num_steps: list[int] = field(
        default_factory=lambda: [32], metadata={"help": "recurrent depths; each generation round draws one"})
    backprop_steps: int = field(default=8, metadata={"help": "last recurrent steps that carry gradient"})
    state_seed: int = field(default=0, metadata={"help": "seed of the initial latent state (rollout = loss)"})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["correctness", "format"],
        metadata={"help": "from correctness, format, length_penalty, step_saving; weights: reward_weights"})
    length_penalty_margin: int = field(
        default=64, metadata={"help": "length_penalty falls from 0 to -1 over the last this many tokens"})
    rollout_batch_size: int | None = field(
        default=None, metadata={"help": "completions decoded at once (default: all of a round's); lower caps the "
                                       "rollout KV cache's memory, continuous batching keeps the rows busy"})
    rollout_sampler: str = field(
        default="sequential", metadata={"help": "sequential, or diffusion: diffusion forcing (generation."
                                       "DiffusionSettings, knobs not set here at their defaults), positions recurring "
                                       "together; its log-probs go through the same sampler-mismatch correction"})
    rollout_diffusion_inner_steps: int = field(default=4, metadata={"help": "diffusion: recurrent steps per wave"})
    rollout_diffusion_max_wavefront: int = field(
        default=16, metadata={"help": "diffusion: positions of a completion recurring together, at most"})
    depth_credit_fractions: list[float] = field(
        default_factory=list, metadata={"help": "depth-aware GRPO: the loss also scores each completion read out "
                                        "after these fractions of the round's depth (0.125 0.25 0.5 at 8 steps: after "
                                        "steps 1, 2 and 4), with the same advantages; empty: plain GRPO"})
    depth_credit_weights: list[float] = field(
        default_factory=list, metadata={"help": "weight of each earlier read-out's term, relative to the final "
                                        "read-out's 1 (one per fraction)"})
    rollout_exit_threshold: float | None = field(
        default=None, metadata={"help": "rollouts decode with adaptive exit at this KL threshold (HuginnEngine's "
                                        "exit_threshold; the reward functions get each completion's mean_steps_used); "
                                        "needs vllm_importance_sampling_correction"})
    final_norm_learning_rate: float = field(
        default=0.0, metadata={"help": "> 0: also train the final RMSNorm's gain (transformer.ln_f, saved with the "
                                       "adapter) at this rate: the one weight that sets the logits' scale"})


class HuginnGRPOTrainer(SafeTrainerMixin, GRPOTrainer):
    """GRPOTrainer with Huginn's recurrence fixed per generation round (depth and initial-state seed), rollouts that
    return their own per-token log-probabilities for TRL's sampler-mismatch correction, a policy without dropout,
    the interruption safety of training.py, and the rollout/train time split logged. The TRL methods it overrides
    are listed in training.LIBRARY_INTERNALS."""

    def __init__(self, *args, rollout_num_steps: list[int], backprop_steps: int, state_seed: int,
                 final_norm_learning_rate: float = 0.0, rollout_batch_size: int | None = None,
                 rollout_diffusion: DiffusionSettings | None = None,
                 depth_credit: dict[float, float] | None = None, rollout_exit_threshold: float | None = None,
                 **kwargs):
        self.depth_credit = check_depth_credit(depth_credit or {})
        self.credit: dict[int, float] = {}  # read-out step -> weight, set only around the policy's loss forward
        for depth in rollout_num_steps if rollout_diffusion is not None else []:
            rollout_diffusion.check_depth(depth)
        self.rollout_diffusion = rollout_diffusion
        self.final_norm_learning_rate = final_norm_learning_rate
        super().__init__(*args, **kwargs)
        self.rollout_num_steps, self.backprop_steps, self.state_seed = rollout_num_steps, backprop_steps, state_seed
        self.rollout_batch_size, self.rollout_exit_threshold = rollout_batch_size, rollout_exit_threshold
        self.rollout_steps_used: list[float] = []  # of the current round's completions: mean steps per token
        if rollout_exit_threshold is not None and not self.vllm_importance_sampling_correction:
            raise ValueError("rollout_exit_threshold: rollouts then sample tokens from their exit step's read-out, "
                             "not the loss's full-depth forward; set vllm_importance_sampling_correction: true")
        self.rollout_seconds, self.loss_tokens = 0.0, 0  # of the current training step, for the time split
        if self.args.use_vllm:
            raise ValueError("use_vllm: vLLM has no Huginn model; rollouts decode with the model itself")
        if self.min_p is not None or self.repetition_penalty != 1.0:
            raise ValueError(f"min_p ({self.min_p}) and repetition_penalty ({self.repetition_penalty}): the rollout "
                             "engine samples with temperature, top_k and top_p only")
        # TRL corrects for a sampler that differs from the trained forward (truncated importance sampling over the
        # sampler's own log-probs, and its mismatch metrics) only on its vLLM path, which it recognises by
        # `use_vllm`. Our rollouts are such a sampler (shared KV slots approximate the exact forward) and
        # `_generate_single_turn` below replaces the one vLLM call, so the correction is TRL's own code. Where TRL
        # reads the flag: training.USE_VLLM_READERS (fenced by tests/test_library_fence.py).
        self.use_vllm = True
        disable_lora_dropout(self.model)  # after TRL made its "ref" adapter, a copy of the SFT adapter's config
        if self.args.learning_rate == 0:  # the LoRA is held: computing its gradients would be wasted work
            for name, parameter in self.model.named_parameters():
                parameter.requires_grad_(parameter.requires_grad and f".{FINAL_NORM}." in name)
        if not any(parameter.requires_grad for parameter in self.model.parameters()):
            raise ValueError("nothing to train: learning_rate is 0 and final_norm_learning_rate is 0")

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with the final norm's gain (when trained) in a group of its own rate: one gain
        per channel near 1 needs a far larger step than LoRA's entries to move the logits' scale."""
        optimizer = super().create_optimizer(model)
        norm_rate = self.final_norm_learning_rate
        norm = [p for name, p in self.model.named_parameters() if p.requires_grad and f".{FINAL_NORM}." in name]
        if norm_rate > 0 and norm:
            ids, settings = {id(p) for p in norm}, dict(optimizer.param_groups[0])
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in ids]
            optimizer.param_groups = [group for group in optimizer.param_groups if group["params"]]
            optimizer.add_param_group({**settings, "params": norm, "lr": norm_rate, "weight_decay": 0.0})
        return optimizer

    def round_depth(self) -> int:
        """A pure function of seed and step, so a resumed run draws the depths an uninterrupted run would."""
        return random.Random(f"{self.args.seed}/{self.state.global_step}").choice(self.rollout_num_steps)

    def recurrence(self, depth: int):
        """Depth and initial state of every forward and generate call in the block (rollout, old/ref and new
        log-probabilities alike); gradient through the last `backprop_steps` steps."""
        with_grad = min(self.backprop_steps, depth)
        return huginn_backbone(self.model).recurrence_defaults((depth - with_grad, with_grad), self.state_seed)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """Completions (up to and including their first stop token) and each token's log-probability at the sampling
        temperature, decoded by generation.HuginnEngine at the round's depth and initial state: continuous batching
        over the round's prompts x generations (a prompt's samples share its prefill), one KV slot per step (exact)
        unless `generation_kwargs: {kv_cache_slots: k}`. Sampling seeds are a function of seed, step and process,
        so a resumed run samples what an uninterrupted one would. The engine lives for one round: its KV cache is
        freed before the loss runs."""
        config, backbone = self.generation_config, huginn_backbone(self.model)
        depth = sum(backbone.resolve_num_steps(None))  # the round's, from `recurrence`
        slots = min(getattr(config, "kv_cache_slots", None) or depth, depth)
        draw = random.Random(f"{self.args.seed}/{self.state.global_step}/{self.accelerator.process_index}/"
                             f"{self.model.training}")
        sampling_seeds = [draw.getrandbits(31) for _ in prompt_ids]
        with unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs) as model:
            rows = min(len(prompt_ids), self.rollout_batch_size or len(prompt_ids))
            max_length = max(map(len, prompt_ids)) + self.max_completion_length
            # A dense copy (LoRA merged, NF4 dequantized) in the dtype the frozen weights compute in, when it fits
            # in memory: building it once per round costs less than the adapter's extra matmuls (and NF4's
            # dequantization) in every block pass of every token. It matches the model to rounding (tested).
            sampler = pick_generation_model(model, rows, max_length, slots, dtype=backbone.compute_dtype)
            engine = HuginnEngine(sampler, max_batch_size=rows, kv_cache_slots=slots, max_length=max_length,
                                  exit_threshold=self.rollout_exit_threshold, diffusion=self.rollout_diffusion)
            try:
                result = engine.generate(prompt_ids, num_steps=depth, max_new_tokens=self.max_completion_length,
                                         eos_token_ids=self.eos_token_ids, do_sample=True,
                                         temperature=config.temperature, top_p=config.top_p, top_k=config.top_k or 0,
                                         state_seeds=[self.state_seed] * len(prompt_ids),
                                         sampling_seeds=sampling_seeds)
            finally:
                engine.close()
        self.rollout_steps_used = [sum(steps) / max(len(steps), 1) for steps in result.steps_used]
        return result.tokens, result.logprobs

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's, with each completion's recurrence among the reward functions' keyword arguments: `mean_steps_used`
        (recurrent steps per token; below the depth only with adaptive exit) and `rollout_num_steps` (the round's
        depth)."""
        depth = sum(huginn_backbone(self.model).resolve_num_steps(None))
        inputs = [{**row, "mean_steps_used": steps, "rollout_num_steps": depth}
                  for row, steps in zip(inputs, self.rollout_steps_used, strict=True)]
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    def _generate_and_score_completions(self, inputs):
        depth, start = self.round_depth(), time.perf_counter()
        with self.recurrence(depth):
            output = super()._generate_and_score_completions(inputs)
        seconds = time.perf_counter() - start
        self.rollout_seconds += seconds
        mode = "train" if self.model.training else "eval"
        completion_tokens = self.accelerator.gather(output["completion_mask"].sum()).sum().item()
        self._metrics[mode]["rollout/seconds"].append(seconds)
        self._metrics[mode]["rollout/tokens_per_second"].append(completion_tokens / seconds)
        self._metrics[mode]["rollout/num_steps"].append(depth)
        if self.rollout_exit_threshold is not None:  # recurrent steps per token with adaptive exit (this process's)
            steps = self.rollout_steps_used
            self._metrics[mode]["rollout/mean_steps_used"].append(sum(steps) / max(len(steps), 1))
        if "old_per_token_logps" in output:  # the sampler-mismatch correction ran
            self._metrics[mode]["sampling/kl"].append(self.accelerator.gather(sampler_kl(output)).mean().item())
        # travels with the rows through TRL's shuffling and splitting into micro-batches
        output["rollout_num_steps"] = torch.full((len(output["prompt_ids"]),), depth)
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.loss_tokens += (inputs["prompt_mask"].sum() + inputs["completion_mask"].sum()).item()
        depth = int(inputs["rollout_num_steps"][0])
        self.credit = credit_steps(self.depth_credit, depth)
        try:
            with self.recurrence(depth):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self.credit = {}

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        """TRL's per-token log-probs (and entropies) of the completions, (batch, logits_to_keep), computed on packed
        rows (`pack_shared_prompts`): a prompt's samples share one pass over it and completions carry no padding.
        Each of TRL's three forwards (loss, KL reference, sampler scoring) goes through here.

        With depth credit (in the loss forward only: `self.credit`), the same forward also reads out the states after
        the credited steps, and the log-probs returned are the final read-out's plus, per credited step k,
        w_k * (logp_k - logp_k.detach()): the same values (so TRL's ratios, clipping, KL and metrics are the final
        read-out's), and the gradient of TRL's loss gains w_k times that loss's gradient through read-out k."""
        if compute_aux_loss or any(value is not None for value in multimodal.values()):  # not a Huginn input
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **multimodal)
        rows = len(input_ids)
        chunk_rows = rows if batch_size is None else batch_size  # TRL's memory bound: samples per forward
        logps, entropies, mode = [], [], "train" if self.model.training else "eval"
        for start in range(0, rows, chunk_rows):
            end = min(start + chunk_rows, rows)
            readouts, entropy = self.readout_logps(model, input_ids[start:end], attention_mask[start:end],
                                                   logits_to_keep, tuple(self.credit))
            final = readouts.pop()
            logps.append(final + sum(weight * (logp - logp.detach())
                                     for weight, logp in zip(self.credit.values(), readouts, strict=True)))
            if compute_entropy:
                entropies.append(entropy)
            for step, logp in zip(self.credit, readouts, strict=True):  # training curves of the earlier read-outs
                scored = logp.detach()[attention_mask[start:end, -logits_to_keep:].bool()]
                self._metrics[mode][f"depth_credit/logp_step_{step}"].append(scored.mean().item())
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

    def readout_logps(self, model, input_ids, attention_mask, logits_to_keep: int, readout_steps: tuple[int, ...]):
        """Per-token log-probs (batch, logits_to_keep) of the completions read out after each of `readout_steps`
        and, last, after the full depth, from one forward over packed rows (`pack_shared_prompts`): a list, and the
        final read-out's entropies. The earlier read-outs come from the same recurrence (HuginnModel's
        `readout_steps`), so each costs one more coda and head pass, not a forward."""
        packed = pack_shared_prompts(input_ids, attention_mask, logits_to_keep, self.processing_class.pad_token_id)
        extra = {"readout_steps": readout_steps} if readout_steps else {}
        with self.accelerator.autocast():  # the read-outs are stacked on the batch dimension: labels repeated
            outputs = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                            position_ids=packed.position_ids, labels=packed.labels.repeat(len(readout_steps) + 1, 1),
                            fused_lm_head=True, **extra)
        readouts = [packed.unpack(logp) for logp in outputs.log_probs.chunk(len(readout_steps) + 1)]
        entropy = outputs.entropy.chunk(len(readout_steps) + 1)[-1] if outputs.entropy is not None else None
        return readouts, None if entropy is None else packed.unpack(entropy)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Logs the time of the loss forward and backward alone (a step that starts a round also generates)."""
        self.rollout_seconds, self.loss_tokens, start = 0.0, 0, time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        seconds = time.perf_counter() - start - self.rollout_seconds
        self._metrics["train"]["train/seconds"].append(seconds)
        self._metrics["train"]["train/tokens_per_second"].append(self.loss_tokens / seconds)
        return loss


@dataclass
class PackedRows:
    """`pack_shared_prompts`' model inputs, and where each completion token's log-prob lands in the output."""

    input_ids: torch.Tensor  # (packed, length)
    attention_mask: torch.Tensor  # (packed, 1, length, length) bool: the keys each query sees
    position_ids: torch.Tensor  # (packed, length): each token's position in its own unpacked sequence
    labels: torch.Tensor  # (packed, length): completion tokens, -100 elsewhere
    source: torch.Tensor  # (batch, completion): flat index into the (packed, length - 1) shifted outputs, -1 = none

    def unpack(self, per_token: torch.Tensor) -> torch.Tensor:
        """(packed, length - 1) model outputs (TRL's fused log-probs or entropies) -> (batch, completion), 0 where
        a completion has no token."""
        values = per_token.reshape(-1)[self.source.clamp(min=0)]
        return values.masked_fill(self.source < 0, 0.0)


def pack_shared_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_length: int,
                        pad_token_id: int) -> PackedRows:
    """TRL's rows (left-padded prompt + right-padded completion of `completion_length`) repacked: the samples of one
    prompt in one row, [prompt without its last token | per sample: that last token + the sample's real completion
    tokens]. A segment sees the shared prompt and itself only, at the positions it has alone, so every completion
    token's log-prob is the unpacked one (tested) while the prompt is computed once per group, not once per sample,
    and completions carry no padding. (TRL's GRPOTrainer has no padding-free or prefix-sharing path.)"""
    prompt_length = input_ids.shape[1] - completion_length
    ids, mask = input_ids.tolist(), attention_mask.tolist()
    groups: dict[tuple, list[int]] = {}  # prompt tokens -> its samples' batch rows
    for row in range(len(ids)):
        prompt = tuple(t for t, m in zip(ids[row][:prompt_length], mask[row][:prompt_length], strict=True) if m)
        groups.setdefault(prompt, []).append(row)
    tokens, segments, positions, scored, sources = [], [], [], [], []
    for prompt, members in groups.items():
        row_tokens, row_segments = list(prompt[:-1]), [0] * (len(prompt) - 1)
        row_positions, row_scored = list(range(len(prompt) - 1)), [False] * (len(prompt) - 1)
        for segment, row in enumerate(members, start=1):
            real = [j for j, m in enumerate(mask[row][prompt_length:]) if m]
            completion = ids[row][prompt_length:prompt_length + (real[-1] + 1 if real else 0)]
            start = len(row_tokens)  # the repeated last prompt token: its output scores completion[0]
            sources.append((row, len(tokens), start, real))
            row_tokens += [prompt[-1], *completion]
            row_segments += [segment] * (len(completion) + 1)
            row_positions += range(len(prompt) - 1, len(prompt) + len(completion))
            row_scored += [False] + [bool(m) for m in mask[row][prompt_length:prompt_length + len(completion)]]
        tokens.append(row_tokens)
        segments.append(row_segments)
        positions.append(row_positions)
        scored.append(row_scored)
    length, device = max(map(len, tokens)), input_ids.device

    def padded(lists, value, dtype=torch.long):
        return torch.tensor([row + [value] * (length - len(row)) for row in lists], dtype=dtype, device=device)

    packed_ids, segment = padded(tokens, pad_token_id), padded(segments, -1)  # (packed, length)
    labels = packed_ids.masked_fill(~padded(scored, False, torch.bool), -100)
    index = torch.arange(length, device=device)
    causal = index[None, :, None] >= index[None, None, :]  # (1, query, key)
    same = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])  # shared prompt or own segment
    allowed = (causal & same & (segment[:, None, :] >= 0)) | (index[:, None] == index[None, :])  # pads see themselves
    source = torch.full((len(ids), completion_length), -1, dtype=torch.long, device=device)
    for row, packed_row, start, real in sources:  # token j of the completion is predicted at start + j
        source[row, real] = torch.tensor([packed_row * (length - 1) + start + j for j in real], dtype=torch.long,
                                         device=device)
    return PackedRows(packed_ids, allowed[:, None], padded(positions, 0), labels, source)


def sampler_kl(output: dict) -> torch.Tensor:
    """KL(sampler || trained forward) per completion token, estimated from the sampled tokens (k3 estimator:
    r - 1 - log r with r = p_trained / p_sampler, unbiased and never negative)."""
    log_ratio = output["old_per_token_logps"] - output["sampling_per_token_logps"]
    mask = output["completion_mask"].bool()
    return (log_ratio.exp() - 1 - log_ratio)[mask].mean()


def check_depth_credit(depth_credit: dict[float, float]) -> dict[float, float]:
    """{fraction of the depth: weight}, checked: fractions in (0, 1), weights >= 0."""
    for fraction, weight in depth_credit.items():
        if not 0 < fraction < 1 or weight < 0:
            raise ValueError(f"depth credit {fraction}: {weight}: fractions must lie in (0, 1) and weights be >= 0")
    return dict(sorted(depth_credit.items()))


def credit_steps(depth_credit: dict[float, float], depth: int) -> dict[int, float]:
    """{recurrent step: weight} of the earlier read-outs at `depth`: each fraction rounded to a step in
    [1, depth - 1]; fractions that land on one step add their weights. Empty at depth 1 (no earlier state)."""
    steps: dict[int, float] = {}
    for fraction, weight in depth_credit.items():
        if depth > 1:
            step = min(depth - 1, max(1, round(fraction * depth)))
            steps[step] = steps.get(step, 0.0) + weight
    return steps


def disable_lora_dropout(model) -> None:
    """Rollouts must sample the policy that the loss scores: LoRA dropout (an SFT adapter may carry 0.05) would make
    every rollout and every loss forward a different random sub-policy, so GRPO runs without it."""
    for module in model.modules():
        if isinstance(getattr(module, "lora_dropout", None), torch.nn.ModuleDict):
            for name in module.lora_dropout:
                module.lora_dropout[name] = torch.nn.Identity()


def fail_safe(reward_func):
    """The reward function, but when it raises, the completions it fails on score 0.0 (counted in
    REWARD_FAILURES, logged) instead of stopping training. rewards.py already turns grader timeouts into 0."""

    def guarded(completions, **kwargs):
        try:
            return reward_func(completions, **kwargs)
        except Exception as batch_error:  # a reward bug must not kill a multi-hour run
            scores = []
            for i, completion in enumerate(completions):
                columns = {key: value[i:i + 1] if isinstance(value, list) and len(value) == len(completions)
                           else value for key, value in kwargs.items()}
                try:
                    scores += reward_func([completion], **columns)
                except Exception:  # same reason, one completion at a time
                    scores.append(0.0)
                    REWARD_FAILURES[reward_func.__name__] = REWARD_FAILURES.get(reward_func.__name__, 0) + 1
            logger.warning(f"{reward_func.__name__} raised {batch_error!r}; its failing completions scored 0 "
                           f"(so far: {REWARD_FAILURES})")
            return scores

    guarded.__name__ = reward_func.__name__
    return guarded


def build_reward_funcs(names: list[str], max_completion_length: int, length_margin: int) -> list:
    available = {
        "correctness": lambda: rewards.correctness_reward,
        "format": lambda: rewards.format_reward,
        "length_penalty": lambda: rewards.make_length_penalty(max_completion_length, length_margin),
        "step_saving": lambda: rewards.step_saving_reward,
    }
    unknown = sorted(set(names) - set(available))
    if unknown:
        raise ValueError(f"unknown reward_funcs {unknown}; choose from {sorted(available)}")
    return [fail_safe(available[name]()) for name in names]


def prompts_per_run(training_args: GRPOConfig) -> int | None:
    """The distinct prompts a run of `max_steps` draws; None for a run bounded by epochs. TRL's RepeatSampler draws
    a fresh chunk of generation_batch_size / num_generations prompts per generation round, and one round feeds
    steps_per_generation x num_iterations of the run's max_steps x gradient_accumulation_steps micro-batches."""
    if training_args.max_steps <= 0:
        return None
    micro_batches = training_args.max_steps * training_args.gradient_accumulation_steps
    rounds = math.ceil(micro_batches / (training_args.steps_per_generation * training_args.num_iterations))
    return rounds * training_args.generation_batch_size // training_args.num_generations


def prompt_rows(source: str, split: str, seed: int) -> tuple[Iterator[dict], str]:
    """A source's rows, read as they are pulled, and its schema. A hub source streams in a seeded shuffled order
    (data.shuffled_stream): only the rows pulled and the shuffle buffer are read, never the whole split. A local
    file is read whole, in file order, as train_sft.py reads it without streaming (the tiny pipeline's prompts)."""
    if data.is_local_file(data.resolve_source(source)):
        dataset, schema = data.read_sft_source(source, split, False, None)
    else:
        dataset, schema = data.shuffled_stream(source, split, seed)
    return iter(dataset), schema


def gradable_rows(rows: list[dict], first_index: int, schema: str, source: str) -> tuple[list, int, list[str]]:
    """(row, normalised fields) of the rows that make prompts; how many rows are malformed or incorrect; the gold
    answers the grader cannot parse (their rows skipped too). Rows are numbered from `first_index` in errors."""
    screened = [data.screen_row(row, first_index + i, schema, source, keep_code=True) for i, row in enumerate(rows)]
    usable = [(row, fields) for row, fields in zip(rows, screened, strict=True) if not fields["skip"]]
    verdicts = rewards.gradable_golds([fields["answer"] for _, fields in usable])
    ungradable = [fields["answer"] for (_, fields), ok in zip(usable, verdicts, strict=True) if not ok]
    return [pair for pair, ok in zip(usable, verdicts, strict=True) if ok], len(rows) - len(usable), ungradable


def source_prompts(source: str, split: str, limit: int | None, seed: int, system_prompt: str | None) -> list[dict]:
    """`limit` prompts (all when None) {"prompt", "answer"} of one source: rows are pulled until that many are
    usable, so a streamed source is read no further. Skipped rows and the problem_source mix are logged."""
    rows, schema = prompt_rows(source, split, seed)
    kept, read, skipped, ungradable = [], 0, 0, []
    while limit is None or len(kept) < limit:
        chunk = list(itertools.islice(rows, None if limit is None else limit - len(kept)))
        if not chunk:
            break
        gradable, malformed, bad_golds = gradable_rows(chunk, read, schema, source)
        kept += gradable
        ungradable += bad_golds
        read, skipped = read + len(chunk), skipped + malformed
    mix = data.mix_counts([row[data.MIX_COLUMN] for row, _ in kept if data.MIX_COLUMN in row])
    logger.info(f"{source}: {read} rows read, {skipped} malformed or incorrect, {len(ungradable)} with a gold answer "
                f"the grader cannot parse (e.g. {ungradable[:3]}), skipped; {len(kept)} prompts"
                + "".join(f", {key} {value}" for key, value in mix.items()))
    return [{"prompt": data.prompt_messages(fields["problem"], system_prompt), "answer": fields["answer"]}
            for _, fields in kept]


def build_prompt_dataset(script_args: ScriptArguments, num_prompts: int | None = None, seed: int = 0) -> Dataset:
    """{"prompt": chat messages, "answer": gold} of the sources concatenated: from each, `max_samples` usable prompts
    when set, else `num_prompts` (what the run draws: prompts_per_run; with several sources each gives up to that
    many), else all. `seed` orders a streamed hub source (prompt_rows)."""
    limit = script_args.max_samples if script_args.max_samples is not None else num_prompts
    rows = []
    for source in script_args.dataset_name:
        rows += source_prompts(source, script_args.dataset_split or "train", limit, seed,
                               script_args.system_prompt or None)
    if not rows:
        raise data.DataError(f"{script_args.dataset_name}: no usable prompt")
    return Dataset.from_list(rows)


def load_policy(script_args: ScriptArguments, model_args: ModelConfig, training_args: GRPOConfig, tokenizer):
    """The NF4 (or full-precision) base with a trainable LoRA: the SFT adapter when given, else a new one; with
    `final_norm_learning_rate`, the final norm's gain trainable too (a PEFT module to save)."""
    model = load_model(model_args, training_args)
    # A chat turn ends at <|end_turn|>, text at <|end_text|>: rollouts stop at both, whatever the checkpoint's
    # generation config lists (the published one lists only <|end_text|>). TRL reads its stop tokens from here.
    model.generation_config.eos_token_id = data.stop_token_ids(model.generation_config, tokenizer)
    trained_norm = [FINAL_NORM] if script_args.final_norm_learning_rate > 0 else []
    if script_args.sft_adapter is None:
        config = lora_config(model_args)
        if config is not None and trained_norm:
            config.modules_to_save = [*(config.modules_to_save or []), *trained_norm]
        return model, config
    model = PeftModel.from_pretrained(model, script_args.sft_adapter, is_trainable=True)
    # Modules SFT trained in full (modules_to_save, e.g. the tiny default's embeddings) stay frozen: Adam moves
    # every coordinate by ~lr per step whatever its gradient's size, so the noisy policy gradient would random-walk
    # whole embedding rows (measured on the tiny default: reward falls instead of rising). Only the LoRA learns.
    for name, parameter in model.named_parameters():
        if "modules_to_save" in name:
            parameter.requires_grad_(False)
    if trained_norm:  # a module to save that the SFT adapter lacks: PEFT's own wrapper, listed so it is saved
        config = model.peft_config["default"]
        config.modules_to_save = [*(config.modules_to_save or []), *trained_norm]
        _set_trainable(model, "default", module_names=trained_norm, inference_mode=False)
    return model, None


def build_trainer(script_args: ScriptArguments, training_args: GRPOConfig, model_args: ModelConfig,
                  reward_funcs: list | None = None) -> HuginnGRPOTrainer:
    """Tokenizer, prompts, policy and rewards (`script_args.reward_funcs` unless `reward_funcs` are given) in a
    trainer, ready to train."""
    tokenizer = data.load_tokenizer(model_args.model_name_or_path, model_args.model_revision)
    # Every rank reads the same prompts itself (a streamed source's order is seeded), rank 0 first: TRL's sampler
    # needs the same dataset on every rank.
    with training_args.main_process_first(desc="GRPO prompts"):
        train_dataset = build_prompt_dataset(script_args, prompts_per_run(training_args), training_args.seed)
    model, peft_config = load_policy(script_args, model_args, training_args, tokenizer)
    if model_args.lora_dropout:
        logger.warning(f"lora_dropout {model_args.lora_dropout} ignored: GRPO samples and scores the policy without "
                       "dropout")
    if reward_funcs is None:
        reward_funcs = build_reward_funcs(script_args.reward_funcs, training_args.max_completion_length,
                                          script_args.length_penalty_margin)
    return HuginnGRPOTrainer(
        model=model, args=training_args, train_dataset=train_dataset, processing_class=tokenizer,
        reward_funcs=reward_funcs, peft_config=peft_config, rollout_num_steps=script_args.rollout_num_steps,
        backprop_steps=script_args.backprop_steps, state_seed=script_args.state_seed,
        final_norm_learning_rate=script_args.final_norm_learning_rate,
        rollout_batch_size=script_args.rollout_batch_size, rollout_diffusion=rollout_diffusion(script_args),
        depth_credit=depth_credit(script_args), rollout_exit_threshold=script_args.rollout_exit_threshold,
        max_consecutive_nonfinite=script_args.max_consecutive_nonfinite,
    )


def depth_credit(script_args: ScriptArguments) -> dict[float, float]:
    """{fraction of the depth: weight} of `depth_credit_fractions` / `depth_credit_weights`."""
    fractions, weights = script_args.depth_credit_fractions, script_args.depth_credit_weights
    if len(fractions) != len(weights):
        raise ValueError(f"depth_credit_fractions {fractions} and depth_credit_weights {weights}: one weight per "
                         "fraction")
    if len(set(fractions)) != len(fractions):
        raise ValueError(f"depth_credit_fractions {fractions}: each fraction once")
    return dict(zip(fractions, weights, strict=True))


def rollout_diffusion(script_args: ScriptArguments) -> DiffusionSettings | None:
    """The diffusion-forcing knobs of `rollout_sampler: diffusion`; None for sequential rollouts."""
    if script_args.rollout_sampler not in ("sequential", "diffusion"):
        raise ValueError(f"rollout_sampler must be sequential or diffusion, got {script_args.rollout_sampler!r}")
    if script_args.rollout_sampler == "sequential":
        return None
    return DiffusionSettings(inner_steps=script_args.rollout_diffusion_inner_steps,
                             max_wavefront=script_args.rollout_diffusion_max_wavefront)


def main(script_args: ScriptArguments, training_args: GRPOConfig, model_args: ModelConfig,
         reward_funcs: list | None = None) -> HuginnGRPOTrainer:
    set_seed(training_args.seed)
    setup_logging(training_args)
    logger.info(f"seed {training_args.seed}\n{script_args}\n{model_args}\n{training_args}")
    return train_and_save(build_trainer(script_args, training_args, model_args, reward_funcs))


if __name__ == "__main__":
    main(*parse_args(ScriptArguments, GRPOConfig))
