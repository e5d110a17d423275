"""A Llama 3.x transformer, from scratch, with explicit positions and attention masks.

Read it bottom-up: ModelArgs -> RMSNorm -> RoPE -> Attention -> FeedForward -> Block -> Transformer
-> loading. Parameter names are Hugging Face's (without the leading "model."), so a Hugging Face
checkpoint loads by name; Meta's names are translated on load (meta_to_hf).

Two things the MoTE method needs from the base (METHOD.md sections 3-4), and that a stock Llama
hides, are explicit here:
  * every linear layer takes a `route` argument (one expert index per token). The frozen base
    ignores it; lora.ExpertBank, which replaces these layers when experts are attached, uses it.
  * forward() takes per-token `positions` and a boolean attention `mask`, so that step skipping
    (mote.skip_mask) can hide a block of tokens and shift the positions of the blocks after it.
"""
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import safe_open
from safetensors.torch import save_file


@dataclass
class ModelArgs:
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    vocab_size: int = 264
    ffn_dim: int = 172
    norm_eps: float = 1e-5
    rope_theta: float = 5e5
    # Llama 3.1 RoPE frequency scaling (rope_factor 1.0 = none); see rope_frequencies
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    max_seq_len: int = 2048  # the context the model was trained for; KV caches are sized from it
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def preset(cls, name: str) -> "ModelArgs":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name])

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelArgs":
        return cls(**json.loads(text))

    @classmethod
    def from_hf_config(cls, c: dict) -> "ModelArgs":
        """A Hugging Face LlamaConfig (config.json) -> ModelArgs."""
        rs = c.get("rope_scaling") or c.get("rope_parameters") or {}  # transformers >= 5 writes rope_parameters
        llama3 = rs.get("rope_type", rs.get("type")) == "llama3"
        return cls(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                   n_kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
                   vocab_size=c["vocab_size"], ffn_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-5),
                   rope_theta=c.get("rope_theta", rs.get("rope_theta", 1e4)), rope_factor=rs["factor"] if llama3 else 1.0,
                   rope_low_freq_factor=rs.get("low_freq_factor", 1.0), rope_high_freq_factor=rs.get("high_freq_factor", 4.0),
                   rope_original_context=rs.get("original_max_position_embeddings", 8192),
                   max_seq_len=c.get("max_position_embeddings", 2048), tie_embeddings=c.get("tie_word_embeddings", False))

    @classmethod
    def from_meta_params(cls, p: dict) -> "ModelArgs":
        """Meta's params.json -> ModelArgs (the FFN width is derived as in Meta's llama/model.py)."""
        ffn = int(2 * 4 * p["dim"] / 3)
        ffn = int(p.get("ffn_dim_multiplier", 1.0) * ffn)
        ffn = p["multiple_of"] * ((ffn + p["multiple_of"] - 1) // p["multiple_of"])
        # Llama 3.1's params.json says only "use_scaled_rope": Meta's code then applies factor 8, low 1,
        # high 4 over an 8192 context (llama-models, apply_scaling); later files may name the factors
        scaled = p.get("use_scaled_rope", False)
        return cls(dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"], n_kv_heads=p.get("n_kv_heads", p["n_heads"]),
                   vocab_size=p["vocab_size"], ffn_dim=ffn, norm_eps=p.get("norm_eps", 1e-5),
                   rope_theta=p.get("rope_theta", 1e4), rope_factor=p.get("rope_scaling_factor", 8.0) if scaled else 1.0,
                   rope_low_freq_factor=p.get("rope_low_freq_factor", 1.0),
                   rope_high_freq_factor=p.get("rope_high_freq_factor", 4.0),
                   max_seq_len=p.get("max_seq_len", 131072 if scaled else 8192))


PRESETS = {
    # byte-level vocabulary (tokenizer.byte_tokenizer: 256 bytes + specials): for tests and laptop runs
    "tiny": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=264, ffn_dim=172, rope_theta=1e4,
                      max_seq_len=1024),
    "smollm2-135m": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, ffn_dim=1536,
                              rope_theta=1e5, max_seq_len=8192, tie_embeddings=True),
    # Llama 3.0 8B has the shapes of 3.1 8B but no RoPE scaling and an 8k context: a file without a
    # config cannot say which it is (checkpoint_args)
    "llama3-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim=14336,
                           rope_theta=5e5, max_seq_len=8192),
    "llama31-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim=14336,
                            rope_theta=5e5, rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                            rope_original_context=8192, max_seq_len=131072),
}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cpu_bf16() -> str:
    """The CPU feature that computes bf16 natively ("AMX", "AVX512-BF16", "ARM BF16"), or "" where
    bf16 would be emulated (older x86, many laptops: there it runs several times slower than fp32)."""
    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX512-BF16"
    try:  # aarch64 Linux lists the ARMv8.6 BF16 extension among its features
        if any(line.startswith("Features") and " bf16" in line for line in open("/proc/cpuinfo")):
            return "ARM BF16"
    except OSError:
        pass
    return ""


def choose_dtype(name: str, device) -> tuple:
    """name ("auto", "bfloat16", "float32") -> (dtype, why): the one decision every entry point
    (train, sample, evaluate, calibrate, bench) takes. auto is bf16 on CUDA and on a CPU that
    computes bf16 natively (cpu_bf16), fp32 elsewhere. Forced bf16 on a GPU without it is an error."""
    kind = torch.device(device).type
    if name not in ("auto", *DTYPES):
        raise ValueError(f"unknown dtype {name!r}; choose auto or one of {sorted(DTYPES)}")
    if name == "bfloat16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU cannot compute bfloat16; use --dtype float32")
    if name != "auto":
        return DTYPES[name], "--dtype " + name
    if kind == "cuda":
        return torch.bfloat16, "auto: CUDA"
    if kind == "cpu" and cpu_bf16():
        return torch.bfloat16, f"auto: this CPU computes bf16 natively ({cpu_bf16()})"
    return torch.float32, f"auto: {'this CPU has no native bf16' if kind == 'cpu' else kind}, so fp32"


def resolve_dtype(name: str, device) -> tuple:
    """choose_dtype for an entry point: a bad choice is one line and an exit. -> (dtype, why); the
    entry point prints why once the model has loaded (so an error stays the only line printed).

      training   base in this dtype; experts and marker rows fp32 (lora.py); with bf16 the forward
                 runs under bf16 autocast, on CUDA and on CPU alike (train.py)
      inference  base in this dtype; the experts cast to it once after loading (mote.cast_experts);
                 the KV cache in the model's dtype (Transformer.dtype)"""
    try:
        return choose_dtype(name, device)
    except ValueError as e:
        sys.exit(f"error: {e}")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32, scale in the input dtype (as the reference does)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_frequencies(args: ModelArgs, device=None) -> torch.Tensor:
    """The head_dim/2 rotation frequencies, with Llama 3.1's scaling for long context.

    Llama 3.1 keeps high frequencies (wavelength < original_context / high_freq_factor), divides low
    frequencies (wavelength > original_context / low_freq_factor) by `factor`, and interpolates
    smoothly in between (Meta's llama-models, apply_scaling)."""
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))  # (hd/2,)
    if args.rope_factor == 1.0:
        return freqs
    wavelen = 2 * math.pi / freqs
    low_wavelen = args.rope_original_context / args.rope_low_freq_factor
    high_wavelen = args.rope_original_context / args.rope_high_freq_factor
    smooth = (args.rope_original_context / wavelen - args.rope_low_freq_factor) / (
        args.rope_high_freq_factor - args.rope_low_freq_factor)
    mid = (1 - smooth) * freqs / args.rope_factor + smooth * freqs
    return torch.where(wavelen < high_wavelen, freqs, torch.where(wavelen > low_wavelen, freqs / args.rope_factor, mid))


def rope_cos_sin(freqs: torch.Tensor, positions: torch.Tensor, dtype):
    """positions (B, T) -> cos, sin (B, 1, T, head_dim): each token rotates by its own position.
    Angles in fp32 (positions up to 128k need it), then rounded to dtype."""
    angles = positions[..., None].float() * freqs  # (B, T, hd/2)
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, hd)
    return angles.cos().to(dtype), angles.sin().to(dtype)


class RoPETable:
    """cos and sin of every position of the context, computed once per device (rope_cos_sin on
    0 .. max_seq_len - 1, in fp32) and looked up per forward: the same values, none recomputed."""

    def __init__(self, args: ModelArgs):
        self.args, self.cos, self.sin = args, None, None

    def __call__(self, positions, dtype):
        """positions (B, T) -> cos, sin (B, 1, T, head_dim) in dtype."""
        if self.cos is None or self.cos.device != positions.device:
            every = torch.arange(self.args.max_seq_len, device=positions.device)[None]
            self.cos, self.sin = rope_cos_sin(rope_frequencies(self.args, positions.device), every, torch.float32)
        return self.cos[0, 0, positions][:, None].to(dtype), self.sin[0, 0, positions][:, None].to(dtype)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE (the Hugging Face layout): pairs are (i, i + head_dim/2). x: (B, H, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a Q or K projection from Meta's interleaved RoPE layout, where a head's
    rotation pairs are rows (0,1), (2,3), ..., to the rotate-half layout, where they are rows
    (i, i + head_dim/2). GGUF files use Meta's layout too. w: (n_heads * head_dim, in)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


class Linear(nn.Linear):
    """A bias-free linear layer that accepts the per-token expert route and ignores it.

    The frozen base has no experts; lora.ExpertBank replaces these layers (mote.attach) and uses the
    route. Passing it through every layer keeps a token's route visible in the data flow."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x, route=None):
        return F.linear(x, self.weight)


class KVCache:
    """A static key/value cache: one preallocated buffer for every layer (as in gpt-fast).

    k, v: (n_layers, B, n_kv_heads, max_len, head_dim). `length` slots are filled; a forward pass
    with T new tokens writes slots [length, length + T) in every layer, then advances length.
    Attention always runs over all max_len slots, with a mask hiding the empty ones: every decoding
    step then has the same shapes, so no kernel is re-planned as the sequence grows."""

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (args.n_layers, batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k, v):
        """Store this layer's new keys/values (B, n_kv, T, hd); return every slot (B, n_kv, max_len, hd)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer], self.v[layer]


class Attention(nn.Module):
    """Grouped-query attention: n_heads query heads share n_kv_heads key/value heads."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = Linear(args.dim, args.n_heads * args.head_dim)
        self.k_proj = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.v_proj = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.o_proj = Linear(args.n_heads * args.head_dim, args.dim)

    def forward(self, x, cos, sin, mask, cache, route):
        B, T, _ = x.shape
        q = self.q_proj(x, route).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x, route).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x, route).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, S, hd), S = the cache's max_len
        # mask: None = plain causal over these T tokens (no cache); else bool (B, T, S), True where
        # query t may attend key s
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None],
                                           is_causal=mask is None, enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1), route)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = Linear(args.dim, args.ffn_dim)
        self.up_proj = Linear(args.dim, args.ffn_dim)
        self.down_proj = Linear(args.ffn_dim, args.dim)

    def forward(self, x, route):
        return self.down_proj(F.silu(self.gate_proj(x, route)) * self.up_proj(x, route), route)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = FeedForward(args)

    def forward(self, x, cos, sin, mask, cache, route):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, route)
        return x + self.mlp(self.post_attention_layernorm(x), route)


def causal_mask(T: int, S: int, start: int = 0, device=None) -> torch.Tensor:
    """(T, S) bool: T new tokens written at slots start .. start + T - 1 of S key slots each see
    every slot up to and including their own (the slots after them are empty or in their future):

        T=2, S=6, start=3:  [[1 1 1 1 0 0],      slot 3 sees 0..3
                             [1 1 1 1 1 0]]      slot 4 sees 0..4"""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=start)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim, _weight=torch.empty(args.vocab_size, args.dim))
        if not self.embed_tokens.weight.is_meta:  # on the meta device (from_pretrained) normal_ would cost
            nn.init.normal_(self.embed_tokens.weight)  # ~1.3 s of imports and initialise nothing
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.checkpointing = False  # recompute each block in the backward pass (activation checkpointing)
        self.rope = RoPETable(args)

    @property
    def dtype(self) -> torch.dtype:
        """The frozen base's dtype (experts attached for training stay fp32; see resolve_dtype)."""
        return self.norm.weight.dtype

    def hidden(self, tokens, positions=None, mask=None, cache=None, route=None):
        """tokens (B, T) -> final hidden states (B, T, dim), before the output head.

        positions: (B, T) int, default 0.. T-1 (offset by the cache length when decoding).
        mask: (B, T, S) or (T, S) bool, True = may attend. Without a cache S = T, and None means
        causal (no mask is built: attention takes its causal fast path). With a cache S is the
        cache's max_len (KVCache) and None means causal over the filled slots.
        cache: a KVCache, filled in place. route: (B, T) expert index per token (mote.route)."""
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        if mask is None and cache is not None:
            mask = causal_mask(T, cache.max_len, start, tokens.device)
        if mask is not None and mask.dim() == 2:
            mask = mask.expand(B, -1, -1)
        x = self.embed_tokens(tokens)  # (B, T, dim)
        cos, sin = self.rope(positions, x.dtype)
        for layer in self.layers:
            if self.checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, cache, route, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, route)
        if cache is not None:
            cache.length += T
        return self.norm(x)

    def forward(self, tokens, positions=None, mask=None, cache=None, route=None):
        """tokens (B, T) -> logits (B, T, vocab). Arguments as in hidden()."""
        return self.lm_head(self.hidden(tokens, positions, mask, cache, route))

    # ---- loading and saving -------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str, dtype=None, device="cpu") -> "Transformer":
        """Load a base from a .safetensors file, a directory holding model.safetensors, or a sharded
        directory with model.safetensors.index.json; Hugging Face or Meta tensor names.

        The model is built on the meta device (no memory) and its parameters are then assigned the
        memory-mapped tensors of the file, so the weights are never held twice (gpt-fast's recipe).
        dtype=None keeps the file's dtype."""
        files = checkpoint_files(path)
        args = checkpoint_args(path, files)
        tensors = {}
        for f in files:
            try:
                handle = safe_open(f, framework="pt", device="cpu")
            except Exception as e:
                raise CheckpointError(f"cannot read {f}: {e}") from None
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})  # mmap'd, lazy
        state = to_internal_names(tensors, args)
        with torch.device("meta"):
            model = cls(args)
        check_state(model, state, path)
        if args.tie_embeddings:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        state = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        if args.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        return model.requires_grad_(False).eval()

    def save(self, path: str, metadata: dict | None = None):
        """Write the base weights as safetensors with Hugging Face names and ModelArgs in the metadata."""
        state = {("" if k == "lm_head.weight" else "model.") + k: v.contiguous()
                 for k, v in self.state_dict().items() if not (k == "lm_head.weight" and self.args.tie_embeddings)}
        save_file(state, path, metadata={"format": "pt", "model_args": self.args.to_json(), **(metadata or {})})


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what is wrong."""


def checkpoint_files(path: str) -> list:
    """The safetensors file(s) of a checkpoint path (file, directory, or sharded directory)."""
    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(path, s) for s in shards]
        path = os.path.join(path, "model.safetensors")
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path} (expected a .safetensors file, or a directory with "
                              "model.safetensors or model.safetensors.index.json; weights load only from safetensors)")
    return [path]


def load_metadata(path: str) -> dict:
    """The string metadata stored in a safetensors file's header ({} if none)."""
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def checkpoint_args(path: str, files: list) -> ModelArgs:
    """The config: the file's metadata (files this project writes), else config.json (Hugging Face)
    or params.json (Meta) beside the weights, else the preset whose shapes match."""
    meta = load_metadata(files[0])
    if "model_args" in meta:
        return ModelArgs.from_json(meta["model_args"])
    folder = os.path.dirname(files[0])
    for name, parse in (("config.json", ModelArgs.from_hf_config), ("params.json", ModelArgs.from_meta_params)):
        if os.path.exists(os.path.join(folder, name)):
            with open(os.path.join(folder, name)) as f:
                return parse(json.load(f))
    shapes = {}
    for f in files:
        with safe_open(f, framework="pt") as h:
            shapes.update({k.removeprefix("model."): tuple(h.get_slice(k).get_shape()) for k in h.keys()})
    emb = shapes.get("embed_tokens.weight", shapes.get("tok_embeddings.weight"))
    n_layers = len({k.split(".")[1] for k in shapes if k.startswith("layers.")})
    matches = [name for name, a in PRESETS.items() if emb == (a.vocab_size, a.dim) and n_layers == a.n_layers]
    if not matches:
        raise CheckpointError(f"{path}: no config (no model_args metadata, config.json or params.json) "
                              f"and no preset matches its shapes")
    if len(matches) > 1:
        raise CheckpointError(f"{path}: no config, and its shapes fit presets {' and '.join(matches)}, which "
                              f"differ (RoPE scaling, context): put the model's config.json or params.json beside it")
    print(f"note: {path} has no config; assumed preset {matches[0]!r} from its shapes", file=sys.stderr)
    return replace(PRESETS[matches[0]], tie_embeddings=not ({"lm_head.weight", "output.weight"} & shapes.keys()))


# Meta's llama names -> ours (= Hugging Face's without "model.")
META_NAMES = {"tok_embeddings": "embed_tokens", "output": "lm_head", "attention.wq": "self_attn.q_proj",
              "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
              "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
              "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def to_internal_names(tensors: dict, args: ModelArgs) -> dict:
    """Hugging Face or Meta tensor names -> this module's names. Meta's Q and K rows are in the
    interleaved RoPE layout and are permuted per head (K with the KV head count)."""
    out = {}
    for name, t in tensors.items():
        name = name.removeprefix("model.")
        if name in ("rotary_emb.inv_freq",) or name.endswith(".rotary_emb.inv_freq"):
            continue  # old HF checkpoints store this buffer; we recompute it
        for meta, ours in META_NAMES.items():
            if f".{meta}." in f".{name}" and name.endswith(".weight"):
                name = name.replace(meta, ours, 1)
                if meta == "attention.wq":
                    t = interleaved_to_half(t, args.n_heads)
                elif meta == "attention.wk":
                    t = interleaved_to_half(t, args.n_kv_heads)
                break
        out[name] = t
    return out


def check_state(model: nn.Module, state: dict, path: str):
    """Raise a CheckpointError, one line naming path, listing missing and unexpected tensors and
    shape mismatches."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.args.tie_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = [f"{k}: expected {expected[k]}, got {tuple(state[k].shape)}"
             for k in sorted(expected.keys() & state.keys()) if tuple(state[k].shape) != expected[k]]
    problems = ([f"missing tensors: {', '.join(missing)}"] if missing else []) + \
               ([f"unexpected tensors: {', '.join(unexpected)}"] if unexpected else []) + \
               ([f"shape mismatch: {'; '.join(wrong)}"] if wrong else [])
    if problems:
        raise CheckpointError(f"{path}: does not match the model config: " + "; ".join(problems))
