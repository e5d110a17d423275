"""model.py: parity with an independent implementation, KV cache, masks and positions, loading."""
import json
import os
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import CheckpointError, KVCache, ModelArgs, Transformer, causal_mask

GOLDEN = os.path.join(os.path.dirname(__file__), "fixtures", "golden_llama")


def golden():
    g = load_file(os.path.join(GOLDEN, "golden.safetensors"))
    return g["tokens"], g["logits"]


def random_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = Transformer(replace(ModelArgs.preset("tiny"), **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def test_parity_with_hugging_face_llama():
    """Logits of a random Llama (GQA + Llama 3.1 RoPE scaling) == transformers' LlamaForCausalLM
    (tests/make_golden.py wrote them)."""
    model = Transformer.from_pretrained(GOLDEN)
    tokens, expected = golden()
    assert model.args.rope_factor == 8.0 and model.args.n_kv_heads == 2
    torch.testing.assert_close(model(tokens), expected, atol=1e-5, rtol=1e-5)
    # the scaling is live in this fixture: without it the logits differ
    unscaled = Transformer.from_pretrained(GOLDEN)
    unscaled.args.rope_factor = 1.0
    assert (unscaled(tokens) - expected).abs().max() > 1e-3


def half_to_interleaved(w, n_heads):
    """Hugging Face rotate-half rows -> Meta's interleaved rows (the inverse of model.interleaved_to_half)."""
    out, inp = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def test_meta_names_give_the_same_logits(tmp_path):
    hf = load_file(os.path.join(GOLDEN, "model.safetensors"))
    args = Transformer.from_pretrained(GOLDEN).args
    rename = {"model.embed_tokens": "tok_embeddings", "lm_head": "output", "model.norm": "norm",
              "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
              "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
              "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
              "post_attention_layernorm": "ffn_norm", "model.layers": "layers"}
    meta = {}
    for name, t in hf.items():
        if "q_proj" in name:
            t = half_to_interleaved(t, args.n_heads)
        if "k_proj" in name:
            t = half_to_interleaved(t, args.n_kv_heads)
        for a, b in rename.items():
            name = name.replace(a, b)
        meta[name] = t.contiguous()
    assert "layers.0.attention.wq.weight" in meta and "tok_embeddings.weight" in meta
    save_file(meta, tmp_path / "model.safetensors")
    shutil.copy(os.path.join(GOLDEN, "config.json"), tmp_path / "config.json")
    tokens, expected = golden()
    torch.testing.assert_close(Transformer.from_pretrained(str(tmp_path))(tokens), expected, atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint(tmp_path):
    hf = load_file(os.path.join(GOLDEN, "model.safetensors"))
    names = sorted(hf)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: hf[k] for k in keys}, tmp_path / shard)
    json.dump({"weight_map": {k: s for s, keys in shards.items() for k in keys}},
              open(tmp_path / "model.safetensors.index.json", "w"))
    shutil.copy(os.path.join(GOLDEN, "config.json"), tmp_path / "config.json")
    tokens, expected = golden()
    torch.testing.assert_close(Transformer.from_pretrained(str(tmp_path))(tokens), expected, atol=1e-5, rtol=1e-5)


def test_kv_cache_decoding_equals_full_forward():
    model = random_model()
    tokens = torch.randint(0, 264, (2, 20))
    full = model(tokens)
    cache = KVCache(model.args, batch_size=2, max_len=32)
    steps = [model(tokens[:, :7], cache=cache)]  # prefill 7, then chunks of 1 and 3
    for a, b in [(7, 8), (8, 9), (9, 12), (12, 20)]:
        steps.append(model(tokens[:, a:b], cache=cache))
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_explicit_causal_mask_and_positions_equal_the_defaults():
    model = random_model()
    tokens = torch.randint(0, 264, (2, 12))
    explicit = model(tokens, positions=torch.arange(12).expand(2, 12), mask=causal_mask(12, 12))
    torch.testing.assert_close(explicit, model(tokens), atol=1e-6, rtol=1e-6)
    assert causal_mask(2, 6, start=3).tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]]


def test_rope_table_equals_computing_the_angles():
    from model import rope_cos_sin, rope_frequencies
    args = replace(ModelArgs.preset("tiny"), rope_factor=8.0, rope_original_context=16)
    model = Transformer(args)
    positions = torch.tensor([[0, 5, 1023], [7, 7, 100]])
    for dtype in (torch.float32, torch.bfloat16):
        for got, want in zip(model.rope(positions, dtype), rope_cos_sin(rope_frequencies(args), positions, dtype)):
            assert torch.equal(got, want)


def test_rope_sees_only_relative_positions():
    """Shifting every position by the same offset leaves the logits unchanged (RoPE is relative)."""
    model = random_model()
    tokens = torch.randint(0, 264, (1, 10))
    shifted = model(tokens, positions=torch.arange(100, 110)[None])
    torch.testing.assert_close(shifted, model(tokens), atol=1e-4, rtol=1e-4)


def test_hidden_block_with_shifted_positions_equals_the_shortened_sequence():
    """The primitive under step skipping: hide tokens [3, 7) from the tokens after them and give
    those tokens the positions they would have without the block -> same logits as deleting it."""
    model = random_model()
    tokens = torch.randint(0, 264, (1, 12))
    keep = torch.tensor([i for i in range(12) if not 3 <= i < 7])
    mask = causal_mask(12, 12).clone()
    mask[7:, 3:7] = False
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 6, 7]])
    masked = model(tokens, positions=positions, mask=mask)
    short = model(tokens[:, keep])
    torch.testing.assert_close(masked[:, keep], short, atol=1e-5, rtol=1e-5)
    assert (masked[:, 7:] - model(tokens)[:, 7:]).abs().max() > 1e-3  # the mask did something


def test_save_and_load_round_trip_with_tied_embeddings(tmp_path):
    model = random_model(tie_embeddings=True)
    path = str(tmp_path / "m.safetensors")
    model.save(path)
    assert "lm_head.weight" not in load_file(path)
    loaded = Transformer.from_pretrained(path)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    tokens = torch.randint(0, 264, (1, 9))
    torch.testing.assert_close(loaded(tokens), model(tokens))
    assert Transformer.from_pretrained(path, dtype=torch.bfloat16).embed_tokens.weight.dtype == torch.bfloat16


def test_config_from_preset_shapes_when_there_is_no_metadata(tmp_path):
    model = random_model()
    save_file({"model." + k: v for k, v in model.state_dict().items() if k != "lm_head.weight"} |
              {"lm_head.weight": model.lm_head.weight}, tmp_path / "bare.safetensors")
    assert Transformer.from_pretrained(str(tmp_path / "bare.safetensors")).args == model.args


def write_tiny(tmp_path, edit):
    """Save a tiny model's tensors after edit(state) and return the path."""
    state = {"model." + k: v for k, v in random_model().state_dict().items() if k != "lm_head.weight"}
    state["lm_head.weight"] = torch.zeros(264, 64)
    edit(state)
    path = str(tmp_path / "bad.safetensors")
    save_file(state, path, metadata={"model_args": ModelArgs.preset("tiny").to_json()})
    return path


def test_loader_errors_name_what_is_wrong(tmp_path):
    def drop(s):
        del s["model.layers.1.mlp.up_proj.weight"], s["model.norm.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensors: layers.1.mlp.up_proj.weight, norm.weight"):
        Transformer.from_pretrained(write_tiny(tmp_path, drop))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: layers.0.extra.weight"):
        Transformer.from_pretrained(write_tiny(tmp_path, lambda s: s.update({"model.layers.0.extra.weight": torch.zeros(1)})))
    with pytest.raises(CheckpointError, match=r"layers.0.self_attn.k_proj.weight: expected \(32, 64\), got \(64, 64\)"):
        Transformer.from_pretrained(write_tiny(tmp_path, lambda s: s.update(
            {"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)})))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read .*garbage.safetensors"):
        Transformer.from_pretrained(str(garbage))
    with pytest.raises(CheckpointError, match="no checkpoint at .*weights load only from safetensors"):
        Transformer.from_pretrained(str(tmp_path / "consolidated.00.pth"))


LLAMA31_8B_PARAMS = {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8,
                     "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
                     "vocab_size": 128256}  # Meta's params.json of Llama 3.1 8B, as published


def test_meta_params_json_gives_the_presets():
    assert ModelArgs.from_meta_params(LLAMA31_8B_PARAMS) == ModelArgs.preset("llama31-8b")
    llama3 = {k: v for k, v in LLAMA31_8B_PARAMS.items() if k != "use_scaled_rope"}  # Llama 3.0 8B
    assert ModelArgs.from_meta_params(llama3) == ModelArgs.preset("llama3-8b")
    named = ModelArgs.from_meta_params(LLAMA31_8B_PARAMS | {"rope_scaling_factor": 32.0})  # a file that names it
    assert named.rope_factor == 32.0 and named.rope_high_freq_factor == 4.0


def test_a_config_less_file_whose_shapes_fit_two_presets_is_an_error(tmp_path, monkeypatch, capsys):
    """Like Llama 3.0 and 3.1 8B (same shapes, different RoPE): the loader names both, assumes neither."""
    import model as model_module
    model = random_model()
    path = tmp_path / "bare.safetensors"
    save_file({"model." + k: v for k, v in model.state_dict().items()}, path)
    Transformer.from_pretrained(str(path))
    assert "assumed preset 'tiny' from its shapes" in capsys.readouterr().err
    monkeypatch.setitem(model_module.PRESETS, "tiny-long", replace(ModelArgs.preset("tiny"), rope_factor=8.0))
    with pytest.raises(CheckpointError, match="fit presets tiny and tiny-long.*config.json or params.json"):
        Transformer.from_pretrained(str(path))
