"""GSM8K and MATH accuracy of huginn-0125 (base or LoRA adapters) versus the number of recurrent steps.

Tiny CPU run (offline, the embedded tiny default; a random model, so accuracy is ~0: this checks the pipeline):

    python tiny.py --output_dir outputs/tiny-data --data_only
    python evaluate.py --config configs/eval_tiny.yaml

huginn-0125 on one GPU, zero-shot chat with the authors' math system prompt, answer in \\boxed{}, greedy:

    python evaluate.py --model_name_or_path tomg-group-umd/huginn-0125 --benchmarks gsm8k math500 \\
        --num_steps 4 8 16 32 64 --max_new_tokens 512 --batch_size 16 --output_dir outputs/eval-huginn

Closest to the paper's settings (32 steps; GSM8K 8-shot as multi-turn chat with the system prompt; MATH without it;
the published numbers themselves come from lm-eval-harness's own gsm8k_cot / minerva_math prompts, see README):

    python evaluate.py --model_name_or_path tomg-group-umd/huginn-0125 --benchmarks gsm8k --num_steps 32 \\
        --num_fewshot 8 --fewshot_source openai/gsm8k --output_dir outputs/eval-paper-gsm8k
    python evaluate.py --model_name_or_path tomg-group-umd/huginn-0125 --benchmarks math --num_steps 32 \\
        --system_prompt "" --output_dir outputs/eval-paper-math

Compare checkpoints in one table and plot:   --adapters base sft=outputs/sft grpo=outputs/grpo
Sampling, pass@k and maj@k:                  --do_sample --num_samples 8 --temperature 0.7 --top_p 0.95
Local files in the hub schema:               --benchmarks ../shared/benchmarks/gsm8k_test.jsonl (label: file stem)
                                             or --benchmarks gsm8k=path/to/file.jsonl
Benchmark names: gsm8k (openai/gsm8k main test, 1319), math500 (HuggingFaceH4/MATH-500), math (the full
5000-problem MATH test, EleutherAI/hendrycks_math, answers taken from the solutions' last \\boxed{}).

Outputs in output_dir: results.json (accuracy with Wilson 95% interval per checkpoint x benchmark x steps, GSM8K's
lm-eval strict/flexible scores, tokens, speed, config, prompt, versions, git commit), samples.jsonl (one line per
generated sample, appended and flushed as it goes) and accuracy_vs_steps.png. Rerunning with the same output_dir
resumes: samples already in samples.jsonl are not generated again.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import matplotlib
import torch
from peft import PeftModel
from tqdm import tqdm
from transformers import AutoModelForCausalLM
from trl import TrlParser

import data
import rewards
from generation import HuginnEngine
from modeling_huginn_qlora import nf4_quantization_config
from tiny import resolve_model_path

BENCHMARKS = {"gsm8k": "openai/gsm8k", "math500": "HuggingFaceH4/MATH-500", "math": "EleutherAI/hendrycks_math"}
# Settings every sample in one output_dir must share; the others (steps, benchmarks, adapters, limit) only
# select which samples a run needs.
GENERATION_SETTINGS = ("model_name_or_path", "dtype", "load_in_4bit", "system_prompt", "num_fewshot",
                       "fewshot_source", "fewshot_split", "max_new_tokens", "do_sample", "temperature", "top_p",
                       "seed", "init_state", "kv_cache_slots", "exit_threshold")
# lm-eval-harness gsm8k / gsm8k-cot filters and exact_match normalisation, so GSM8K compares with published numbers.
LM_EVAL_STRICT = re.compile(r"#### (-?[0-9.,]+)|The answer is (-?[0-9.,]+).")
LM_EVAL_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
LM_EVAL_IGNORE = (r",", r"\$", r"(?s).*#### ", r"\.$")

# A generation backend: (requests, num_steps) -> one {"completion", "num_tokens", "finished"} per request. A request
# holds "id", "sample", "seed", "prompt" and the gold "problem", "solution", "answer" (stand-ins may use them).
Backend = Callable[[list[dict], int], list[dict]]


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
    batch_size: int = field(default=16, metadata={"help": "prompts per generate call; higher: faster, more memory"})
    max_new_tokens: int = 512
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    num_samples: int = field(default=1, metadata={"help": "samples per problem (pass@k, maj@k); needs do_sample"})
    temperature: float = 0.7
    top_p: float = 0.95
    system_prompt: str = field(default=data.SYSTEM_PROMPT, metadata={"help": "'' for none"})
    num_fewshot: int = field(default=0, metadata={"help": "solved exemplars given as earlier chat turns"})
    fewshot_source: str = field(default="openai/gsm8k", metadata={"help": "hub id or local file of exemplars"})
    fewshot_split: str = "train"
    init_state: str = field(default="random", metadata={"help": "initial recurrent state: random (seeded) or zero"})
    kv_cache_slots: int | None = field(default=None, metadata={"help": "share core KV slots (step mod k)"})
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


def chat_messages(problem: str, system_prompt: str, exemplars: list[dict]) -> list[dict]:
    """data.prompt_messages, with solved exemplars as earlier user/assistant turns when few-shot."""
    shots = []
    for example in exemplars:
        shots += data.prompt_messages(example["problem"], None)
        shots.append({"role": "assistant", "content": data.boxed_solution(example["solution"], example["answer"])})
    messages = data.prompt_messages(problem, system_prompt or None)
    return messages[:-1] + shots + messages[-1:]


# ---------------------------------------------------------------------------------------------------------------
# Generation backend
# ---------------------------------------------------------------------------------------------------------------


class HuginnBackend:
    """Batched (left-padded) generation with huginn, plus an optional LoRA adapter (merged unless NF4)."""

    def __init__(self, args: EvalArguments, adapter: str | None):
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = (torch.bfloat16 if self.device.type == "cuda" else torch.float32) if args.dtype == "auto" else getattr(
            torch, args.dtype)
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model_path(args.model_name_or_path), dtype=dtype, device_map=self.device,
            quantization_config=nf4_quantization_config(dtype) if args.load_in_4bit else None)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapter)
            model = model if args.load_in_4bit else model.merge_and_unload()  # merged: no LoRA cost per block pass
        self.model = model.eval()
        self.tokenizer = data.load_tokenizer(args.model_name_or_path)
        eos = model.generation_config.eos_token_id
        end_turn = self.tokenizer.convert_tokens_to_ids("<|end_turn|>")  # a chat turn ends there, whatever the config
        eos_ids = {*(eos if isinstance(eos, list) else [eos]), end_turn} - {None, self.tokenizer.unk_token_id}
        self.eos_ids = sorted(eos_ids)

    def __call__(self, requests: list[dict], num_steps: int) -> list[dict]:
        if self.args.exit_threshold is not None:
            return self.generate_adaptive(requests, num_steps)
        args = self.args
        batch = self.tokenizer([r["prompt"] for r in requests], return_tensors="pt", padding=True,
                               add_special_tokens=False).to(self.device)  # the chat template holds the bos token
        sampling = {}
        if args.do_sample:
            generator = torch.Generator(self.device).manual_seed(requests[0]["seed"])
            sampling = dict(temperature=args.temperature, top_p=args.top_p, generator=generator)
        output = self.model.generate(
            batch.input_ids, attention_mask=batch.attention_mask, num_steps=num_steps,
            max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, init_state=args.init_state,
            state_seeds=torch.tensor([r["seed"] for r in requests]), kv_cache_slots=args.kv_cache_slots,
            eos_token_id=self.eos_ids, pad_token_id=self.tokenizer.pad_token_id, **sampling)
        return [self.completion(ids) for ids in output[:, batch.input_ids.shape[1]:].tolist()]

    def generate_adaptive(self, requests: list[dict], num_steps: int) -> list[dict]:
        """The engine's per-token adaptive exit (at most num_steps); reports the mean steps each completion used."""
        args = self.args
        prompts = [self.tokenizer(r["prompt"], add_special_tokens=False).input_ids for r in requests]
        engine = HuginnEngine(self.model, len(prompts), max(map(len, prompts)) + args.max_new_tokens,
                              kv_cache_slots=args.kv_cache_slots or 1, exit_threshold=args.exit_threshold)
        seeds = [r["seed"] for r in requests]
        result = engine.generate(prompts, num_steps=num_steps, max_new_tokens=args.max_new_tokens,
                                 eos_token_ids=self.eos_ids, do_sample=args.do_sample, temperature=args.temperature,
                                 top_p=args.top_p, state_seeds=seeds, sampling_seeds=seeds)
        return [{**self.completion(tokens), "mean_steps_used": sum(steps) / len(steps)}
                for tokens, steps in zip(result.tokens, result.steps_used)]

    def completion(self, ids: list[int]) -> dict:
        end = next((i for i, token in enumerate(ids) if token in self.eos_ids), None)
        kept = ids if end is None else ids[:end]
        return {"completion": self.tokenizer.decode(kept, skip_special_tokens=True),
                "num_tokens": len(ids) if end is None else end + 1, "finished": end is not None}


def stand_in(complete: Callable[[dict], str]) -> Backend:
    """A Backend from a function request -> completion (an oracle, a fake model in tests); it generates no tokens."""
    return lambda requests, num_steps: [{"completion": complete(r), "num_tokens": 0, "finished": True}
                                        for r in requests]


# ---------------------------------------------------------------------------------------------------------------
# Scoring and metrics
# ---------------------------------------------------------------------------------------------------------------


def lm_eval_gsm8k(completion: str, gold: str) -> tuple[bool, bool]:
    """lm-eval-harness GSM8K exact match (strict: first '#### N' / 'The answer is N'; flexible: last number)."""

    def normalise(text: str) -> str:
        for pattern in LM_EVAL_IGNORE:
            text = re.sub(pattern, "", text)
        return text.strip().lower()

    strict, flexible = ([next(g for g in groups if g) for groups in pattern.findall(completion)]
                        for pattern in (LM_EVAL_STRICT, LM_EVAL_FLEXIBLE))
    target = normalise(gold)
    return (bool(strict) and normalise(strict[0]) == target), (bool(flexible) and normalise(flexible[-1]) == target)


def score(requests: list[dict], completions: list[dict], is_gsm8k: bool, args: EvalArguments) -> list[dict]:
    """Grade with rewards.py (math-verify; GSM8K allows a last-number fallback); sample records for samples.jsonl."""
    texts = [c["completion"] for c in completions]
    correct = rewards.grade_batch(texts, [r["answer"] for r in requests], timeout_s=args.grader_timeout_s,
                                  num_workers=args.grader_workers, numeric_fallback=is_gsm8k)
    records = []
    for request, completion, verdict in zip(requests, completions, correct):
        record = {key: request[key] for key in ("checkpoint", "benchmark", "steps", "id", "sample", "prompt")}
        record.update(completion=completion["completion"], num_tokens=completion.get("num_tokens", 0),
                      finished=completion.get("finished", True), seconds=request["seconds"],
                      extracted=rewards.extract_answer(completion["completion"], numeric_fallback=is_gsm8k),
                      gold=request["answer"], correct=verdict)
        if "mean_steps_used" in completion:
            record["mean_steps_used"] = completion["mean_steps_used"]
        if is_gsm8k:
            record["lm_eval_strict"], record["lm_eval_flexible"] = lm_eval_gsm8k(completion["completion"],
                                                                                 request["answer"])
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


def summarise(records: list[dict], is_gsm8k: bool, num_samples: int) -> dict:
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
    if is_gsm8k:
        for key in ("lm_eval_strict", "lm_eval_flexible"):
            cell[key] = sum(r[key] for r in records) / max(len(records), 1)
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
            raise ValueError(f"{path}: line {number} is corrupt ({error}); remove it or use a new output_dir") from None
    if tail.strip():
        try:
            records.append(json.loads(tail))
            path.write_bytes(raw + b"\n")
        except json.JSONDecodeError:
            path.write_bytes(raw[:len(raw) - len(tail)])
    return records


def record_key(record: dict) -> tuple:
    return record["checkpoint"], record["benchmark"], record["steps"], record["id"], record["sample"]


def check_settings(output_dir: Path, args: EvalArguments) -> None:
    """Refuse to mix samples generated with different settings in one output_dir."""
    settings = {key: getattr(args, key) for key in GENERATION_SETTINGS}
    path = output_dir / "settings.json"
    if path.exists():
        saved = json.loads(path.read_text())
        changed = sorted(key for key in settings if saved.get(key) != settings[key])
        if changed:
            raise ValueError(f"{output_dir} holds samples generated with other settings ({', '.join(changed)}): "
                             "use a new output_dir")
    path.write_text(json.dumps(settings, indent=2))


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
    packages = ("torch", "transformers", "peft", "datasets", "trl", "math-verify", "bitsandbytes")
    found = {}
    for package in packages:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return {"python": platform.python_version(), **found}


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


def main(args: EvalArguments, backends: dict[str, Backend] | None = None) -> list[dict]:
    """Evaluate every checkpoint x benchmark x steps; returns the result cells (also in results.json).
    `backends` (label -> Backend) replaces loading the model and adapters, e.g. by an oracle in tests."""
    if args.exit_threshold is not None and args.init_state != "random":
        raise ValueError("adaptive exit (the engine) starts from the seeded random state: use init_state random")
    if args.num_samples > 1 and not args.do_sample:
        raise ValueError("num_samples > 1 needs do_sample (greedy samples would all be the same)")
    if args.init_state not in ("random", "zero"):
        raise ValueError(f"init_state must be 'random' or 'zero', got {args.init_state!r}")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    print(f"evaluate.py config (seed {args.seed}):\n{json.dumps(asdict(args), indent=2)}", flush=True)
    output_dir = Path(args.output_dir)

    benchmarks = dict(map(parse_labelled, args.benchmarks))
    checkpoints = dict(map(parse_labelled, args.adapters)) if backends is None else dict.fromkeys(backends)
    if len(benchmarks) < len(args.benchmarks) or (backends is None and len(checkpoints) < len(args.adapters)):
        raise ValueError(f"labels must be unique (name them label=source): {args.benchmarks} {args.adapters}")
    problems, is_gsm8k = {}, {}
    for label, source in benchmarks.items():
        rows, schema = load_rows(source)
        problems[label], is_gsm8k[label] = fixed_subset(rows, args.limit, args.seed), schema == "gsm8k"
    exemplars = []
    if args.num_fewshot:
        pool = load_rows(args.fewshot_source, args.fewshot_split)[0]
        exemplars = random.Random(args.seed).sample(pool, args.num_fewshot)
    tokenizer = data.load_tokenizer(args.model_name_or_path)
    for label, rows in problems.items():
        for row in rows:
            shots = [e for e in exemplars if e["problem"] != row["problem"]]  # never the question as its own shot
            row["prompt"] = tokenizer.apply_chat_template(chat_messages(row["problem"], args.system_prompt, shots),
                                                          add_generation_prompt=True, tokenize=False)

    output_dir.mkdir(parents=True, exist_ok=True)
    check_settings(output_dir, args)
    samples_path = output_dir / "samples.jsonl"
    rows_by_id = {(label, row["id"]): row for label, rows in problems.items() for row in rows}
    wanted = [(checkpoint, label, steps, row["id"], sample) for checkpoint in checkpoints for steps in args.num_steps
              for label, rows in problems.items() for row in rows for sample in range(args.num_samples)]
    wanted_set = set(wanted)
    records = {record_key(r): r for r in read_samples(samples_path) if record_key(r) in wanted_set}
    pending = [key for key in wanted if key not in records]  # (checkpoint, benchmark, steps, id, sample)
    print(f"{len(wanted)} samples wanted, {len(records)} already in {samples_path}, {len(pending)} to generate")

    progress = tqdm(total=len(pending), desc="generating", unit="sample", dynamic_ncols=True)
    with open(samples_path, "a", encoding="utf-8") as sink:
        for checkpoint, adapter in checkpoints.items():
            todo = [key for key in pending if key[0] == checkpoint]
            if not todo:
                continue
            backend = backends[checkpoint] if backends is not None else HuginnBackend(
                args, None if adapter == "base" else adapter)
            for steps in args.num_steps:
                for label in problems:
                    group = [key for key in todo if key[1:3] == (label, steps)]
                    group.sort(key=lambda key: -len(rows_by_id[label, key[3]]["prompt"]))  # less padding
                    for start in range(0, len(group), args.batch_size):
                        batch = [dict(rows_by_id[label, id_], checkpoint=checkpoint, benchmark=label, steps=steps,
                                      sample=sample, seed=stable_seed(args.seed, label, id_, sample))
                                 for _, _, _, id_, sample in group[start:start + args.batch_size]]
                        began = time.perf_counter()
                        completions = backend(batch, steps)
                        for request in batch:  # the batch's time, shared by its samples
                            request["seconds"] = (time.perf_counter() - began) / len(batch)
                        for record in score(batch, completions, is_gsm8k[label], args):
                            sink.write(json.dumps(record) + "\n")
                            records[record_key(record)] = record
                        sink.flush()
                        progress.update(len(batch))
            del backend
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    progress.close()

    cells = []
    for checkpoint in checkpoints:
        for label in problems:
            for steps in args.num_steps:
                group = [r for key, r in records.items() if key[:3] == (checkpoint, label, steps)]
                cells.append({"checkpoint": checkpoint, "benchmark": label, "num_steps": steps,
                              **summarise(group, is_gsm8k[label], args.num_samples)})
    results = {
        "results": cells,
        "config": asdict(args),
        "checkpoints": checkpoints,
        "benchmarks": benchmarks,
        "prompt": {"system_prompt": args.system_prompt, "instruction": data.ANSWER_INSTRUCTION,
                   "num_fewshot": args.num_fewshot, "chat_template": tokenizer.chat_template,
                   "examples": {label: rows[0]["prompt"] for label, rows in problems.items() if rows}},
        "versions": versions(),
        "git_commit": git_commit(),
        "command": " ".join(sys.argv),
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    plot(cells, output_dir / "accuracy_vs_steps.png")
    for cell in cells:
        gsm8k = (f"  lm-eval strict {100 * cell['lm_eval_strict']:.2f} flexible {100 * cell['lm_eval_flexible']:.2f}"
                 if "lm_eval_strict" in cell else "")
        print(f"{cell['checkpoint']:>12} {cell['benchmark']:>14} steps {cell['num_steps']:>3}: "
              f"{100 * cell['accuracy']:6.2f}% [{100 * cell['ci95_low']:.1f}, {100 * cell['ci95_high']:.1f}] "
              f"n={cell['n']}{gsm8k}")
    print(f"wrote {output_dir / 'results.json'}, {samples_path}, {output_dir / 'accuracy_vs_steps.png'}")
    return cells


def parse_args(argv: list[str] | None = None) -> EvalArguments:
    """The CLI, with `--config x.yaml` giving defaults the CLI overrides; unknown or abbreviated keys are errors."""
    (args,) = TrlParser(EvalArguments, allow_abbrev=False).parse_args_and_config(argv)
    return args


if __name__ == "__main__":
    main(parse_args())
