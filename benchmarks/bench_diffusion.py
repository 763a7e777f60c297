"""Diffusion-forcing decoding (generation.DiffusionSettings) against sequential decoding, same engine, model, prompts
and seeds: the tiny pipeline's SFT model on its 128 held-out problems, greedy.

    python pipeline.py --output_dir outputs/pipeline                       # once: the SFT adapter and the problems
    python benchmarks/bench_diffusion.py --run_dir outputs/pipeline        # CPU, ~10 minutes on 2 cores

Reports, per sampler: sequential block passes per decoded token (prelude + core steps + coda that each token waited
for one after another), wall-clock of `generate` over all problems at each batch size (median of `--repeats`, the two
samplers timed alternately, A B A B, so load on a shared machine hits both alike), accuracy, and the share of
completions identical to sequential decoding. Appends the table to benchmarks/results_generate.md (--no_append:
print only).
"""

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import evaluate  # noqa: E402
import rewards  # noqa: E402
from generation import DiffusionSettings, HuginnEngine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results_generate.md"
BENCHMARK_FILES = ("gsm8k_test", "math_test")  # the pipeline's held-out problems, 64 each


def load_sft_model(run_dir: Path):
    """The pipeline's base model with its SFT adapter merged, fp32, and the tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(run_dir / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(model, run_dir / "sft").merge_and_unload().eval()
    return model, data.load_tokenizer(str(run_dir / "base"))


def held_out_requests(run_dir: Path, tokenizer) -> list[dict]:
    """Every held-out problem with its token ids, gold answer and evaluate.py's per-problem seed."""
    args = evaluate.EvalArguments(system_prompt="", seed=0)
    benchmarks = {name: str(run_dir / "data" / f"{name}.jsonl") for name in BENCHMARK_FILES}
    problems, is_gsm8k = evaluate.build_problems(args, benchmarks, tokenizer)
    return [{"ids": tokenizer(row["prompt"], add_special_tokens=False).input_ids, "answer": row["answer"],
             "seed": evaluate.stable_seed(0, label, row["id"], 0), "gsm8k": is_gsm8k[label]}
            for label, rows in problems.items() for row in rows]


def decode(model, requests: list[dict], batch: int, num_steps: int, new_tokens: int, eos: list[int],
           diffusion: DiffusionSettings | None):
    """One engine, one generate call over all requests; returns the result, its wall-clock seconds and the CPU
    seconds of this process (less sensitive than wall-clock to other work on a shared machine)."""
    max_length = max(len(r["ids"]) for r in requests) + new_tokens
    engine = HuginnEngine(model, batch, max_length, kv_cache_slots=1, diffusion=diffusion)
    seeds = [r["seed"] for r in requests]
    start, cpu_start = time.perf_counter(), time.process_time()
    result = engine.generate([r["ids"] for r in requests], num_steps=num_steps, max_new_tokens=new_tokens,
                             eos_token_ids=eos, state_seeds=seeds, sampling_seeds=seeds)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    engine.close()
    return result, seconds, cpu_seconds


def accuracy(tokenizer, requests: list[dict], tokens: list[list[int]], eos: list[int]) -> float:
    texts = [tokenizer.decode([t for t in ids if t not in eos], skip_special_tokens=True) for ids in tokens]
    verdicts = [rewards.grade_batch([text], [r["answer"]], numeric_fallback=r["gsm8k"])[0]
                for text, r in zip(texts, requests, strict=True)]
    return sum(bool(v) for v in verdicts) / len(verdicts)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True, help="a finished tiny pipeline run (base/, sft/, data/)")
    parser.add_argument("--num_steps", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=24, help="the pipeline's evaluation budget")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per sampler and batch (median reported)")
    parser.add_argument("--inner_steps", type=int, default=4)
    parser.add_argument("--max_wavefront", type=int, default=16)
    parser.add_argument("--new_positions", type=int, default=1)
    parser.add_argument("--freeze", default="latent-diff")
    parser.add_argument("--freeze_threshold", type=float, default=0.03)
    parser.add_argument("--new_position_state", default="fresh")
    parser.add_argument("--no_append", action="store_true")
    args = parser.parse_args(argv)
    settings = DiffusionSettings(args.inner_steps, args.new_positions, args.max_wavefront, args.freeze,
                                 args.freeze_threshold, args.new_position_state)
    run_dir = Path(args.run_dir)
    model, tokenizer = load_sft_model(run_dir)
    eos = data.stop_token_ids(model.generation_config, tokenizer)
    requests = held_out_requests(run_dir, tokenizer)
    samplers = {"sequential": None, "diffusion": settings}
    timings = {(name, batch): [] for name in samplers for batch in args.batches}  # (generate s, decode s, CPU s)
    results = {}
    for batch in args.batches:
        for _ in range(args.repeats):  # A B A B
            for name, diffusion in samplers.items():
                result, elapsed, cpu = decode(model, requests, batch, args.num_steps, args.new_tokens, eos, diffusion)
                timings[name, batch].append((elapsed, result.decode_seconds, cpu))
                if results.setdefault(name, result).tokens != result.tokens:
                    raise RuntimeError(f"{name} at batch {batch} changed its greedy tokens")
    medians = {key: [statistics.median(run[i] for run in runs) for i in range(3)] for key, runs in timings.items()}
    scores = {name: accuracy(tokenizer, requests, result.tokens, eos) for name, result in results.items()}
    sequential = results["sequential"].tokens
    lines = ["| sampler | batch | generate s | of which decode s | CPU s | block passes per token | "
             "mean steps per token | accuracy | completions identical to sequential |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (name, batch), (total, decoding, cpu) in medians.items():
        result = results[name]
        same = sum(a == b for a, b in zip(result.tokens, sequential, strict=True)) / len(sequential)
        lines.append(f"| {name} | {batch} | {total:.1f} | {decoding:.1f} | {cpu:.1f} | "
                     f"{result.block_passes_per_token:.1f} | {result.mean_steps:.1f} | {scores[name]:.1%} | "
                     f"{same:.1%} |")
    ratios = [f"batch {b}: " + ", ".join(f"{medians['sequential', b][i] / medians['diffusion', b][i]:.2f}x {what}"
                                         for i, what in enumerate(("generate", "decode", "CPU")))
              for b in args.batches]
    passes = results["sequential"].block_passes_per_token / results["diffusion"].block_passes_per_token
    raw = "; ".join(f"{name} b{b}: {[round(run[0], 1) for run in runs]}" for (name, b), runs in timings.items())
    table = "\n".join([
        f"## diffusion forcing vs sequential: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, {datetime.date.today()}", "",
        f"Tiny pipeline's SFT model ({run_dir}), {len(requests)} held-out problems, greedy, {args.num_steps} steps, "
        f"{args.new_tokens} new tokens, one KV slot (k=1), torch {torch.__version__}; medians of {args.repeats} "
        f"runs per sampler and batch, timed A B A B. Diffusion: {settings}.", "",
        *lines, "",
        f"Diffusion vs sequential: {passes:.2f}x fewer sequential block passes per token; wall-clock "
        + "; ".join(ratios) + f". Accuracy {scores['diffusion'] - scores['sequential']:+.1%}. "
        f"Generate seconds per run: {raw}."])
    print(table)
    if not args.no_append:
        with RESULTS.open("a") as f:
            f.write("\n" + table + "\n")
    return table


if __name__ == "__main__":
    main()
