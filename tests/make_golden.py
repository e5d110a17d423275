"""Write the golden-logits fixture for tests/test_model.py with an independent implementation.

Dev-only (needs `pip install transformers`; the tests do not): builds a small random Llama with
Hugging Face's LlamaForCausalLM — grouped-query attention and Llama 3.1 RoPE scaling switched on,
with a short original context so the scaling changes the frequencies — and stores its weights,
config.json and the logits it computes for a fixed token sequence.

    python tests/make_golden.py      # writes tests/fixtures/golden_llama/
"""
import json
import os

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

OUT = os.path.join(os.path.dirname(__file__), "fixtures", "golden_llama")

config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=64, vocab_size=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                     max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.3,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                     attention_bias=False, mlp_bias=False, torch_dtype="float32")
torch.manual_seed(0)
model = LlamaForCausalLM(config).eval()
with torch.no_grad():  # norms start at 1.0; randomise them so the test sees their weights
    for name, p in model.named_parameters():
        if "norm" in name:
            p.uniform_(0.5, 1.5)
tokens = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    logits = model(tokens).logits

os.makedirs(OUT, exist_ok=True)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(OUT, "model.safetensors"),
          metadata={"format": "pt"})
keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
        "vocab_size", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings")
hub_config = {k: getattr(config, k) for k in keys}  # the layout of Llama 3.1's config.json on the Hub
hub_config.update(rope_theta=500000.0, rope_scaling={k: v for k, v in config.rope_parameters.items() if k != "rope_theta"})
with open(os.path.join(OUT, "config.json"), "w") as f:
    json.dump(hub_config, f, indent=1)
save_file({"tokens": tokens, "logits": logits}, os.path.join(OUT, "golden.safetensors"))
print("wrote", OUT, "logits", tuple(logits.shape))
