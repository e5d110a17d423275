"""Write the GGUF fixtures of tests/test_convert.py with the `gguf` package (llama.cpp's own Python
writer and quantisers), independent of convert.py's reader and dequantiser.

Dev-only: needs `pip install gguf` (and transformers + accelerate for the SmolLM2 reference
logits); the tests need neither.

    python tests/make_fixtures_gguf.py

writes into tests/fixtures/:
  quant.gguf / quant_expected.npz / quant_expected.json
      one tensor of each supported type (F32, F16, BF16, Q8_0, Q4_0, Q4_1), quantised by gguf's
      quantize(); the values gguf's dequantize() gives back; the metadata of every value type;
      a non-default alignment (64).
  tiny_llama.gguf / tiny_llama_expected.npz / tiny_llama_expected.json
      a tiny random llama written as llama.cpp's converter would (Q/K rows permuted to the
      interleaved layout, Llama 3.1 rope_freqs, a byte-level BPE with merges, pre "smollm"), and
      the Hugging Face-layout tensors and ModelArgs convert.py must give back.
  smollm2_reference.json
      transformers' logits (its own GGUF loader) for "The capital of France is" with SmolLM2.
"""
import json
import math
import os
import sys

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, TokenType
from gguf.quants import dequantize, quantize

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "fixtures")
rng = np.random.default_rng(0)


def add_tensor_value(x, qtype):
    """What a reader must decode from x stored as qtype (float32)."""
    if qtype == Q.F32:
        return x
    if qtype == Q.F16:
        return x.astype(np.float16).astype(np.float32)
    return dequantize(quantize(x, qtype), qtype).astype(np.float32).reshape(x.shape)


def add_tensor(w, name, x, qtype):
    """Store x in the GGUF writer as qtype; returns the float32 values a reader must decode."""
    if qtype == Q.F32:
        w.add_tensor(name, x)
    elif qtype == Q.F16:
        w.add_tensor(name, x.astype(np.float16))
    else:
        w.add_tensor(name, quantize(x, qtype), raw_dtype=qtype)
    return add_tensor_value(x, qtype)


def quant_fixture():
    w = GGUFWriter(os.path.join(OUT, "quant.gguf"), "test")
    w.add_custom_alignment(64)
    kv = [("t.u8", 200, w.add_uint8), ("t.i8", -100, w.add_int8), ("t.u16", 60000, w.add_uint16),
          ("t.i16", -30000, w.add_int16), ("t.u32", 4000000000, w.add_uint32), ("t.i32", -2000000000, w.add_int32),
          ("t.u64", 2 ** 40, w.add_uint64), ("t.i64", -(2 ** 40), w.add_int64), ("t.f32", 0.25, w.add_float32),
          ("t.f64", 1e-300, w.add_float64), ("t.bool", True, w.add_bool), ("t.str", "héllo", w.add_string),
          ("t.ints", [1, -2, 3], w.add_array), ("t.strs", ["a", "", "ü"], w.add_array),
          ("t.floats", [0.5, -1.5], w.add_array)]
    for key, value, add in kv:
        add(key, value)
    expected = {}

    def values(*shape):
        x = rng.normal(0, 1, shape).astype(np.float32)
        x.reshape(-1)[:32] = 0.0            # an all-zero block (scale 0)
        x.reshape(-1)[40] = 50.0            # an outlier
        return x

    tensors = {"f32": (values(3, 32), Q.F32), "f16": (values(2, 64), Q.F16), "bf16": (values(2, 32), Q.BF16),
               "q8_0": (values(4, 64), Q.Q8_0), "q4_0": (values(4, 64), Q.Q4_0), "q4_1": (values(4, 64), Q.Q4_1),
               "q8_0_3d": (values(2, 3, 32), Q.Q8_0)}
    for name, (x, qtype) in tensors.items():
        expected[name] = add_tensor(w, name, x, qtype)
    write(w)
    np.savez(os.path.join(OUT, "quant_expected.npz"), **expected)
    with open(os.path.join(OUT, "quant_expected.json"), "w") as f:
        json.dump({"metadata": {k: v for k, v, _ in kv}, "alignment": 64,
                   "types": {k: t.name for k, (_, t) in tensors.items()}}, f, indent=1)


def write(w: GGUFWriter):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gpt2_unicode(b: int) -> str:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return chr(b) if b in printable else chr(256 + [c for c in range(256) if c not in printable].index(b))


def tiny_vocab():
    """3 specials, 255 byte tokens (byte 0x04 missing, as in SmolLM2), 6 merges: 264 tokens."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    byte_tokens = [gpt2_unicode(b) for b in range(256) if b != 0x04]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "a n"]
    tokens = specials + byte_tokens + [m.replace(" ", "") for m in merges]
    return tokens, specials, merges


def interleave(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permute: HF rotate-half rows -> interleaved rows."""
    out, inp = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


def tiny_llama_fixture():
    dim, n_layers, n_heads, n_kv, ffn, vocab, theta = 32, 2, 4, 2, 64, 264, 500000.0
    hd = dim // n_heads
    tokens, specials, merges = tiny_vocab()
    assert len(tokens) == vocab
    w = GGUFWriter(os.path.join(OUT, "tiny_llama.gguf"), "llama")
    w.add_name("tiny")
    w.add_block_count(n_layers)
    w.add_context_length(1024)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(hd)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([TokenType.CONTROL] * len(specials) + [TokenType.NORMAL] * (vocab - len(specials)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    # Llama 3.1 RoPE scaling the way convert_hf_to_gguf stores it: one divisor per frequency
    factor, low, high, orig = 8.0, 1.0, 4.0, 8192
    divisors = []
    for i in range(0, hd, 2):
        wavelen = 2 * math.pi * theta ** (i / hd)
        if wavelen < orig / high:
            divisors.append(1.0)
        elif wavelen > orig / low:
            divisors.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    w.add_tensor("rope_freqs.weight", np.array(divisors, dtype=np.float32))
    expected = {}

    def add(gguf_name, hf_name, x, qtype, heads=None):
        # rows are quantised independently, so quantising then permuting rows == permuting then
        # quantising: after un-permuting, a reader must decode x's own quantised values
        add_tensor(w, gguf_name, interleave(x, heads) if heads else x, qtype)
        expected[hf_name] = add_tensor_value(x, qtype)

    r = lambda *s: rng.normal(0, 0.3, s).astype(np.float32)
    add("token_embd.weight", "model.embed_tokens.weight", r(vocab, dim), Q.Q8_0)
    for i in range(n_layers):
        p, h = f"blk.{i}.", f"model.layers.{i}."
        add(p + "attn_norm.weight", h + "input_layernorm.weight", 1 + r(dim), Q.F32)
        add(p + "attn_q.weight", h + "self_attn.q_proj.weight", r(dim, dim), Q.Q4_1, n_heads)
        add(p + "attn_k.weight", h + "self_attn.k_proj.weight", r(n_kv * hd, dim), Q.Q8_0, n_kv)
        add(p + "attn_v.weight", h + "self_attn.v_proj.weight", r(n_kv * hd, dim), Q.Q4_0)
        add(p + "attn_output.weight", h + "self_attn.o_proj.weight", r(dim, dim), Q.F16)
        add(p + "ffn_norm.weight", h + "post_attention_layernorm.weight", 1 + r(dim), Q.F32)
        add(p + "ffn_gate.weight", h + "mlp.gate_proj.weight", r(ffn, dim), Q.Q4_1)
        add(p + "ffn_up.weight", h + "mlp.up_proj.weight", r(ffn, dim), Q.Q4_0)
        add(p + "ffn_down.weight", h + "mlp.down_proj.weight", r(dim, ffn), Q.Q8_0)
    add("output_norm.weight", "model.norm.weight", 1 + r(dim), Q.F32)
    add("output.weight", "lm_head.weight", r(vocab, dim), Q.F16)
    write(w)
    np.savez(os.path.join(OUT, "tiny_llama_expected.npz"), **expected)
    args = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, vocab_size=vocab, ffn_dim=ffn,
                norm_eps=1e-5, rope_theta=theta, rope_factor=factor, rope_low_freq_factor=low,
                rope_high_freq_factor=high, rope_original_context=orig, max_seq_len=1024, tie_embeddings=False)
    with open(os.path.join(OUT, "tiny_llama_expected.json"), "w") as f:
        json.dump({"model_args": args}, f, indent=1)


def smollm2_reference():
    """transformers' own GGUF loading of SmolLM2 (dequantised by gguf) -> next-token logits."""
    import torch
    from transformers import AutoModelForCausalLM
    sys.path.insert(0, os.path.dirname(HERE))
    from convert import asset
    path = asset("smollm2")
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = [504, 3575, 282, 4649, 314]  # "The capital of France is" (checked by test_tokenizers' oracle)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    top = logits.topk(10)
    with open(os.path.join(OUT, "smollm2_reference.json"), "w") as f:
        json.dump({"prompt": "The capital of France is", "ids": ids, "top_ids": top.indices.tolist(),
                   "top_logits": top.values.tolist()}, f, indent=1)


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    quant_fixture()
    tiny_llama_fixture()
    if "--no-smollm2" not in sys.argv:
        smollm2_reference()
    print("wrote", sorted(f for f in os.listdir(OUT) if f.startswith(("quant", "tiny_llama", "smollm2"))))
