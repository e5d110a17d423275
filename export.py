"""Take trained experts out of this repository: one PEFT LoRA adapter per step, or merged weights per step.

    python export.py runs/smollm2-135m-instruct --peft out/peft      # out/peft/{analysis,guidance,response}/
    python export.py runs/smollm2-135m-instruct --merged out/merged  # out/merged/{analysis,guidance,response}/

A MoTE step is one LoRA of rank 2r (METHOD.md sec. 3). A token of step s computes

    W0 x + scale (alpha B_s A_s + (1 - alpha) B_sh A_sh) x = W0 x + scale [alpha B_s, (1 - alpha) B_sh] [A_s; A_sh] x

so step s exports as A = [A_s; A_sh] (2r, in) and B = [alpha B_s, (1 - alpha) B_sh] (out, 2r), with
PEFT's r = 2r and lora_alpha = scale * 2r (PEFT scales by lora_alpha / r): step_lora. Without a
shared expert a step is rank r; a single LoRA exports once, as "single"; a token-gated bank has no
per-step adapter (its mix differs per token) and is refused. The question is read by the analysis
expert (mote.INFERENCE_QUESTION_EXPERT), so a chain begins with the analysis adapter.

The six marker tokens (ids V .. V+5, mote.MARKERS) travel as PEFT trainable tokens on embed_tokens
and lm_head (their rows, not the whole matrices): resize the base's embeddings to V + 6 first, then
PeftModel.from_pretrained(base, DIR/STEP). The tokenizer's added tokens are in DIR/markers.json.
--merged writes, per step, W0 + delta(step) as a Hugging Face checkpoint (config.json, sharded
safetensors with an index, the embedding and an untied head with the marker rows appended).
README, "Taking the experts elsewhere", says which servers can switch adapters inside one request.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file

import cli
import mote
import sample
from lora import ExpertBank

SHARD_BYTES = 2 * 2**30  # --merged: at most this many bytes per safetensors shard


def step_lora(bank, step: int) -> tuple:
    """One expert bank's LoRA for the tokens of `step`: (A (k, in), B (out, k), scale), k = the
    rank of its non-zero experts (2r with the shared expert), with B @ A * scale == bank.delta(step)."""
    w = bank.merge_weights(step)  # (E,): the mixing table's row, or 1 for a single LoRA
    used = w.nonzero().flatten()
    A = torch.cat([bank.A[e].float() for e in used])  # (k, in)
    B = torch.cat([bank.B[:, e].float() * w[e] for e in used], dim=1)  # (out, k)
    return A, B, bank.scale


def adapters_of(model) -> list:
    """The adapters to export: [(name, step)], one per step of MoTE, one for a single LoRA."""
    routing = model.expert_config.routing
    if routing == "token":
        raise ValueError("a token-gated expert bank has no per-step adapter (its expert weights differ per token)")
    return [("single", 0)] if routing == "single" else list(zip(mote.STEPS, range(len(mote.STEPS))))


def peft_adapter(model, step: int, base_name: str) -> tuple:
    """(adapter_config dict, tensors dict) of one step in PEFT's format and names."""
    V, tensors, rank, scale = model.args.vocab_size, {}, 0, 0.0
    for name, module in model.named_modules():
        if isinstance(module, ExpertBank):
            A, B, scale = step_lora(module, step)
            rank = A.shape[0]
            tensors[f"base_model.model.model.{name}.lora_A.weight"] = A.contiguous()
            tensors[f"base_model.model.model.{name}.lora_B.weight"] = B.contiguous()
    tensors["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"] = model.embed_tokens.new.float()
    tensors["base_model.model.lm_head.token_adapter.trainable_tokens_delta"] = model.lm_head.new.float()
    markers = list(range(V, V + len(mote.MARKERS)))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name, "r": rank,
              "lora_alpha": scale * rank, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "target_modules": sorted({n.split(".")[-1] for n in mote.LINEARS}), "inference_mode": True,
              "trainable_token_indices": {"embed_tokens": markers, "lm_head": markers}}
    return config, tensors


def hf_config(args, vocab_size: int) -> dict:
    """A Hugging Face LlamaConfig dict for ModelArgs (the inverse of ModelArgs.from_hf_config)."""
    c = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
         "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
         "vocab_size": vocab_size, "intermediate_size": args.ffn_dim, "rms_norm_eps": args.norm_eps,
         "rope_theta": args.rope_theta, "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": False,
         "hidden_act": "silu", "torch_dtype": "float32"}
    if args.rope_factor != 1.0:
        c["rope_scaling"] = {"rope_type": "llama3", "factor": args.rope_factor, "low_freq_factor": args.rope_low_freq_factor,
                             "high_freq_factor": args.rope_high_freq_factor,
                             "original_max_position_embeddings": args.rope_original_context}
    return c


def merged_state(model, step: int, dtype) -> dict:
    """W0 + delta(step) for every linear, the embedding and head with the marker rows appended, in HF names."""
    state = {}
    for name, p in model.named_parameters():
        if not p.requires_grad and not name.endswith("base.weight"):  # the norms
            state[name] = p.detach()
    for name, module in model.named_modules():
        if isinstance(module, ExpertBank):
            state[f"{name}.weight"] = module.base.weight.float() + module.delta(step)
    state["embed_tokens.weight"] = torch.cat([model.embed_tokens.base.weight.float(), model.embed_tokens.new.float()])
    state["lm_head.weight"] = torch.cat([model.lm_head.base.weight.float(), model.lm_head.new.float()])
    return {("" if k == "lm_head.weight" else "model.") + k: v.to(dtype).contiguous() for k, v in state.items()}


def write_sharded(state: dict, folder: str):
    """model-0000k-of-0000n.safetensors and model.safetensors.index.json, as Hugging Face writes them."""
    shards, size = [[]], 0
    for k, v in state.items():
        if size and size + v.numel() * v.element_size() > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += v.numel() * v.element_size()
    weight_map = {}
    for i, keys in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k] for k in keys}, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map |= {k: file for k in keys}
    total = sum(v.numel() * v.element_size() for v in state.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)


def hf_tokenizer(base: str, folder: str, V: int):
    """Copy the Hugging Face tokenizer.json beside the base into folder, the markers added as special
    tokens (ids V .. V+5), if there is one; a base converted from GGUF has none (markers.json only)."""
    path = os.path.join(base if os.path.isdir(base) else os.path.dirname(base), "tokenizer.json")
    if not os.path.exists(path):
        return
    doc = json.load(open(path, encoding="utf-8"))
    doc["added_tokens"] = doc.get("added_tokens", []) + [
        {"id": V + i, "content": m, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True} for i, m in enumerate(mote.MARKERS)]
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False)


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a finished train.py run folder")
    p.add_argument("--base", help="its base (default: the one the run names)")
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--peft", metavar="DIR", help="write a PEFT LoRA adapter per step under DIR")
    way.add_argument("--merged", metavar="DIR", help="write merged Hugging Face weights per step under DIR")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="--merged: the weights' dtype")
    args = p.parse_args(argv)
    if not os.path.exists(os.path.join(args.run, "adapters.safetensors")):
        sys.exit(f"error: {args.run}: no adapters.safetensors (not a finished train.py run); train it, or name one")
    out = args.peft or args.merged
    if os.path.exists(out) and os.listdir(out):
        sys.exit(f"error: {out}: exists and is not empty; name a new folder")
    model, tok = sample.load(args.base, args.run, "cpu", "float32")  # export from fp32: exact A, B and W0
    try:
        names = adapters_of(model)
    except ValueError as e:
        sys.exit(f"error: {args.run}: {e}")
    V = model.args.vocab_size
    config = json.load(open(os.path.join(args.run, "train_config.json")))
    base_name = os.path.abspath(args.base) if args.base else config.get("base_abspath", config["base"])
    for name, step in names:
        folder = os.path.join(out, name)
        os.makedirs(folder)
        if args.peft:
            config, tensors = peft_adapter(model, step, base_name)
            with open(os.path.join(folder, "adapter_config.json"), "w") as f:
                json.dump(config, f, indent=1)
            save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
        else:
            with open(os.path.join(folder, "config.json"), "w") as f:
                json.dump(hf_config(model.args, V + len(mote.MARKERS)) | {"torch_dtype": args.dtype}, f, indent=1)
            write_sharded(merged_state(model, step, getattr(torch, args.dtype)), folder)
        print(f"wrote {folder}")
        hf_tokenizer(base_name, folder, V)
    with open(os.path.join(out, "markers.json"), "w") as f:  # the tokenizer's added tokens
        json.dump({"added_tokens": [{"id": V + i, "content": m, "special": True} for i, m in enumerate(mote.MARKERS)],
                   "question_expert": mote.STEPS[mote.INFERENCE_QUESTION_EXPERT], "steps": list(mote.STEPS)}, f, indent=1)


if __name__ == "__main__":
    main()
