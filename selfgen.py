"""AlignCoT self-generation: the base model writes its own reasoning chains (METHOD.md sec. 1).

    python data.py generate --base smollm2-135m-instruct.safetensors \\
        --questions ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz --out runs/selfgen/chains.jsonl

Every stage is written by the base itself, prompted with PROMPTS, and the base judges its own answers
(Safety Checking). The control flow keeps each chain as short as it can be (METHOD.md sec. 1):

    1. answer(X) -> A; check(X, A)                       safe: chain (X, A)              path "answer"
    2. analysis(X) -> X_a; answer(X, X_a) -> A; check    safe: chain (X, X_a, A)         path "analysis"
    3. guidance(X, X_a) -> X_g; answer(X, X_a, X_g) -> A; check (recorded only):
                                                               chain (X, X_a, X_g, A)    path "guidance"

A record (read by data.read_chains, trained on by train.py); empty stages are left out:

    {"question": X, "analysis": X_a, "guidance": X_g, "answer": A, "check": "unsafe,unsafe,safe", "path": "guidance"}

"check" lists the verdict of every safety check, in order: safe, unsafe, or unparsed (a reply in
which parse_verdict finds no verdict; it counts as unsafe). A chain whose final answer is empty is
dropped and counted in the summary, never written.

Held-out split (shared with evaluate.py): a question is held out for evaluation iff heldout(q),
i.e. sha256(q) mod 5 == 0 (about a fifth). Generation skips held-out questions from every source.

Batched (each stage is one generate_fn call for a whole batch of questions), resumable (questions
already in --out are skipped, records are appended and flushed one by one) and summarised at the
end like the paper's Table 2 (share of chains with an analysis, with a guidance).
"""
import gzip
import hashlib
import json
import os
import re
from collections import Counter

import torch
from tqdm import tqdm

import data
import sample

# ---- the stage prompts --------------------------------------------------------------------------
# This project's own wording: the paper does not publish its prompts (METHOD.md sec. 1). Each is
# the user turn of one chat (tok.chat); {fields} are filled from the chain written so far. The
# first answer is the model's plain reply to the question itself.
PROMPTS = {
    "answer": "{question}",
    "check": (
        "Here is a question and an answer to it.\n\n"
        "Question: {question}\n\nAnswer: {answer}\n\n"
        "Is this answer safe? An answer is unsafe if it helps with something harmful, dangerous, illegal "
        "or unethical, or if it is hateful, insulting or discriminatory. Reply with one word: safe or unsafe."),
    "analysis": (
        "Before anyone answers the question below, analyse it. What is the person asking for? What explicit "
        "and implicit risks does it carry (harm to people, dangerous or illegal acts, unethical or offensive "
        "content)? What might the person really need? Write the analysis only, not an answer.\n\n"
        "Question: {question}"),
    "answer_with_analysis": (
        "Question: {question}\n\nAnalysis of the question: {analysis}\n\n"
        "Taking this analysis into account, write a safe, honest and helpful answer to the question. "
        "Write only the answer."),
    "guidance": (
        "Question: {question}\n\nAnalysis of the question: {analysis}\n\n"
        "Write short guidance for answering this question: how to be safe and accurate and still helpful, "
        "what to avoid, and what useful help to offer instead. Write the guidance only, not the answer."),
    "answer_with_guidance": (
        "Question: {question}\n\nAnalysis of the question: {analysis}\n\nGuidance for the answer: {guidance}\n\n"
        "Following the analysis and the guidance, write a safe, honest and helpful answer to the question. "
        "Write only the answer."),
}
PATHS = data.CHAIN_PATHS  # "answer", "analysis", "guidance": the stage at which a chain stopped

# The check prompt asks "Is this answer safe? ... safe or unsafe": the first "unsafe" / "not safe" /
# "safe" anywhere decides; "yes" (safe) or "no" (unsafe) counts only as the reply's first word
# ("...contains no harmful content..." must not read as "no").
VERDICT = re.compile(r"\b(unsafe|(?:not|isn't|is not) safe|safe)\b|^\W*(yes|no)\b", re.IGNORECASE)


def parse_verdict(reply: str) -> str:
    """A safety check's reply -> "safe", "unsafe" or "unparsed" (no verdict found; counts as unsafe)."""
    m = VERDICT.search(reply.strip())
    if not m:
        return "unparsed"
    return "safe" if (m.group(1) or m.group(2)).lower() in ("safe", "yes") else "unsafe"


def heldout(question: str) -> bool:
    """The fixed HH-RLHF split: held out for evaluation iff sha256(utf-8 question) mod 5 == 0.
    Generation never uses a held-out question; evaluate.py uses only those."""
    return int(hashlib.sha256(question.encode("utf-8")).hexdigest(), 16) % 5 == 0


# ---- the pipeline ---------------------------------------------------------------------------------

def align_cot(questions: list, generate_fn) -> list:
    """One batch of questions through the stages of METHOD.md sec. 1 -> chain records (module doc).

    generate_fn(prompts: list[str]) -> list[str] writes one reply per prompt (the base model in the
    CLI, a script in the tests); every stage is one call for all the chains that reach it."""
    chains = [{"question": q, "checks": []} for q in questions]

    def write(active, prompt, key):
        for chain, text in zip(active, generate_fn([PROMPTS[prompt].format(**c) for c in active])):
            chain[key] = text.strip()

    def answer_and_check(active, prompt):  # -> the chains still unsafe
        write(active, prompt, "answer")
        write(active, "check", "reply")
        for c in active:
            c["checks"].append(parse_verdict(c.pop("reply")))
        return [c for c in active if c["checks"][-1] != "safe"]

    unsafe = answer_and_check(chains, "answer")
    if unsafe:
        write(unsafe, "analysis", "analysis")
        unsafe = answer_and_check(unsafe, "answer_with_analysis")
    if unsafe:
        write(unsafe, "guidance", "guidance")
        answer_and_check(unsafe, "answer_with_guidance")
    return [{"question": c["question"], **{k: c[k] for k in ("analysis", "guidance") if c.get(k)},
             "answer": c["answer"], "check": ",".join(c["checks"]), "path": PATHS[len(c["checks"]) - 1]}
            for c in chains]


def read_done(path: str) -> list:
    """The records already in `path` ([] if none). A torn last line (the run was killed while
    writing it) is cut off the file, so that its question is generated again."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def run(questions: list, generate_fn, out: str, batch_size: int = 8, progress: bool = True) -> dict:
    """Generate the chains of `questions` not yet in `out`, appending each record as soon as its
    batch is done; -> summarize() of everything in `out`."""
    done = {r["question"] for r in read_done(out)}
    todo = [q for q in dict.fromkeys(questions) if q not in done]
    dropped, paths = 0, Counter()
    with open(out, "a", encoding="utf-8") as f, \
            tqdm(total=len(todo), unit="chain", desc="self-generate", disable=not progress, dynamic_ncols=True) as bar:
        for i in range(0, len(todo), batch_size):
            for chain in align_cot(todo[i:i + batch_size], generate_fn):
                if chain["answer"]:
                    f.write(json.dumps(chain, ensure_ascii=False) + "\n")
                    f.flush()
                    paths[chain["path"]] += 1
                else:
                    dropped += 1
            bar.update(len(todo[i:i + batch_size]))
            bar.set_postfix(paths)
    return summarize(read_done(out), dropped)


def summarize(records: list, dropped: int = 0) -> dict:
    """Table 2 of the paper for a chain file: how many chains have each stage, and each path's count."""
    n = max(len(records), 1)
    checks = [v for r in records for v in r.get("check", "").split(",") if v]
    return {"chains": len(records),
            "with_answer": sum(bool(r.get("answer")) for r in records) / n,
            "with_analysis": sum(bool(r.get("analysis")) for r in records) / n,
            "with_guidance": sum(bool(r.get("guidance")) for r in records) / n,
            "paths": {p: sum(r.get("path") == p for r in records) for p in PATHS},
            "checks": len(checks), "unparsed_checks": checks.count("unparsed"), "dropped_empty_answer": dropped}


def print_summary(s: dict):
    print(f"chains: {s['chains']}   (paper, 6,000 chains: answer 100%, analysis 71.5%, guidance 61.4%)")
    print(f"  with answer {100 * s['with_answer']:.1f}%, analysis {100 * s['with_analysis']:.1f}%, "
          f"guidance {100 * s['with_guidance']:.1f}%")
    print("  paths: " + ", ".join(f"{p} {k}" for p, k in s["paths"].items()))
    print(f"  unparsed safety verdicts: {s['unparsed_checks']} of {s['checks']}; "
          f"dropped this run (empty answer): {s['dropped_empty_answer']}")


# ---- questions and decoding (shared with evaluate.py) -------------------------------------------

def read_questions(path: str) -> list:
    """Questions, de-duplicated in file order, from HH-RLHF (.jsonl / .jsonl.gz of dialogues with a
    "chosen" text: data.hh_questions), a JSONL file with a "question" field, or a plain text file
    (one question per line)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
    except OSError as e:
        raise data.DataError(f"{path}: cannot read: {e}") from None
    if path.endswith((".jsonl", ".jsonl.gz")):
        if lines and '"chosen"' in lines[0]:
            return data.hh_questions(path)
        try:
            lines = [json.loads(line)["question"] for line in lines]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise data.DataError(f"{path}: expected JSON objects with a 'question' (or HH-RLHF dialogues)") from None
    return list(dict.fromkeys(q.strip() for q in lines))


def generation_questions(questions: list, limit: int = 0) -> tuple:
    """The questions self-generation may use: not held out (heldout), the first `limit` of them
    (0: all). -> (questions, how many were held out)."""
    kept = [q for q in questions if not heldout(q)]
    return kept[: limit or None], len(questions) - len(kept)


def decode_text(tok, ids) -> str:
    """Generated ids -> text, without stop tokens."""
    return tok.decode([t for t in ids if t not in tok.stop_ids]).strip()


def main(argv=None):
    p = data.ArgumentParser(prog="data.py generate", description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="base checkpoint that writes the chains")
    p.add_argument("--questions", required=True, help="HH-RLHF .jsonl(.gz), JSONL with 'question', or text")
    p.add_argument("--out", required=True, help="chains JSONL (appended to: a rerun resumes)")
    p.add_argument("--limit", type=data.count, default=0, help="use the first N questions that are not held out")
    p.add_argument("--batch-size", type=data.positive_int, default=8)
    p.add_argument("--max-new-tokens", type=data.positive_int, default=160, help="per stage")
    p.add_argument("--temperature", type=data.nonnegative, default=0.2, help="0: greedy (SmolLM2's card suggests 0.2)")
    p.add_argument("--top-p", type=data.fraction, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="the model's dtype; auto: bf16 on CUDA, fp32 on CPU")
    args = p.parse_args(argv)
    try:
        questions = read_questions(args.questions)
    except data.DataError as e:
        raise SystemExit(f"error: {e}")
    kept, n_heldout = generation_questions(questions, args.limit)
    print(f"questions: {len(questions)}, held out for evaluation: {n_heldout}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = sample.load(args.base, None, device, args.dtype)
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)

    def generate_fn(prompts):
        ids = sample.generate_batches(model, tok, [tok.chat(q) for q in prompts], args.batch_size, **gen)
        return [decode_text(tok, x) for x in ids]

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    summary = run(kept, generate_fn, args.out, args.batch_size)
    print_summary(summary)
    return summary
