"""The reasoning chains of MoTE (METHOD.md sec. 1-2): reading and checking them, encoding a chain
into the token sequence the model learns, batching, and the HH-RLHF questions the chains start from.

    chat(question) <|analysis|> analysis <|/analysis|> <|guidance|> guidance <|/guidance|>
                   <|response|> response <|/response|> <eot>
"""
import gzip
import json
import re
import sys

import torch

import mote

# ---- reasoning chains (METHOD.md sec. 1-2) -----------------------------------------------------------

CHAIN_KEYS = ("question", "analysis", "guidance", "response", "check", "path", "source")
CHAIN_PATHS = ("response", "analysis", "guidance")  # "path": the stage self-generation stopped at (selfgen.py)
VERDICTS = ("safe", "unsafe", "unparsed")  # "check": the verdict of each safety check, comma-separated
STEP_KEYS = mote.STEPS  # a chain's key for the text of each step, in order


class DataError(ValueError):
    """Bad input data; the message names the file and line."""


def read_chains(path: str) -> list:
    """Read and validate a JSONL file of reasoning chains, one per line:
    {"question": str, "analysis": str?, "guidance": str?, "response": str, "check": str?, "path": str?,
    "source": str?}.
    Analysis and guidance are optional, the response is required and non-empty; check is the stored
    safety verdicts ("safe", or one per check in order: "unsafe,safe"); path is where self-generation
    stopped (CHAIN_PATHS); source names who wrote the chain (README: the data). Blank lines are
    skipped; anything else that is wrong raises DataError. A file of the older format ("answer" for
    "response", path "answer" for "response") is read, with a one-line note."""
    chains, renamed = [], False
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if "answer" in record and "response" not in record:
            record["response"], renamed = record.pop("answer"), True
            if record.get("path") == "answer":
                record["path"] = "response"
        unknown = sorted(set(record) - set(CHAIN_KEYS))
        if unknown:
            raise DataError(f"{where}: unknown keys {unknown}; allowed: {list(CHAIN_KEYS)}")
        for key, value in record.items():
            if not isinstance(value, str):
                raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
        for key in ("question", "response"):
            if not record.get(key, "").strip():
                raise DataError(f"{where}: missing or empty {key!r}")
        if record.get("path", "response") not in CHAIN_PATHS:
            raise DataError(f"{where}: 'path' must be one of {list(CHAIN_PATHS)}, got {record['path']!r}")
        if not set(record.get("check", "safe").split(",")) <= set(VERDICTS):
            raise DataError(f"{where}: 'check' must be verdicts {list(VERDICTS)} joined by commas, got {record['check']!r}")
        chains.append(record)
    if not chains:
        raise DataError(f"{path}: no chains (the file is empty)")
    if renamed:
        print(f"note: {path}: read the older key 'answer' as 'response'", file=sys.stderr)
    return chains


def last_sentence(text: str) -> str:
    """The last sentence of a step's text: in the recipe's analyses, its conclusion
    ("Verdict: harmful." or "Verdict: harmless."); the whole text when it has one sentence."""
    return re.split(r"(?<=[.!?])\s+", text.strip())[-1]


def conclusion(analysis: str) -> str | None:
    """What an analysis concluded, from its last sentence: "harmful" ("Verdict: harmful."),
    "harmless" ("Verdict: harmless."), or None when it ends otherwise."""
    found = re.fullmatch(r"Verdict: (harmful|harmless)\.?", last_sentence(analysis))
    return found and found[1]


def encode_chain(tok, chain: dict, base_vocab: int):
    """A chain -> (tokens, targets, conclusion, harmful), lists (METHOD.md sec. 2):

        chat(question) <|analysis|> analysis <|/analysis|> ... <|response|> response <|/response|> <eot>

    targets[t] is the token t must predict, or -100: the question and chat template are never
    learned; every step token, every marker and the closing end-of-turn are. conclusion[t] is True
    where targets[t] is a token of the analysis's last sentence (train.py --conclusion-weight);
    all False when the tokenizer merges that sentence into the one before it. harmful[t] is True
    where targets[t] is a token of the text of an analysis that concludes harmful (train.py
    --harmful-weight; not its markers)."""
    prompt = tok.chat(chain["question"])
    tokens, verdict, harmful = list(prompt), [], []  # verdict, harmful: token positions (ranges once found)
    for step, key in enumerate(STEP_KEYS):
        if chain.get(key, "").strip():
            text = tok.encode(chain[key].strip())
            tokens += [mote.start_marker(base_vocab, step), *text, mote.end_marker(base_vocab, step)]
            if key == "analysis":
                end = len(tokens) - 1  # the end marker's index: the text, and its conclusion, come just before it
                if conclusion(chain[key]) == "harmful":
                    harmful = range(end - len(text), end)
                last = tok.encode(last_sentence(chain[key]))
                for n in (len(last), len(last) + 1):  # the sentence, with or without its leading space
                    if n <= len(text) and tok.decode(text[-n:]).strip() == last_sentence(chain[key]):
                        verdict = range(end - n, end)
                        break
    tokens.append(tok.eot_id)
    targets = [tokens[t + 1] if t + 1 >= len(prompt) else -100 for t in range(len(tokens) - 1)] + [-100]

    def marked(positions):  # per token t: is its target, tokens[t + 1], at one of these positions?
        return [t + 1 in positions for t in range(len(tokens))]
    return tokens, targets, marked(verdict), marked(harmful)


def encode_chains(tok, chains: list, base_vocab: int, max_len: int):
    """Encode every chain; a chain longer than max_len tokens is dropped, not truncated (a cut
    chain would teach an answer without its end), and counted. -> (encoded list, n_dropped)."""
    encoded = [encode_chain(tok, c, base_vocab) for c in chains]
    kept = [e for e in encoded if len(e[0]) <= max_len]
    return kept, len(encoded) - len(kept)


def collate(encoded: list, pad_id: int):
    """Right-pad a list of (tokens, targets, conclusion, harmful) -> tokens, targets (B, T) long,
    valid, conclusion and harmful (B, T) bool."""
    T = max(len(t) for t, *_ in encoded)
    tokens = torch.full((len(encoded), T), pad_id, dtype=torch.long)
    targets = torch.full((len(encoded), T), -100, dtype=torch.long)
    valid, conclusion, harmful = (torch.zeros(len(encoded), T, dtype=torch.bool) for _ in range(3))
    for i, (tk, tg, c, h) in enumerate(encoded):
        tokens[i, : len(tk)], targets[i, : len(tg)], valid[i, : len(tk)] = torch.tensor(tk), torch.tensor(tg), True
        conclusion[i, : len(c)], harmful[i, : len(h)] = torch.tensor(c, dtype=torch.bool), torch.tensor(h, dtype=torch.bool)
    return tokens, targets, valid, conclusion, harmful


def hh_questions(path: str) -> list:
    """The questions of the method: the first human turn of each HH-RLHF dialogue ("\\n\\nHuman: ...
    \\n\\nAssistant: ..."), from a .jsonl or .jsonl.gz file (its "chosen" text), de-duplicated in
    file order."""
    opener = gzip.open if path.endswith(".gz") else open
    seen, questions = set(), []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["chosen"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{n}: not an HH-RLHF record (a JSON object with a 'chosen' dialogue)") from None
            first = text.split("\n\nHuman:", 1)[-1].split("\n\nAssistant:", 1)[0].strip()
            if first and first not in seen:
                seen.add(first)
                questions.append(first)
    return questions

