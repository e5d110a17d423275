"""AlignCoT self-generation: the base model writes its own reasoning chains (METHOD.md sec. 1).

    python selfgen.py --base smollm2-135m-instruct.safetensors \\
        --questions ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz --out runs/selfgen/chains.jsonl
    torchrun --nproc_per_node 2 selfgen.py ...   # each process writes every second prompt of a stage (parallel.py)

Every stage is written by the base itself, prompted with PROMPTS, and the base judges its own answers
(Safety Checking). The control flow keeps each chain as short as it can be (METHOD.md sec. 1):

    1. answer(X) -> A; check(X, A)                       safe: chain (X, A)              path "response"
    2. analysis(X) -> X_a; answer(X, X_a) -> A; check    safe: chain (X, X_a, A)         path "analysis"
    3. guidance(X, X_a) -> X_g; answer(X, X_a, X_g) -> A; check
                                                         safe: chain (X, X_a, X_g, A)    path "guidance"

A record (read by data.read_chains, trained on by train.py); empty stages are left out:

    {"question": X, "analysis": X_a, "guidance": X_g, "response": A, "check": "unsafe,unsafe,safe", "path": "guidance"}

The safety check cannot go unparsed: it is the base's next-token probability of "safe" against
"unsafe" after the check prompt (p_safe), and an answer is safe iff that is >= SAFE_THRESHOLD.
"check" lists every verdict in order. A chain whose final answer is still judged unsafe after the
guidance is not an example of a safe answer: it is dropped, never written, and counted (ours; the
paper keeps it). So is a chain whose final answer is empty.

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
from collections import Counter

import torch
from tqdm import tqdm

import cli
import data
import parallel
import sample

# ---- the stage prompts --------------------------------------------------------------------------
# This project's own wording: the paper does not publish its prompts (METHOD.md sec. 1). Each is
# the user turn of one chat (tok.chat); {fields} are filled from the chain written so far. The
# first answer is the model's plain reply to the question itself.
PROMPTS = {
    "response": "{question}",
    "check": (
        "Here is a question and an answer to it.\n\n"
        "Question: {question}\n\nAnswer: {response}\n\n"
        "Is this answer safe? An answer is unsafe if it helps with something harmful, dangerous, illegal "
        "or unethical, or if it is hateful, insulting or discriminatory. Reply with one word: safe or unsafe."),
    "analysis": (
        "Before anyone answers the question below, analyse it. What is the person asking for? What explicit "
        "and implicit risks does it carry (harm to people, dangerous or illegal acts, unethical or offensive "
        "content)? What might the person really need? Write the analysis only, not an answer.\n\n"
        "Question: {question}"),
    "response_with_analysis": (
        "Question: {question}\n\nAnalysis of the question: {analysis}\n\n"
        "Taking this analysis into account, write a safe, honest and helpful answer to the question. "
        "Write only the answer."),
    "guidance": (
        "Question: {question}\n\nAnalysis of the question: {analysis}\n\n"
        "Write short guidance for answering this question: how to be safe and accurate and still helpful, "
        "what to avoid, and what useful help to offer instead. Write the guidance only, not the answer."),
    "response_with_guidance": (
        "Question: {question}\n\nAnalysis of the question: {analysis}\n\nGuidance for the answer: {guidance}\n\n"
        "Following the analysis and the guidance, write a safe, honest and helpful answer to the question. "
        "Write only the answer."),
}
PATHS = data.CHAIN_PATHS  # "response", "analysis", "guidance": the stage at which a chain stopped

# Safety Checking as a probability (ours): P("safe") / (P("safe") + P("unsafe")) of the check
# reply's first token, each summed over the first tokens of its spellings. The threshold is an even
# split, chosen before any data was seen; never tuned on evaluation prompts.
SAFE_THRESHOLD = 0.5
SAFE_WORDS, UNSAFE_WORDS = ("safe", "Safe", " safe", " Safe"), ("unsafe", "Unsafe", " unsafe", " Unsafe")


def verdict_tokens(tok) -> tuple:
    """The first token ids of the spellings of "safe" and of "unsafe", less any first token the two
    share (a byte-level tokenizer starts " safe" and " unsafe" alike) -> two disjoint, non-empty lists."""
    safe, unsafe = ({tok.encode(w)[0] for w in words} for words in (SAFE_WORDS, UNSAFE_WORDS))
    safe, unsafe = safe - unsafe, unsafe - safe
    if not safe or not unsafe:
        raise ValueError("this tokenizer cannot tell 'safe' from 'unsafe' by their first token")
    return sorted(safe), sorted(unsafe)


def p_safe(probs, safe_ids, unsafe_ids) -> list:
    """Next-token probabilities (B, vocab) after the check prompt -> P(safe) of each, in [0, 1]."""
    safe, unsafe = probs[:, safe_ids].sum(-1), probs[:, unsafe_ids].sum(-1)
    return (safe / (safe + unsafe).clamp(min=1e-30)).tolist()


def verdict(p: float) -> str:
    return "safe" if p >= SAFE_THRESHOLD else "unsafe"


def heldout(question: str) -> bool:
    """The fixed HH-RLHF split: held out for evaluation iff sha256(utf-8 question) mod 5 == 0.
    Generation never uses a held-out question; evaluate.py uses only those."""
    return int(hashlib.sha256(question.encode("utf-8")).hexdigest(), 16) % 5 == 0


# ---- the pipeline ---------------------------------------------------------------------------------

def align_cot(questions: list, generate_fn, check_fn) -> list:
    """One batch of questions through the stages of METHOD.md sec. 1 -> chain records (module doc).

    generate_fn(prompts: list[str]) -> list[str] writes one reply per prompt, and check_fn(prompts)
    -> list[float] gives P(safe) of each check prompt (the base model in the CLI, scripts in the
    tests); every stage is one call for all the chains that reach it."""
    chains = [{"question": q, "checks": []} for q in questions]

    def write(active, prompt, key):
        for chain, text in zip(active, generate_fn([PROMPTS[prompt].format(**c) for c in active])):
            chain[key] = text.strip()

    def response_and_check(active, prompt):  # -> the chains still unsafe
        write(active, prompt, "response")
        for c, p in zip(active, check_fn([PROMPTS["check"].format(**c) for c in active])):
            c["checks"].append(verdict(p))
        return [c for c in active if c["checks"][-1] != "safe"]

    unsafe = response_and_check(chains, "response")
    if unsafe:
        write(unsafe, "analysis", "analysis")
        unsafe = response_and_check(unsafe, "response_with_analysis")
    if unsafe:
        write(unsafe, "guidance", "guidance")
        response_and_check(unsafe, "response_with_guidance")
    return [{"question": c["question"], **{k: c[k] for k in ("analysis", "guidance") if c.get(k)},
             "response": c["response"], "check": ",".join(c["checks"]), "path": PATHS[len(c["checks"]) - 1]}
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


def run(questions: list, generate_fn, check_fn, out: str, batch_size: int = 8, progress: bool = True) -> dict:
    """Generate the chains of `questions` not yet in `out`, appending each kept record as soon as
    its batch is done (under torchrun every rank computes every chain of the batch from the shared
    stages, and rank 0 alone writes); -> summarize() of everything in `out`, with this run's dropped
    counts."""
    done = {r["question"] for r in read_done(out)}
    todo = [q for q in dict.fromkeys(questions) if q not in done]
    dropped, paths = Counter(), Counter()
    writes = parallel.rank_and_world()[0] == 0
    with open(out if writes else os.devnull, "a", encoding="utf-8") as f, \
            tqdm(total=len(todo), unit="chain", desc="self-generate", disable=not (progress and writes),
                 dynamic_ncols=True) as bar:
        for i in range(0, len(todo), batch_size):
            for chain in align_cot(todo[i:i + batch_size], generate_fn, check_fn):
                if not chain["response"]:
                    dropped["empty response"] += 1
                elif chain["check"].split(",")[-1] != "safe":
                    dropped["final response unsafe"] += 1
                else:
                    f.write(json.dumps(chain, ensure_ascii=False) + "\n")
                    f.flush()
                    paths[chain["path"]] += 1
            bar.update(len(todo[i:i + batch_size]))
            bar.set_postfix(paths)
    return summarize(read_done(out), dropped)


def summarize(records: list, dropped: Counter = Counter()) -> dict:
    """Table 2 of the paper for a chain file: how many chains have each stage, and each path's count."""
    n = max(len(records), 1)
    checks = [v for r in records for v in r.get("check", "").split(",") if v]
    return {"chains": len(records),
            "with_response": sum(bool(r.get("response")) for r in records) / n,
            "with_analysis": sum(bool(r.get("analysis")) for r in records) / n,
            "with_guidance": sum(bool(r.get("guidance")) for r in records) / n,
            "paths": {p: sum(r.get("path") == p for r in records) for p in PATHS},
            "checks": len(checks), "dropped_empty_response": dropped["empty response"],
            "dropped_unsafe_response": dropped["final response unsafe"]}


def print_summary(s: dict):
    print(f"chains: {s['chains']}   (paper, 6,000 chains: response 100%, analysis 71.5%, guidance 61.4%)")
    print(f"  with response {100 * s['with_response']:.1f}%, analysis {100 * s['with_analysis']:.1f}%, "
          f"guidance {100 * s['with_guidance']:.1f}%")
    print("  paths: " + ", ".join(f"{p} {k}" for p, k in s["paths"].items()))
    print(f"  dropped this run: {s['dropped_unsafe_response']} judged unsafe after the guidance, "
          f"{s['dropped_empty_response']} with an empty response")


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
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="base checkpoint that writes the chains")
    p.add_argument("--questions", required=True, help="HH-RLHF .jsonl(.gz), JSONL with 'question', or text")
    p.add_argument("--out", required=True, help="chains JSONL (appended to: a rerun resumes)")
    p.add_argument("--limit", type=cli.count, default=0, help="use the first N questions that are not held out")
    p.add_argument("--batch-size", type=cli.positive_int, default=8)
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=160, help="per stage")
    p.add_argument("--temperature", type=cli.nonnegative, default=0.2, help="0: greedy (SmolLM2's card suggests 0.2)")
    p.add_argument("--top-p", type=cli.fraction, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="the model's dtype; auto: bf16 on CUDA and on a CPU with native bf16, else fp32 (model.choose_dtype)")
    args = p.parse_args(argv)
    try:
        questions = read_questions(args.questions)
    except data.DataError as e:
        raise SystemExit(f"error: {e}")
    kept, n_heldout = generation_questions(questions, args.limit)
    print(f"questions: {len(questions)}, held out for evaluation: {n_heldout}")
    rank = parallel.join()  # under torchrun each rank writes every world-th prompt of a stage; rank 0 the file
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = sample.load(args.base, None, device, args.dtype)
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    safe_ids, unsafe_ids = verdict_tokens(tok)

    def generate_fn(prompts):
        ids = sample.generate_batches(model, tok, [tok.chat(q) for q in parallel.share(prompts)], args.batch_size, **gen)
        return parallel.gather([decode_text(tok, x) for x in ids])

    def check_fn(prompts):
        mine = parallel.share(prompts)
        return parallel.gather([p for i in range(0, len(mine), args.batch_size) for p in p_safe(
            sample.next_token_probs(model, [tok.chat(q) for q in mine[i:i + args.batch_size]]), safe_ids, unsafe_ids)])

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    summary = run(kept, generate_fn, check_fn, args.out, args.batch_size)
    parallel.leave()
    if rank == 0:
        print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
