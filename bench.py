"""Speed and memory of MoTE, printed as one table. Random weights; every figure measured in this run.

    python bench.py                # CPU: tiny and smollm2-135m shapes (a few minutes on 2 cores)
    python bench.py --quick        # fewer repeats
    python bench.py --dtype auto   # the CPU rows in the dtype train.py would choose (default: fp32 and bf16)
    python bench.py --gpu          # the CUDA rows instead: smollm2-135m and llama31-8b shapes

Rows: training tokens/s of train.py's MoTE step (chain_loss: seven linears, 3 step experts +
shared, rank 16) against a single LoRA of the same rank and against the frozen base's forward +
backward; decoding tokens/s as a user runs it (the first call, no warm-up) and warmed up, with the
static KV cache (batch 1 and 8) against full recompute, with the experts routed and merged; the
per-token time late in a long chain against early in it; the achieved share of the memory-bandwidth
floor on CUDA; loading time and peak RSS. When transformers and peft are importable (never a
dependency of this project) the same run adds Hugging Face + PEFT LoRA training and HF generate
with the same shapes, dtype and settings, so the ratios are measured side by side.
"""
import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import torch

import mote
import train
from model import ModelArgs, Transformer, resolve_dtype
from sample import generate

ROWS = []
LINEARS = [name.split(".")[1] for name in mote.LINEARS]  # q_proj ... down_proj: LoRA targets for PEFT too


def row(name, value, unit, note=""):
    ROWS.append((name, value, unit, note))
    print(f"{name:<62} {value:>12.3f} {unit:<10} {note}", flush=True)


def synchronizer(device):
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


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


def with_experts(model, cfg=mote.ExpertConfig()):
    """Experts attached and made trained-looking (B != 0), in fp32 as train.py trains them."""
    mote.attach(model, cfg)
    with torch.no_grad():
        for b in mote.banks(model):
            b.B.normal_(0, 0.02)
    return model


def for_decoding(model):
    """Trained-looking experts as sample.load leaves them: cast once to the base's dtype
    (mote.cast_experts). Left in fp32 under a bf16 base, every layer would cast its experts to bf16
    again at every decoded token, a cost sample.py never pays."""
    return mote.cast_experts(with_experts(model), model.dtype)


def chain_batch(args, batch, seq, device):
    """A batch of random chains as train.py sees them (data.collate's tokens, targets, valid,
    conclusion, harmful): question, analysis, guidance, response."""
    tokens = torch.randint(0, args.vocab_size, (batch, seq), device=device)
    for step, at in enumerate((seq // 4, seq // 2, 3 * seq // 4)):
        tokens[:, at] = mote.start_marker(args.vocab_size, step)
    targets = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -100)], dim=1)
    none = torch.zeros_like(tokens, dtype=torch.bool)
    return tokens, targets, torch.ones_like(tokens, dtype=torch.bool), none, none


def train_step_fn(model, batch, dtype, device):
    """One forward + backward of train.py's loss (chain_loss, nothing dropped)."""
    B, V = batch[0].shape[0], model.args.vocab_size
    qexp, dropped = torch.zeros(B, dtype=torch.long, device=device), torch.zeros(B, 3, dtype=torch.bool, device=device)

    def step():
        with train.autocast(device, dtype):
            losses, *_ = train.chain_loss(model, batch, V, qexp, dropped)
        losses.mean().backward()
        model.zero_grad(set_to_none=True)
    return step


def hf_lora_step_fn(args, batch, dtype, device, checkpointing, rank=16):
    """Hugging Face transformers + PEFT, one LoRA of `rank` on the same seven linears, same shapes,
    dtype, autocast and checkpointing: the anchor a user would otherwise train with. None when
    transformers or peft is not installed."""
    try:
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    config = LlamaConfig(hidden_size=args.dim, intermediate_size=args.ffn_dim, num_hidden_layers=args.n_layers,
                         num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
                         vocab_size=args.vocab_size, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
                         max_position_embeddings=args.max_seq_len, tie_word_embeddings=args.tie_embeddings)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=32, lora_dropout=0.0, target_modules=LINEARS))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    tokens = batch[0].clamp(max=args.vocab_size - 1)

    def step():
        with train.autocast(device, dtype):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def short(dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


def bench_training(preset, batch, seq, device, repeats, checkpointing=False, dtype_name="auto"):
    args = ModelArgs.preset(preset)
    (dtype, _), sync = resolve_dtype(dtype_name, device), synchronizer(device)
    chains = chain_batch(args, batch, seq, device)
    n_params = sum(p.numel() for p in random_base(args, "meta", dtype).parameters())
    results = {}
    variants = {"base": None, "single": mote.ExpertConfig(routing="single", shared=False), "mote": mote.ExpertConfig(),
                "hf+peft": "hf"}
    for variant, cfg in variants.items():
        if cfg == "hf":
            step = hf_lora_step_fn(args, chains, dtype, device, checkpointing)
            if step is None:
                continue
        else:
            model = random_base(args, device, dtype)
            model.checkpointing = checkpointing
            if cfg:
                with_experts(model, cfg).train()
                step = train_step_fn(model, chains, dtype, device)
            else:  # the frozen base: the backward still runs through every layer (what any LoRA pays)
                model.layers[0].input_layernorm.weight.requires_grad_(True)
                plain = (chains[0].clamp(max=args.vocab_size - 1), chains[1].clamp(max=args.vocab_size - 1), *chains[2:])
                step = train_step_fn(model, plain, dtype, device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = timed(step, repeats, sync)
        results[variant] = batch * seq / seconds
        extra = ""
        if device == "cuda":
            flops = 4 * n_params * batch * seq + 4 * args.n_layers * batch * seq * seq * args.dim  # + causal attention
            extra = (f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, "
                     f"MFU {flops / seconds / PEAK_FLOPS.get(torch.cuda.get_device_name(), 989e12):.1%}")
        row(f"train {preset} {short(dtype)} {variant} fwd+bwd B={batch} T={seq}", results[variant], "tok/s", extra)
        step = model = None
    name = f"train {preset} {short(dtype)}"
    row(f"{name} MoTE / single LoRA step time", results["single"] / results["mote"], "x", "target <= 1.10")
    row(f"{name} MoTE / frozen base fwd+bwd speed", results["mote"] / results["base"], "x", "target >= 0.6 (GPU)")
    if "hf+peft" in results:
        row(f"{name} MoTE / HF+PEFT single LoRA speed", results["mote"] / results["hf+peft"], "x", "target >= 1.5 (GPU)")


PEAK_FLOPS = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12}  # dense bf16
HBM = {"NVIDIA H100 80GB HBM3": 3.35e12, "NVIDIA H200": 4.8e12}  # bytes/s


def hf_generate_fn(model, prompt, new_tokens, cache_implementation):
    """HF generate on the same weights (copied into LlamaForCausalLM), greedy, exactly new_tokens.
    None when transformers is not installed."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    a = model.args
    config = LlamaConfig(hidden_size=a.dim, intermediate_size=a.ffn_dim, num_hidden_layers=a.n_layers,
                         num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, vocab_size=a.vocab_size,
                         rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta, max_position_embeddings=a.max_seq_len,
                         tie_word_embeddings=a.tie_embeddings)
    device = next(model.parameters()).device
    with torch.device(device):
        hf = LlamaForCausalLM(config).to(model.dtype).eval()
    state = {("" if k == "lm_head.weight" else "model.") + k: v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    ids = torch.tensor([prompt], device=device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if cache_implementation:
        kw["cache_implementation"] = cache_implementation
    return lambda: hf.generate(ids, **kw)


def bench_decoding(preset, device, repeats, new_tokens, dtype_name="auto"):
    args = ModelArgs.preset(preset)
    (dtype, _), sync = resolve_dtype(dtype_name, device), synchronizer(device)
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

    name = f"decode {preset} {short(dtype)}"
    with torch.no_grad():
        t0 = time.perf_counter()
        run(1)()
        sync()
        row(f"{name} batch 1, first call (as sample.py runs it)", new_tokens / (time.perf_counter() - t0), "tok/s")
        plain1 = new_tokens / timed(run(1), repeats, sync)
        row(f"{name} KV cache, batch 1", plain1, "tok/s", f"weights read {weight_bytes * plain1 / 1e9:.1f} GB/s")
        if device == "cuda":
            floor = weight_bytes / HBM.get(torch.cuda.get_device_name(), 3.35e12)
            row(f"{name} batch 1, share of the bandwidth floor", floor * plain1, "x",
                f"floor {floor * 1e3:.2f} ms/token; target >= 0.6")
        row(f"{name} KV cache, batch 8", 8 * new_tokens / timed(run(8), repeats, sync), "tok/s")
        naive_tps = new_tokens / timed(naive, 1, sync)
        row(f"{name} full recompute (naive), batch 1", naive_tps, "tok/s")
        row(f"{name} KV cache / naive", plain1 / naive_tps, "x", "target >= 2")
        for cache in ("static", None):
            hf = hf_generate_fn(model, prompt, new_tokens, cache)
            if hf is not None:
                hf_tps = new_tokens / timed(hf, repeats, sync)
                row(f"{name} HF generate ({cache or 'dynamic'} cache), batch 1", hf_tps, "tok/s")
                row(f"{name} ours / HF generate ({cache or 'dynamic'} cache)", plain1 / hf_tps, "x",
                    "target >= 1.2 (GPU)" if cache else "")
        for_decoding(model)
        # the experts sampler on a path with all three steps, routed and merged
        routed = new_tokens / timed(run(1, experts=True, path="full"), repeats, sync)
        row(f"{name} with experts (routed), batch 1", routed, "tok/s")
        merged = new_tokens / timed(run(1, experts=True, path="full", merge=True), repeats, sync)
        row(f"{name} with experts (merged per step), batch 1", merged, "tok/s")
        row(f"{name} routed experts / plain base speed", routed / plain1, "x", "target >= 0.75 (GPU)")
        row(f"{name} merged experts / plain base speed", merged / plain1, "x", "target >= 0.95 (GPU)")


def bench_per_token(preset, device, n_tokens=2000, window=20):
    """Seconds per token late in a long chain (around token n_tokens) against early (around token
    20), experts routed on the full path: the sampler's own work per token must not grow with the
    sequence (attention runs over the whole static cache, so it is flat too)."""
    args = ModelArgs.preset(preset)
    args = replace(args, max_seq_len=max(args.max_seq_len, n_tokens + 64))
    (dtype, _), sync = resolve_dtype("auto", device), synchronizer(device)
    model = for_decoding(random_base(args, device, dtype))
    with torch.no_grad():
        model.lm_head.new.zero_()  # markers score below the best text token: steps close at max_step_tokens
    stamps = []

    def on_token(*_):
        sync()
        stamps.append(time.perf_counter())

    prompt = torch.randint(0, args.vocab_size, (32,)).tolist()
    generate(model, [prompt], [], max_new_tokens=n_tokens, experts=True, path="full",
             max_step_tokens=n_tokens // 3 - 2, on_token=on_token)
    gaps = torch.tensor(stamps, dtype=torch.float64).diff()  # float32 would round the ms of perf_counter away
    early, late = gaps[10:10 + window].median().item(), gaps[-window:].median().item()
    row(f"decode {preset} per-token time at token {len(stamps)} / at token 20", late / early, "x",
        f"{early * 1e3:.2f} -> {late * 1e3:.2f} ms; target ~1")


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
    p.add_argument("--gpu", action="store_true", help="run the CUDA rows (smollm2-135m and llama31-8b shapes) instead")
    p.add_argument("--memory", metavar="PRESET", help="print the training-memory arithmetic for a preset and exit")
    p.add_argument("--dtype", choices=("both", "auto", "bfloat16", "float32"), default="both",
                   help="the CPU rows' dtype (model.choose_dtype); both: fp32 and bf16 side by side, ours and HF+PEFT alike")
    args = p.parse_args()
    if args.memory:
        return memory_estimate(args.memory)
    repeats = 2 if args.quick else 5
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("error: --gpu: CUDA is not available")
        print(f"# {torch.cuda.get_device_name()}")
        bench_training("smollm2-135m", 8, 2048, "cuda", repeats)
        bench_training("llama31-8b", 1, 2048, "cuda", 3, checkpointing=True)
        bench_decoding("llama31-8b", "cuda", 3, 128)
        bench_per_token("llama31-8b", "cuda", n_tokens=1000)
        return
    for name in ("float32", "bfloat16") if args.dtype == "both" else (args.dtype,):
        bench_training("tiny", 8, 256, "cpu", repeats, dtype_name=name)
        bench_training("smollm2-135m", 4, 256, "cpu", max(2, repeats - 1), dtype_name=name)
        bench_decoding("smollm2-135m", "cpu", max(1, repeats // 2), 32 if args.quick else 64, dtype_name=name)
    bench_per_token("tiny", "cpu")
    bench_loading()


if __name__ == "__main__":
    main()
