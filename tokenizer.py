"""Tokenizers. Every base this project supports uses a byte-level BPE, and all of them run on one engine,
tiktoken: a `tiktoken.Encoding` is a split regex (the "pre-tokenizer"), a table of mergeable byte
strings whose ranks are their token ids, and a dict of special tokens. A `Tokenizer` wraps one
Encoding together with the chat template of its base (METHOD.md section 2: the chain follows the
chat-formatted question):

  * byte_tokenizer()         256 byte tokens + 8 specials, for the tiny preset (tests, laptops)
  * llama3_tokenizer(path)   Meta's tokenizer.model of Llama 3 / 3.1 (the paper's second base)
  * tokenizer_from_file(p)   this project's JSON format, written by convert.py (e.g. SmolLM2)
  * hf_tokenizer(path)       a Hugging Face tokenizer.json (Llama 3.x, SmolLM2 downloaded from HF)
  * load_tokenizer(base)     the tokenizer that belongs to a base checkpoint

User text is never parsed for special tokens: "<|eot_id|>" typed in a question is seven ordinary
tokens, not an end-of-turn. Only the chat template itself contributes special tokens.
"""
import base64
import json
import os
import re
from pathlib import Path

import tiktoken
from safetensors import safe_open
from tiktoken.load import load_tiktoken_bpe


# ---- split patterns (pre-tokenizers) ------------------------------------------------------------

# Llama 3 (Meta's tokenizer.py; identical to the Split regex of its Hugging Face tokenizer.json)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# GPT-2 (Hugging Face ByteLevel pre-tokenizer with use_regex=True)
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# SmolLM2 (llama.cpp pre-type "smollm"): Hugging Face runs two pre-tokenizers in sequence,
# Digits(individual_digits=True) and then ByteLevel's GPT-2 regex on each stretch between digits.
# As one regex: every \p{N} is its own piece (so " ?\p{N}+" can never match and is dropped), and a
# run of white space that ends at a digit ends at the end of its stretch, where GPT-2's lookahead
# (?!\S) sees nothing; hence (?![^\s\p{N}]): "not followed by anything but space or a digit".
SMOLLM_PATTERN = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
# llama.cpp's tokenizer.ggml.pre names -> patterns (convert.py reads GGUF files with it)
PRE_TOKENIZERS = {"llama-bpe": LLAMA3_PATTERN, "smollm": SMOLLM_PATTERN, "gpt-2": GPT2_PATTERN}

# ---- chat templates: one user turn, then the assistant header the model continues ----------------

CHAT_TEMPLATES = {
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{question}"
              "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    # SmolLM2's template inserts this default system prompt when the chat has none
    "chatml": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
              "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
    "byte": "<|begin_of_text|><|user|>{question}<|eot|><|assistant|>",
}
# (bos, end of assistant turn) of each template family. ChatML bases (SmolLM2) add no BOS to text.
CHAT_SPECIALS = {"llama3": ("<|begin_of_text|>", "<|eot_id|>"), "chatml": (None, "<|im_end|>"),
                 "byte": ("<|begin_of_text|>", "<|eot|>")}

# Meta's Llama 3.1 special tokens, ids 128000.. in this order (llama-models, llama3_1 tokenizer.py)
LLAMA31_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]  # 256 in all


class Tokenizer:
    """A tiktoken Encoding + the chat template of its base.

    enc: the Encoding; chat_template: a key of CHAT_TEMPLATES; bos_id: the base's beginning of text
    (None when the base adds none); eot_id: the token that ends an assistant turn.

    Missing bytes. A byte-level BPE should hold all 256 single bytes, but SmolLM2's lacks 21:
    0x04 0x06 0x13 0x14 0x16 0x1d (control characters), 0xC0 0xC1 0xF5..0xFF (never in UTF-8) and
    0xF1 0xF2 (the lead bytes of the unassigned code points U+40000..U+BFFFF). tiktoken would panic
    on them. Hugging Face's BPE (no unk token, no byte fallback) drops such a byte, and so do we:
    `encode` runs a second Encoding in which each missing byte is a token of its own with an id
    above the vocabulary, and removes those ids. Ids equal Hugging Face's except that HF may then
    merge the bytes on both sides of the dropped one (" \\x1d#" -> one token for " #", here " " and
    "#"); the decoded bytes are always the same. Ordinary text never contains these bytes.
    """

    def __init__(self, enc: tiktoken.Encoding, chat_template: str, bos_id: int | None, eot_id: int):
        if chat_template not in CHAT_TEMPLATES:
            raise ValueError(f"unknown chat template {chat_template!r}; choose one of {sorted(CHAT_TEMPLATES)}")
        self.enc, self.chat_template, self.bos_id, self.eot_id = enc, chat_template, bos_id, eot_id
        ranks = enc._mergeable_ranks  # tiktoken keeps its tables in these attributes
        self.missing_bytes = bytes(b for b in range(256) if bytes([b]) not in ranks)
        self._missing_re = re.compile(b"[" + re.escape(self.missing_bytes) + b"]") if self.missing_bytes else None
        self._filled = None  # the Encoding with stand-ins for the missing bytes, built on first need

    @property
    def n_vocab(self) -> int:
        return self.enc.n_vocab

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end generation: the end of the assistant turn, then any end-of-text token."""
        ends = ("<|end_of_text|>", "<|endoftext|>", "<|eom_id|>")
        return [self.eot_id] + [self.enc._special_tokens[n] for n in ends if n in self.enc._special_tokens]

    def encode(self, text: str) -> list[int]:
        """Ordinary text -> ids. Special-token strings in `text` are encoded as plain text."""
        if self._missing_re is None or not self._missing_re.search(text.encode("utf-8", "surrogatepass")):
            return self.enc.encode_ordinary(text)
        top = self.enc.max_token_value
        if self._filled is None:
            stand_ins = {bytes([b]): top + 1 + i for i, b in enumerate(self.missing_bytes)}
            self._filled = tiktoken.Encoding(self.enc.name + "+missing", pat_str=self.enc._pat_str,
                                             mergeable_ranks={**self.enc._mergeable_ranks, **stand_ins},
                                             special_tokens={})
        return [i for i in self._filled.encode_ordinary(text) if i <= top]

    def decode_bytes(self, ids) -> bytes:
        """ids -> their raw bytes (a token may hold part of a UTF-8 character)."""
        return self.enc.decode_bytes([int(i) for i in ids])

    def decode(self, ids) -> str:
        """ids (any iterable of ints, a tensor too) -> text; invalid UTF-8 becomes U+FFFD."""
        return self.enc.decode([int(i) for i in ids])

    def chat(self, question: str) -> list[int]:
        """The prompt the model continues: the template's tokens with `question` in the user turn.

        The template is split at its special tokens; the text touching the question ("user\\n",
        "\\n\\n", ...) is encoded together with it, exactly as a Hugging Face tokenizer encodes the
        rendered template, but the question itself can never produce a special token."""
        head, tail = (self._template_parts(s) for s in CHAT_TEMPLATES[self.chat_template].split("{question}"))
        left = head.pop() if head and isinstance(head[-1], str) else ""
        right = tail.pop(0) if tail and isinstance(tail[0], str) else ""
        return self._encode_parts(head) + self.encode(left + question + right) + self._encode_parts(tail)

    def _template_parts(self, text: str) -> list:
        """'<|a|>x<|b|>' -> [id of <|a|>, 'x', id of <|b|>] (special tokens of this tokenizer only)."""
        names = sorted(self.enc._special_tokens, key=len, reverse=True)
        pieces = re.split("(" + "|".join(map(re.escape, names)) + ")", text)
        return [self.enc._special_tokens.get(p, p) for p in pieces if p]

    def _encode_parts(self, parts: list) -> list[int]:
        return [i for p in parts for i in ([p] if isinstance(p, int) else self.encode(p))]

    def special(self, name: str) -> int:
        """The id of a special token, e.g. special('<|eot_id|>')."""
        try:
            return self.enc._special_tokens[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a special token of {self.enc.name}") from None

    def with_special_tokens(self, extra: dict[str, int]) -> "Tokenizer":
        """A new Tokenizer whose Encoding also has the special tokens `extra` (name -> id), e.g. the
        MoTE step markers appended after the base vocabulary (METHOD.md section 2)."""
        specials = dict(self.enc._special_tokens)
        taken = {i: n for n, i in specials.items()} | {i: b for b, i in self.enc._mergeable_ranks.items()}
        for name, i in extra.items():
            if name in specials and specials[name] != i:
                raise ValueError(f"{name!r} is already special token {specials[name]}, not {i}")
            if taken.get(i, name) != name:
                raise ValueError(f"id {i} for {name!r} is already token {taken[i]!r}")
        enc = tiktoken.Encoding(f"{self.enc.name}+{len(extra)}", pat_str=self.enc._pat_str,
                                mergeable_ranks=self.enc._mergeable_ranks, special_tokens={**specials, **extra})
        return Tokenizer(enc, self.chat_template, self.bos_id, self.eot_id)

    def save(self, path) -> None:
        """Write this project's tokenizer JSON (read back by tokenizer_from_file):
        {"pattern": split regex, "ranks": [base64 of the token's bytes, list index = rank = id;
        null where an id is not a byte string (special tokens)], "special_tokens": {name: id},
        "chat": template name, "bos": id | null, "eot": id}."""
        ranks = self.enc._mergeable_ranks
        table = [None] * (max(ranks.values()) + 1)
        for token, rank in ranks.items():
            table[rank] = base64.b64encode(token).decode("ascii")
        doc = {"format": "mote-tokenizer", "version": 1, "name": self.enc.name, "pattern": self.enc._pat_str,
               "chat": self.chat_template, "bos": self.bos_id, "eot": self.eot_id,
               "special_tokens": self.enc._special_tokens, "ranks": table}
        Path(path).write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")

    def __repr__(self):
        return (f"Tokenizer({self.enc.name!r}, n_vocab={self.n_vocab}, chat={self.chat_template!r}, "
                f"bos={self.bos_id}, eot={self.eot_id})")


def _with_template(enc: tiktoken.Encoding, chat_template: str) -> Tokenizer:
    """A Tokenizer whose bos/eot are the special tokens its template family names."""
    bos, eot = CHAT_SPECIALS[chat_template]
    return Tokenizer(enc, chat_template, enc._special_tokens[bos] if bos else None, enc._special_tokens[eot])


def chat_family(special_tokens) -> str:
    """Which chat template a vocabulary's special tokens belong to."""
    for family, marker in (("llama3", "<|start_header_id|>"), ("chatml", "<|im_start|>"), ("byte", "<|user|>")):
        if marker in special_tokens:
            return family
    raise ValueError(f"no known chat template for special tokens {sorted(special_tokens)[:8]}...")


def byte_tokenizer() -> Tokenizer:
    """256 byte tokens (id = byte) and 8 specials at 256..263, no merges: the tiny preset's
    vocabulary (ModelArgs.vocab_size 264). Needs no file."""
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|user|>", "<|assistant|>", "<|eot|>",
             "<|reserved_0|>", "<|reserved_1|>", "<|reserved_2|>"]
    enc = tiktoken.Encoding("byte", pat_str=LLAMA3_PATTERN, mergeable_ranks={bytes([b]): b for b in range(256)},
                            special_tokens={n: 256 + i for i, n in enumerate(names)})
    return _with_template(enc, "byte")


def llama3_tokenizer(path) -> Tokenizer:
    """Meta's Llama 3 / 3.1 tokenizer.model (base64 token, rank per line) with the 256 special
    tokens of Llama 3.1 at 128000..128255 and the Llama 3 chat template."""
    ranks = load_tiktoken_bpe(str(path))
    specials = {name: len(ranks) + i for i, name in enumerate(LLAMA31_SPECIAL_TOKENS)}
    enc = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    return _with_template(enc, "llama3")


def tokenizer_from_file(path) -> Tokenizer:
    """Read this project's tokenizer JSON (see Tokenizer.save)."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    if doc.get("format") != "mote-tokenizer":
        raise ValueError(f"{path} is not a tokenizer file of this project (no \"format\": \"mote-tokenizer\")")
    ranks = {base64.b64decode(t): i for i, t in enumerate(doc["ranks"]) if t is not None}
    enc = tiktoken.Encoding(doc.get("name", Path(path).stem), pat_str=doc["pattern"], mergeable_ranks=ranks,
                            special_tokens=doc["special_tokens"])
    return Tokenizer(enc, doc["chat"], doc["bos"], doc["eot"])


# ---- byte-level BPE from GPT-2-style token strings (GGUF files, Hugging Face tokenizer.json) ----

def _gpt2_unicode_to_byte() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes: printable Latin-1 bytes stand for themselves, the
    other 68 bytes are mapped in order to U+0100.. (so ' ' is 'Ġ' and '\\n' is 'Ċ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


GPT2_UNICODE_TO_BYTE = _gpt2_unicode_to_byte()


def byte_level_bpe(vocab: dict[str, int], special_tokens: dict[str, int], pattern: str, name: str) -> Tokenizer:
    """A Tokenizer from GPT-2-style token strings (vocab: token string -> id) and special tokens.

    The id of a token is its merge rank. Hugging Face's BPE instead applies its merge list in
    order; the two agree when the merges create tokens in id order, as in tokenizers trained by
    Hugging Face (SmolLM2: merge i creates id 252 + i) and in Llama 3 (itself a tiktoken
    vocabulary). The chat template is recognised from the special tokens."""
    ranks = {}
    for token, i in vocab.items():
        if i in special_tokens.values():
            continue
        try:
            ranks[bytes(GPT2_UNICODE_TO_BYTE[c] for c in token)] = i
        except KeyError:
            raise ValueError(f"token {i} {token!r} is not a byte-level token") from None
    enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens)
    return _with_template(enc, chat_family(special_tokens))


def _hf_pattern(pre: dict | None) -> str:
    """The split regex equivalent to a Hugging Face pre_tokenizer (the three kinds our bases use)."""
    steps = pre.get("pretokenizers", [pre]) if pre else []
    kinds = [s["type"] for s in steps]
    if any(s.get("add_prefix_space") for s in steps):
        raise ValueError("ByteLevel add_prefix_space=True is not supported")
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return steps[0]["pattern"]["Regex"]                      # Llama 3
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return SMOLLM_PATTERN                                    # SmolLM2
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_PATTERN                                      # GPT-2
    raise ValueError(f"unsupported pre_tokenizer {json.dumps(pre)[:200]}")


def hf_tokenizer(path) -> Tokenizer:
    """A Hugging Face tokenizer.json of a byte-level BPE (Llama 3.x, SmolLM2). Added tokens marked
    special become special tokens; the chat template is recognised from them."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    model = doc["model"]
    if model.get("type") != "BPE" or doc.get("normalizer") or model.get("byte_fallback"):
        raise ValueError(f"{path}: only byte-level BPE tokenizers without a normalizer are supported")
    specials = {t["content"]: t["id"] for t in doc.get("added_tokens", []) if t.get("special")}
    return byte_level_bpe(model["vocab"], specials, _hf_pattern(doc.get("pre_tokenizer")), Path(path).parent.name)


def load_tokenizer(base_path) -> Tokenizer:
    """The tokenizer of a base checkpoint (a .safetensors file or a directory), looked up in order:
    1. the weights' metadata "tokenizer": "byte", or a tokenizer JSON file relative to the weights;
    2. tokenizer.model or original/tokenizer.model beside the weights (Meta's Llama 3 format);
    3. tokenizer.json beside the weights (Hugging Face)."""
    base = Path(base_path)
    folder = base if base.is_dir() else base.parent
    weights = sorted(folder.glob("*.safetensors")) if base.is_dir() else [base]
    if weights and weights[0].exists():
        with safe_open(str(weights[0]), "pt") as f:
            name = (f.metadata() or {}).get("tokenizer")
        if name == "byte":
            return byte_tokenizer()
        if name:
            return tokenizer_from_file(folder / name)
    for candidate in ("tokenizer.model", os.path.join("original", "tokenizer.model")):
        if (folder / candidate).exists():
            return llama3_tokenizer(folder / candidate)
    if (folder / "tokenizer.json").exists():
        return hf_tokenizer(folder / "tokenizer.json")
    raise FileNotFoundError(f"no tokenizer for {base_path}: no \"tokenizer\" metadata in the weights and no "
                            f"tokenizer.model, original/tokenizer.model or tokenizer.json in {folder}")
