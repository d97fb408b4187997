"""Training throughput of this project's models against `transformers`' stock classes, side by side.

Same dimensions, data, batch, optimizer and precision; each model is timed for the same number of
steps after a warm-up, alternating between the two so that machine noise hits both alike.

    python benchmarks/train_throughput.py --size tiny --vocab 4096 --seq 128 --batch 16 --steps 30
    python benchmarks/train_throughput.py --json results.json

Prints tokens/s per model and the ratio ours / transformers. Runs on CUDA when available (bf16).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from model.config import ModelConfig  # noqa: E402
from model.hf.bert import bert_config  # noqa: E402
from model.hf.gpt2 import gpt2_config  # noqa: E402
from model.objectives import get_objective  # noqa: E402
from model.objectives.mlm import MaskingConfig, mask_tokens  # noqa: E402

SPECIALS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


def hf_model(objective: str, cfg: ModelConfig):
    import transformers

    if objective == "mlm":
        return transformers.BertForMaskedLM(transformers.BertConfig(**bert_config(cfg, SPECIALS)))
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**gpt2_config(cfg, SPECIALS)))


def step_fns(objective: str, cfg: ModelConfig, device: torch.device):
    ours = get_objective(objective).build(cfg, None, SPECIALS).to(device)
    theirs = hf_model(objective, cfg).to(device)
    masking = MaskingConfig()

    def ours_step(rows, gen):
        return ours(rows, gen)[0]

    def theirs_step(rows, gen):
        if objective == "mlm":
            ids, labels = mask_tokens(rows, list(SPECIALS.values()), SPECIALS["mask"], cfg.vocab_size, masking, gen)
            return theirs(input_ids=ids, labels=labels).loss
        # GPT2LMHeadModel shifts labels itself: feed the same seq_len tokens ours predicts from.
        return theirs(input_ids=rows[:, :-1], labels=rows[:, :-1]).loss

    return {"ours": (ours, ours_step), "transformers": (theirs, theirs_step)}


def measure(objective: str, args, device: torch.device) -> dict:
    arch = get_objective(objective).ARCH
    cfg = ModelConfig.from_name(args.size, arch=arch, vocab_size=args.vocab, max_seq_len=max(512, args.seq + 1))
    fns = step_fns(objective, cfg, device)
    width = args.seq + (1 if objective == "clm" else 0)
    rows = torch.randint(5, args.vocab, (args.batch, width), device=device)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else None
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=device.type == "cuda") for k, (m, _) in fns.items()}
    times = {k: 0.0 for k in fns}
    for rnd in range(args.rounds + 1):  # round 0 is warm-up
        for name, (model, step) in fns.items():
            gen = torch.Generator(device=device).manual_seed(rnd)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                if amp:
                    with amp():
                        loss = step(rows, gen)
                else:
                    loss = step(rows, gen)
                loss.backward()
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rnd:
                times[name] += time.perf_counter() - t0
    tokens = args.rounds * args.steps * args.batch * args.seq
    result = {k: tokens / t for k, t in times.items()}
    return {"objective": objective, "tokens_per_s": result, "ratio": result["ours"] / result["transformers"],
            "params": {k: sum(p.numel() for p in m.parameters()) for k, (m, _) in fns.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--objectives", default="mlm,clm")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = [measure(o, args, device) for o in args.objectives.split(",")]
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"torch {torch.__version__}, size {args.size}, vocab {args.vocab}, seq {args.seq}, batch {args.batch}")
    print(f"{'objective':<10}{'ours tok/s':>14}{'transformers tok/s':>20}{'ratio':>8}")
    for r in results:
        t = r["tokens_per_s"]
        print(f"{r['objective']:<10}{t['ours']:>14,.0f}{t['transformers']:>20,.0f}{r['ratio']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "torch": torch.__version__, "args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
