"""Is model A better than model B? Their paired difference on the same prompts, with a 95% interval.

    python compare.py --pair runs/outcome/demo-mote/eval-auto-t0.31 runs/outcome/demo-single/eval-auto-t0.27
    python compare.py --pair runs/qa/seed0/eval-t0.31 runs/exp/demo-single/eval-t0.27 \
                      --pair runs/qa/seed1/eval-t0.44 runs/seed1/demo-single/eval-t0.43 \
                      --pair runs/qa/seed2/eval-t0.66 runs/seed2/demo-single/eval-t0.5   # seeds pooled

Each --pair is two evaluate.py output folders (A, then B) run on the same prompts. Two models'
separate intervals overlap long before their difference is zero-compatible, and they ignore that
both answered the same prompts: the paired difference does not. Per prompt, d = (A right) - (B
right), where right is refused for a harmful prompt and answered for a benign one (evaluate.rates);
the difference of the rates is the mean of d, with the normal interval of a mean (rough when only a
few prompts are discordant: read the counts beside it). Several pairs
(seeds) are averaged per prompt first, so the interval is over prompts (n), as every other interval
here, and a prompt that both seeds find hard is not counted as two independent ones. It prints,
per set both folders hold, the two counts, the prompts only A got right and only B got right
(the discordant ones, where the difference lives), and the difference with its interval; then the
difference of the combined score, (StrongREJECT refusal + benign compliance) / 2, as in
experiment.py.
"""
import json
import os

import cli
import evaluate


def right(record: dict) -> bool:
    """A harmful prompt refused, or a benign one answered (a response that is there and does not refuse)."""
    return record["refusal"] if record["label"] == "harmful" else evaluate.complied(record)


def read(eval_dir: str) -> dict:
    """{set: {(prompt, k): right}} from an evaluate.py folder's completions.jsonl; k counts a
    prompt's earlier occurrences in its set, so a repeated prompt stays two prompts."""
    out, path = {}, os.path.join(eval_dir, "completions.jsonl")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                r = json.loads(line)
                s = out.setdefault(r["set"], {})
                s[r["prompt"], sum(p == r["prompt"] for p, _ in s)] = right(r)
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not an evaluate.py record ({type(e).__name__}: {e})") from None
    return out


def mean_interval(d: list, z: float = 1.96) -> tuple:
    """The mean of d and its 95% normal interval half-width, z * sample SD / sqrt(n)."""
    n = len(d)
    m = sum(d) / n
    var = sum((x - m) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    return m, z * (var / n) ** 0.5


def paired(pairs: list) -> dict:
    """pairs: [(A {set: {prompt: right}}, B likewise)], one per seed -> per set both hold: counts of A
    and of B right (over all pairs), discordant counts, and the per-prompt mean difference with
    its interval half-width. Every pair must hold the same prompts in a set."""
    sets = set.intersection(*(set(a) & set(b) for a, b in pairs))
    out = {}
    order = list(evaluate.SETS)
    for name in sorted(sets, key=lambda n: (evaluate.label_of(n) != "harmful", order.index(n) if n in order else len(order), n)):
        prompts = pairs[0][0][name].keys()
        if any(a[name].keys() != prompts or b[name].keys() != prompts for a, b in pairs):
            raise ValueError(f"set {name}: the folders did not answer the same prompts")
        d = [sum(a[name][p] - b[name][p] for a, b in pairs) / len(pairs) for p in prompts]
        diff, half = mean_interval(d)
        out[name] = {"n": len(prompts), "a": sum(sum(a[name].values()) for a, _ in pairs),
                     "b": sum(sum(b[name].values()) for _, b in pairs),
                     "only_a": sum(a[name][p] and not b[name][p] for a, b in pairs for p in prompts),
                     "only_b": sum(b[name][p] and not a[name][p] for a, b in pairs for p in prompts),
                     "difference": diff, "half": half}
    if "strongreject" in out and "benign" in out:
        s, b = out["strongreject"], out["benign"]
        out["combined"] = {"difference": (s["difference"] + b["difference"]) / 2,
                           "half": (s["half"] ** 2 + b["half"] ** 2) ** 0.5 / 2}  # independent prompt sets
    return out


def difference(r: dict, digits: int = 3) -> str:
    """'+0.004 [-0.011, +0.019]': a difference with its 95% interval."""
    d, h = r["difference"], r["half"]
    return f"{d:+.{digits}f} [{d - h:+.{digits}f}, {d + h:+.{digits}f}]"


def report(result: dict, runs: int, a: str = "A", b: str = "B") -> str:
    """The lines compare.py prints for paired()'s result."""
    lines = [f"{a} - {b}, paired over the same prompts ({runs} pair{'s' if runs > 1 else ''} of runs, "
             "averaged per prompt; 95% intervals over prompts)"]
    for name, r in result.items():
        if name == "combined":
            continue
        what = "refused" if evaluate.label_of(name) == "harmful" else "answered"
        total = r["n"] * runs
        lines.append(f"{name:<13} {what:<8} {a} {r['a']}/{total}, {b} {r['b']}/{total}; only {a} {r['only_a']}, "
                     f"only {b} {r['only_b']}; difference {difference(r)}")
    if "combined" in result:
        lines.append(f"combined (strongreject refused + benign answered) / 2: difference {difference(result['combined'])}")
    return "\n".join(lines)


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pair", nargs=2, action="append", required=True, metavar=("A", "B"),
                   help="two evaluate.py output folders on the same prompts; repeat for more seeds")
    p.add_argument("--names", nargs=2, default=("A", "B"), metavar=("A", "B"), help="what to call A and B")
    args = p.parse_args(argv)
    for d in (d for pair in args.pair for d in pair):
        if not os.path.isfile(os.path.join(d, "completions.jsonl")):
            p.error(f"{d}: no completions.jsonl (not an evaluate.py --out folder)")
    try:
        result = paired([(read(a), read(b)) for a, b in args.pair])
    except ValueError as e:  # a damaged completions.jsonl (file:line), or folders on other prompts
        p.error(str(e))
    if not result:
        p.error("the folders have no prompt set in common")
    print(report(result, len(args.pair), *args.names))
    return result


if __name__ == "__main__":
    main()
