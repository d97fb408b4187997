"""Training throughput of this project's objectives against `transformers`' stock classes, side by side.

Same dimensions, data, batch, optimizer and precision; each model is timed for the same number of
steps after a warm-up, alternating between the two so that machine noise hits both alike. The
`transformers` side is the plain PyTorch loop a researcher would write: BertForMaskedLM with the
same 80/10/10 masks, GPT2LMHeadModel, and ELECTRA as ElectraForMaskedLM (generator) +
ElectraForPreTraining (discriminator) with shared embeddings and L = L_gen + 50 L_disc.

    python benchmarks/train_throughput.py --size tiny --vocab 4096 --seq 128 --batch 16 --steps 20
    python benchmarks/train_throughput.py --objectives mlm,clm,electra,t5 --json results.json

Prints tokens/s, peak memory and the ratio ours / transformers. Runs on CUDA when available (bf16).
Peak memory is `torch.cuda.max_memory_allocated` on a GPU; on the CPU it is the peak resident set
of a separate process that runs only that model (so both include the same interpreter baseline).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import ModelConfig, TrainConfig  # noqa: E402
from model.hf.bert import bert_config  # noqa: E402
from model.hf.electra import electra_config  # noqa: E402
from model.hf.gpt2 import gpt2_config  # noqa: E402
from model.objectives import get_objective, preset  # noqa: E402
from model.objectives.electra import generator_config  # noqa: E402
from model.objectives.mlm import IGNORE, MaskingConfig, mask_tokens  # noqa: E402

SPECIALS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4, "sentinel": 5, "sentinel_last": 36}
SPECIAL_IDS = sorted(set(SPECIALS.values()))
HF_CLASSES = {"mlm": "BertForMaskedLM", "clm": "GPT2LMHeadModel", "electra": "ElectraForPreTraining",
              "t5": "T5ForConditionalGeneration"}


def ours_model(objective: str, cfg: ModelConfig, train_cfg: TrainConfig):
    model = get_objective(objective).build(cfg, train_cfg, SPECIALS)
    return model, lambda rows, gen: model(rows, gen)[0]


def hf_model(objective: str, cfg: ModelConfig, train_cfg: TrainConfig):
    """The `transformers` model(s) of the same dimensions and a training step over the same rows."""
    import transformers

    if objective == "mlm":
        model = transformers.BertForMaskedLM(transformers.BertConfig(**bert_config(cfg, SPECIALS)))
        masking = MaskingConfig.of(train_cfg)

        def step(rows, gen):
            ids, labels = mask_tokens(rows, SPECIAL_IDS, SPECIALS["mask"], cfg.vocab_size, masking, gen)
            return model(input_ids=ids, attention_mask=rows != 0, labels=labels).loss
        return model, step
    if objective == "clm":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**gpt2_config(cfg, SPECIALS)))
        # GPT2LMHeadModel shifts labels itself: feed the same seq_len tokens ours predicts from.
        return model, lambda rows, gen: model(input_ids=rows[:, :-1], labels=rows[:, :-1]).loss
    if objective == "electra":
        return hf_electra(cfg, train_cfg)
    if objective == "t5":
        from model.hf.t5 import t5_config
        from model.objectives.t5 import split_row

        model = transformers.T5ForConditionalGeneration(transformers.T5Config(**t5_config(cfg, SPECIALS)))

        def step(rows, gen):
            inputs, targets = split_row(rows, train_cfg)
            return model(input_ids=inputs, attention_mask=inputs != 0, labels=targets.contiguous()).loss
        return model, step
    raise SystemExit(f"no transformers counterpart for objective {objective!r}; use {', '.join(HF_CLASSES)}")


def hf_electra(cfg: ModelConfig, train_cfg: TrainConfig):
    import transformers

    small = generator_config(cfg, train_cfg.generator_ratio)
    gen_cfg = transformers.ElectraConfig(**electra_config(small, SPECIALS, "ElectraForMaskedLM"))
    generator = transformers.ElectraForMaskedLM(gen_cfg)
    discriminator = transformers.ElectraForPreTraining(
        transformers.ElectraConfig(**electra_config(cfg, SPECIALS, "ElectraForPreTraining")))
    generator.electra.embeddings = discriminator.electra.embeddings  # shared, as in the paper
    generator.generator_lm_head.weight = discriminator.electra.embeddings.word_embeddings.weight
    both = torch.nn.ModuleDict({"generator": generator, "discriminator": discriminator})
    masking = MaskingConfig.of(train_cfg)

    def step(rows, gen):
        ids, labels = mask_tokens(rows, SPECIAL_IDS, SPECIALS["mask"], cfg.vocab_size, masking, gen)
        attention = rows != 0
        out = generator(input_ids=ids, attention_mask=attention, labels=labels)
        selected = labels != IGNORE
        with torch.no_grad():
            probs = torch.softmax(out.logits[selected].float(), dim=-1)
            disc_input = rows.clone()
            disc_input[selected] = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        disc = discriminator(input_ids=disc_input, attention_mask=attention, labels=(disc_input != rows).long())
        return out.loss + train_cfg.disc_weight * disc.loss
    return both, step


def example_rows(objective: str, train_cfg: TrainConfig, vocab: int, batch: int, device) -> torch.Tensor:
    """A batch made by the objective's own example maker (T5's rows hold inputs and targets)."""
    gen = torch.Generator().manual_seed(0)
    n = (batch + 4) * (train_cfg.seq_len + 1) * 2
    tokens = torch.randint(40, vocab, (n,), generator=gen).numpy().astype("uint16")
    offsets = torch.tensor([0, n // 2, n]).numpy()
    rows = get_objective(objective).make_examples(tokens, offsets, train_cfg, SPECIALS)
    return torch.from_numpy(rows[:batch].astype("int64")).to(device)


def setup(objective: str, args, device, sides=("ours", "transformers")):
    arch = get_objective(objective).ARCH
    cfg = ModelConfig.from_name(args.size, arch=arch, vocab_size=args.vocab, max_seq_len=max(512, args.seq + 1))
    train_cfg = TrainConfig(objective=objective, seq_len=args.seq, **preset(objective))
    torch.manual_seed(0)
    build = {"ours": ours_model, "transformers": hf_model}
    fns = {}
    for side in sides:
        model, step = build[side](objective, cfg, train_cfg)
        fns[side] = (model.to(device), step)
    return fns, example_rows(objective, train_cfg, args.vocab, args.batch, device)


def train_steps(model, step, rows, opt, n: int, seed: int, device, amp) -> None:
    gen = torch.Generator(device=device).manual_seed(seed)
    for _ in range(n):
        with amp():
            loss = step(rows, gen)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def autocast(device):
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    import contextlib
    return contextlib.nullcontext


def measure(objective: str, args, device: torch.device) -> dict:
    fns, rows = setup(objective, args, device)
    amp = autocast(device)
    # The same fused AdamW for both sides (CPU and CUDA): the comparison is of the models, not the optimizer.
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for k, (m, _) in fns.items()}
    times = {k: 0.0 for k in fns}
    peak = {}
    for rnd in range(args.rounds + 1):  # round 0 is warm-up
        for name, (model, step) in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            train_steps(model, step, rows, opts[name], args.steps, rnd, device, amp)
            if device.type == "cuda":
                torch.cuda.synchronize()
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated() / 2**20)
            if rnd:
                times[name] += time.perf_counter() - t0
    if device.type != "cuda":
        peak = {name: cpu_peak_mb(objective, name, args) for name in fns}
    tokens = args.rounds * args.steps * args.batch * args.seq
    result = {k: tokens / t for k, t in times.items()}
    return {"objective": objective, "hf_class": HF_CLASSES[objective], "tokens_per_s": result,
            "ratio": result["ours"] / result["transformers"], "peak_memory_mb": peak,
            "params": {k: sum(p.numel() for p in m.parameters()) for k, (m, _) in fns.items()}}


def cpu_peak_mb(objective: str, which: str, args) -> float:
    """Peak RSS of a fresh process that trains only this model for a few steps."""
    cmd = [sys.executable, __file__, "--probe", f"{objective}:{which}", "--size", args.size, "--vocab", str(args.vocab),
           "--seq", str(args.seq), "--batch", str(args.batch)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def probe(spec: str, args) -> None:
    objective, which = spec.split(":")
    device = torch.device("cpu")
    fns, rows = setup(objective, args, device, sides=(which,))
    model, step = fns[which]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_steps(model, step, rows, opt, 3, 0, device, autocast(device))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec.
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    print(int(status["VmHWM"].split()[0]) / 1024)  # kB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--objectives", default="mlm,clm,electra")
    parser.add_argument("--json", default="")
    parser.add_argument("--probe", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        return probe(args.probe, args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = [measure(o, args, device) for o in args.objectives.split(",")]
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device {where}, torch {torch.__version__}, size {args.size}, vocab {args.vocab}, seq {args.seq}, "
          f"batch {args.batch}, {'bf16' if device.type == 'cuda' else 'fp32'}")
    print(f"{'objective':<10}{'transformers class':<28}{'ours tok/s':>12}{'theirs tok/s':>14}{'ratio':>7}"
          f"{'ours MB':>10}{'theirs MB':>11}")
    for r in results:
        t, m = r["tokens_per_s"], r["peak_memory_mb"]
        print(f"{r['objective']:<10}{r['hf_class']:<28}{t['ours']:>12,.0f}{t['transformers']:>14,.0f}{r['ratio']:>7.2f}"
              f"{m['ours']:>10,.0f}{m['transformers']:>11,.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "torch": torch.__version__, "args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
