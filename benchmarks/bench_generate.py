"""Generation speed: the engine (generation.HuginnEngine) next to the simple path (HuginnForCausalLM.generate),
measured in the same run on the same model, prompts and seeds, both with one shared core cache slot (k=1).

    python benchmarks/bench_generate.py --smoke    # CPU, tiny model, seconds (tests run it)
    python benchmarks/bench_generate.py --gpu      # one GPU, huginn-0125 size, random weights, ~5 min on an H100

Prints one table and appends it, with the card and date, to benchmarks/results_generate.md (--no_append: print
only). Per weights (bf16, then NF4 via bitsandbytes Linear4bit, double quant) and batch size: decode tok/s (greedy,
no end token, prompts of 256 random tokens, `--new_tokens` new tokens: 32 by default to stay near 5 minutes, 256
for the issue's full 256 + 256 at several times the time; caches sized for prompt + new), prefill seconds, peak
memory, KV cache bytes per token, and whether both paths chose the same tokens; plus one row timing the prefill of
a single 512-token prompt. GPU mode builds HuginnConfig() (= the published config) on meta and materialises it on
cuda in bf16 with the published random init; the engine records CUDA graphs (excluded from the timings, as is a
first warm-up generation per weights). A row that runs out of memory reads OOM and the run goes on. The smoke mode
runs the tiny default in fp32 (and NF4 with fp32 compute) for a few tokens: its figures are CPU-overhead bound and
say nothing about GPU speed.
"""

import argparse
import dataclasses
import datetime
import gc
import math
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from generation import DEFAULT_EXIT_THRESHOLD, HuginnEngine, kv_cache_bytes_per_token  # noqa: E402
from modeling_huginn_qlora import HuginnConfig, HuginnForCausalLM  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results_generate.md"
NEVER = 10**9  # end token id that never comes: every row decodes all its tokens


@dataclass
class Settings:
    batches: list[int]
    num_steps: int
    prompt_len: int
    new_tokens: int
    prefill_len: int


SMOKE = Settings(batches=[1, 4], num_steps=4, prompt_len=8, new_tokens=4, prefill_len=32)
GPU = Settings(batches=[1, 16, 64, 256], num_steps=32, prompt_len=256, new_tokens=32, prefill_len=512)


@dataclass
class Measured:
    decode_tok_s: float
    prefill_s: float
    peak_gib: float | None
    tokens: torch.Tensor  # (batch, new)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_simple(model, prompts: torch.Tensor, seeds: torch.Tensor, settings: Settings, new_tokens: int) -> Measured:
    """model.generate, timed by a forward pre-hook: its first forward is the prefill, every later one a decode."""
    device, batch = prompts.device, prompts.shape[0]
    calls, marks = [], {}

    def mark_decode_start(module, args):
        calls.append(1)
        if len(calls) == 2:
            synchronize(device)
            marks["decode"] = time.perf_counter()

    handle = model.register_forward_pre_hook(mark_decode_start)
    reset_peak(device)
    synchronize(device)
    start = time.perf_counter()
    try:
        out = model.generate(prompts, num_steps=settings.num_steps, kv_cache_slots=1, state_seeds=seeds,
                             max_new_tokens=new_tokens, eos_token_id=[NEVER])
        synchronize(device)
    finally:
        handle.remove()
    end = time.perf_counter()
    decode_start = marks.get("decode", end)
    decode_tok_s = batch * (len(calls) - 1) / (end - decode_start) if len(calls) > 1 else math.nan
    return Measured(decode_tok_s, decode_start - start, peak_gib(device), out[:, prompts.shape[1]:].cpu())


def run_engine(model, prompts: torch.Tensor, seeds: torch.Tensor, settings: Settings, new_tokens: int) -> Measured:
    device, batch = prompts.device, prompts.shape[0]
    reset_peak(device)
    engine = HuginnEngine(model, max_batch_size=batch, max_length=prompts.shape[1] + new_tokens)
    result = engine.generate(prompts.tolist(), num_steps=settings.num_steps, max_new_tokens=new_tokens,
                             eos_token_ids=[NEVER], state_seeds=seeds.tolist())
    decode_tok_s = result.decode_tokens / result.decode_seconds if result.decode_tokens else math.nan
    return Measured(decode_tok_s, result.prefill_seconds, peak_gib(device), torch.tensor(result.tokens))


def measure(run, *args) -> Measured | str:
    try:
        return run(*args)
    except torch.OutOfMemoryError:
        return "OOM"


def fmt(value, digits=1) -> str:
    if isinstance(value, str) or value is None:
        return value or "-"
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def table_rows(label: str, model, settings: Settings) -> list[str]:
    """One row per batch size, then the 512-token prefill row, for one set of weights."""
    device = model.lm_head.weight.device
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    cache_bytes = kv_cache_bytes_per_token(model.config, 1, model.transformer.wte.weight.dtype)
    rows = []
    warm = torch.randint(0, vocab, (1, 8), generator=generator).to(device)
    run_simple(model, warm, torch.tensor([0], device=device), settings, 2)  # CUDA context, kernels, allocator
    run_engine(model, warm, torch.tensor([0], device=device), settings, 2)
    for batch in settings.batches:
        prompts = torch.randint(0, vocab, (batch, settings.prompt_len), generator=generator).to(device)
        seeds = torch.arange(batch, device=device)
        simple, engine = (measure(run, model, prompts, seeds, settings, settings.new_tokens)
                          for run in (run_simple, run_engine))
        both = not isinstance(simple, str) and not isinstance(engine, str)
        speedup = f"{engine.decode_tok_s / simple.decode_tok_s:.1f}x" if both else "-"
        same = f"{(simple.tokens == engine.tokens).all(dim=1).float().mean().item():.0%}" if both else "-"
        rows.append(_row(label, str(batch), simple, engine, speedup, same, cache_bytes))
        del simple, engine
    prompt = torch.randint(0, vocab, (1, settings.prefill_len), generator=generator).to(device)
    simple, engine = (measure(run, model, prompt, torch.tensor([0], device=device), settings, 1)
                      for run in (run_simple, run_engine))
    rows.append(_row(label, f"1, prompt {settings.prefill_len}", simple, engine, "-", "-", cache_bytes))
    return rows


def _row(label, batch, simple, engine, speedup, same, cache_bytes) -> str:
    def cells(m: Measured | str):
        return [m] * 3 if isinstance(m, str) else [fmt(m.decode_tok_s), fmt(m.prefill_s, 3), fmt(m.peak_gib, 2)]

    (s_tok, s_pre, s_peak), (e_tok, e_pre, e_peak) = cells(simple), cells(engine)
    return (f"| {label} | {batch} | {s_tok} | {e_tok} | {speedup} | {s_pre} | {e_pre} | {s_peak} | {e_peak} | "
            f"{cache_bytes:,} | {same} |")


HEADER = ("| weights | batch | simple tok/s | engine tok/s | engine/simple | simple prefill s | engine prefill s | "
          "simple peak GiB | engine peak GiB | KV bytes/token (k=1, both) | same greedy tokens |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def quantize_nf4_(model, compute_dtype: torch.dtype) -> None:
    """Replace the blocks' Linear layers by bitsandbytes NF4 Linear4bit (double quant), in place, as
    `nf4_quantization_config` does at load time: the embedding/head and the adapter stay unquantized."""
    import bitsandbytes as bnb

    transformer = model.transformer
    for block in [*transformer.prelude, *transformer.core_block, *transformer.coda]:
        for parent, name in ((block.attn, "Wqkv"), (block.attn, "proj"), (block.mlp, "fc"), (block.mlp, "proj")):
            linear = getattr(parent, name)
            quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, device="meta",
                                          compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
            quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4")
            setattr(parent, name, quantized.to(linear.weight.device))


def full_size_model(device: torch.device) -> HuginnForCausalLM:
    """huginn-0125's architecture with the published random init, in bf16 on `device`, built without an fp32 copy."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = HuginnForCausalLM(HuginnConfig())
    finally:
        torch.set_default_dtype(default_dtype)
    model.to_empty(device=device)
    model.apply(model._init_weights)
    model.lm_head.weight = model.transformer.wte.weight  # to_empty unties
    model.freqs_cis.copy_(model._rope_table())
    return model.eval()


def tiny_model() -> HuginnForCausalLM:
    from tiny import build_tiny_default

    path = build_tiny_default(Path(tempfile.mkdtemp()) / "tiny-huginn")
    return HuginnForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def exit_line(model, settings: Settings) -> str:
    """Adaptive exit at the default threshold vs fixed depth, greedy: mean steps and how much of the output agrees
    (tokens before each prompt's first difference)."""
    generator = torch.Generator().manual_seed(1)
    num_prompts, steps, new = 4, 4 * settings.num_steps, 2 * settings.new_tokens
    prompts = torch.randint(0, model.config.vocab_size, (num_prompts, settings.prompt_len), generator=generator)
    kwargs = dict(num_steps=steps, max_new_tokens=new, eos_token_ids=[NEVER], state_seeds=list(range(num_prompts)))
    fixed = HuginnEngine(model, num_prompts, settings.prompt_len + new).generate(prompts.tolist(), **kwargs)
    adaptive = HuginnEngine(model, num_prompts, settings.prompt_len + new, exit_threshold=DEFAULT_EXIT_THRESHOLD
                            ).generate(prompts.tolist(), **kwargs)
    prefix = sum(next((i for i, (a, b) in enumerate(zip(x, y, strict=False)) if a != b), len(x))  # lengths may differ
                 for x, y in zip(adaptive.tokens, fixed.tokens, strict=True))
    return (f"Adaptive exit (KL < {DEFAULT_EXIT_THRESHOLD:g}, k=1), {steps} steps, {num_prompts} prompts x {new} "
            f"tokens, random weights: mean {adaptive.mean_steps:.1f} steps per decoded token; "
            f"{prefix / (num_prompts * new):.0%} of tokens before the first difference from fixed depth.")


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--smoke", action="store_true", help="CPU, tiny model")
    mode.add_argument("--gpu", action="store_true", help="one GPU, full size, random weights")
    parser.add_argument("--new_tokens", type=int, help="new tokens per prompt (default: smoke 8, GPU 32)")
    parser.add_argument("--no_append", action="store_true", help=f"print only, do not append to {RESULTS.name}")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.gpu:
        settings, device = GPU, torch.device("cuda")
        card = torch.cuda.get_device_name(device)
        model, compute_dtype = full_size_model(device), torch.bfloat16
    else:
        settings, device = SMOKE, torch.device("cpu")
        card = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        model, compute_dtype = tiny_model(), torch.float32
    if args.new_tokens:
        settings = dataclasses.replace(settings, new_tokens=args.new_tokens)
    label = str(compute_dtype).removeprefix("torch.")
    rows = table_rows(label, model, settings)
    note = exit_line(model, settings) if args.smoke else ""
    quantize_nf4_(model, compute_dtype)
    rows += table_rows(f"NF4 ({label} compute)", model, settings)
    title = (f"## {'smoke (tiny model)' if args.smoke else 'huginn-0125 size, random weights'}: {card}, "
             f"{datetime.date.today()}\n\n{settings.num_steps} steps per token, prompts of {settings.prompt_len} "
             f"tokens, {settings.new_tokens} new tokens, torch {torch.__version__}.\n")
    table = "\n".join([title, HEADER, *rows, "", note]).rstrip() + "\n"
    print(table)
    if not args.no_append:
        with RESULTS.open("a") as f:
            f.write("\n" + table)
    return table


if __name__ == "__main__":
    main()
