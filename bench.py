"""Speed and memory of MoTE, printed as one table. Random weights; every figure measured in this run.

    python bench.py                # CPU: tiny and smollm2-135m shapes (about 3 minutes on 2 cores)
    python bench.py --quick        # fewer repeats
    python bench.py --gpu          # adds the llama31-8b rows when CUDA is present

Rows: training tokens/s of a MoTE step (seven linears, 3 step experts + shared, rank 16) against a
single LoRA of the same rank and against the frozen base's forward + backward; decoding tokens/s
with the KV cache (batch 1 and 8) against full recompute, with and without experts, with the active
experts merged, and the achieved weight bandwidth; loading time and peak RSS as a multiple of the
file size.
"""
import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import mote
from model import ModelArgs, Transformer
from sample import generate

ROWS = []


def row(name, value, unit, note=""):
    ROWS.append((name, value, unit, note))
    print(f"{name:<58} {value:>12.3f} {unit:<10} {note}", flush=True)


def timed(fn, repeats, sync=lambda: None):
    """Median seconds of fn() over repeats, after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def random_base(args, device, dtype):
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(args).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.requires_grad_(False)


def train_step_fn(model, tokens, amp):
    """One forward + backward of the next-token loss."""
    steps = mote.token_steps(tokens, model.args.vocab_size)
    route = mote.route(steps, torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device))

    def step():
        with torch.autocast("cuda", torch.bfloat16, enabled=amp):
            hidden = model.hidden(tokens, route=route)
            loss = F.cross_entropy(model.lm_head(hidden[:, :-1]).float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def bench_training(preset, batch, seq, device, repeats, amp, checkpointing=False):
    args = ModelArgs.preset(preset)
    dtype = torch.bfloat16 if amp else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    tokens = torch.randint(0, args.vocab_size, (batch, seq), device=device)
    tokens[:, seq // 4] = mote.start_marker(args.vocab_size, 0)  # a chain: question, analysis, guidance, response
    tokens[:, seq // 2] = mote.start_marker(args.vocab_size, 1)
    tokens[:, 3 * seq // 4] = mote.start_marker(args.vocab_size, 2)
    n_params = sum(p.numel() for p in random_base(args, "meta", dtype).parameters())
    results = {}
    for variant, cfg in (("base", None), ("single", mote.ExpertConfig(routing="single", shared=False)),
                         ("mote", mote.ExpertConfig())):
        model = random_base(args, device, dtype)
        model.checkpointing = checkpointing
        if cfg:
            mote.attach(model, cfg)
        else:  # the frozen base: the backward still runs through every layer (what any LoRA pays)
            model.layers[0].input_layernorm.weight.requires_grad_(True)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = timed(train_step_fn(model, tokens if cfg else tokens.clamp(max=args.vocab_size - 1), amp),
                        repeats, sync)
        results[variant] = batch * seq / seconds
        extra = ""
        if device == "cuda":
            flops = 4 * n_params * batch * seq + 4 * args.n_layers * batch * seq * seq * args.dim  # + causal attention
            extra = (f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, "
                     f"MFU {flops / seconds / PEAK_FLOPS.get(torch.cuda.get_device_name(), 989e12):.1%}")
        row(f"train {preset} {variant} fwd+bwd B={batch} T={seq}", results[variant], "tok/s", extra)
        del model
    row(f"train {preset} MoTE / single LoRA step time", results["single"] / results["mote"], "x", "target <= 1.10")
    row(f"train {preset} MoTE / frozen base fwd+bwd time", results["base"] / results["mote"], "x")


PEAK_FLOPS = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12}  # dense bf16


def bench_decoding(preset, device, repeats, new_tokens):
    args = ModelArgs.preset(preset)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model = random_base(args, device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    prompt = torch.randint(0, args.vocab_size, (32,)).tolist()
    stop = []  # no stop token: decode exactly new_tokens

    def run(batch, **kw):
        return lambda: generate(model, [prompt] * batch, stop, max_new_tokens=new_tokens, **kw)

    def naive():  # recompute the whole sequence for every new token
        seq = torch.tensor([prompt], device=device)
        for _ in range(new_tokens):
            seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], dim=1)

    with torch.no_grad():
        plain1 = new_tokens / timed(run(1), repeats, sync)
        row(f"decode {preset} KV cache, batch 1", plain1, "tok/s",
            f"weights read {weight_bytes * plain1 / 1e9:.1f} GB/s")
        plain8 = 8 * new_tokens / timed(run(8), repeats, sync)
        row(f"decode {preset} KV cache, batch 8", plain8, "tok/s")
        naive_tps = new_tokens / timed(naive, 1, sync)
        row(f"decode {preset} full recompute (naive), batch 1", naive_tps, "tok/s")
        row(f"decode {preset} KV cache / naive", plain1 / naive_tps, "x", "target >= 2")
        mote.attach(model, mote.ExpertConfig())
        for b in mote.banks(model):
            b.B.data.normal_(0, 0.02)
        # the experts sampler on a path with all three steps, routed and merged
        routed = new_tokens / timed(run(1, experts=True, path="full"), repeats, sync)
        row(f"decode {preset} with experts (routed), batch 1", routed, "tok/s")
        merged = new_tokens / timed(run(1, experts=True, path="full", merge=True), repeats, sync)
        row(f"decode {preset} with experts (merged per step), batch 1", merged, "tok/s")
        row(f"decode {preset} routed-experts overhead vs plain base", plain1 / routed, "x")
        row(f"decode {preset} merged-experts overhead vs plain base", plain1 / merged, "x")
        if device == "cuda":
            floor = weight_bytes / HBM.get(torch.cuda.get_device_name(), 3.35e12)
            row(f"decode {preset} batch 1, share of the bandwidth floor", floor * plain1, "x",
                f"floor {floor * 1e3:.2f} ms/token")


HBM = {"NVIDIA H100 80GB HBM3": 3.35e12, "NVIDIA H200": 4.8e12}  # bytes/s


def bench_loading():
    """Load a generated safetensors base of ~440 MB in a fresh process; report its peak RSS
    above the process's RSS after importing torch, as a multiple of the file size (Linux)."""
    args = ModelArgs(dim=1024, n_layers=4, n_heads=16, n_kv_heads=4, vocab_size=32000, ffn_dim=2816)  # ~440 MB fp32
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "base.safetensors")
        random_base(args, "cpu", torch.float32).save(path)
        size = os.path.getsize(path)
        code = ("import time, torch; from model import Transformer\n"
                "def status(key): return int(open('/proc/self/status').read().split(key + ':')[1].split()[0]) * 1024\n"
                "r0 = status('VmRSS')\n"
                f"t = time.perf_counter(); m = Transformer.from_pretrained({path!r}); s = time.perf_counter() - t\n"
                "m(torch.zeros(1, 4, dtype=torch.long))  # touch the weights\n"
                "print(s, status('VmHWM') - r0)")  # VmHWM: this process's peak RSS (ru_maxrss counts the parent's)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.split()
    seconds, peak = float(out[0]), float(out[1])
    row(f"load {size / 1e6:.0f} MB safetensors base", seconds, "s")
    row("load peak RSS / file size", peak / size, "x", "target <= 1.15")


def memory_estimate(preset, seq=2048, batch=1):
    """Arithmetic, not a measurement: the GPU memory of MoTE training on `preset` with bf16 base
    weights, fp32 experts + AdamW, activation checkpointing (block inputs kept, one block live)."""
    args = ModelArgs.preset(preset)
    base = sum(p.numel() for p in random_base(args, "meta", torch.bfloat16).parameters())
    per_layer = sum(i + o for i, o in [(args.dim, args.n_heads * args.head_dim), (args.dim, args.n_kv_heads * args.head_dim),
                                       (args.dim, args.n_kv_heads * args.head_dim), (args.n_heads * args.head_dim, args.dim),
                                       (args.dim, args.ffn_dim), (args.dim, args.ffn_dim), (args.ffn_dim, args.dim)])
    experts = per_layer * 16 * 4 * args.n_layers  # rank 16, 3 step experts + shared
    gib = 2 ** 30
    rows = {"base weights (bf16)": base * 2, "experts (fp32)": experts * 4, "expert grads (fp32)": experts * 4,
            "AdamW moments (fp32)": experts * 8,
            "block inputs kept (bf16)": args.n_layers * batch * seq * args.dim * 2,
            "one block recomputed (bf16, ~20 activations of dim or ffn width)": batch * seq * (12 * args.dim + 8 * args.ffn_dim) * 2,
            "logits chunk (fp32, 1024 positions)": 1024 * (args.vocab_size + 6) * 4 * 3}
    for name, b in rows.items():
        print(f"  {name:<66} {b / gib:7.2f} GiB")
    print(f"  {'total (estimate; add ~1-2 GiB of CUDA context and allocator slack)':<66} {sum(rows.values()) / gib:7.2f} GiB")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--gpu", action="store_true", help="run the CUDA rows (llama31-8b shapes)")
    p.add_argument("--memory", metavar="PRESET", help="print the training-memory arithmetic for a preset and exit")
    args = p.parse_args()
    if args.memory:
        return memory_estimate(args.memory)
    repeats = 2 if args.quick else 5
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    bench_training("tiny", 8, 256, "cpu", repeats, amp=False)
    bench_training("smollm2-135m", 4, 256, "cpu", max(2, repeats - 1), amp=False)
    bench_decoding("smollm2-135m", "cpu", max(1, repeats // 2), 32 if args.quick else 64)
    bench_loading()
    if args.gpu and torch.cuda.is_available():
        print(f"# {torch.cuda.get_device_name()}")
        bench_training("smollm2-135m", 8, 2048, "cuda", repeats, amp=True)
        bench_training("llama31-8b", 1, 2048, "cuda", 3, amp=True, checkpointing=True)
        bench_decoding("llama31-8b", "cuda", 3, 128)


if __name__ == "__main__":
    main()
