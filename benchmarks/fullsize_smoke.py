"""Full-size smoke run on CPU: huginn-0125's published architecture (3.5B parameters, random weights) through the
real entry points: NF4 load on bitsandbytes' CPU path, one QLoRA SFT step (`train_sft.main`), one GRPO rollout and
loss from that adapter (`train_grpo.main`), one evaluation problem (`evaluate.main`).

    python benchmarks/fullsize_smoke.py --tiny    # dry run: the same at 1/15 width (TINY_WIDTHS), ~2 minutes
    python benchmarks/fullsize_smoke.py           # full size: ~10 minutes on 2 cores, 7.1 GB of disk under --workdir

The checkpoint is written in the published layout: the published config.json (huginn-0125's from the reference
folder when present, else HuginnConfig() defaults, which equal it), bf16 safetensors shards under the published key
names (lm_head tied to transformer.wte, stored once) with model.safetensors.index.json, a generation_config.json
listing only <|end_text|> as eos (as published), and the tiny tokenizer padded so that the special tokens sit at
the published ids 65504-65509 (no chat template: data.load_tokenizer must add it). Shards are written tensor by
tensor, each stage runs in its own process, and each process reports its model load time, peak RSS (VmHWM) and
weight bytes by kind. Full size writes benchmarks/results_fullsize_cpu.md (--results to change, --tiny: none).
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import bitsandbytes as bnb  # noqa: E402
import torch  # noqa: E402
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


def published_config(tiny_widths: bool) -> dict:
    """huginn-0125's config.json as published (the reference copy when present, else HuginnConfig()'s defaults)."""
    if PUBLISHED_CONFIG.is_file():
        config = json.loads(PUBLISHED_CONFIG.read_text())
    else:  # as JSON holds it (id2label's keys become strings), so it equals the config.json written from it
        config = json.loads(HuginnConfig().to_json_string())
    return {**config, **TINY_WIDTHS} if tiny_widths else config


def random_tensor(name: str, shape: torch.Size, std: float, generator: torch.Generator) -> torch.Tensor:
    """A bf16 tensor of one published key: norms at 1, qk biases at 0, matrices N(0, std) (the published scale)."""
    if "norm" in name or name.startswith("transformer.ln_f"):
        return torch.ones(shape, dtype=torch.bfloat16)
    if "qk_bias" in name:
        return torch.zeros(shape, dtype=torch.bfloat16)
    return torch.randn(shape, generator=generator, dtype=torch.bfloat16).mul_(std)


def write_checkpoint(path: Path, config_dict: dict, shard_bytes: int, seed: int = 0) -> Path:
    """A random-weight checkpoint of `config_dict` in the published layout (see the module docstring)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_dict, indent=2))
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        skeleton = HuginnForCausalLM(config)
    tensors, seen = {}, set()
    for name, tensor in skeleton.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:  # a tied weight is stored once, under its first name (transformer.wte.weight)
            seen.add(id(tensor))
            tensors[name] = tensor.shape
    shards, size = [[]], 0
    for name, shape in tensors.items():
        nbytes = shape.numel() * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for index, names in enumerate(shards, 1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        shard = {}
        for name in names:
            # the RoPE table the reference stores (our model recomputes the angles; the key round-trips)
            shard[name] = (skeleton._rope_table().to(torch.bfloat16) if name == "freqs_cis" else
                           random_tensor(name, tensors[name], config.init_values["std"], generator))
        save_file(shard, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del shard
    total = sum(shape.numel() * 2 for shape in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(path)
    tokenizer = tiny.build_tiny_tokenizer(first_special_id=config.bos_token_id)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(path)
    return path


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


def record_loads(loads: list[dict]) -> None:
    """Wrap AutoModelForCausalLM.from_pretrained (every stage loads through it) to record each load's seconds, RSS
    and weight bytes."""
    original = AutoModelForCausalLM.from_pretrained

    def timed(*args, **kwargs):
        start = time.perf_counter()
        model = original(*args, **kwargs)
        loads.append({"seconds": time.perf_counter() - start, "peak_rss": peak_rss_bytes(), "rss": rss_now(),
                      "bytes": bytes_by_kind(model)})
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
    if stage == "sft":
        import train_sft
        from trl import SFTConfig
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
        import train_grpo
        from trl import GRPOConfig
        from training import parse_args
        args = parse_args(train_grpo.ScriptArguments, GRPOConfig, [
            "--config", str(ROOT / "configs" / "grpo_huginn_24gb.yaml"), *common, "--output_dir", str(workdir / "grpo"),
            "--sft_adapter", str(workdir / "sft"), "--dataset_name", "tiny:gsm8k_train", "--max_samples", "2",
            "--rollout_num_steps", "4", "--backprop_steps", "2", "--per_device_train_batch_size", "4",
            "--num_generations", "2", "--max_completion_length", "4", "--logging_steps", "1",
            "--log_completions", "false"])
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


def report(results: list[dict], write_seconds: float, checkpoint_bytes: int, config: dict, run_seconds: float) -> str:
    load = results[0]["loads"][0]
    rows = [f"| {r['stage']} | {r['loads'][0]['seconds']:.0f} | {r['seconds_total']:.0f} | {gib(r['peak_rss'])} | "
            f"{gib(r['loads'][0]['rss']['RssAnon'])} + {gib(r['loads'][0]['rss']['RssFile'])} | "
            f"{r['load_average']:.1f} |" for r in results]
    weights = [f"| {kind} | {gib(nbytes)} |" for kind, nbytes in sorted(results[0]["bytes_after"].items())]
    sft, grpo, evaluation = results
    return "\n".join([
        f"## {datetime.date.today()}, 2-core CPU ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, bitsandbytes {bnb.__version__}",
        "",
        f"Checkpoint: n_embd {config['n_embd']}, intermediate {config['intermediate_size']}, vocab "
        f"{config['vocab_size']}, random bf16 weights, {gib(checkpoint_bytes)} GiB on disk, written in "
        f"{write_seconds:.0f} s. Every stage loads it with NF4 + double quantization (bf16 compute). Whole run: "
        f"{run_seconds / 60:.1f} minutes.",
        "",
        "| stage | model load s | stage total s | peak RSS GiB (VmHWM) | RSS after load GiB, anon + file | "
        "load average (5 min) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "Weights resident after the SFT step (NF4 model + LoRA r16 on Wqkv/proj/fc):",
        "",
        "| kind | GiB |",
        "|---|---|",
        *weights,
        f"| AdamW state (LoRA) | {gib(sft['optimizer_bytes'])} |",
        "",
        f"Right after loading: {', '.join(f'{kind} {gib(n)} GiB' for kind, n in sorted(load['bytes'].items()))}.",
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
    parser.add_argument("--stage", choices=["sft", "grpo", "eval"], help=argparse.SUPPRESS)  # a stage's own process
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="huginn-fullsize-"))
    checkpoint = workdir / "checkpoint"
    if args.stage:
        stage_main(args.stage, checkpoint, workdir)
        return
    os.environ["TINYMATH_CACHE"] = str(workdir / "cache")  # the tiny datasets, away from the user's cache
    config = published_config(args.tiny)
    start = run_start = time.perf_counter()
    write_checkpoint(checkpoint, config, shard_bytes=(64 if args.tiny else 2048) * 2**20)
    write_seconds = time.perf_counter() - start
    checkpoint_bytes = sum(file.stat().st_size for file in checkpoint.glob("*.safetensors"))
    print(f"checkpoint {checkpoint}: {gib(checkpoint_bytes)} GiB in {write_seconds:.0f} s", flush=True)
    results = []
    for stage in ("sft", "grpo", "eval"):
        subprocess.run([sys.executable, __file__, "--stage", stage, "--workdir", str(workdir)], check=True)
        results.append(json.loads((workdir / f"{stage}.json").read_text()))
        print(json.dumps(results[-1]), flush=True)
    text = report(results, write_seconds, checkpoint_bytes, config, time.perf_counter() - run_start)
    print(text)
    results_path = args.results or (None if args.tiny else RESULTS)
    if results_path is not None:
        with open(results_path, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    if args.workdir is None:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
