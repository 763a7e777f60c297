"""Every stage at full size on one GPU, in one call of <= 8 minutes: huginn-0125's architecture (HuginnConfig())
with random weights made on the GPU, driven through the project's own code.

    python benchmarks/gpu_check.py --dry_run --output_dir outputs/gpu-check-dry   # CPU, tiny model, seconds (CI)
    python benchmarks/gpu_check.py --output_dir outputs/gpu-check                  # one GPU, full size, <= 8 min

Parts, in order (`--parts` picks some; `load` always runs, it writes the checkpoint the others read):
  load    build the random model on the device, save it (bf16) with the tiny tokenizer, reload it in NF4 through
          training.load_model: seconds of each, NF4 weights resident (GiB);
  decode  generation.HuginnEngine at 32 steps, prompts of 256 random tokens: decode tok/s, prefill s and peak GiB at
          batch 1 / 16 / 64, bf16 and NF4 weights, with and without CUDA graphs; and whether its greedy tokens equal
          the simple path's (model.generate) for 64 tokens at batch 4; and diffusion forcing (DiffusionSettings,
          1 inner step per 8 steps of depth: 4 at 32) at batch 1 / 16, bf16, CUDA graphs: decode tok/s and
          sequential block passes per token;
  sft     train_sft.main with configs/sft_huginn_24gb.yaml (NF4 + LoRA), sequences of 1024 tokens, batch 1,
          24 + 8 recurrent steps, each step checkpointed: seconds and tok/s per step (the first step, a warm-up,
          left out), peak GiB;
  grpo    train_grpo.main with configs/grpo_huginn_24gb.yaml (NF4 + LoRA, micro-batches of 4): one step of
          8 prompts x 8 completions x 256 tokens at 32 steps: seconds (rollout / loss), peak GiB;
  eval    evaluate.main on 64 problems in GSM8K's schema at 32 steps, 256 new tokens: problems/s and the memory
          plan results.json records.
Each part runs under a time limit (PART_LIMITS_S) and a try/except: a part that fails or runs out of time is
recorded with ok=false and its traceback, memory is freed, and the next part runs. Peak GiB is
torch.cuda.max_memory_allocated, reset before each measurement (None on CPU). The prompts and problems are
synthetic (sums of digits, tokenized by the tiny tokenizer): with random weights only their lengths matter, and
random weights rarely emit an end token, so every completion runs to its full length.

Writes output_dir/gpu_check.jsonl (one record per part, written as each part ends, so a run killed by a timeout
keeps its finished parts) and output_dir/gpu_check.md (a dated section: our figures beside the public reference
implementation's H200 figures, and the targets with pass/fail), rewritten after each part; a full-size run also
appends that section to benchmarks/results_gpu.md. The dry run walks the same functions on the tiny model on CPU
at tiny sizes; its figures say nothing about a GPU and it never touches results_gpu.md.

On a GPU machine without network whose Python (3.12) has torch, transformers, peft, accelerate, pandas, pyarrow
(>= 24, for datasets 5), xxhash and matplotlib but not bitsandbytes, trl, datasets or math-verify: download their
wheels where pip has network, in the repository root (.whl/ is git-ignored; 44 MB in all, bitsandbytes 43 MB of it;
add pyarrow (55 MB), pandas (12 MB) or xxhash only where the image lacks them, pyarrow in a separate transfer):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \\
        --platform manylinux2014_x86_64 -d .whl bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 \\
        math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 dill==0.4.1 \\
        multiprocess==0.70.19

then copy the repository with .whl/ there and run, with OUT the folder to bring back (480 s budget in all):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
        PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
        timeout 480 python3 benchmarks/gpu_check.py --output_dir "$OUT"

Bring back $OUT/gpu_check.jsonl and $OUT/gpu_check.md, and append gpu_check.md to benchmarks/results_gpu.md here.
"""

import _thread
import argparse
import datetime
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model and data file here is local
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from trl import GRPOConfig, ModelConfig, SFTConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
import tiny  # noqa: E402
import train_grpo  # noqa: E402
import train_sft  # noqa: E402
import training  # noqa: E402
from benchmarks.bench_generate import NEVER, full_size_model, peak_gib, reset_peak, synchronize  # noqa: E402
from generation import DiffusionSettings, HuginnEngine  # noqa: E402
from modeling_huginn_qlora import END_TURN, HuginnConfig, HuginnForCausalLM  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results_gpu.md"
PARTS = ("load", "decode", "sft", "grpo", "eval")
# Seconds each part may run before it is interrupted and recorded as failed: together 450 s, inside the 480 s of
# the command with start-up. Expected (estimates, not measured): load 30, decode 90, sft 40, grpo 80, eval 40.
PART_LIMITS_S = {"load": 60, "decode": 150, "sft": 60, "grpo": 120, "eval": 60}


@dataclass(frozen=True)
class Sizes:
    full_size: bool  # HuginnConfig() on the GPU in bf16, else the tiny default on CPU in fp32
    num_steps: int  # recurrent steps per token: decode, rollouts, evaluation
    prompt_len: int  # decode prompts, random tokens
    decode_batches: tuple[int, ...]
    decode_new_tokens: int  # tokens timed per decode run (the prefill's first token not counted)
    parity_batch: int  # greedy engine vs simple path
    parity_new_tokens: int
    sft_seq: int  # tokens per SFT sequence (batch 1)
    sft_num_steps: tuple[int, int]  # (without grad, with grad)
    sft_train_steps: int  # optimizer steps; the first is a warm-up, left out of the step figures
    problem_terms: int  # terms of each GRPO / eval sum: 45 -> chat prompts of ~130 tokens, as GSM8K's
    grpo_prompts: int
    grpo_generations: int
    grpo_micro_batch: int  # completions per loss micro-batch (the 24 GB config's 4)
    grpo_completion_len: int
    grpo_backprop_steps: int
    eval_problems: int
    eval_new_tokens: int


FULL = Sizes(full_size=True, num_steps=32, prompt_len=256, decode_batches=(1, 16, 64), decode_new_tokens=32,
             parity_batch=4, parity_new_tokens=64, sft_seq=1024, sft_num_steps=(24, 8), sft_train_steps=5,
             problem_terms=45, grpo_prompts=8, grpo_generations=8, grpo_micro_batch=4, grpo_completion_len=256,
             grpo_backprop_steps=8, eval_problems=64, eval_new_tokens=256)
DRY = Sizes(full_size=False, num_steps=4, prompt_len=8, decode_batches=(1, 2), decode_new_tokens=4,
            parity_batch=2, parity_new_tokens=8, sft_seq=64, sft_num_steps=(2, 2), sft_train_steps=3,
            problem_terms=4, grpo_prompts=2, grpo_generations=2, grpo_micro_batch=2, grpo_completion_len=8,
            grpo_backprop_steps=2, eval_problems=4, eval_new_tokens=8)

# The public reference implementation of huginn-0125, as published with its measurements on one H200 (random
# weights, bf16 compute, 32 steps; decode with prompts of 64 and 64 new tokens). Not our measurements.
REFERENCE_SOURCE = "public reference implementation, one H200, random weights"
REFERENCE = {
    "nf4_load_s": 1.0, "nf4_resident_gib": 2.26,
    ("decode", "dense", 1): 5.8, ("decode", "dense", 16): 87.5, ("decode", "nf4", 1): 5.3, ("decode", "nf4", 16): 76.4,
    "qlora_step": {"step_s": 0.478, "tok_s": 2144, "peak_gib": 14.2},  # NF4 + LoRA, seq 1024, 24 + 8 steps
    "qlora_step_checkpointed": {"step_s": 0.757, "tok_s": 1352, "peak_gib": 4.89},  # the same, steps checkpointed
}


@dataclass
class Context:
    sizes: Sizes
    device: torch.device
    work_dir: Path  # checkpoint (~7 GB at full size), data files, trainer outputs; removed at the end
    checkpoint: Path
    dtype: torch.dtype  # weights and compute


# ---------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------


def measure(fn, device: torch.device):
    """fn() run once after freeing memory: (its result, wall seconds with the device synchronized, peak GiB
    allocated while it ran; None on CPU)."""
    reset_peak(device)
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start, peak_gib(device)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def allocated_gib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None


class PartTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    """Raises PartTimeout in the main thread after `seconds`: a watchdog thread interrupts the main thread, whose
    SIGINT handler (ours, for the duration) turns that into PartTimeout. Not SIGALRM, which libraries (e.g.
    math-verify's timeouts) set and cancel for themselves. Our own handler because Python installs none when the
    parent process ignores SIGINT (a background job of a non-interactive shell), and the interrupt is then dropped."""
    fired = threading.Event()

    def on_interrupt(signum, frame):
        if fired.is_set():
            raise PartTimeout(f"over its {seconds} s limit")
        raise KeyboardInterrupt  # a real Ctrl-C

    def interrupt():
        fired.set()
        _thread.interrupt_main()

    previous_handler = signal.signal(signal.SIGINT, on_interrupt)
    timer = threading.Timer(seconds, interrupt)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous_handler)


def run_part(name: str, part, ctx: Context) -> dict:
    """The part's record: the figures it filled in (also those it had before a failure), ok, error, traceback."""
    record = {"part": name, "ok": False, "mode": "full" if ctx.sizes.full_size else "dry_run", "error": None,
              "traceback": None}
    start = time.perf_counter()
    try:
        with time_limit(PART_LIMITS_S[name]):
            part(ctx, record)
        record["ok"] = True
    except (Exception, SystemExit) as error:  # one part's failure (OOM, a parser's exit) must not lose the others
        record["error"] = f"{type(error).__name__}: {error}".strip()[:500]
        record["traceback"] = traceback.format_exc()
    record["wall_s"] = time.perf_counter() - start
    reset_peak(ctx.device)
    record["allocated_gib_after"] = allocated_gib(ctx.device)  # memory a part left behind
    return record


# ---------------------------------------------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------------------------------------------


def random_model(sizes: Sizes, device: torch.device) -> HuginnForCausalLM:
    """Full size: HuginnConfig() materialised on the GPU in bf16 with the published init (no fp32 copy);
    dry run: the tiny default's architecture, fp32, CPU."""
    if sizes.full_size:
        return full_size_model(device)
    torch.manual_seed(0)
    return HuginnForCausalLM(tiny.tiny_config(tiny.build_tiny_tokenizer())).eval()


def save_checkpoint(model: HuginnForCausalLM, path: Path) -> None:
    """The model with the tiny tokenizer (its ids are all < 65536) and its end tokens, as a normal HF directory."""
    tokenizer = tiny.build_tiny_tokenizer()
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_TURN)]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def load_checkpoint(ctx: Context, nf4: bool):
    """NF4 through training.load_model (what SFT and GRPO load), else the dense checkpoint in ctx.dtype."""
    if nf4:
        model_args = ModelConfig(model_name_or_path=str(ctx.checkpoint), dtype=dtype_name(ctx.dtype),
                                 load_in_4bit=True)
        training_args = SimpleNamespace(device=ctx.device, use_cpu=ctx.device.type == "cpu", bf16=False)
        return training.load_model(model_args, training_args).eval()  # it reads only these
    return HuginnForCausalLM.from_pretrained(ctx.checkpoint, dtype=ctx.dtype, device_map=ctx.device).eval()


def write_problems(path: Path, count: int, terms: int, solution_chars: int = 0) -> str:
    """`count` sums of `terms` digits in GSM8K's schema ("What is 3+4+...?", "3+4+...=N. ...#### N": gradable
    golds). The solution restates the sum until it has `solution_chars` characters (a token each, tiny tokenizer)."""
    with open(path, "w") as f:
        for index in range(count):
            digits = [(index + 3 * term) % 9 + 1 for term in range(terms)]
            expression = "+".join(map(str, digits))
            restated = f"{expression}={sum(digits)}. "
            solution = restated * max(1, math.ceil(solution_chars / len(restated)))
            f.write(json.dumps({"question": f"What is {expression}?",
                                "answer": f"{solution.strip()}\n#### {sum(digits)}"}) + "\n")
    return str(path)


def trainer_flags(ctx: Context, output_dir: Path) -> list[str]:
    """Overrides shared by the SFT and GRPO parts: no checkpoints, no loggers, a log per step, CPU in the dry run."""
    flags = ["--output_dir", str(output_dir), "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1",
             "--warmup_steps", "0", "--dataloader_num_workers", "0"]
    if not ctx.sizes.full_size:
        flags += ["--dtype", "float32", "--bf16", "false", "--use_cpu", "true"]
    return flags


# ---------------------------------------------------------------------------------------------------------------
# The parts: each fills in its record
# ---------------------------------------------------------------------------------------------------------------


def load_part(ctx: Context, record: dict) -> None:
    model, record["build_s"], _ = measure(lambda: random_model(ctx.sizes, ctx.device), ctx.device)
    record["parameters_b"] = sum(p.numel() for p in model.parameters()) / 1e9
    _, record["save_s"], _ = measure(lambda: save_checkpoint(model, ctx.checkpoint), ctx.device)
    record["checkpoint_gib"] = sum(f.stat().st_size for f in ctx.checkpoint.glob("*.safetensors")) / 2**30
    del model
    model, record["nf4_load_s"], record["peak_gib"] = measure(lambda: load_checkpoint(ctx, nf4=True), ctx.device)
    record["nf4_resident_gib"] = allocated_gib(ctx.device)
    record["linear4bit_layers"] = sum(getattr(m.weight, "quant_state", None) is not None for m in model.modules()
                                      if hasattr(m, "weight"))


def engine_decode(model, prompts: torch.Tensor, num_steps: int, new_tokens: int, cuda_graphs: bool | None,
                  diffusion: DiffusionSettings | None = None):
    """Greedy engine decode without end tokens; the result and the CUDA-graph recordings that fell back to eager."""
    engine = HuginnEngine(model, max_batch_size=prompts.shape[0], max_length=prompts.shape[1] + new_tokens,
                          cuda_graphs=cuda_graphs, diffusion=diffusion)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = engine.generate(prompts.tolist(), num_steps=num_steps, max_new_tokens=new_tokens,
                                 eos_token_ids=[NEVER], state_seeds=list(range(prompts.shape[0])))
    fallbacks = sum("CUDA graph recording failed" in str(w.message) for w in caught)
    return result, fallbacks


def decode_speed(ctx: Context, model, weights: str, prompts: torch.Tensor) -> list[dict]:
    """One row per (CUDA graphs, batch); a batch that runs out of memory reads OOM and the others still run.
    On CPU, "CUDA graphs" runs the same fixed-shape phases eagerly (the engine's cuda_graphs=True there)."""
    sizes, rows = ctx.sizes, []
    engine_decode(model, prompts[:1, :8], sizes.num_steps, 2, cuda_graphs=False)  # kernels, allocator, cuBLAS
    for cuda_graphs in (True, False):
        for batch in sizes.decode_batches:
            row = {"weights": weights, "dtype": dtype_name(ctx.dtype), "batch": batch, "cuda_graphs": cuda_graphs}
            try:
                (result, fallbacks), _, peak = measure(lambda batch=batch, cuda_graphs=cuda_graphs: engine_decode(
                    model, prompts[:batch], sizes.num_steps, sizes.decode_new_tokens, cuda_graphs), ctx.device)
                row.update(tok_s=result.decode_tokens / result.decode_seconds, prefill_s=result.prefill_seconds,
                           peak_gib=peak, graph_fallbacks=fallbacks)
            except torch.OutOfMemoryError:
                row["error"] = "OOM"
            rows.append(row)
    return rows


def diffusion_speed(ctx: Context, model, prompts: torch.Tensor) -> list[dict]:
    """Diffusion forcing at the paper's ratio of inner steps to depth (4 of 32), CUDA graphs where available, at the
    first two decode batch sizes: one row each. Random weights rarely settle, so positions mostly freeze at their
    step budget (the slowest case of the sampler)."""
    sizes, rows = ctx.sizes, []
    settings = DiffusionSettings(inner_steps=max(1, sizes.num_steps // 8))
    for batch in sizes.decode_batches[:2]:
        row = {"dtype": dtype_name(ctx.dtype), "batch": batch, "inner_steps": settings.inner_steps,
               "max_wavefront": settings.max_wavefront}
        try:
            decode = partial(engine_decode, model, prompts[:batch], sizes.num_steps, sizes.decode_new_tokens, None,
                             settings)
            (result, fallbacks), _, peak = measure(decode, ctx.device)
            row.update(tok_s=result.decode_tokens / result.decode_seconds, prefill_s=result.prefill_seconds,
                       peak_gib=peak, graph_fallbacks=fallbacks, block_passes_per_token=result.block_passes_per_token)
        except torch.OutOfMemoryError:
            row["error"] = "OOM"
        rows.append(row)
    return rows


def greedy_parity(ctx: Context, model, prompts: torch.Tensor) -> dict:
    """The engine (CUDA graphs where available) against model.generate, same seeds, one shared core cache slot."""
    sizes = ctx.sizes
    prompts = prompts[:sizes.parity_batch]
    seeds = torch.arange(prompts.shape[0], device=ctx.device)
    simple = model.generate(prompts, num_steps=sizes.num_steps, kv_cache_slots=1, state_seeds=seeds,
                            max_new_tokens=sizes.parity_new_tokens, eos_token_id=[NEVER])[:, prompts.shape[1]:]
    engine, _ = engine_decode(model, prompts, sizes.num_steps, sizes.parity_new_tokens, cuda_graphs=None)
    same = torch.tensor(engine.tokens, device=simple.device) == simple  # (batch, new)
    first_difference = [int(row.logical_not().nonzero()[0]) if not row.all() else row.numel() for row in same]
    return {"rows_equal": same.all(dim=1).float().mean().item(), "tokens_before_first_difference": first_difference}


def decode_part(ctx: Context, record: dict) -> None:
    sizes = ctx.sizes
    generator = torch.Generator().manual_seed(0)
    vocab = HuginnConfig.from_pretrained(ctx.checkpoint).vocab_size
    prompts = torch.randint(0, vocab, (max(sizes.decode_batches), sizes.prompt_len), generator=generator)
    prompts = prompts.to(ctx.device)
    record["rows"], record["greedy"] = [], {}
    for weights in ("dense", "nf4"):
        model = load_checkpoint(ctx, nf4=weights == "nf4")
        record["rows"] += decode_speed(ctx, model, weights, prompts)
        record["greedy"][weights] = greedy_parity(ctx, model, prompts)
        if weights == "dense":
            record["diffusion"] = diffusion_speed(ctx, model, prompts)
        del model
        reset_peak(ctx.device)


def sft_part(ctx: Context, record: dict) -> None:
    sizes = ctx.sizes
    data_file = write_problems(ctx.work_dir / "sft.jsonl", sizes.sft_train_steps, sizes.problem_terms,
                               solution_chars=sizes.sft_seq)
    args = training.parse_args(train_sft.ScriptArguments, SFTConfig, [
        "--config", str(ROOT / "configs" / "sft_huginn_24gb.yaml"), "--model_name_or_path", str(ctx.checkpoint),
        "--dataset_name", data_file, "--dataset_streaming", "false", "--max_samples", str(sizes.sft_train_steps),
        "--max_length", str(sizes.sft_seq), "--overlong", "truncate",  # every row cut to exactly sft_seq tokens
        "--num_steps", *map(str, sizes.sft_num_steps), "--per_device_train_batch_size", "1",
        "--gradient_accumulation_steps", "1", "--max_steps", str(sizes.sft_train_steps),
        "--include_num_input_tokens_seen", "true", *trainer_flags(ctx, ctx.work_dir / "sft")])
    trainer, record["wall_main_s"], record["peak_gib"] = measure(lambda: train_sft.main(*args), ctx.device)
    # A step's log holds the training time so far and the tokens seen (include_num_input_tokens_seen)
    steps = [log for log in trainer.state.log_history if "loss" in log and "train_runtime" in log]
    timed_s = steps[-1]["train_runtime"] - steps[0]["train_runtime"]
    tokens = steps[-1]["num_input_tokens_seen"] - steps[0]["num_input_tokens_seen"]
    record.update(timed_steps=len(steps) - 1, step_s=timed_s / (len(steps) - 1), tok_s=tokens / timed_s,
                  tokens_per_step=tokens / (len(steps) - 1), loss=steps[-1]["loss"],
                  first_step_s=steps[0]["train_runtime"],
                  depth=[steps[-1].get("mean_depth"), steps[-1].get("mean_backprop_depth")],  # the steps it ran
                  checkpointed=training.huginn_backbone(trainer.model).gradient_checkpointing)


def grpo_part(ctx: Context, record: dict) -> None:
    sizes = ctx.sizes
    data_file = write_problems(ctx.work_dir / "grpo.jsonl", sizes.grpo_prompts, sizes.problem_terms)
    completions = sizes.grpo_prompts * sizes.grpo_generations
    args = training.parse_args(train_grpo.ScriptArguments, GRPOConfig, [
        "--config", str(ROOT / "configs" / "grpo_huginn_24gb.yaml"), "--model_name_or_path", str(ctx.checkpoint),
        "--dataset_name", data_file, "--max_samples", str(sizes.grpo_prompts), "--max_steps", "1",
        "--num_generations", str(sizes.grpo_generations), "--per_device_train_batch_size", str(sizes.grpo_micro_batch),
        "--gradient_accumulation_steps", str(completions // sizes.grpo_micro_batch),  # one round = one step
        "--max_completion_length", str(sizes.grpo_completion_len), "--rollout_num_steps", str(sizes.num_steps),
        "--backprop_steps", str(sizes.grpo_backprop_steps), "--log_completions", "false",
        "--mask_truncated_completions", "false",  # random weights never finish: masked, the loss would be 0
        *trainer_flags(ctx, ctx.work_dir / "grpo")])
    trainer, record["wall_main_s"], record["peak_gib"] = measure(lambda: train_grpo.main(*args), ctx.device)
    logs = trainer.state.log_history
    step = next(log for log in logs if "rollout/seconds" in log)  # read defensively: train_grpo.py is changing
    record.update(completions=completions, step_s=logs[-1]["train_runtime"], rollout_s=step["rollout/seconds"],
                  rollout_tok_s=step.get("rollout/tokens_per_second"),
                  mean_completion_tokens=step.get("completions/mean_length"))
    record["loss_s"] = record["step_s"] - record["rollout_s"]


def memory_plan(results: dict) -> dict:
    """What results.json says about the memory plan (cache mode, batch), wherever evaluate.py puts it."""
    cell = (results.get("results") or [{}])[0]
    return {key: value for source in (results, cell) for key, value in source.items()
            if any(word in key for word in ("plan", "memory", "cache", "batch"))}


def eval_part(ctx: Context, record: dict) -> None:
    sizes = ctx.sizes
    problems = write_problems(ctx.work_dir / "eval.jsonl", sizes.eval_problems, sizes.problem_terms)
    output_dir = ctx.work_dir / "eval"
    args = evaluate.parse_args([
        "--model_name_or_path", str(ctx.checkpoint), "--benchmarks", f"gsm8k={problems}",
        "--num_steps", str(sizes.num_steps), "--max_new_tokens", str(sizes.eval_new_tokens),
        "--batch_size", str(sizes.eval_problems), "--output_dir", str(output_dir)])
    _, record["wall_main_s"], record["peak_gib"] = measure(lambda: evaluate.main(args), ctx.device)
    results = json.loads((output_dir / "results.json").read_text())
    cell = results["results"][0]
    record.update(problems=cell["n"], generation_s=cell["wall_time_s"], problems_per_s=cell["n"] / cell["wall_time_s"],
                  tokens_per_s=cell.get("tokens_per_s"), mean_output_tokens=cell.get("mean_output_tokens"),
                  memory_plan=memory_plan(results))


PART_FUNCTIONS = {"load": load_part, "decode": decode_part, "sft": sft_part, "grpo": grpo_part, "eval": eval_part}


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def decode_row(records: dict, weights: str, batch: int, cuda_graphs: bool = True) -> dict:
    rows = records.get("decode", {}).get("rows", [])
    return next((r for r in rows if (r["weights"], r["batch"], r["cuda_graphs"]) == (weights, batch, cuda_graphs)), {})


def targets(records: dict) -> list[tuple[str, float | None, str, float]]:
    """(what, our figure or None, comparison, threshold) of each target."""
    sft, grpo = records.get("sft", {}), records.get("grpo", {})
    oom = [name for name, r in records.items() if "OutOfMemoryError" in (r.get("error") or "")]
    oom += [f"decode {r['weights']} batch {r['batch']}" for r in records.get("decode", {}).get("rows", [])
            if r.get("error") == "OOM"]
    return [("decode tok/s, bf16, batch 64, CUDA graphs", decode_row(records, "dense", 64).get("tok_s"), ">=", 1250),
            ("decode tok/s, bf16, batch 1, CUDA graphs", decode_row(records, "dense", 1).get("tok_s"), ">=", 32),
            ("SFT step peak GiB", sft.get("peak_gib"), "<=", 6), ("SFT step tok/s", sft.get("tok_s"), ">=", 1850),
            ("GRPO step peak GiB", grpo.get("peak_gib"), "<=", 20),
            ("parts or decode rows out of memory", len(oom), "<=", 0)]


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def decode_lines(records: dict, sizes: Sizes) -> list[str]:
    decode = records.get("decode", {})
    lines = ["| weights | batch | CUDA graphs | decode tok/s | prefill s | peak GiB | reference tok/s |",
             "|---|---|---|---|---|---|---|"]
    for row in decode.get("rows", []):
        reference = REFERENCE.get(("decode", row["weights"], row["batch"]))
        lines.append(f"| {row['dtype'] if row['weights'] == 'dense' else 'NF4'} | {row['batch']} | "
                     f"{'yes' if row['cuda_graphs'] else 'no'} | {row.get('error') or fmt(row.get('tok_s'), 1)} | "
                     f"{fmt(row.get('prefill_s'), 3)} | {fmt(row.get('peak_gib'))} | {fmt(reference, 1)} |")
    if decode.get("diffusion"):
        lines += ["", "| diffusion forcing (CUDA graphs on GPU) | batch | inner steps | decode tok/s | "
                  "block passes per token | prefill s | peak GiB |", "|---|---|---|---|---|---|---|"]
    for row in decode.get("diffusion", []):
        lines.append(f"| {row['dtype']} | {row['batch']} | {row['inner_steps']} | "
                     f"{row.get('error') or fmt(row.get('tok_s'), 1)} | {fmt(row.get('block_passes_per_token'), 1)} | "
                     f"{fmt(row.get('prefill_s'), 3)} | {fmt(row.get('peak_gib'))} |")
    for weights, parity in decode.get("greedy", {}).items():
        lines.append(f"\nGreedy engine vs simple path, {weights}, batch {sizes.parity_batch} x "
                     f"{sizes.parity_new_tokens} tokens: {parity['rows_equal']:.0%} of rows equal; tokens before the "
                     f"first difference {parity['tokens_before_first_difference']}.")
    return lines


def stage_lines(records: dict, sizes: Sizes) -> list[str]:
    load, sft, grpo, ev = (records.get(name, {}) for name in ("load", "sft", "grpo", "eval"))
    plain, checkpointed = REFERENCE["qlora_step"], REFERENCE["qlora_step_checkpointed"]
    return [
        f"| stage | figure | ours | reference ({REFERENCE_SOURCE}) |", "|---|---|---|---|",
        f"| load | build s / save s / NF4 load s | {fmt(load.get('build_s'), 1)} / {fmt(load.get('save_s'), 1)} / "
        f"{fmt(load.get('nf4_load_s'), 1)} | NF4 load {REFERENCE['nf4_load_s']} s |",
        f"| load | NF4 weights resident GiB | {fmt(load.get('nf4_resident_gib'))} | {REFERENCE['nf4_resident_gib']} |",
        f"| SFT (NF4 + LoRA, seq {sizes.sft_seq}, {sizes.sft_num_steps[0]} + {sizes.sft_num_steps[1]} steps, "
        f"checkpointed) | step s / tok/s / peak GiB | {fmt(sft.get('step_s'), 3)} / {fmt(sft.get('tok_s'), 0)} / "
        f"{fmt(sft.get('peak_gib'))} | checkpointed {checkpointed['step_s']} / {checkpointed['tok_s']} / "
        f"{checkpointed['peak_gib']}; not checkpointed {plain['step_s']} / {plain['tok_s']} / {plain['peak_gib']} |",
        f"| GRPO ({sizes.grpo_prompts} x {sizes.grpo_generations} x {sizes.grpo_completion_len} tokens, "
        f"{sizes.num_steps} steps) | step s (rollout / loss) / peak GiB | {fmt(grpo.get('step_s'), 1)} "
        f"({fmt(grpo.get('rollout_s'), 1)} / {fmt(grpo.get('loss_s'), 1)}) / {fmt(grpo.get('peak_gib'))} | - |",
        f"| eval ({sizes.eval_problems} problems, {sizes.num_steps} steps, {sizes.eval_new_tokens} new tokens) | "
        f"problems/s / peak GiB | {fmt(ev.get('problems_per_s'), 3)} / {fmt(ev.get('peak_gib'))} | - |",
        f"\nEvaluation memory plan (results.json): {json.dumps(ev.get('memory_plan'))}."]


def target_lines(records: dict, sizes: Sizes) -> list[str]:
    lines = ["| target | ours | verdict |", "|---|---|---|"]
    for what, value, comparison, threshold in targets(records):
        passed = value is not None and (value >= threshold if comparison == ">=" else value <= threshold)
        verdict = ("pass" if passed else "fail") if sizes.full_size else "not judged (dry run)"
        lines.append(f"| {what} {comparison} {threshold:,} | {fmt(value, 1)} | "
                     f"{verdict if value is not None else 'not measured'} |")
    return lines


def render(records: dict, sizes: Sizes, device_name: str) -> str:
    """The dated markdown section of one run."""
    title = "huginn-0125 size, random weights" if sizes.full_size else "dry run (tiny model; not GPU figures)"
    versions = ", ".join(f"{name} {version}" for name, version in evaluate.versions().items())
    parts = ["| part | ok | seconds | error |", "|---|---|---|---|"]
    parts += [f"| {name} | {'yes' if r['ok'] else 'no'} | {r['wall_s']:.1f} | {r['error'] or ''} |"
              for name, r in records.items()]
    lines = [f"## {title}: {device_name}, {datetime.date.today()}", "",
             f"Commit {evaluate.git_commit()}; {versions}.", f"Sizes: {json.dumps(asdict(sizes))}.", "",
             *decode_lines(records, sizes), "", *stage_lines(records, sizes), "", *target_lines(records, sizes), "",
             *parts]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    """Runs the parts; returns part name -> record (also in output_dir/gpu_check.jsonl)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry_run", action="store_true", help="tiny model on CPU, tiny sizes, seconds")
    parser.add_argument("--output_dir", default="outputs/gpu-check", help="gpu_check.jsonl and gpu_check.md")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="load always runs")
    parser.add_argument("--work_dir", help="checkpoint and trainer outputs (default: a temporary dir, removed)")
    args = parser.parse_args(argv)
    sizes = DRY if args.dry_run else FULL
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu-check-"))
    dtype = torch.bfloat16 if sizes.full_size else torch.float32
    ctx = Context(sizes, device, work_dir, work_dir / "checkpoint", dtype)
    records = {}
    jsonl, md = output_dir / "gpu_check.jsonl", output_dir / "gpu_check.md"
    jsonl.write_text("")
    try:
        for name in PARTS:
            if name != "load" and name not in args.parts:
                continue
            print(f"[gpu_check] {name} ...", flush=True)
            records[name] = record = run_part(name, PART_FUNCTIONS[name], ctx)
            print(f"[gpu_check] {name}: {'ok' if record['ok'] else 'FAILED ' + record['error']} "
                  f"({record['wall_s']:.1f} s)", flush=True)
            with jsonl.open("a") as f:
                f.write(json.dumps(record, default=str) + "\n")
            md.write_text(render(records, sizes, device_name))
    finally:
        if not args.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    section = md.read_text()
    print(section)
    if sizes.full_size:
        with RESULTS.open("a") as f:
            f.write("\n" + section)
    return records


if __name__ == "__main__":
    main()
