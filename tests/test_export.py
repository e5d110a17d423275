"""export.py: a MoTE step is one LoRA of rank 2r. Without transformers: the exported A and B give
ExpertBank.delta(step) (the rank-2r identity), names and shapes are PEFT's, and the merged
checkpoint, loaded back by model.py from its Hugging Face files, gives the logits of the routed
experts. With transformers and peft importable (never a dependency), HF + PEFT give them too."""
import json
import os
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import export
import mote
import train
from model import ModelArgs, Transformer

CHAINS = [{"question": f"q{i}?", "analysis": "a b c", "guidance": "g", "response": "r s"} for i in range(8)]


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def run(request, tmp_path_factory):
    """A tiny base (tied like SmolLM2, or untied like Llama 3.1 8B) and a run trained a few steps."""
    d = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    args = replace(ModelArgs.preset("tiny"), tie_embeddings=request.param)
    Transformer(args).save(str(d / "tiny.safetensors"), metadata={"tokenizer": "byte"})
    (d / "chains.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHAINS))
    train.main(["--base", str(d / "tiny.safetensors"), "--data", str(d / "chains.jsonl"), "--out", str(d / "run"),
                "--max-iters", "3", "--lr", "1e-2", "--val-frac", "0", "--batch-size", "4"])
    return d


def trained(d):
    import sample
    return sample.load(None, str(d / "run"), "cpu", "float32")[0]


def test_each_step_is_one_lora_of_rank_2r(run):
    model = trained(run)
    for bank in mote.banks(model):
        for step in range(3):
            A, B, scale = export.step_lora(bank, step)
            assert A.shape == (32, bank.A.shape[2]) and B.shape == (bank.B.shape[0], 32)
            torch.testing.assert_close(B @ A * scale, bank.delta(step), atol=1e-6, rtol=1e-5)


def test_peft_export_names_shapes_and_config(run, tmp_path):
    export.main([str(run / "run"), "--peft", str(tmp_path / "peft")])
    model = trained(run)
    for step in mote.STEPS:
        config = json.load(open(tmp_path / "peft" / step / "adapter_config.json"))
        tensors = load_file(tmp_path / "peft" / step / "adapter_model.safetensors")
        assert config["r"] == 32 and config["lora_alpha"] == 64 and len(config["target_modules"]) == 7
        assert config["trainable_token_indices"]["embed_tokens"] == list(range(264, 270))
        bank = model.layers[1].mlp.down_proj
        A, B, _ = export.step_lora(bank, mote.STEPS.index(step))
        assert torch.equal(tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"], A)
        assert torch.equal(tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"], B)
        assert len(tensors) == 2 * 7 * 2 + 2
    markers = json.load(open(tmp_path / "peft" / "markers.json"))["added_tokens"]
    assert [m["content"] for m in markers] == list(mote.MARKERS) and markers[0]["id"] == 264


def routed_logits(model, tokens, step):
    return model(tokens, route=torch.full_like(tokens, step))


def test_merged_export_loads_back_and_gives_the_routed_logits(run, tmp_path):
    export.main([str(run / "run"), "--merged", str(tmp_path / "merged"), "--dtype", "float32"])
    model = trained(run)
    tokens = torch.tensor([[1, 50, 264, 70, 71, 265, 268, 80]])  # text and markers
    for s, step in enumerate(mote.STEPS):
        folder = tmp_path / "merged" / step
        assert os.path.exists(folder / "model.safetensors.index.json")
        merged = Transformer.from_pretrained(str(folder))
        assert merged.args.vocab_size == 270 and not merged.args.tie_embeddings
        torch.testing.assert_close(merged(tokens), routed_logits(model, tokens, s), atol=1e-4, rtol=1e-4)


def test_export_refuses_what_it_cannot_write(run, tmp_path):
    with pytest.raises(SystemExit, match=r"no adapters.safetensors \(not a finished train.py run\)"):
        export.main([str(tmp_path), "--peft", str(tmp_path / "x")])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("")
    with pytest.raises(SystemExit, match="exists and is not empty"):
        export.main([str(run / "run"), "--peft", str(tmp_path / "full")])


def test_hf_and_peft_reproduce_each_step(run, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    export.main([str(run / "run"), "--peft", str(tmp_path / "peft")])
    model = trained(run)
    base = Transformer.from_pretrained(str(run / "tiny.safetensors"))
    config = {k: v for k, v in export.hf_config(base.args, 264).items() if k not in ("architectures", "model_type")}
    config |= {"tie_word_embeddings": base.args.tie_embeddings, "attention_bias": False}
    tokens = torch.tensor([[1, 50, 264, 70, 71, 265, 268, 80]])
    for s, step in enumerate(mote.STEPS):
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()  # resizing changes its config
        state = {("" if k == "lm_head.weight" else "model.") + k: v for k, v in base.state_dict().items()}
        hf.load_state_dict(state, strict=False)
        hf.resize_token_embeddings(270, mean_resizing=False)
        if base.args.tie_embeddings:  # the marker rows of the head are not those of the embedding: untie (README)
            hf.config.tie_word_embeddings = False
            hf.lm_head.weight = torch.nn.Parameter(hf.lm_head.weight.detach().clone())
        hf = peft.PeftModel.from_pretrained(hf, str(tmp_path / "peft" / step)).eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(tokens).logits, routed_logits(model, tokens, s), atol=1e-4, rtol=1e-4)


def test_a_single_lora_exports_once_and_a_token_gated_bank_is_refused(run, tmp_path):
    for routing in ("single", "token"):
        train.main(["--base", str(run / "tiny.safetensors"), "--data", str(run / "chains.jsonl"), "--out",
                    str(tmp_path / routing), "--max-iters", "1", "--val-frac", "0", "--batch-size", "4", "--routing", routing])
    export.main([str(tmp_path / "single"), "--peft", str(tmp_path / "single-peft")])
    assert sorted(os.listdir(tmp_path / "single-peft")) == ["markers.json", "single"]
    assert json.load(open(tmp_path / "single-peft" / "single" / "adapter_config.json"))["r"] == 16
    with pytest.raises(SystemExit, match=r"token-gated expert bank has no per-step adapter"):
        export.main([str(tmp_path / "token"), "--peft", str(tmp_path / "token-peft")])
    assert not os.path.exists(tmp_path / "token-peft")
