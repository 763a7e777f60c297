"""GSM8K and MATH accuracy of huginn-0125 (base or LoRA adapters) versus the number of recurrent steps.

Tiny CPU run (offline, the embedded tiny default; a random model, so accuracy is ~0: this checks the pipeline):

    python tiny.py --output_dir outputs/tiny-data --data_only
    python evaluate.py --config configs/eval_tiny.yaml

huginn-0125 on one GPU, zero-shot chat with the authors' math system prompt, answer in \\boxed{}, greedy:

    python evaluate.py --model_name_or_path tomg-group-umd/huginn-0125 --benchmarks gsm8k math500 \\
        --num_steps 4 8 16 32 64 --max_new_tokens 512 --batch_size 16 --output_dir outputs/eval-huginn

The paper's settings (32 steps, greedy). GSM8K as lm-eval-harness's gsm8k_cot: its 8 exemplars as "Q: ... A:" chat
turns ending "The answer is N.", the system prompt, 256 new tokens (lm-eval's default), completions cut at "Q:";
its strict / flexible scores compare with the published 34.80 / 42.08. MATH as lm-eval-harness's minerva_math:
its 4 exemplars as "Problem: ... Solution:" turns ending "Final Answer: The final answer is X. I hope it is correct.",
no system prompt, 256 new tokens, completions cut at "Problem:"; its exact match compares with the published 12.58:

    python evaluate.py --model_name_or_path tomg-group-umd/huginn-0125 --benchmarks gsm8k --num_steps 32 \\
        --prompt_format gsm8k_cot --num_fewshot 8 --max_new_tokens 256 --output_dir outputs/eval-paper-gsm8k
    python evaluate.py --model_name_or_path tomg-group-umd/huginn-0125 --benchmarks math math500 --num_steps 32 \\
        --prompt_format minerva_math --num_fewshot 4 --system_prompt "" --max_new_tokens 256 \\
        --output_dir outputs/eval-paper-math

Compare checkpoints in one table and plot:   --adapters base sft=outputs/sft-huginn-80gb grpo=outputs/grpo-huginn-80gb
Sampling, pass@k and maj@k:                  --do_sample --num_samples 8 --temperature 0.7 --top_p 0.95
Diffusion forcing, a parallel sampler:       --sampler diffusion --diffusion_inner_steps 4 (all knobs: --diffusion_*)
Local files in the hub schema:               --benchmarks data/my_gsm8k.jsonl (label: the file stem)
                                             or --benchmarks gsm8k=data/my_gsm8k.jsonl
Benchmark names: gsm8k (openai/gsm8k main test, 1319), math500 (HuggingFaceH4/MATH-500), math (the full
5000-problem MATH test, EleutherAI/hendrycks_math, answers taken from the solutions' last \\boxed{}).

Memory: per depth, the largest batch up to --batch_size whose weights, KV cache and activations fit the budget
(--max_memory_gb, else the free GPU memory at start; on CPU the available RAM), with exact KV caches (one slot per
step) unless not even one row fits (generation.plan_generation_memory); --kv_cache_slots k shares slots instead.
With --load_in_4bit, decoding runs on a dense copy of the NF4 weights (LoRA merged) where that is faster.
Decoding: generation.HuginnEngine, one per checkpoint and plan, continuously batched over the whole benchmark (a
finished row takes the next problem), CUDA graphs on GPU.

Outputs in output_dir: results.json (accuracy with Wilson 95% interval per checkpoint x benchmark x steps, the
accuracy with flexible answer extraction, GSM8K's lm-eval strict/flexible scores with gsm8k_cot prompts, Minerva's
exact match and equivalence with minerva_math prompts, tokens, speed, the memory plan, config, prompt, versions, git
commit), samples.jsonl (one line per generated sample, appended and flushed as it goes) and accuracy_vs_steps.png.
Rerunning with the same output_dir resumes: a sample is reused only when its key, a hash of everything that changes
a completion (prompt, adapter files, a local base model's files or the hub id, dtype, NF4 working copy, depth, KV
cache mode, decoding settings, seed), matches.

Reproducibility: the recurrence starts from the published random state, seeded per problem and sample
(`state_seeds` = hash(seed, benchmark, id, sample)), so a completion does not depend on its batch: greedy results
are identical for any batch size. `--init_state zero` starts from zeros instead.
"""

import gc
import hashlib
import importlib.metadata
import json
import math
import platform
import random
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import matplotlib
import torch
from peft import PeftModel
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM
from trl import TrlParser

import data
import rewards
from generation import (
    MEMORY_HEADROOM,
    DiffusionSettings,
    HuginnEngine,
    MemoryPlan,
    free_memory_bytes,
    generation_copy,
    model_weight_bytes,
    plan_generation_memory,
)
from modeling_huginn_qlora import nf4_quantization_config
from tiny import resolve_model_path

BENCHMARKS = {"gsm8k": "openai/gsm8k", "math500": "HuggingFaceH4/MATH-500", "math": "EleutherAI/hendrycks_math"}
PROMPT_FORMATS = ("boxed", "gsm8k_cot", "minerva_math")
# lm-eval-harness's gsm8k_cot task, which the paper's GSM8K scores come from (prompts: data.gsm8k_cot_messages):
# completions stop at "Q:"; strict = first "The answer is N.", flexible = last number, then exact match after its
# normalisation.
LM_EVAL_STOP = "Q:"
LM_EVAL_STRICT = re.compile(r"The answer is (-?[0-9.,]+).")
LM_EVAL_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
LM_EVAL_IGNORE = (r",", r"\$", r"(?s).*#### ", r"\.$")
# lm-eval-harness's minerva_math task, which the paper's MATH scores come from (prompts: data.minerva_math_messages):
# completions stop at "Problem:"; the answer of "Final Answer: The final answer is X." scored by exact match after
# Minerva's normalisation and by equivalence (rewards.minerva_exact_match, rewards extraction "minerva").
MINERVA_STOP = "Problem:"

# A generation backend: (requests, num_steps, kv_cache_slots, on_done) calls on_done(index, {"completion",
# "num_tokens", "finished"}) for each request as it finishes, in any order (kv_cache_slots None: one slot per step).
# A request holds "id", "sample", "seed", "prompt" and the gold "problem", "solution", "answer" (stand-ins may use
# them).
Backend = Callable[[list[dict], int, int | None, Callable[[int, dict], None]], None]


@dataclass
class EvalArguments:
    model_name_or_path: str = field(default="tiny-huginn", metadata={"help": "hub id, local dir or tiny-huginn"})
    adapters: list[str] = field(default_factory=lambda: ["base"], metadata={
        "help": "checkpoints to compare: 'base' (no adapter) or a LoRA adapter dir, optionally label=dir"})
    benchmarks: list[str] = field(default_factory=lambda: ["gsm8k", "math500"], metadata={
        "help": f"{sorted(BENCHMARKS)} or a local .jsonl/.json/.parquet file, optionally label=source"})
    limit: int | None = field(default=None, metadata={"help": "evaluate a fixed-seed random subset of N problems"})
    num_steps: list[int] = field(default_factory=lambda: [32], metadata={"help": "recurrent steps to sweep"})
    exit_threshold: float | None = field(default=None, metadata={
        "help": "adaptive exit: a token stops recurring when successive steps' next-token KL is below this (e.g. "
                "5e-4); num_steps is then the maximum. Uses generation.HuginnEngine"})
    sampler: str = field(default="sequential", metadata={
        "help": "sequential: every token runs all num_steps steps before the next; diffusion: diffusion forcing "
                "(generation.DiffusionSettings, the diffusion_* knobs), a wave of positions recurring together, "
                "each frozen once its state settles or it ran num_steps steps"})
    diffusion_inner_steps: int = field(default=4, metadata={"help": "recurrent steps per wave; fewer: faster"})
    diffusion_new_positions: int = field(default=1, metadata={"help": "positions a wave adds to the wavefront"})
    diffusion_max_wavefront: int = field(default=16, metadata={
        "help": "positions recurring together per row, at most; more: more parallel work per wave"})
    diffusion_freeze: str = field(default="latent-diff", metadata={
        "help": "latent-diff: a position also freezes once its state's relative change over a wave is below "
                "diffusion_freeze_threshold; budget: only after num_steps steps"})
    diffusion_freeze_threshold: float = field(default=0.03, metadata={"help": "higher: faster, less exact"})
    diffusion_new_position_state: str = field(default="fresh", metadata={
        "help": "fresh: a new position starts from the initial state; previous: from the wavefront's last state"})
    batch_size: int = field(default=16, metadata={
        "help": "prompts per generate call, at most; the memory plan lowers it to fit. Higher: faster, more memory"})
    max_memory_gb: float | None = field(default=None, metadata={
        "help": "memory budget (GB) for weights, KV cache and activations; default: the free GPU memory at start "
                "(on CPU: the available RAM)"})
    max_new_tokens: int = 512
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    num_samples: int = field(default=1, metadata={"help": "samples per problem (pass@k, maj@k); needs do_sample"})
    temperature: float = 0.7
    top_p: float = 0.95
    system_prompt: str = field(default=data.SYSTEM_PROMPT, metadata={"help": "'' for none"})
    prompt_format: str = field(default="boxed", metadata={
        "help": "boxed: the chat prompt SFT trains on, answer in \\boxed{}; gsm8k_cot: lm-eval-harness's gsm8k_cot "
                "('Q: ... A:' turns, its fixed exemplars ending 'The answer is N.'), which alone reports GSM8K's "
                "lm-eval strict/flexible scores; minerva_math: lm-eval-harness's minerva_math ('Problem: ... "
                "Solution:' turns, its 4 exemplars ending 'Final Answer: The final answer is X. I hope it is "
                "correct.'), which alone reports Minerva's exact match and equivalence"})
    num_fewshot: int = field(default=0, metadata={"help": "solved exemplars given as earlier chat turns"})
    fewshot_source: str = field(default="openai/gsm8k", metadata={
        "help": "hub id or local file of exemplars (prompt_format boxed)"})
    fewshot_split: str = "train"
    init_state: str = field(default="random", metadata={"help": "initial recurrent state: random (seeded) or zero"})
    kv_cache_slots: int | None = field(default=None, metadata={
        "help": "share core KV slots (step mod k): less memory, slightly different completions. Default: exact "
                "(one slot per step) unless even batch 1 does not fit; 1 with exit_threshold"})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on GPU, float32 on CPU), bfloat16, ..."})
    load_in_4bit: bool = field(default=False, metadata={"help": "NF4 base weights (QLoRA's quantization)"})
    grader_timeout_s: float = rewards.DEFAULT_TIMEOUT_S
    grader_workers: int | None = None
    seed: int = 0
    output_dir: str = "outputs/eval"


def stable_seed(*parts) -> int:
    """A 32-bit seed from any values, the same in every process (unlike hash())."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little")


def parse_labelled(entry: str) -> tuple[str, str]:
    """'label=value' or 'value' (label: a file's stem, a directory's name, or the value itself)."""
    label, sep, value = entry.partition("=")
    if sep:
        return label, value
    path = Path(entry)
    return (path.stem if path.suffix else path.name or entry), entry


# ---------------------------------------------------------------------------------------------------------------
# Data and prompts
# ---------------------------------------------------------------------------------------------------------------


def load_rows(source: str, split: str | None = None) -> tuple[list[dict], str]:
    """Normalised rows {"id", "problem", "solution", "answer"} of a benchmark name, hub id or local file, and the
    schema name."""
    source = data.resolve_source(BENCHMARKS.get(source, source))
    dataset, schema = data.load_source(source, split)
    return [{"id": str(i), **data.normalise_row(row, schema, source, i)} for i, row in enumerate(dataset)], schema


def fixed_subset(rows: list, limit: int | None, seed: int) -> list:
    if limit is None or limit >= len(rows):
        return rows
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), limit))]


def chat_messages(problem: str, args: EvalArguments, exemplars: list[dict]) -> list[dict]:
    """The chat asking one problem, solved exemplars as earlier user/assistant turns. boxed: data.prompt_messages,
    exemplars from `exemplars` answered in \\boxed{}; gsm8k_cot: lm-eval's "Q: ...\\nA:" turns, its own exemplars;
    minerva_math: lm-eval's "Problem: ... Solution:" turns, its own exemplars."""
    if args.prompt_format == "gsm8k_cot":
        return data.gsm8k_cot_messages(problem, args.system_prompt, args.num_fewshot)
    if args.prompt_format == "minerva_math":
        return data.minerva_math_messages(problem, args.system_prompt, args.num_fewshot)
    shots = []
    for example in exemplars:
        shots += data.prompt_messages(example["problem"], None)
        shots.append({"role": "assistant", "content": data.boxed_solution(example["solution"], example["answer"])})
    messages = data.prompt_messages(problem, args.system_prompt or None)
    return messages[:-1] + shots + messages[-1:]


# ---------------------------------------------------------------------------------------------------------------
# Generation backend and its memory plan
# ---------------------------------------------------------------------------------------------------------------


def device_and_dtype(args: EvalArguments) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype != "auto":
        return device, getattr(torch, args.dtype)
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


# Per-row decode time of NF4 over bf16 weights at equal batch, the least of what the reference measured on an H200
# (one full-size block, 32-step tokens): 1.8-2.3x at batch 1-64, 1.38x at 256. Throughput grows less than linearly
# with the batch, so a copy whose batch is smaller by up to this factor still decodes at least as fast.
NF4_DECODE_SLOWDOWN = 1.35


def memory_plans(args: EvalArguments, prompt_length: int) -> tuple[dict[int, MemoryPlan], str]:
    """A batch size and KV cache mode per depth that fit the budget, and where the budget came from. Planned once,
    before any model is loaded, so the free memory measured includes what the weights will take.

    NF4 weights decode from a dense working copy (generation.generation_copy: dequantized, LoRA merged, the same
    function to rounding) when that is faster at every depth: the copy's smaller batch (its weights take KV cache
    room) times NF4_DECODE_SLOWDOWN is at least the NF4 batch, with the same KV cache mode, and the copy fits beside
    the NF4 weights while it is made."""
    device, dtype = device_and_dtype(args)
    if args.max_memory_gb is not None:
        budget, source = args.max_memory_gb * 1e9, "max_memory_gb"
    else:
        budget = free_memory_bytes(device)
        source = f"{'free GPU memory' if device.type == 'cuda' else 'available RAM'} at start"
    config = AutoConfig.from_pretrained(resolve_model_path(args.model_name_or_path))
    slots = args.kv_cache_slots or (1 if args.exit_threshold is not None else None)  # adaptive: one shared slot

    def plan(steps: int, load_in_4bit: bool) -> MemoryPlan:
        return plan_generation_memory(config, budget, args.batch_size, prompt_length, args.max_new_tokens, steps,
                                      slots, dtype, load_in_4bit, engine=True)

    plans = {steps: plan(steps, args.load_in_4bit) for steps in args.num_steps}
    if not args.load_in_4bit:
        return plans, source
    copy_peak = model_weight_bytes(config, dtype, load_in_4bit=True) + model_weight_bytes(config, dtype)
    try:
        dense = {steps: replace(plan(steps, False), working_copy=True) for steps in args.num_steps}
    except ValueError:  # not even one row beside dense weights
        return plans, source
    faster = all(dense[s].kv_cache_slots == plans[s].kv_cache_slots
                 and dense[s].batch_size * NF4_DECODE_SLOWDOWN >= plans[s].batch_size for s in plans)
    return (dense if faster and copy_peak <= MEMORY_HEADROOM * budget else plans), source


class HuginnBackend:
    """Generation with huginn, plus an optional LoRA adapter (merged; with NF4 weights, merged into their working
    copy when the plans have one, else kept apart), through generation.HuginnEngine: continuous batching over a
    call's requests (a finished row takes the next problem; completions do not depend on the batch), at each depth's
    planned batch size and KV cache mode. One engine per memory plan, kept across calls; `max_prompt_tokens` (the
    run's longest prompt) sizes its cache."""

    def __init__(self, args: EvalArguments, adapter: str | None, plans: dict[int, MemoryPlan], max_prompt_tokens: int):
        self.args, self.plans, self.max_prompt_tokens = args, plans, max_prompt_tokens
        self.device, dtype = device_and_dtype(args)
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model_path(args.model_name_or_path), dtype=dtype, device_map=self.device,
            quantization_config=nf4_quantization_config(dtype) if args.load_in_4bit else None)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapter)
            model = model if args.load_in_4bit else model.merge_and_unload()  # merged: no LoRA cost per block pass
        if any(plan.working_copy for plan in plans.values()):
            model = generation_copy(model, dtype)
            gc.collect()  # the NF4 model (PEFT's modules refer to each other) is freed before the KV cache is made
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self.model = model.eval()
        self.tokenizer = data.load_tokenizer(args.model_name_or_path)
        self.eos_ids = data.stop_token_ids(model.generation_config, self.tokenizer)
        self.engine_key, self.engine = None, None

    def engine_for(self, num_steps: int, kv_cache_slots: int | None) -> HuginnEngine:
        """The engine of this depth's plan, built when the plan differs from the last one's (the old one's cache
        freed first: two would not fit the plan)."""
        key = (self.plans[num_steps].batch_size, kv_cache_slots or num_steps)
        if key != self.engine_key:
            if self.engine is not None:
                self.engine.close()
            self.engine = HuginnEngine(self.model, key[0], self.max_prompt_tokens + self.args.max_new_tokens,
                                       kv_cache_slots=key[1], exit_threshold=self.args.exit_threshold,
                                       init_state=self.args.init_state, diffusion=diffusion_settings(self.args))
            self.engine_key = key
            print(f"engine for {num_steps} steps: batch {key[0]}, {key[1]} KV slot(s), cache "
                  f"{self.engine.cache_bytes / 1e9:.3f} GB allocated ({self.plans[num_steps].cache_bytes / 1e9:.3f} "
                  "GB planned)", flush=True)
        return self.engine

    def __call__(self, requests: list[dict], num_steps: int, kv_cache_slots: int | None,
                 on_done: Callable[[int, dict], None]) -> None:
        args = self.args
        prompts = [self.tokenizer(r["prompt"], add_special_tokens=False).input_ids for r in requests]  # bos in prompt
        seeds = [r["seed"] for r in requests]
        self.engine_for(num_steps, kv_cache_slots).generate(
            prompts, num_steps=num_steps, max_new_tokens=args.max_new_tokens, eos_token_ids=self.eos_ids,
            do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p, state_seeds=seeds,
            sampling_seeds=seeds,
            on_finish=lambda index, tokens, steps: on_done(index, self.completion(tokens, steps)))

    def completion(self, ids: list[int], steps_used: list[int]) -> dict:
        end = next((i for i, token in enumerate(ids) if token in self.eos_ids), None)
        kept = ids if end is None else ids[:end]
        completion = {"completion": self.tokenizer.decode(kept, skip_special_tokens=True),
                      "num_tokens": len(ids) if end is None else end + 1, "finished": end is not None}
        if self.args.exit_threshold is not None or self.args.sampler == "diffusion":  # the steps its tokens used
            completion["mean_steps_used"] = sum(steps_used) / len(steps_used)
        return completion


def stand_in(complete: Callable[[dict], str]) -> Backend:
    """A Backend from a function request -> completion (an oracle, a fake model in tests); it generates no tokens."""
    def backend(requests, num_steps, kv_cache_slots, on_done):
        for index, request in enumerate(requests):
            on_done(index, {"completion": complete(request), "num_tokens": 0, "finished": True})

    return backend


class SampleSink:
    """Where finished samples go: scored in groups of `group_size` (grading is batched), appended to samples.jsonl
    and flushed, so an interruption loses at most one group. A sample's `seconds` is the generation time since the
    previous one finished: under continuous batching they sum to the whole generation time."""

    def __init__(self, file, records: dict, progress: tqdm, is_gsm8k: bool, args: EvalArguments, group_size: int):
        self.file, self.records, self.progress = file, records, progress
        self.is_gsm8k, self.args, self.group_size = is_gsm8k, args, group_size
        self.pending, self.clock = [], time.perf_counter()

    def add(self, request: dict, completion: dict) -> None:
        now = time.perf_counter()
        self.pending.append((dict(request, seconds=now - self.clock), completion))
        self.clock = now
        if len(self.pending) >= self.group_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        requests, completions = zip(*self.pending, strict=True)
        for record in score(list(requests), list(completions), self.is_gsm8k, self.args):
            self.file.write(json.dumps(record) + "\n")
            self.records[SampleRef.of(record)] = record
        self.file.flush()
        self.progress.update(len(self.pending))
        self.pending, self.clock = [], time.perf_counter()  # grading time is not generation time


# ---------------------------------------------------------------------------------------------------------------
# Scoring and metrics
# ---------------------------------------------------------------------------------------------------------------


def lm_eval_gsm8k(completion: str, gold: str) -> tuple[bool, bool]:
    """lm-eval-harness gsm8k_cot exact match (strict: the first 'The answer is N.'; flexible: the last number)."""

    def normalise(text: str) -> str:
        for pattern in LM_EVAL_IGNORE:
            text = re.sub(pattern, "", text)
        return text.strip().lower()

    strict, flexible = ([next(g for g in match.groups() if g) for match in pattern.finditer(completion)]
                        for pattern in (LM_EVAL_STRICT, LM_EVAL_FLEXIBLE))
    target = normalise(gold)
    return (bool(strict) and normalise(strict[0]) == target), (bool(flexible) and normalise(flexible[-1]) == target)


def score(requests: list[dict], completions: list[dict], is_gsm8k: bool, args: EvalArguments) -> list[dict]:
    """Grade with rewards.py (math-verify; GSM8K allows a last-number fallback), and with its flexible extraction
    (models that do not box); sample records for samples.jsonl. gsm8k_cot prompts: completions end at lm-eval's stop
    sequence, and GSM8K gets lm-eval's strict/flexible scores (the \\boxed{} prompts never ask for 'The answer is
    N.', so strict would be ~0 by construction). minerva_math prompts: completions end at "Problem:", and get
    Minerva's exact match and equivalence."""
    cot, minerva = args.prompt_format == "gsm8k_cot", args.prompt_format == "minerva_math"
    stop = LM_EVAL_STOP if cot else MINERVA_STOP if minerva else None
    texts = [c["completion"].split(stop)[0] if stop else c["completion"] for c in completions]
    golds = [r["answer"] for r in requests]
    grading = dict(timeout_s=args.grader_timeout_s, num_workers=args.grader_workers)
    correct = rewards.grade_batch(texts, golds, numeric_fallback=is_gsm8k, **grading)
    flexible = rewards.grade_batch(texts, golds, extraction="flexible", **grading)
    equivalent = rewards.grade_batch(texts, golds, extraction="minerva", **grading) if minerva else [None] * len(texts)
    records = []
    for request, completion, text, verdict, flexible_verdict, minerva_verdict in zip(
            requests, completions, texts, correct, flexible, equivalent, strict=True):
        record = {key: request[key] for key in ("checkpoint", "benchmark", "steps", "id", "sample", "key", "prompt")}
        record.update(completion=text, num_tokens=completion.get("num_tokens", 0),
                      finished=completion.get("finished", True), seconds=request["seconds"],
                      extracted=rewards.extract_answer(text, numeric_fallback=is_gsm8k), gold=request["answer"],
                      correct=verdict, correct_flexible=flexible_verdict)
        if minerva:
            record["minerva_exact_match"] = rewards.minerva_exact_match(text, request["answer"])
            record["minerva_equivalent"] = minerva_verdict is True
        if "mean_steps_used" in completion:
            record["mean_steps_used"] = completion["mean_steps_used"]
        if is_gsm8k and cot:
            record["lm_eval_strict"], record["lm_eval_flexible"] = lm_eval_gsm8k(text, request["answer"])
        records.append(record)
    return records


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))  # contains p despite rounding


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """The unbiased pass@k estimator of Chen et al. (2021)."""
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


def summarise(records: list[dict], num_samples: int) -> dict:
    """Metrics of one checkpoint x benchmark x steps cell. Ungradable samples (None) count as wrong. With several
    samples, accuracy is the mean over samples (pass@1) and the interval treats per-problem means as successes."""
    by_problem = defaultdict(list)
    for record in records:
        by_problem[record["id"]].append(record)
    n = len(by_problem)
    per_problem = [sum(bool(r["correct"]) for r in group) / len(group) for group in by_problem.values()]
    low, high = wilson_interval(sum(per_problem), n)
    seconds = sum(r["seconds"] for r in records)
    tokens = sum(r["num_tokens"] for r in records)
    cell = {"n": n, "samples_per_problem": num_samples, "accuracy": sum(per_problem) / max(n, 1),
            "ci95_low": low, "ci95_high": high, "ungradable": sum(r["correct"] is None for r in records),
            "truncated": sum(not r["finished"] for r in records), "mean_output_tokens": tokens / max(len(records), 1),
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0, "wall_time_s": seconds}
    if records and "mean_steps_used" in records[0]:  # adaptive exit
        cell["mean_steps_used"] = sum(r["mean_steps_used"] for r in records) / len(records)
    for key in ("correct_flexible", "lm_eval_strict", "lm_eval_flexible", "minerva_exact_match", "minerva_equivalent"):
        if records and all(key in r for r in records):  # its prompt format's, and not in samples of older versions
            cell[key] = sum(bool(r[key]) for r in records) / len(records)
    if num_samples > 1:
        for k in sorted({1, num_samples} | {2**i for i in range(1, num_samples.bit_length()) if 2**i <= num_samples}):
            cell[f"pass@{k}"] = sum(pass_at_k(len(g), sum(bool(r["correct"]) for r in g), k)
                                    for g in by_problem.values()) / max(n, 1)
        votes_right = 0
        for group in by_problem.values():
            votes = Counter(" ".join(r["extracted"].split()) for r in group if r["extracted"])
            if votes:
                top = votes.most_common(1)[0][0]
                votes_right += any(r["correct"] for r in group if r["extracted"] and " ".join(
                    r["extracted"].split()) == top)
        cell[f"maj@{num_samples}"] = votes_right / max(n, 1)
    return cell


# ---------------------------------------------------------------------------------------------------------------
# Output folder: resumable samples, results, plot
# ---------------------------------------------------------------------------------------------------------------


def read_samples(path: Path) -> list[dict]:
    """Records of earlier runs. A last line cut by a kill is dropped, and cut from the file so appends stay clean."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    body, newline, tail = raw.rpartition(b"\n")
    records = []
    for number, line in enumerate(body.split(b"\n") if newline else [], 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}: line {number} is corrupt ({error}); remove it or use a new output_dir") from None
    if tail.strip():
        try:
            records.append(json.loads(tail))
            path.write_bytes(raw + b"\n")
        except json.JSONDecodeError:
            path.write_bytes(raw[:len(raw) - len(tail)])
    return records


@dataclass(frozen=True)
class SampleRef:
    """One sample of one problem: resume reuses a record of samples.jsonl only when all six fields match, `key` being
    the hash of every setting that changes the completion (sample_key)."""

    checkpoint: str
    benchmark: str
    steps: int
    id: str | int
    sample: int
    key: str | None

    @classmethod
    def of(cls, record: dict) -> "SampleRef":
        return cls(record["checkpoint"], record["benchmark"], record["steps"], record["id"], record["sample"],
                   record.get("key"))


def files_fingerprint(source: str, patterns: tuple[str, ...]) -> str:
    """sha256 of the names and contents of a local directory's files matching `patterns`, so a model or adapter
    retrained in the same directory never reuses its predecessor's samples; a hub id stands for itself."""
    directory = Path(source)
    if not directory.is_dir():
        return source
    digest = hashlib.sha256()
    for path in sorted({p for pattern in patterns for p in directory.glob(pattern) if p.is_file()}):
        with open(path, "rb") as file:
            digest.update(path.name.encode() + hashlib.file_digest(file, "sha256").digest())
    return digest.hexdigest()


def adapter_fingerprint(adapter: str) -> str:
    return files_fingerprint(adapter, ("adapter_*",))  # adapter_config.json, adapter_model.*


def model_fingerprint(model_name_or_path: str) -> str:
    """A local base model's config and weights (~7 GB at full size: seconds to hash), or its hub id."""
    return files_fingerprint(resolve_model_path(model_name_or_path), ("config.json", "*.safetensors", "*.bin"))


def completion_settings(args: EvalArguments, model: str, checkpoint: str, num_steps: int, plan: MemoryPlan) -> dict:
    """Everything but the prompt that changes one checkpoint's completions at one depth (batch size does not):
    `model` and `checkpoint` are the base model's and the adapter's fingerprints."""
    settings = {key: getattr(args, key) for key in ("load_in_4bit", "max_new_tokens", "do_sample", "init_state",
                                                    "exit_threshold", "seed")}
    if args.do_sample:
        settings.update(temperature=args.temperature, top_p=args.top_p)
    if plan.working_copy:  # NF4 dequantized: the same function, but not bit for bit
        settings["working_copy"] = True
    if (diffusion := diffusion_settings(args)) is not None:  # absent for sequential: earlier samples still resume
        settings["diffusion"] = asdict(diffusion)
    return {**settings, "model_name_or_path": model, "dtype": str(device_and_dtype(args)[1]), "checkpoint": checkpoint,
            "num_steps": num_steps, "kv_cache_slots": plan.kv_cache_slots}


def sample_key(settings: dict, prompt: str, answer: str) -> str:
    return hashlib.sha256(json.dumps([settings, prompt, answer], sort_keys=True).encode()).hexdigest()[:16]


def plot(cells: list[dict], path: Path) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = defaultdict(list)
    for cell in cells:
        lines[f"{cell['checkpoint']} / {cell['benchmark']}"].append(cell)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, line in lines.items():
        line.sort(key=lambda c: c["num_steps"])
        steps, accuracy = [c["num_steps"] for c in line], [100 * c["accuracy"] for c in line]
        errors = [[100 * (c["accuracy"] - c["ci95_low"]) for c in line],
                  [100 * (c["ci95_high"] - c["accuracy"]) for c in line]]
        ax.errorbar(steps, accuracy, yerr=errors, marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    all_steps = sorted({c["num_steps"] for c in cells})
    ax.set_xticks(all_steps, labels=[str(steps) for steps in all_steps])
    ax.set_xlabel("recurrent steps")
    ax.set_ylabel("accuracy (%), 95% Wilson interval")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def versions() -> dict:
    # torch.__version__ carries the build ('2.14.1+cu130'), which a pip wheel's metadata ('2.14.1') may not.
    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("transformers", "peft", "datasets", "trl", "math-verify", "bitsandbytes"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def git_commit() -> str | None:
    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def build_problems(args: EvalArguments, benchmarks: dict[str, str], tokenizer) -> tuple[dict, dict]:
    """label -> rows, each with its rendered "prompt"; label -> whether the benchmark is in GSM8K's schema."""
    problems, is_gsm8k = {}, {}
    for label, source in benchmarks.items():
        rows, schema = load_rows(source)
        problems[label], is_gsm8k[label] = fixed_subset(rows, args.limit, args.seed), schema == "gsm8k"
    exemplars = []
    if args.num_fewshot and args.prompt_format == "boxed":
        pool = load_rows(args.fewshot_source, args.fewshot_split)[0]
        exemplars = random.Random(args.seed).sample(pool, args.num_fewshot)
    for rows in problems.values():
        for row in rows:
            shots = [e for e in exemplars if e["problem"] != row["problem"]]  # never the question as its own shot
            row["prompt"] = tokenizer.apply_chat_template(chat_messages(row["problem"], args, shots),
                                                          add_generation_prompt=True, tokenize=False)
    return problems, is_gsm8k


def check_arguments(args: EvalArguments) -> None:
    if args.num_samples > 1 and not args.do_sample:
        raise ValueError("num_samples > 1 needs do_sample (greedy samples would all be the same)")
    if args.init_state not in ("random", "zero"):
        raise ValueError(f"init_state must be 'random' or 'zero', got {args.init_state!r}")
    if args.prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {args.prompt_format!r}")
    fixed_exemplars = {"gsm8k_cot": data.GSM8K_COT_EXEMPLARS, "minerva_math": data.MINERVA_MATH_EXEMPLARS}
    available = len(fixed_exemplars.get(args.prompt_format, ()))
    if available and args.num_fewshot > available:  # boxed prompts draw theirs from fewshot_source instead
        raise ValueError(f"{args.prompt_format} has {available} exemplars, num_fewshot is {args.num_fewshot}")
    if args.sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {args.sampler!r}")
    if (diffusion := diffusion_settings(args)) is not None:  # its own checks of the knobs
        if args.exit_threshold is not None:
            raise ValueError("sampler diffusion freezes positions by its own rule: leave exit_threshold unset")
        for steps in args.num_steps:
            diffusion.check_depth(steps)


SAMPLERS = ("sequential", "diffusion")


def diffusion_settings(args: EvalArguments) -> DiffusionSettings | None:
    """The diffusion-forcing knobs of `--sampler diffusion`; None for sequential decoding."""
    if args.sampler != "diffusion":
        return None
    return DiffusionSettings(args.diffusion_inner_steps, args.diffusion_new_positions, args.diffusion_max_wavefront,
                             args.diffusion_freeze, args.diffusion_freeze_threshold, args.diffusion_new_position_state)


def check_adapters(checkpoints: dict[str, str | None]) -> None:
    """Every adapter directory exists and holds an adapter, before any model loads: a wrong path must not surface
    only after the base model's whole sweep has run."""
    for label, adapter in checkpoints.items():
        if adapter not in (None, "base") and not (Path(adapter) / "adapter_config.json").is_file():
            found = "no such directory" if not Path(adapter).is_dir() else "no adapter_config.json in it"
            raise FileNotFoundError(f"adapter {label}={adapter}: {found} (train it first, or fix the path)")


def wanted_samples(args: EvalArguments, problems: dict[str, list[dict]], plans: dict[int, MemoryPlan],
                   base_fingerprint: str, fingerprints: dict[str, str | None]) -> list[SampleRef]:
    """Every sample the run reports: checkpoint x depth x benchmark x problem x sample index."""
    wanted = []
    for checkpoint, fingerprint in fingerprints.items():
        for steps in args.num_steps:
            settings = completion_settings(args, base_fingerprint, fingerprint, steps, plans[steps])
            wanted += [SampleRef(checkpoint, label, steps, row["id"], sample,
                                 sample_key(settings, row["prompt"], row["answer"]))
                       for label, rows in problems.items() for row in rows for sample in range(args.num_samples)]
    return wanted


def requests_for(refs: list[SampleRef], rows: list[dict], seed: int) -> list[dict]:
    """The backend's requests for `refs` (one benchmark's samples), longest prompts first: a batch's long prompts
    start together instead of holding up the last batch. A sample's seed is a pure function of what it is."""
    row_of = {row["id"]: row for row in rows}
    requests = [dict(row_of[ref.id], **asdict(ref), seed=stable_seed(seed, ref.benchmark, ref.id, ref.sample))
                for ref in refs]
    return sorted(requests, key=lambda request: -len(request["prompt"]))


def decode_into(sink: SampleSink, backend: Backend, requests: list[dict], steps: int, plan: MemoryPlan) -> None:
    backend(requests, steps, plan.kv_cache_slots, lambda index, done: sink.add(requests[index], done))
    sink.flush()


def result_cells(records: dict[SampleRef, dict], checkpoints: list[str], benchmarks: list[str],
                 plans: dict[int, MemoryPlan], num_samples: int) -> list[dict]:
    """One cell per checkpoint x benchmark x depth: its metrics and the memory plan it ran with."""
    groups = defaultdict(list)
    for ref, record in records.items():
        groups[ref.checkpoint, ref.benchmark, ref.steps].append(record)
    return [{"checkpoint": checkpoint, "benchmark": label, "num_steps": steps,
             **summarise(groups[checkpoint, label, steps], num_samples), "batch_size": plan.batch_size,
             "kv_cache_slots": plan.kv_cache_slots}  # None: exact, one slot per step
            for checkpoint in checkpoints for label in benchmarks for steps, plan in plans.items()]


def main(args: EvalArguments, backends: dict[str, Backend] | None = None) -> list[dict]:
    """Evaluate every checkpoint x benchmark x steps; returns the result cells (also in results.json).
    `backends` (label -> Backend) replaces loading the model and adapters, e.g. by an oracle in tests."""
    check_arguments(args)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    print(f"evaluate.py config (seed {args.seed}):\n{json.dumps(asdict(args), indent=2)}", flush=True)
    output_dir = Path(args.output_dir)

    benchmarks = dict(map(parse_labelled, args.benchmarks))
    checkpoints = dict(map(parse_labelled, args.adapters)) if backends is None else dict.fromkeys(backends)
    if len(benchmarks) < len(args.benchmarks) or (backends is None and len(checkpoints) < len(args.adapters)):
        raise ValueError(f"labels must be unique (name them label=source): {args.benchmarks} {args.adapters}")
    check_adapters(checkpoints)
    tokenizer = data.load_tokenizer(args.model_name_or_path)
    problems, is_gsm8k = build_problems(args, benchmarks, tokenizer)
    prompt_length = max((len(tokenizer(row["prompt"], add_special_tokens=False).input_ids)
                         for rows in problems.values() for row in rows), default=1)
    plans, budget_source = memory_plans(args, prompt_length)
    for steps, plan in plans.items():
        print(f"memory plan, {steps} steps: batch {plan.batch_size}, KV cache "
              f"{'exact' if plan.kv_cache_slots is None else f'{plan.kv_cache_slots} shared slot(s)'}, "
              f"{'NF4 decoded from a dense working copy, ' if plan.working_copy else ''}"
              f"{plan.total_bytes / 1e9:.2f} of {plan.budget_bytes / 1e9:.2f} GB ({budget_source}; longest prompt "
              f"{prompt_length} tokens)")

    output_dir.mkdir(parents=True, exist_ok=True)
    samples_path = output_dir / "samples.jsonl"
    base_fingerprint = model_fingerprint(args.model_name_or_path)
    fingerprints = {checkpoint: adapter if adapter in (None, "base") else adapter_fingerprint(adapter)
                    for checkpoint, adapter in checkpoints.items()}
    wanted = wanted_samples(args, problems, plans, base_fingerprint, fingerprints)
    wanted_set = set(wanted)
    records = {SampleRef.of(r): r for r in read_samples(samples_path) if SampleRef.of(r) in wanted_set}
    pending = [ref for ref in wanted if ref not in records]
    print(f"{len(wanted)} samples wanted, {len(records)} already in {samples_path}, {len(pending)} to generate")

    progress = tqdm(total=len(pending), desc="generating", unit="sample", dynamic_ncols=True)
    with open(samples_path, "a", encoding="utf-8") as samples_file:
        for checkpoint, adapter in checkpoints.items():
            todo = [ref for ref in pending if ref.checkpoint == checkpoint]
            if not todo:
                continue
            backend = backends[checkpoint] if backends is not None else HuginnBackend(
                args, None if adapter == "base" else adapter, plans, prompt_length)
            for steps, plan in plans.items():
                for label in problems:
                    group = [ref for ref in todo if (ref.benchmark, ref.steps) == (label, steps)]
                    sink = SampleSink(samples_file, records, progress, is_gsm8k[label], args, plan.batch_size)
                    decode_into(sink, backend, requests_for(group, problems[label], args.seed), steps, plan)
            del backend
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    progress.close()

    cells = result_cells(records, list(checkpoints), list(problems), plans, args.num_samples)
    results = {
        "results": cells,
        "memory_plan": {"budget_source": budget_source, "longest_prompt_tokens": prompt_length,
                        "by_num_steps": {steps: asdict(plan) for steps, plan in plans.items()}},
        "config": asdict(args),
        "checkpoints": checkpoints,
        "model_fingerprint": base_fingerprint,
        "checkpoint_fingerprints": fingerprints,
        "benchmarks": benchmarks,
        "prompt": {"format": args.prompt_format, "system_prompt": args.system_prompt,
                   "instruction": data.ANSWER_INSTRUCTION if args.prompt_format == "boxed" else None,
                   "num_fewshot": args.num_fewshot, "chat_template": tokenizer.chat_template,
                   "examples": {label: rows[0]["prompt"] for label, rows in problems.items() if rows}},
        "versions": versions(),
        "git_commit": git_commit(),
        "command": " ".join(sys.argv),
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    plot(cells, output_dir / "accuracy_vs_steps.png")
    for cell in cells:
        extras = (f"  lm-eval strict {100 * cell['lm_eval_strict']:.2f} flexible {100 * cell['lm_eval_flexible']:.2f}"
                  if "lm_eval_strict" in cell else "")
        extras += (f"  minerva exact match {100 * cell['minerva_exact_match']:.2f} equivalent "
                   f"{100 * cell['minerva_equivalent']:.2f}" if "minerva_exact_match" in cell else "")
        extras += f"  mean steps used {cell['mean_steps_used']:.2f}" if "mean_steps_used" in cell else ""
        print(f"{cell['checkpoint']:>12} {cell['benchmark']:>14} steps {cell['num_steps']:>3}: "
              f"{100 * cell['accuracy']:6.2f}% [{100 * cell['ci95_low']:.1f}, {100 * cell['ci95_high']:.1f}] "
              f"n={cell['n']}{extras}")
    print(f"wrote {output_dir / 'results.json'}, {samples_path}, {output_dir / 'accuracy_vs_steps.png'}")
    return cells


def parse_args(argv: list[str] | None = None) -> EvalArguments:
    """The CLI, with `--config x.yaml` giving defaults the CLI overrides; unknown or abbreviated keys are errors."""
    (args,) = TrlParser(EvalArguments, allow_abbrev=False).parse_args_and_config(argv)
    return args


if __name__ == "__main__":
    main(parse_args())
