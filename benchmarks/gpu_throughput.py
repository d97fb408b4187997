"""GPU training throughput and MFU: this project's GPT-2 small and BERT-base against `transformers`' classes.

One run trains, on the same random tokens, sequence length, batch and dimensions (12 layers, width
768, 12 heads, vocab 50304: 124M parameters for the GPT), each of

- gpt: this project's `clm` model and `transformers.GPT2LMHeadModel` (next-token loss over every position),
- bert: this project's `mlm` model and `transformers.BertForMaskedLM` (the same 80/10/10 masks, drawn by
  this project's collator on the device for both),

built from their config classes (random initialisation, nothing downloaded), in the same plain loop:
bf16 autocast over fp32 weights, fused AdamW, TF32 for fp32 matmuls and `torch.compile` of the loss
function (this project's side compiles its model's forward, as `python -m model.train` does).
Warm-up steps (compilation included) are not timed; the timed steps sit between two
`torch.cuda.synchronize()`. Each side runs alone and is freed before the next, so its peak memory
(`torch.cuda.max_memory_allocated`) is its own.

MFU uses one FLOP count for both sides: 6 N + 12 L d T per token (PaLM appendix B, as nanoGPT's
estimate): N the parameters without the position embeddings (the tied vocabulary projection counted
once, as a matmul of every token), and the attention scores counted in full, causal or not. The peak
is the dense bf16 table of `model.train.PEAK_TFLOPS` (H100 / H200 989, A100 312 TFLOP/s) or
`--peak-tflops`.

    python benchmarks/gpu_throughput.py --json gpu.json                 # one H100: both models, both sides
    python benchmarks/gpu_throughput.py --tiny --device cpu --threads 1  # a smoke check of the code path

Needs torch, rich and this repository's `model/`; without `transformers` it says so and times this
project's side alone.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import ModelConfig, TrainConfig  # noqa: E402
from model.hf.bert import bert_config  # noqa: E402
from model.hf.gpt2 import gpt2_config  # noqa: E402
from model.objectives import get_objective  # noqa: E402
from model.objectives.mlm import MaskingConfig, mask_tokens  # noqa: E402
from model.train import peak_flops  # noqa: E402

SPECIALS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
SPECIAL_IDS = sorted(set(SPECIALS.values()))
FIRST_ID = max(SPECIAL_IDS) + 1  # random tokens are never special: no row is padded, no token masked out
MODELS = {  # objective, architecture, the transformers class it is compared with
    "gpt": ("clm", "decoder", "GPT2LMHeadModel"),
    "bert": ("mlm", "encoder", "BertForMaskedLM"),
}
PRESETS = {
    "full": dict(n_layers=12, d_model=768, n_heads=12, d_ff=3072, vocab=50304, seq=1024, batch=16, steps=50, warmup=10),
    "tiny": dict(n_layers=2, d_model=128, n_heads=2, d_ff=512, vocab=4096, seq=64, batch=4, steps=3, warmup=1),
}
FLOP_FORMULA = "6*N + 12*L*d*T per token; N = parameters minus position embeddings (tied head once), full attention"
N_BATCHES = 4  # distinct random batches, cycled


def model_config(kind: str, dims: dict) -> tuple[ModelConfig, TrainConfig]:
    objective, arch, _ = MODELS[kind]
    cfg = ModelConfig.from_name("custom", arch=arch, n_layers=dims["n_layers"], d_model=dims["d_model"],
                                n_heads=dims["n_heads"], d_ff=dims["d_ff"], vocab_size=dims["vocab"],
                                max_seq_len=dims["seq"])
    return cfg, TrainConfig(objective=objective, seq_len=dims["seq"])


def build(kind: str, side: str, dims: dict):
    """(model, step): `step(rows, generator)` is one training forward returning the loss."""
    cfg, train_cfg = model_config(kind, dims)
    if side == "ours":
        model = get_objective(train_cfg.objective).build(cfg, train_cfg, SPECIALS)
        return model, lambda rows, gen: model(rows, gen)[0]
    import transformers

    if kind == "gpt":
        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(**gpt2_config(cfg, SPECIALS), attn_implementation="sdpa"))

        def step(rows, gen):  # the same seq inputs and next-token targets as this project's rows
            logits = model(input_ids=rows[:, :-1]).logits
            return F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten())
        return model, step
    model = transformers.BertForMaskedLM(
        transformers.BertConfig(**bert_config(cfg, SPECIALS), attn_implementation="sdpa"))
    masking = MaskingConfig.of(train_cfg)

    def step(rows, gen):
        ids, labels = mask_tokens(rows, SPECIAL_IDS, SPECIALS["mask"], cfg.vocab_size, masking, gen)
        return model(input_ids=ids, attention_mask=rows != SPECIALS["pad"], labels=labels).loss
    return model, step


def flops_per_token(kind: str, dims: dict) -> float:
    """The FLOP count both sides are credited with (FLOP_FORMULA), from this project's model of these dims."""
    cfg, train_cfg = model_config(kind, dims)
    with torch.device("meta"):  # shapes only
        model = get_objective(train_cfg.objective).build(cfg, train_cfg, SPECIALS)
    n = sum(p.numel() for p in model.parameters()) - model.backbone.pos_emb.weight.numel()
    return 6 * n + 12 * cfg.n_layers * cfg.d_model * dims["seq"]


def random_rows(dims: dict, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(FIRST_ID, dims["vocab"], (N_BATCHES, dims["batch"], dims["seq"] + 1), generator=gen)
    return [r.to(device) for r in rows]


def rows_for(kind: str, rows: torch.Tensor, seq: int) -> torch.Tensor:
    return rows if kind == "gpt" else rows[:, :seq]  # gpt: seq inputs + the next token; bert: seq tokens


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_side(kind: str, side: str, dims: dict, data: list[torch.Tensor], device: torch.device, amp,
             compile_: bool, steps: int, warmup: int, lr: float) -> dict:
    torch.manual_seed(0)
    model, step = build(kind, side, dims)
    model.to(device).train()
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, fused=True)
    fn = torch.compile(step) if compile_ else step
    gen = torch.Generator(device=device).manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def train_step(i: int) -> torch.Tensor:
        with amp():
            loss = fn(rows_for(kind, data[i % len(data)], dims["seq"]), gen)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for i in range(warmup):
        train_step(i)
    synchronize(device)
    started = time.perf_counter()
    for i in range(steps):
        loss = train_step(warmup + i)  # no read of the loss inside the timed steps: no host-device sync
    synchronize(device)
    seconds = time.perf_counter() - started
    result = {
        "class": type(model).__name__, "params": params, "seconds": seconds,
        "tokens_per_s": steps * dims["batch"] * dims["seq"] / seconds, "final_loss": float(loss),
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }
    del model, step, optimizer, fn
    gc.collect()
    if compile_:
        torch._dynamo.reset()  # the next model starts from an empty compile cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt,bert", help="comma-separated: gpt, bert")
    parser.add_argument("--steps", type=int, help="timed steps per side (50; tiny: 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps first, compilation included (10; tiny: 1)")
    parser.add_argument("--batch", type=int, help="rows per step (16; tiny: 4)")
    parser.add_argument("--seq", type=int, help="tokens per row (1024; tiny: 64)")
    parser.add_argument("--vocab", type=int, help="vocabulary (50304; tiny: 4096)")
    parser.add_argument("--tiny", action="store_true", help="2 layers, width 128: a CPU smoke check, not a result")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                        help="auto: bf16 autocast on CUDA, fp32 on the CPU")
    parser.add_argument("--no-compile", action="store_true", help="eager on both sides")
    parser.add_argument("--compile", action="store_true", help="compile on the CPU too (default: on CUDA only)")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="dense bf16 TFLOP/s of the device for MFU (default: looked up from the GPU's name)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: its default)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--json", default="", help="write the results to this file too")
    args = parser.parse_args(argv)
    preset = PRESETS["tiny" if args.tiny else "full"]
    for key in ("steps", "warmup", "batch", "seq", "vocab"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.dims = {**{k: preset[k] for k in ("n_layers", "d_model", "n_heads", "d_ff")},
                 "vocab": args.vocab, "seq": args.seq, "batch": args.batch}
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"unknown model {sorted(unknown)[0]!r}; use {', '.join(MODELS)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    from rich.console import Console

    console = Console(width=140)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    compile_ = not args.no_compile and (device.type == "cuda" or args.compile)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in fp32
    try:
        import transformers
        versions = {"transformers": transformers.__version__}
        sides = ("ours", "transformers")
    except ImportError:
        console.print("transformers is not installed here: timing this project's side only")
        versions, sides = {"transformers": None}, ("ours",)
    peak = peak_flops(device, args.peak_tflops)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"

    results = {}
    for kind in args.models.split(","):
        data = random_rows(args.dims, device)
        per_token = flops_per_token(kind, args.dims)
        entry = {"flops_per_token": per_token}
        for side in sides:
            r = run_side(kind, side, args.dims, data, device, amp, compile_, args.steps, args.warmup, args.lr)
            r["mfu"] = per_token * r["tokens_per_s"] / peak if peak else None
            entry[side] = r
            console.print(f"{kind} {side}: {r['tokens_per_s']:,.0f} tokens/s", highlight=False)
        if "transformers" in entry:
            ours, theirs = entry["ours"], entry["transformers"]
            entry["ratio"] = {
                "tokens_per_s": ours["tokens_per_s"] / theirs["tokens_per_s"],
                "peak_memory": (ours["peak_memory_mb"] / theirs["peak_memory_mb"]
                                if ours["peak_memory_mb"] and theirs["peak_memory_mb"] else None),
            }
        results[kind] = entry
        del data

    report = {"device": where, "torch": torch.__version__, **versions, "precision": "bf16" if bf16 else "fp32",
              "compile": compile_, "fused_adamw": True, "peak_tflops": peak / 1e12 if peak else None,
              "flop_formula": FLOP_FORMULA, "dims": args.dims, "steps": args.steps, "warmup": args.warmup,
              "results": results}
    print_table(console, report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def print_table(console, report: dict) -> None:
    from rich.table import Table

    d = report["dims"]
    table = Table(title=f"{report['device']}, torch {report['torch']}, transformers {report['transformers'] or 'absent'}; "
                        f"{d['n_layers']} layers, d {d['d_model']}, {d['n_heads']} heads, vocab {d['vocab']}, "
                        f"seq {d['seq']}, batch {d['batch']}; {report['precision']}, "
                        f"compile {'on' if report['compile'] else 'off'}, fused AdamW")
    for col in ("model", "side", "class", "params", "tokens/s", "MFU", "peak MB", "loss", "ours/theirs tok/s",
                "ours/theirs mem"):
        table.add_column(col, justify="left" if col in ("model", "side", "class") else "right")
    for kind, entry in report["results"].items():
        for side in ("ours", "transformers"):
            if side not in entry:
                continue
            r, ratio = entry[side], entry.get("ratio", {}) if side == "ours" else {}
            table.add_row(kind, side, r["class"], f"{r['params'] / 1e6:.1f}M", f"{r['tokens_per_s']:,.0f}",
                          "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                          "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:,.0f}",
                          f"{r['final_loss']:.3f}",
                          f"{ratio['tokens_per_s']:.2f}x" if ratio.get("tokens_per_s") else "",
                          f"{ratio['peak_memory']:.2f}x" if ratio.get("peak_memory") else "")
    console.print(table)
    peak = report["peak_tflops"]
    console.print(f"MFU = FLOPs/token x tokens/s / peak; FLOPs/token: {report['flop_formula']}; peak "
                  + (f"{peak:,.0f} TFLOP/s" if peak else "unknown for this device (give --peak-tflops)")
                  + f". {report['warmup']} warm-up steps untimed, {report['steps']} timed.", highlight=False)


if __name__ == "__main__":
    main()
