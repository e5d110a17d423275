"""Does the analysis decide the response? A teacher-forcing experiment on the development sets.

    python swap.py --adapters runs/smollm2-135m-instruct       # dev-harmful and dev-benign, ~5 min on 2 cores (fp32)

For every question the model first writes its own analysis (greedy, --path analysis). Then its
response is generated three times, each after a different analysis forced in its place:

    own    chat(q) <|analysis|> q's own analysis   <|/analysis|> <|response|> ...
    other  chat(q) <|analysis|> an analysis the model wrote for a question of the other set <|/analysis|> <|response|> ...
    empty  chat(q) <|analysis|> <|/analysis|> <|response|> ...

and judged by evaluate.is_refusal. If the reasoning decides, a harmful question refuses after its
own analysis and complies after a benign question's; a benign question does the reverse. If the
response reads only the question, the three rows are the same. "other" pairs question i of one set
with question i of the other (both sets hold 50). Each rate comes with its count and 95% Wilson
interval; --out writes every response as JSONL.

A second table asks where the analysis decides: at its verdict word, or in the sentences before it
(verdict_log_odds: the log-odds of " harmful" against " harmless" after its own "Verdict:").
"""
import json
import sys

import torch

import calibrate
import cli
import evaluate
import mote
import sample

FORCED = ("own", "other", "empty")


def forced_prompts(tok, questions: list, analyses: list, V: int) -> list:
    """chat(q) <|analysis|> analysis <|/analysis|> <|response|>: the response step opened after a
    given analysis (token ids), for generate to continue."""
    a, r = mote.STEPS.index("analysis"), mote.STEPS.index("response")
    return [tok.chat(q) + [mote.start_marker(V, a), *ids, mote.end_marker(V, a), mote.start_marker(V, r)]
            for q, ids in zip(questions, analyses)]


def own_analyses(model, tok, questions: list, max_step_tokens: int, batch_size: int) -> list:
    """The analysis the model writes for each question (greedy), as token ids."""
    V = model.args.vocab_size
    outs = sample.generate_batches(model, tok, [tok.chat(q) for q in questions], batch_size, experts=True,
                                   path="analysis", max_new_tokens=max_step_tokens + 2, max_step_tokens=max_step_tokens)
    return [sample.split_steps(ids, V, tok.stop_ids)["analysis"] for ids in outs]


def responses(model, tok, prompts: list, max_step_tokens: int, batch_size: int) -> list:
    V = model.args.vocab_size
    outs = sample.generate_batches(model, tok, prompts, batch_size, experts=True, path="auto",
                                   max_new_tokens=max_step_tokens + 1, max_step_tokens=max_step_tokens)
    return [tok.decode([t for t in ids if t < V]).strip() for ids in outs]


def verdict_log_odds(model, tok, questions: list, analyses: list, batch_size: int) -> list:
    """Is the verdict decided before its word is written? For each analysis (token ids) holding
    "Verdict:", teacher-force chat(q) <|analysis|> its text up to "Verdict:" (re-encoded) and score the
    two words that may follow: log P(" harmful") - log P(" harmless"), each word's token log-probs
    summed (calibrate.last_logits: routed as at inference). Near 0 the verdict is still open there;
    far from it, the sentences before it decided. -> one float per analysis, None where it holds no
    "Verdict:"."""
    V = model.args.vocab_size
    texts = [tok.decode(a) for a in analyses]
    has = [i for i, t in enumerate(texts) if "Verdict:" in t]
    prefixes = [tok.chat(questions[i]) + [mote.start_marker(V, mote.STEPS.index("analysis"))]
                + tok.encode(texts[i][:texts[i].rfind("Verdict:") + len("Verdict:")].strip()) for i in has]

    def log_prob(word: list) -> torch.Tensor:  # log P(word | prefix), per prefix, token by token
        return sum(torch.log_softmax(calibrate.last_logits(model, [r + word[:j] for r in prefixes], batch_size), -1)[:, t]
                   for j, t in enumerate(word))

    odds = (log_prob(tok.encode(" harmful")) - log_prob(tok.encode(" harmless"))).tolist() if has else []
    out = [None] * len(analyses)
    for i, x in zip(has, odds):
        out[i] = x
    return out


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapters", required=True, help="a train.py run folder")
    p.add_argument("--base", help="base checkpoint (default: the run's)")
    p.add_argument("--harmful", default="dev-harmful")
    p.add_argument("--benign", default="dev-benign")
    p.add_argument("--max-step-tokens", type=cli.positive_int, default=64)
    p.add_argument("--batch-size", type=cli.positive_int, default=32)
    p.add_argument("--out", help="write every forced response here (JSONL)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto")
    args = p.parse_args(argv)
    sets = (args.harmful, args.benign)
    if [evaluate.SETS.get(n) for n in sets] != ["harmful", "benign"]:
        p.error("--harmful and --benign: a harmful and a benign set of evaluate.SETS")
    questions = [evaluate.load_set(n, evaluate.HH_DEFAULT) for n in sets]
    if len(questions[0]) != len(questions[1]):
        p.error(f"{sets[0]} and {sets[1]}: 'other' pairs question i with question i; the sets differ in size")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = sample.load(args.base, args.adapters, device, args.dtype)
    V = model.args.vocab_size
    own = [own_analyses(model, tok, qs, args.max_step_tokens, args.batch_size) for qs in questions]
    odds = [verdict_log_odds(model, tok, qs, a, args.batch_size) for qs, a in zip(questions, own)]
    records = []
    for k, (name, qs) in enumerate(zip(sets, questions)):
        analyses = {"own": own[k], "other": own[1 - k], "empty": [[] for _ in qs]}
        for forced in FORCED:
            texts = responses(model, tok, forced_prompts(tok, qs, analyses[forced], V), args.max_step_tokens,
                              args.batch_size)
            records += [{"set": name, "forced": forced, "question": q, "analysis": tok.decode(a).strip(),
                         "response": r, "refused": evaluate.is_refusal(r)}
                        | ({"verdict_log_odds": x} if forced == "own" else {})
                        for q, a, r, x in zip(qs, analyses[forced], texts, odds[k])]
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    print("refusal rate of the response after a forced analysis (evaluate.is_refusal; 95% Wilson intervals)\n")
    print("| set | own analysis | the other set's analysis | empty analysis |\n|---|---|---|---|")
    for name in sets:
        cells = []
        for forced in FORCED:
            refused = [r["refused"] for r in records if r["set"] == name and r["forced"] == forced]
            k, n = sum(refused), len(refused)
            cells.append("{:.2f} ({}/{}) [{:.2f}, {:.2f}]".format(k / n, k, n, *evaluate.wilson(k, n)))
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nthe verdict after the own analysis: log P(' harmful') - log P(' harmless') where it says \"Verdict:\"\n")
    print("| set | analyses with a verdict | harmful (> 0) | open (within +-2) | nearest to 0 |\n|---|---|---|---|---|")
    for name, xs in zip(sets, odds):
        xs = [x for x in xs if x is not None]
        print(f"| {name} | {len(xs)} | {sum(x > 0 for x in xs)} | {sum(abs(x) < 2 for x in xs)} | "
              + (f"{min(abs(x) for x in xs):.1f} |" if xs else "- |"))
    return records


if __name__ == "__main__":
    sys.exit(main() and None)
