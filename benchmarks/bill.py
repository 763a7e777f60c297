"""The bill before renting: for a config or a whole recipe on a card, each stage's steps, tokens, estimated
GPU-hours and peak memory, priced from the per-token costs in benchmarks/costs.yaml (the public reference
implementation's H200 measurements until this project's own GPU figures replace them). Arithmetic, not a
measurement: it says which figures it used and what it assumed.

    python benchmarks/bill.py --recipe 80gb --card h100-80gb          # SFT, GRPO, evaluations: the whole recipe
    python benchmarks/bill.py --recipe 24gb --card rtx4090-24gb
    python benchmarks/bill.py --config configs/grpo_huginn_80gb.yaml --card h100-80gb
    python benchmarks/bill.py --config configs/grpo_huginn_80gb.yaml --card a100-80gb --beta 0.05  # what if
    python benchmarks/bill.py --config configs/sft_huginn_multigpu.yaml --card a100-80gb --num_gpus 4

Options after these are the config's own keys, as the script would take them. The stage is told by the config's
name (sft_*, grpo_*, eval_*); configs are parsed by the scripts' own parsers, so an unknown key is an error here too.
Tokens are upper bounds: every SFT sequence padded to max_length, every completion run to its cap (a GRPO round
lasts as long as its longest completion, so for rollouts the cap is also the likely case).
"""

import argparse
import contextlib
import io
import math
import statistics
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml
from trl import GRPOConfig, SFTConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
import sampling_gap  # noqa: E402
import train_grpo  # noqa: E402
import train_sft  # noqa: E402
import training  # noqa: E402
from generation import (  # noqa: E402
    MEMORY_HEADROOM,
    block_passes,
    kv_cache_bytes,
    model_weight_bytes,
    plan_generation_memory,
    prefill_activation_bytes,
)
from modeling_huginn_qlora import HuginnConfig  # noqa: E402

COSTS = ROOT / "benchmarks" / "costs.yaml"
GIB = 2**30
COPY_HEADROOM = 0.8  # generation.pick_generation_model: the dense rollout copy + its KV cache within 80% of free
# The sampled-vs-greedy check between SFT and GRPO (sampling_gap.py: greedy, then num_samples samples per problem at
# each temperature, on GSM8K train problems at the rollout depth; its exact KV cache and batch <= 16 make it dear).
GAP_CHECK = ["--model_name_or_path", "tomg-group-umd/huginn-0125", "--num_steps", "32", "--num_samples", "2"]
# Each recipe: (script, config, extra arguments), in the order they run. The README's recipe commands are these.
RECIPES = {
    "80gb": [
        ("train_sft.py", "configs/sft_huginn_80gb.yaml", []),
        ("sampling_gap.py", "", GAP_CHECK + ["--adapter", "outputs/sft-huginn-80gb", "--limit", "150",
                                             "--output_dir", "outputs/sampling-gap-80gb"]),
        ("train_grpo.py", "configs/grpo_huginn_80gb.yaml", ["--sft_adapter", "outputs/sft-huginn-80gb"]),
        ("evaluate.py", "configs/eval_huginn_80gb.yaml",
         ["--adapters", "base", "--prompt_format", "gsm8k_cot", "--num_fewshot", "8", "--max_new_tokens", "256",
          "--output_dir", "outputs/eval-huginn-paper-gsm8k"]),
        ("evaluate.py", "configs/eval_huginn_80gb.yaml", []),
        ("evaluate.py", "configs/eval_huginn_80gb.yaml",
         ["--num_steps", "1", "4", "8", "16", "32", "64", "--kv_cache_slots", "1", "--limit", "300",
          "--batch_size", "256", "--output_dir", "outputs/eval-huginn-80gb-sweep"]),
    ],
    "24gb": [
        ("train_sft.py", "configs/sft_huginn_24gb.yaml", []),
        ("sampling_gap.py", "", GAP_CHECK + ["--adapter", "outputs/sft-huginn-24gb", "--limit", "100",
                                             "--temperatures", "1.0", "--output_dir", "outputs/sampling-gap-24gb"]),
        ("train_grpo.py", "configs/grpo_huginn_24gb.yaml", ["--sft_adapter", "outputs/sft-huginn-24gb"]),
        ("evaluate.py", "configs/eval_huginn_24gb.yaml",
         ["--adapters", "base", "--prompt_format", "gsm8k_cot", "--num_fewshot", "8", "--max_new_tokens", "256",
          "--limit", "1319", "--kv_cache_slots", "1", "--output_dir", "outputs/eval-huginn-paper-gsm8k-shared"]),
        ("evaluate.py", "configs/eval_huginn_24gb.yaml", []),
        ("evaluate.py", "configs/eval_huginn_24gb.yaml",
         ["--num_steps", "1", "4", "8", "16", "32", "64", "--kv_cache_slots", "1", "--limit", "200",
          "--output_dir", "outputs/eval-huginn-24gb-sweep"]),
    ],
}
ASSUMPTIONS = [
    "Card scaling: a figure measured on another card is scaled by the ratio of the cards' datasheet figures: "
    "training steps and prefill (forwards of >= 1,024 tokens, ~1,000 FLOP per weight byte, above every card's "
    "ridge point) by bf16 TFLOPS, decode steps (weights and KV cache read once per block pass) by memory bandwidth.",
    "Depth: time per token is proportional to block passes (prelude 2 + coda 2 + 4 per recurrent step + the head "
    "as one); SFT's random depth (Poisson-lognormal, mean 32, + 1) is priced at its mean, 33 steps, 8 with grad.",
    "Training rate: a micro-batch of N tokens runs at least as fast per token as the largest measured one of <= N "
    "tokens (batch 1 x seq). Peak memory: resident weights + activations, linear in tokens (two measured sizes) "
    "or proportional (one), times grad steps / 8. Memory is taken to be the same on every card.",
    "A no-grad forward (prefill, GRPO's KL reference and sampler scoring) is priced at the training step's rate "
    "without checkpointing: an upper bound, it skips the backward.",
    "Decode: a step at batch B interpolates the measured batches linearly (CUDA graphs replay the whole batch); "
    "context beyond the measured 512 adds its KV cache reads (B x extra tokens x 21,120 bytes per block pass) at "
    "the measured card's bandwidth. Prompt lengths: costs.yaml's `assumptions` (characters / 4).",
    "Not priced: grading (GSM8K ~14,000 answers/s on the CPU, README), checkpoint writes, the Python between "
    "phases; model loads and the download are a fixed allowance per process (costs.yaml).",
]


class BillError(ValueError):
    """A config, key or card the bill cannot price."""


@dataclass
class Figure:
    """One costs.yaml entry of `what` (train or decode), and how it was scaled to the billed card."""

    entry: dict
    scale: float  # time on the figure's card / time on the billed card
    shape: str = ""  # what of the entry was used, when not the entry alone (an interpolation)

    def describe(self) -> str:
        e = self.entry
        shape = self.shape or (f"{e['tokens']} tokens" if e["what"] == "train" else f"batch {e['batch']}")
        ckpt = (" checkpointed" if e["checkpointing"] else "") if e["what"] == "train" else ""
        return (f"{e['what']} {e['weights']}{ckpt} ({shape}): {e['origin']}, {e['card']}, {e['source']}, "
                f"x{self.scale:.3f} speed")


@dataclass
class StageBill:
    name: str
    command: str
    work: str
    tokens: dict[str, float]
    gpu_seconds: float
    peak_gib: float
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Costs:
    """costs.yaml: cards, figures (project entries preferred to reference ones) and assumptions."""

    def __init__(self, path: Path = COSTS):
        data = yaml.safe_load(path.read_text())
        self.cards, self.figures, self.assumptions = data["cards"], data["figures"], data["assumptions"]

    def card(self, name: str) -> dict:
        if name not in self.cards:
            raise BillError(f"unknown card {name!r}; costs.yaml knows {sorted(self.cards)}")
        return self.cards[name]

    def entries(self, what: str, weights: str, checkpointing: bool | None = None) -> list[dict]:
        found = [f for f in self.figures if f["what"] == what and f["weights"] == weights
                 and (checkpointing is None or f["checkpointing"] == checkpointing)]
        project = [f for f in found if f["origin"] == "project"]
        if not found:
            raise BillError(f"costs.yaml has no {what} figure for {weights} weights (checkpointing {checkpointing})")
        return project or found

    def speed(self, entry: dict, card: str, resource: str) -> float:
        """How much faster the billed card runs what `entry` measured (resource: bf16_tflops or bandwidth_tb_s)."""
        return 1.0 if entry["card"] == card else self.card(card)[resource] / self.card(entry["card"])[resource]

    def prompt_tokens(self, key: str) -> dict:
        if key not in self.assumptions["prompt_tokens"]:
            raise BillError(f"no prompt-length assumption for {key!r} in costs.yaml "
                            f"(known: {sorted(self.assumptions['prompt_tokens'])})")
        return self.assumptions["prompt_tokens"][key]


def passes_per_token(config: HuginnConfig, num_steps: float) -> float:
    """Block passes per token at a depth (the model's forward, generation.block_passes) and the head counted as one."""
    return block_passes(config, num_steps) + 1


def train_figure(costs: Costs, card: str, weights: str, checkpointing: bool, micro_tokens: int) -> Figure:
    """The measured training step of the largest micro-batch <= micro_tokens (the smallest one below that)."""
    entries = sorted(costs.entries("train", weights, checkpointing), key=lambda e: e["tokens"])
    entry = max((e for e in entries if e["tokens"] <= micro_tokens), key=lambda e: e["tokens"], default=entries[0])
    return Figure(entry, costs.speed(entry, card, "bf16_tflops"))


def train_seconds(config: HuginnConfig, figure: Figure, tokens: float, num_steps: float) -> float:
    """Seconds for `tokens` through a training step (or a no-grad forward) at a total depth of num_steps."""
    depth = passes_per_token(config, num_steps) / passes_per_token(config, sum(figure.entry["num_steps"]))
    return tokens / figure.entry["tok_s"] * depth / figure.scale


def train_peak_gib(costs: Costs, weights: str, checkpointing: bool, micro_tokens: int, grad_steps: int) -> float:
    """Resident weights + activations of a micro-batch: linear through the two largest measured sizes, or
    proportional to the one; activations scale with the steps that keep them (the measured 8)."""
    entries = sorted(costs.entries("train", weights, checkpointing), key=lambda e: e["tokens"])[-2:]
    points = [(e["tokens"], e["peak_gib"] - e["weights_gib"]) for e in entries]
    if len(points) == 2 and points[0][0] != points[1][0]:
        (t0, a0), (t1, a1) = points
        activations = a0 + (a1 - a0) * (micro_tokens - t0) / (t1 - t0)
    else:
        activations = points[-1][1] * micro_tokens / points[-1][0]
    grad_fraction = grad_steps / entries[-1]["num_steps"][1]
    return entries[-1]["weights_gib"] + activations * grad_fraction


def decode_step_seconds(costs: Costs, card: str, config: HuginnConfig, weights: str, batch: int, length: int,
                        num_steps: float) -> tuple[float, Figure]:
    """One decode step (every row one token) at `batch` rows whose preallocated cache holds `length` tokens."""
    entries = sorted(costs.entries("decode", weights), key=lambda e: e["batch"])
    lower = max((e for e in entries if e["batch"] <= batch), key=lambda e: e["batch"], default=entries[0])
    upper = min((e for e in entries if e["batch"] > batch), key=lambda e: e["batch"], default=None)
    if upper is None:  # beyond the largest batch: the last segment's slope
        lower, upper = entries[-2], entries[-1]
    slope = (upper["step_ms"] - lower["step_ms"]) / (upper["batch"] - lower["batch"])
    step_ms = lower["step_ms"] + slope * (max(batch, entries[0]["batch"]) - lower["batch"])
    layer_token_bytes = 2 * config.num_key_value_heads * config.head_dim * 2  # keys + values, bf16
    extra_context = max(0, length - lower["context"])
    bandwidth = costs.card(lower["card"])["bandwidth_tb_s"] * 1e12
    per_pass = step_ms / 1e3 / passes_per_token(config, 32) + batch * extra_context * layer_token_bytes / bandwidth
    shape = f"batch {batch} from batches {lower['batch']}-{upper['batch']}, context {length}"
    figure = Figure(lower, costs.speed(lower, card, "bandwidth_tb_s"), shape)
    return per_pass * passes_per_token(config, num_steps) / figure.scale, figure


# ---------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------


def parse_stage(script: str, config: str, extra: list[str]):
    """The script's own (script_args, training_args, model_args) or EvalArguments; the trainers' parsed GPU-free
    (use_cpu, no bf16 check) so that the bill runs anywhere. Unknown keys raise BillError."""
    argv = ["--config", str(ROOT / config), *extra]
    trainer_args = {"train_sft.py": (train_sft.ScriptArguments, SFTConfig),
                    "train_grpo.py": (train_grpo.ScriptArguments, GRPOConfig)}
    try:
        with contextlib.redirect_stderr(io.StringIO()) as stderr:
            if script == "evaluate.py":
                return evaluate.parse_args(argv)
            if script == "sampling_gap.py":
                return sampling_gap.parse_args(extra)
            return training.parse_args(*trainer_args[script], [*argv, "--use_cpu", "true", "--bf16", "false"])
    except (ValueError, SystemExit) as error:
        message = str(error) if isinstance(error, ValueError) else stderr.getvalue().strip().splitlines()[-1]
        raise BillError(f"{config} {' '.join(extra)}: {message}") from None


def script_for(config: str) -> str:
    name = Path(config).name
    for prefix, script in (("sft_", "train_sft.py"), ("grpo_", "train_grpo.py"), ("eval_", "evaluate.py")):
        if name.startswith(prefix):
            return script
    raise BillError(f"{config}: cannot tell its stage; the bill prices sft_*, grpo_* and eval_* configs")


def positive_max_steps(args, config: str) -> int:
    if args.max_steps <= 0:
        raise BillError(f"{config}: the bill needs max_steps > 0 (epoch-based runs are not priced)")
    return args.max_steps


def bill_sft(costs: Costs, card: str, parsed, config: str, num_gpus: int) -> StageBill:
    script_args, args, model_args = parsed
    model = HuginnConfig()
    steps, weights = positive_max_steps(args, config), "nf4" if model_args.load_in_4bit else "bf16"
    sequences = args.per_device_train_batch_size * args.gradient_accumulation_steps * num_gpus
    tokens = steps * sequences * args.max_length
    micro_tokens = args.per_device_train_batch_size * args.max_length
    no_grad, grad = script_args.num_steps or (model.mean_recurrence + 1 - model.mean_backprop_depth,
                                              model.mean_backprop_depth)
    figure = train_figure(costs, card, weights, args.activation_checkpointing, micro_tokens)
    seconds = train_seconds(model, figure, tokens, no_grad + grad)
    notes = []
    if script_args.max_samples is not None and steps * sequences > script_args.max_samples:
        notes.append(f"{steps * sequences:,} sequences from max_samples {script_args.max_samples:,} rows: "
                     f"{steps * sequences / script_args.max_samples:.1f} epochs")
    return StageBill(
        "SFT", "", f"{steps} steps x {sequences} sequences of <= {args.max_length}", {"trained": tokens},
        seconds + costs.assumptions["load_allowance_s"] * num_gpus,
        train_peak_gib(costs, weights, args.activation_checkpointing, micro_tokens, grad), [figure], notes)


def bill_grpo(costs: Costs, card: str, parsed, config: str, num_gpus: int) -> StageBill:
    """Per GPU and round: the rollout decode (waves of rollout_batch_size rows, each as long as the cap), the
    prefill of its prompts, the no-grad forwards over its sequences (sampler scoring, KL reference); per optimizer
    step: grad accumulation micro-batches of loss forward + backward."""
    script_args, args, model_args = parsed
    model, steps = HuginnConfig(), positive_max_steps(args, config)
    prompts = costs.prompt_tokens("gsm8k")
    weights = "nf4" if model_args.load_in_4bit else "bf16"
    depth = statistics.mean(script_args.rollout_num_steps)
    completion = args.max_completion_length
    rows = args.per_device_train_batch_size * args.steps_per_generation  # a round's completions on one GPU
    rounds = args.gradient_accumulation_steps / (args.steps_per_generation * args.num_iterations)
    wave = min(rows, script_args.rollout_batch_size or rows)
    length = prompts["max"] + completion + 1
    slots = min((args.generation_kwargs or {}).get("kv_cache_slots") or math.ceil(depth), math.ceil(depth))
    base_bytes = model_weight_bytes(model, torch.bfloat16, model_args.load_in_4bit)
    copy_bytes, cache_bytes = model_weight_bytes(model, torch.bfloat16), kv_cache_bytes(model, wave, length, slots)
    free = costs.card(card)["memory_gb"] * 1e9 - base_bytes
    copy = copy_bytes + cache_bytes <= COPY_HEADROOM * free
    step_s, decode_figure = decode_step_seconds(costs, card, model, "bf16" if copy else weights, wave, length, depth)
    decode = math.ceil(rows / wave) * completion * step_s
    forward_figure = train_figure(costs, card, weights, False, wave // args.num_generations * prompts["max"])
    sequence_tokens = rows * (prompts["mean"] + completion)
    scoring = args.vllm_importance_sampling_correction or rounds != 1
    forwards = (int(scoring) + int(args.beta > 0)) * train_seconds(model, forward_figure, sequence_tokens, depth)
    prefill = train_seconds(model, forward_figure, rows // args.num_generations * prompts["mean"], depth)
    micro_tokens = args.per_device_train_batch_size * (prompts["max"] + completion)
    loss_figure = train_figure(costs, card, weights, args.activation_checkpointing, micro_tokens)
    loss_tokens = args.gradient_accumulation_steps * args.per_device_train_batch_size * (prompts["mean"] + completion)
    loss = train_seconds(model, loss_figure, loss_tokens, depth)
    per_step = rounds * (decode + prefill + forwards) + loss
    rollout_peak = base_bytes + copy * copy_bytes + cache_bytes + prefill_activation_bytes(
        model, math.ceil(wave / args.num_generations), prompts["max"], torch.bfloat16)
    loss_peak = train_peak_gib(costs, weights, args.activation_checkpointing, micro_tokens, script_args.backprop_steps)
    completions_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * num_gpus
    notes = [f"rollouts: {rows} rows per round and GPU in {math.ceil(rows / wave)} wave(s) of {wave}, "
             f"{'one KV slot per step (exact)' if slots >= depth else f'{slots} shared KV slot(s)'}, "
             f"{'a dense bf16 copy' if copy else f'the {weights} model itself'}; per step "
             f"{rounds * decode:.0f} s decode, {rounds * forwards:.0f} s no-grad forwards, {loss:.0f} s loss "
             f"(forward + backward)"]
    tokens = {"decoded": steps * rounds * rows * completion * num_gpus,
              "trained": steps * loss_tokens * num_gpus}
    return StageBill(
        "GRPO", "", f"{steps} steps x {completions_per_step // args.num_generations} prompts x {args.num_generations}",
        tokens, steps * per_step * num_gpus + costs.assumptions["load_allowance_s"] * num_gpus,
        max(rollout_peak / GIB, loss_peak), [decode_figure, forward_figure, loss_figure], notes)


def eval_prompt_key(args, benchmark: str) -> str:
    if args.prompt_format == "gsm8k_cot":
        return f"gsm8k_cot_{args.num_fewshot}shot"
    if args.num_fewshot:
        raise BillError(f"no prompt-length assumption for {args.num_fewshot}-shot boxed prompts")
    return benchmark


def bill_eval(costs: Costs, card: str, args, config: str, num_gpus: int) -> StageBill:
    """Every checkpoint x benchmark x depth: the memory plan evaluate.py would make (same planner), continuous
    batching at its batch (every completion to max_new_tokens), and each problem's prefill."""
    model = HuginnConfig()
    weights = "nf4" if args.load_in_4bit else "bf16"
    budget = (args.max_memory_gb or costs.card(card)["memory_gb"]) * 1e9
    seconds, decoded, peak, figures, cells = 0.0, 0, 0.0, [], 0
    for entry in args.benchmarks:
        benchmark = entry.partition("=")[2] or entry
        key = eval_prompt_key(args, benchmark)
        prompts = costs.prompt_tokens(key)
        known = costs.assumptions["benchmark_problems"].get(benchmark)
        if known is None and args.limit is None:
            raise BillError(f"{config}: how many problems {benchmark!r} has is unknown; give --limit")
        problems = min(n for n in (args.limit, known) if n is not None)
        length = prompts["max"] + args.max_new_tokens + 1
        for num_steps in args.num_steps:
            plan = plan_generation_memory(model, budget, args.batch_size, prompts["max"], args.max_new_tokens,
                                          num_steps, args.kv_cache_slots, torch.bfloat16, args.load_in_4bit,
                                          engine=True)
            step_s, figure = decode_step_seconds(costs, card, model, weights, plan.batch_size, length, num_steps)
            rows = problems * args.num_samples
            forward = train_figure(costs, card, weights, False, plan.batch_size * prompts["mean"])
            seconds += rows * args.max_new_tokens / plan.batch_size * step_s
            seconds += train_seconds(model, forward, problems * prompts["mean"], num_steps)
            decoded += rows * args.max_new_tokens
            peak = max(peak, plan.total_bytes / GIB)
            figures += [figure, forward]
            cells += 1
    checkpoints = len(args.adapters)
    slots = "exact KV cache" if args.kv_cache_slots is None else f"{args.kv_cache_slots} shared KV slot(s)"
    work = (f"{checkpoints} checkpoint(s) x {'+'.join(args.benchmarks)} x steps {args.num_steps}"
            f"{f' x {args.limit} problems' if args.limit else ''}, {slots}")
    notes = [] if args.exit_threshold is None else ["adaptive exit not modelled: priced at num_steps (upper bound)"]
    return StageBill("eval", "", work, {"decoded": decoded * checkpoints},
                     checkpoints * (seconds + costs.assumptions["load_allowance_s"]), peak, figures, notes)


def bill_gap(costs: Costs, card: str, args, config: str, num_gpus: int) -> StageBill:
    """sampling_gap.py: evaluate.py runs (greedy, then each temperature's samples) on a GSM8K-like train subset,
    priced as one run with all their samples per problem, plus a load per run."""
    runs = 1 + len(args.temperatures)
    as_eval = evaluate.EvalArguments(
        model_name_or_path=args.model_name_or_path, adapters=[f"sft={args.adapter}"], benchmarks=["gsm8k"],
        limit=args.limit, num_steps=[args.num_steps], max_new_tokens=args.max_new_tokens,
        num_samples=1 + args.num_samples * len(args.temperatures), load_in_4bit=args.load_in_4bit,
        batch_size=args.batch_size, kv_cache_slots=args.kv_cache_slots or None)
    stage = bill_eval(costs, card, as_eval, config, num_gpus)
    work = f"{args.limit} problems x (greedy + {args.num_samples} samples x {len(args.temperatures)} temperature(s))"
    slots = "exact KV cache" if not args.kv_cache_slots else f"{args.kv_cache_slots} shared KV slot(s)"
    return replace(stage, name="gap check", work=f"{work}, {slots}",
                   gpu_seconds=stage.gpu_seconds + (runs - 1) * costs.assumptions["load_allowance_s"])


BILLS = {"train_sft.py": bill_sft, "train_grpo.py": bill_grpo, "evaluate.py": bill_eval, "sampling_gap.py": bill_gap}


def bill_stage(costs: Costs, card: str, script: str, config: str, extra: list[str], num_gpus: int = 1) -> StageBill:
    costs.card(card)
    stage = BILLS[script](costs, card, parse_stage(script, config, extra), config, num_gpus)
    stage.command = " ".join(["python", script, *(["--config", config] if config else []), *extra])
    return stage


def bill_recipe(costs: Costs, card: str, recipe: str) -> list[StageBill]:
    if recipe not in RECIPES:
        raise BillError(f"unknown recipe {recipe!r}; known: {sorted(RECIPES)}")
    return [bill_stage(costs, card, *stage) for stage in RECIPES[recipe]]


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------


def millions(tokens: dict[str, float]) -> str:
    return ", ".join(f"{value / 1e6:.1f}M {label}" for label, value in tokens.items())


def render(stages: list[StageBill], costs: Costs, card: str, title: str) -> str:
    spec = costs.card(card)
    usable = MEMORY_HEADROOM * spec["memory_gb"] * 1e9 / GIB
    total = sum(stage.gpu_seconds for stage in stages) / 3600
    lines = [f"{title} on {card} ({spec['source']}: {spec['memory_gb']} GB, {spec['bandwidth_tb_s']} TB/s, "
             f"{spec['bf16_tflops']} bf16 TFLOPS): {total:.1f} GPU-hours by arithmetic, not a measurement", ""]
    lines += [f"{i}. {stage.command}" for i, stage in enumerate(stages, 1)]
    lines += ["", f"| # | stage | work | tokens (upper bound) | GPU-hours | peak GiB (of {usable:.1f} usable) |",
              "|---|---|---|---|---|---|"]
    for i, stage in enumerate(stages, 1):
        fits = "" if stage.peak_gib <= usable else " DOES NOT FIT"
        lines.append(f"| {i} | {stage.name} | {stage.work} | {millions(stage.tokens)} | "
                     f"{stage.gpu_seconds / 3600:.2f} | {stage.peak_gib:.1f}{fits} |")
    lines += [f"| | total | | | {total:.2f} | |", ""]
    lines += [f"- {i}: {note}" for i, stage in enumerate(stages, 1) for note in stage.notes]
    figures = dict.fromkeys(figure.describe() for stage in stages for figure in stage.figures)
    lines += ["", "Figures used (costs.yaml):"] + [f"- {figure}" for figure in figures]
    lines += ["", "Assumptions:"] + [f"- {assumption}" for assumption in ASSUMPTIONS]
    lines.append(f"- Load allowance: {costs.assumptions['load_allowance_s']} s per process.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--config", help="one stage: configs/sft_*, grpo_* or eval_*.yaml")
    target.add_argument("--recipe", help=f"a whole recipe: {', '.join(RECIPES)}")
    parser.add_argument("--card", required=True, help="a card of costs.yaml")
    parser.add_argument("--num_gpus", type=int, default=1, help="DDP processes (one config only)")
    args, extra = parser.parse_known_args(argv)
    costs = Costs()
    if args.recipe:
        if extra:
            raise BillError(f"overrides {extra} apply to one --config, not to a recipe")
        report = render(bill_recipe(costs, args.card, args.recipe), costs, args.card, f"Recipe {args.recipe}")
    else:
        stage = bill_stage(costs, args.card, script_for(args.config), args.config, extra, args.num_gpus)
        report = render([stage], costs, args.card, f"{args.config} x {args.num_gpus} GPU(s)")
    print(report)
    return report


if __name__ == "__main__":
    try:
        main()
    except BillError as error:
        sys.exit(f"bill.py: {error}")
