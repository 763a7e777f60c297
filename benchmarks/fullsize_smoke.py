"""Full-size smoke run on CPU: huginn-0125's published architecture (3.5B parameters, random weights) through the
real entry points: NF4 load on bitsandbytes' CPU path, one QLoRA SFT step (`train_sft.main`), one GRPO rollout and
loss from that adapter (`train_grpo.main`), one evaluation problem (`evaluate.main`), and a bf16 load.

    python benchmarks/fullsize_smoke.py --tiny    # dry run: the same at 1/15 width (TINY_WIDTHS), ~2 minutes
    python benchmarks/fullsize_smoke.py           # full size: ~15 minutes on 2 cores, 15.6 GB of disk under --workdir

The checkpoint is written in the published layout: the published config.json (huginn-0125's from the reference
folder when present, else HuginnConfig() defaults, which equal it), float32 safetensors shards of at most 5 GB under
the published key names, the tied embedding stored twice (`transformer.wte.weight` and `lm_head.weight`, equal), with
model.safetensors.index.json, a generation_config.json listing only <|end_text|> as eos (as published), and the tiny
tokenizer padded so that the special tokens sit at the published ids 65504-65509 (no chat template:
data.load_tokenizer must add it). Each stage runs in its own process and reports, for each model load, its time, peak
RSS (VmHWM, mmap'd checkpoint pages included, and the anonymous part sampled on its own), weight bytes by kind, and
checks against the stored tensors: the head is the embedding (one tensor), unquantized weights equal the stored fp32
ones cast to the compute dtype, NF4 weights are within NF4's rounding of them. Full size writes
benchmarks/results_fullsize_cpu.md (--results to change, --tiny: none).
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import bitsandbytes as bnb  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig  # noqa: E402

import tiny  # noqa: E402
from modeling_huginn_qlora import HuginnConfig, HuginnForCausalLM  # noqa: E402

PUBLISHED_CONFIG = ROOT.parent / "shared" / "reference" / "huginn-0125-config.json"
RESULTS = Path(__file__).resolve().parent / "results_fullsize_cpu.md"
# The dry run's widths keep the full size's divisibility, which bitsandbytes' kernels care about: n_embd 352 like
# 5280 is a multiple of 32 but not of the 64-weight NF4 block, intermediate 1216 like 17920 is one of 64.
TINY_WIDTHS = {"n_embd": 352, "num_attention_heads": 11, "num_key_value_heads": 11, "intermediate_size": 1216}
GIB = 2**30
# The published shards hold at most 5 GB (transformers' default max_shard_size when huginn-0125 was saved): 4 of them
# for 15.6 GB. The dry run's 64 MiB gives its 0.25 GB the same 4.
PUBLISHED_SHARD_BYTES = 5 * 10**9
TINY_SHARD_BYTES = 64 * 2**20
STAGES = ("sft", "grpo", "eval", "bf16")  # each in its own process, in this order (grpo and eval use sft's adapter)


def published_config(tiny_widths: bool) -> dict:
    """huginn-0125's config.json as published (the reference copy when present, else HuginnConfig()'s defaults)."""
    if PUBLISHED_CONFIG.is_file():
        config = json.loads(PUBLISHED_CONFIG.read_text())
    else:  # as JSON holds it (id2label's keys become strings), so it equals the config.json written from it
        config = json.loads(HuginnConfig().to_json_string())
    return {**config, **TINY_WIDTHS} if tiny_widths else config


def random_tensor(name: str, shape: torch.Size, std: float, seed: int) -> torch.Tensor:
    """An fp32 tensor of one published key: norms at 1, qk biases at 0, matrices N(0, std) (the published scale).
    Seeded by its name, so that a tied key stored twice gets the same values wherever it sits."""
    if "norm" in name or name.startswith("transformer.ln_f"):
        return torch.ones(shape)
    if "qk_bias" in name:
        return torch.zeros(shape)
    generator = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator).mul_(std)


def write_checkpoint(path: Path, config_dict: dict, shard_bytes: int, seed: int = 0) -> Path:
    """A random-weight checkpoint of `config_dict` in the published layout (see the module docstring)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_dict, indent=2))
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        skeleton = HuginnForCausalLM(config)
    # every key of the published state dict: the tied head is a key of its own, stored twice as published
    shapes = {name: tensor.shape for name, tensor in skeleton.state_dict().items()}
    shards, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = shape.numel() * 4
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    tied = HuginnForCausalLM._tied_weights_keys
    weight_map = {}
    for index, names in enumerate(shards, 1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        shard = {}
        for name in names:
            # the RoPE table the reference stores (our model recomputes the angles; the key round-trips)
            shard[name] = (skeleton._rope_table() if name == "freqs_cis" else
                           random_tensor(tied.get(name, name), shapes[name], config.init_values["std"], seed))
        save_file(shard, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del shard
    total = sum(shape.numel() * 4 for shape in shapes.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(path)
    tokenizer = tiny.build_tiny_tokenizer(first_special_id=config.bos_token_id)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(path)
    return path


def stored_tensor(checkpoint: Path, name: str) -> torch.Tensor:
    """One tensor as the checkpoint's shards hold it."""
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    with safe_open(checkpoint / index["weight_map"][name], "pt") as shard:
        return shard.get_tensor(name)


# ---------------------------------------------------------------------------------------------------------------
# Measurements inside a stage's process
# ---------------------------------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def rss_now() -> dict[str, int]:
    """Resident bytes now: anonymous (the process's own memory) and file-backed (mmap'd checkpoint pages, which the
    kernel can drop under pressure) from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) * 1024 for key in ("RssAnon", "RssFile")}


def quant_state_bytes(parameter) -> int:
    """The absmax scales (double-quantized: uint8 plus their own fp32 scales) and codebooks of an NF4 weight."""
    return sum(value.nbytes for value in parameter.quant_state.as_dict().values() if isinstance(value, torch.Tensor))


def bytes_by_kind(model: torch.nn.Module) -> dict[str, int]:
    """Resident bytes of the model's weights: NF4 (packed 4-bit and scales), unquantized base weights by dtype, LoRA,
    and buffers. A tied weight counts once."""
    kinds = Counter()
    for name, parameter in model.named_parameters():
        if isinstance(parameter, bnb.nn.Params4bit):
            kinds["nf4"] += parameter.nbytes + quant_state_bytes(parameter)
        elif "lora_" in name:
            kinds[f"lora {str(parameter.dtype).removeprefix('torch.')}"] += parameter.nbytes
        else:
            kinds[f"unquantized {str(parameter.dtype).removeprefix('torch.')}"] += parameter.nbytes
    kinds["buffers"] = sum(buffer.nbytes for buffer in model.buffers())
    return dict(kinds)


@contextlib.contextmanager
def sampled_peak_anon(peak: dict):
    """Samples the anonymous RSS every 0.1 s while the block runs, keeping the largest in peak["RssAnon"]. VmHWM also
    counts the checkpoint's mmap'd pages (14.5 GiB of published fp32 shards), which the kernel can drop under
    pressure: the anonymous peak is what a load needs."""
    done = threading.Event()

    def sample():
        stopped = False
        while not stopped:
            stopped = done.wait(0.1)
            peak["RssAnon"] = max(peak.get("RssAnon", 0), rss_now()["RssAnon"])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()


# What a load is checked against (load_checks): the embedding and its stored duplicate, the unquantized adapter, and
# three NF4 Linears (5280- and 17920-wide inputs, prelude, core and coda)
CHECKED_WEIGHTS = ("transformer.wte.weight", "lm_head.weight", "transformer.adapter.weight",
                   "transformer.prelude.0.attn.Wqkv.weight", "transformer.core_block.3.mlp.proj.weight",
                   "transformer.coda.1.attn.proj.weight")


def nf4_as_stored(parameter) -> torch.Tensor:
    """An NF4 weight in fp32 from its codes and scales, in the flat 64-weight blocks bitsandbytes quantizes in.
    Computed here because bitsandbytes' own CPU dequantize_4bit (0.50) is what is under test: for a row that is not a
    whole number of blocks (huginn-0125's 5280-wide inputs) it applies the wrong blocks' scales."""
    state = parameter.quant_state
    absmax = state.absmax.float()
    if state.nested:  # double quantization: the scales are themselves 8-bit, offset by their mean
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    packed = parameter.data.view(torch.uint8).flatten()
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).flatten()[:state.shape.numel()]  # high nibble first
    values = torch.nn.functional.pad(state.code[codes.long()], (0, -codes.numel() % state.blocksize))
    return (values.view(-1, state.blocksize) * absmax[:, None]).flatten()[:codes.numel()].view(state.shape)


def nf4_error(loaded: torch.Tensor, stored: torch.Tensor, block: int = 64) -> float:
    """Largest |loaded - stored| as a fraction of its block's absmax (NF4's scale). Quantized from `stored`, it is at
    most half the widest gap between NF4 codes (0.152) plus the rounding of the scale and of the compute dtype; a
    weight quantized from anything else lands far above."""
    pad = -stored.numel() % block  # zeros change neither a block's absmax nor its error

    def blocks(values: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(values.abs().flatten(), (0, pad)).view(-1, block).amax(dim=1)

    return (blocks(loaded.float() - stored) / blocks(stored)).max().item()


def load_checks(model: torch.nn.Module, checkpoint: Path) -> dict:
    """The loaded model against the checkpoint: whether the head is the embedding (one tensor); for each of
    CHECKED_WEIGHTS, whether it equals the stored fp32 weight cast to its dtype or, for NF4, nf4_error of its codes
    and scales ("stored") and of what bitsandbytes' CPU kernel computes with ("cpu_kernel")."""
    checks = {"head_is_embedding": model.lm_head.weight is model.transformer.wte.weight}
    for name in CHECKED_WEIGHTS:
        parameter, stored = model.get_parameter(name), stored_tensor(checkpoint, name)
        if isinstance(parameter, bnb.nn.Params4bit):
            cpu_kernel = bnb.functional.dequantize_4bit(parameter.data, parameter.quant_state)
            checks[name] = {"stored": nf4_error(nf4_as_stored(parameter), stored, parameter.blocksize),
                            "cpu_kernel": nf4_error(cpu_kernel, stored, parameter.blocksize)}
        else:
            checks[name] = torch.equal(parameter, stored.to(parameter.dtype))
    return checks


def record_loads(loads: list[dict]) -> None:
    """Wrap AutoModelForCausalLM.from_pretrained (every stage loads through it) to record each load's seconds, peak
    and current RSS, weight bytes and load_checks."""
    original = AutoModelForCausalLM.from_pretrained

    def timed(checkpoint, *args, **kwargs):
        peak = {}
        start = time.perf_counter()
        with sampled_peak_anon(peak):
            model = original(checkpoint, *args, **kwargs)
        loads.append({"seconds": time.perf_counter() - start, "peak_rss": peak_rss_bytes(),
                      "peak_anon": peak["RssAnon"], "rss": rss_now(), "bytes": bytes_by_kind(model),
                      "checks": load_checks(model, Path(checkpoint))})
        return model

    AutoModelForCausalLM.from_pretrained = timed


def sft_data(path: Path) -> Path:
    """OpenMathInstruct-2 rows longer than 64 tokens, so that `overlong: truncate` makes every sequence exactly 64."""
    row = {"problem": "What is 1+2+3+4+5?", "generated_solution": "1+2=3, 3+3=6, 6+4=10, 10+5=15. So 1+2+3+4+5=15. "
           "\\boxed{15}", "expected_answer": "15"}
    path.write_text(json.dumps(row) + "\n")
    return path


def run_stage(stage: str, checkpoint: Path, workdir: Path) -> dict:
    """One stage through its entry point's parse_args and main, with its results."""
    common = ["--model_name_or_path", str(checkpoint), "--use_cpu", "true", "--report_to", "none",
              "--disable_tqdm", "true", "--save_steps", "1000", "--max_steps", "1", "--warmup_steps", "0",
              "--gradient_accumulation_steps", "1"]
    if stage == "bf16":  # unquantized, as a bf16 base loads (here on the CPU): no step, the load and its checks
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
        return {"bytes_after": bytes_by_kind(model)}
    if stage == "sft":
        from trl import SFTConfig

        import train_sft
        from training import parse_args
        args = parse_args(train_sft.ScriptArguments, SFTConfig, [
            "--config", str(ROOT / "configs" / "sft_huginn_24gb.yaml"), *common, "--output_dir", str(workdir / "sft"),
            "--dataset_name", str(sft_data(workdir / "sft_rows.jsonl")), "--dataset_streaming", "false",
            "--max_length", "64", "--overlong", "truncate", "--num_steps", "2", "2",
            "--per_device_train_batch_size", "1", "--dataloader_num_workers", "0", "--logging_steps", "1"])
        trainer = train_sft.main(*args)
        sequence = len(trainer.train_dataset[0]["input_ids"])
        return {"loss": trainer.state.log_history[0]["loss"], "sequence_tokens": sequence,
                "num_steps": "2 + 2", "bytes_after": bytes_by_kind(trainer.model),
                "optimizer_bytes": optimizer_bytes(trainer.optimizer)}
    if stage == "grpo":
        from trl import GRPOConfig

        import train_grpo
        from training import parse_args
        args = parse_args(train_grpo.ScriptArguments, GRPOConfig, [
            "--config", str(ROOT / "configs" / "grpo_huginn_24gb.yaml"), *common,
            "--output_dir", str(workdir / "grpo"),
            "--sft_adapter", str(workdir / "sft"), "--dataset_name", "tiny:gsm8k_train", "--max_samples", "2",
            "--rollout_num_steps", "4", "--backprop_steps", "2", "--per_device_train_batch_size", "4",
            "--num_generations", "2", "--max_completion_length", "4", "--logging_steps", "1",
            "--log_completions", "false",
            "--mask_truncated_completions", "false"])  # random weights never finish in 4 tokens: a loss of 0 else
        trainer = train_grpo.main(*args)
        logs = trainer.state.log_history[0]
        return {"loss": logs["loss"], "rollout_seconds": logs.get("rollout/seconds"),
                "stop_token_ids": trainer.eos_token_ids, "bytes_after": bytes_by_kind(trainer.model)}
    import evaluate
    args = evaluate.parse_args([
        "--model_name_or_path", str(checkpoint), "--adapters", f"sft={workdir / 'sft'}", "--benchmarks",
        "tiny:gsm8k_test", "--limit", "1", "--num_steps", "4", "--max_new_tokens", "4", "--batch_size", "1",
        "--dtype", "bfloat16", "--load_in_4bit", "true", "--output_dir", str(workdir / "eval")])
    (cell,) = evaluate.main(args)
    return {"n": cell["n"], "mean_output_tokens": cell["mean_output_tokens"], "seconds": cell["wall_time_s"]}


def optimizer_bytes(optimizer) -> int:
    return sum(value.nbytes for state in optimizer.state.values() for value in state.values()
               if isinstance(value, torch.Tensor))


def stage_main(stage: str, checkpoint: Path, workdir: Path) -> None:
    loads = []
    record_loads(loads)
    start = time.perf_counter()
    result = run_stage(stage, checkpoint, workdir)
    result.update(stage=stage, seconds_total=time.perf_counter() - start, loads=loads, peak_rss=peak_rss_bytes(),
                  load_average=os.getloadavg()[1])  # the machine is shared: busy cores slow every figure
    (workdir / f"{stage}.json").write_text(json.dumps(result, indent=2))


# ---------------------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------------------


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f}"


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the machine type."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    return names[0] if names else platform.machine()


def checks_summary(results: list[dict]) -> str:
    """load_checks over every load of every stage, in two sentences."""
    checks = [load["checks"] for result in results for load in result["loads"]]
    tied = all(check["head_is_embedding"] for check in checks)
    exact = all(value for check in checks for value in check.values() if isinstance(value, bool))
    nf4 = [value for check in checks for value in check.values() if isinstance(value, dict)]
    return (f"Checked at each of the {len(checks)} loads: the head is the embedding (one tensor), the embedding, "
            f"its stored duplicate and the adapter equal the stored fp32 weights cast to bf16: {tied and exact}. "
            f"Three NF4 Linears' codes and scales are within {max(e['stored'] for e in nf4):.3f} of their 64-weight "
            f"block's absmax of the stored weights (NF4 rounds to at most 0.152 of it, plus the scale's 8-bit "
            f"rounding); what bitsandbytes' CPU kernel dequantizes is within "
            f"{max(e['cpu_kernel'] for e in nf4):.3f}.")


def listing(kinds: dict[str, int]) -> str:
    return ", ".join(f"{kind} {gib(nbytes)} GiB" for kind, nbytes in sorted(kinds.items()))


def stage_row(result: dict) -> str:
    load = result["loads"][0]  # VmHWM right after a stage's first load is the peak of that load
    return (f"| {result['stage']} | {load['seconds']:.0f} | {result['seconds_total']:.0f} | {gib(load['peak_rss'])} | "
            f"{gib(load['peak_anon'])} | {gib(load['rss']['RssAnon'])} + {gib(load['rss']['RssFile'])} | "
            f"{gib(result['peak_rss'])} | {result['load_average']:.1f} |")


def report(results: list[dict], write_seconds: float, shard_bytes: list[int], config: dict, run_seconds: float) -> str:
    weights = [f"| {kind} | {gib(nbytes)} |" for kind, nbytes in sorted(results[0]["bytes_after"].items())]
    sft, grpo, evaluation, bf16 = results
    return "\n".join([
        f"## {datetime.date.today()}, {os.cpu_count()}-core CPU ({cpu_name()}), no GPU, torch {torch.__version__}, "
        f"bitsandbytes {bnb.__version__}",
        "",
        f"Checkpoint: n_embd {config['n_embd']}, intermediate {config['intermediate_size']}, vocab "
        f"{config['vocab_size']}, random fp32 weights with the tied embedding stored twice, {gib(sum(shard_bytes))} "
        f"GiB on disk in {len(shard_bytes)} shards, written in {write_seconds:.0f} s. SFT, GRPO and evaluation load "
        f"it with NF4 + double quantization (bf16 compute), the last stage in bf16. Whole run: "
        f"{run_seconds / 60:.1f} minutes.",
        "",
        "| stage | model load s | stage total s | peak RSS during the load GiB (VmHWM) | its anonymous part GiB "
        "(sampled) | RSS after the load GiB, anon + file | peak RSS of the stage GiB | load average (5 min) |",
        "|---|---|---|---|---|---|---|---|",
        *map(stage_row, results),
        "",
        checks_summary(results),
        "",
        "Weights resident after the SFT step (NF4 model + LoRA r16 on Wqkv/proj/fc):",
        "",
        "| kind | GiB |",
        "|---|---|",
        *weights,
        f"| AdamW state (LoRA) | {gib(sft['optimizer_bytes'])} |",
        "",
        f"Right after the NF4 load: {listing(sft['loads'][0]['bytes'])}. After the bf16 load: "
        f"{listing(bf16['bytes_after'])}.",
        f"SFT: one step at {sft['sequence_tokens']} tokens, {sft['num_steps']} recurrent steps, loss "
        f"{sft['loss']:.3f}. GRPO (from the SFT adapter): 2 prompts x 2 completions x 4 tokens at depth 4 (2 with "
        f"grad), loss {grpo['loss']:.4f}, rollout {grpo['rollout_seconds']:.0f} s, stops on {grpo['stop_token_ids']}. "
        f"Evaluation: {evaluation['n']} problem at 4 steps, {evaluation['mean_output_tokens']:.0f} tokens in "
        f"{evaluation['seconds']:.0f} s.",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="TINY_WIDTHS (dry run); writes no results file")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory, removed after")
    parser.add_argument("--results", type=Path, default=None, help=f"default: {RESULTS.name} (full size only)")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # a stage's own process
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="huginn-fullsize-"))
    checkpoint = workdir / "checkpoint"
    if args.stage:
        stage_main(args.stage, checkpoint, workdir)
        return
    os.environ["TINYMATH_CACHE"] = str(workdir / "cache")  # the tiny datasets, away from the user's cache
    config = published_config(args.tiny)
    start = run_start = time.perf_counter()
    write_checkpoint(checkpoint, config, TINY_SHARD_BYTES if args.tiny else PUBLISHED_SHARD_BYTES)
    write_seconds = time.perf_counter() - start
    shard_bytes = [file.stat().st_size for file in sorted(checkpoint.glob("*.safetensors"))]
    print(f"checkpoint {checkpoint}: {gib(sum(shard_bytes))} GiB in {write_seconds:.0f} s", flush=True)
    results = []
    for stage in STAGES:
        subprocess.run([sys.executable, __file__, "--stage", stage, "--workdir", str(workdir)], check=True)
        results.append(json.loads((workdir / f"{stage}.json").read_text()))
        print(json.dumps(results[-1]), flush=True)
    text = report(results, write_seconds, shard_bytes, config, time.perf_counter() - run_start)
    print(text)
    results_path = args.results or (None if args.tiny else RESULTS)
    if results_path is not None:
        with open(results_path, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    if args.workdir is None:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
