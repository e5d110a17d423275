"""The outcome table and the ablation (the paper's Table 4, replayed small and offline) on SmolLM2-135M-Instruct.

    python experiment.py --variants mote,single --second-choice   # the README's table (~1 h 20 min)
    python experiment.py --question-expert random --out runs/exp-1e-3 --lr 1e-3 \
        --steps-threshold mote=0.54 --steps-threshold single=0.38   # every variant of Table 4, an earlier recipe (~5 h)
    python experiment.py --limit 50 --iters 10 --out runs/try    # a smaller version, to try the pipeline

Every variant is trained with the recipe of demo.sh (RECIPE: the hand-written demo chains, 120
iterations of 8 chains, about 1.6 epochs, lr 2e-3, each question read by the analysis expert), so
the same data and the same budget: MoTE, a single LoRA of the same rank, a token-gated MoE with a
balance loss, MoTE without the shared expert, MoTE without step skipping. With --generate N, the
base first writes chains for N HH-RLHF questions (python data.py generate) and every variant is
trained a second time on the demo chains plus those. Each model, and the base alone, is then
evaluated by evaluate.py (greedy, offline refusal-phrase judge) on the full prompt sets (SETS): on
the auto path (--paths adds forced ones), and again with the threshold T for its first choice that
calibrate.py chooses for it on the development sets (calibrate.target_threshold; --steps-threshold
VARIANT=T gives T instead; with --second-choice, the recipe's rule, it decides after the analysis
too). Every rate is printed with its count and 95% Wilson interval, and the combined score
(StrongREJECT refusal + benign compliance) / 2 with a 95% interval; then each variant's
difference from the single LoRA on the same prompts (compare.py: paired, so it says whether a
difference is real where two separate intervals only overlap). Every command is printed before it
runs; a step whose output exists is skipped, so an interrupted run continues. The tables are built
only from the files those commands write (metrics.jsonl, summary.json, completions.jsonl).
"""
import argparse
import json
import os
import re
import subprocess
import sys

import cli
import compare

BASE = "smollm2-135m-instruct.safetensors"
DEMO = "data/demo_chains.jsonl"
HH = os.path.join("..", "shared", "data", "hh-rlhf", "harmless-base-test.jsonl.gz")
RECIPE = ["--max-iters", "120", "--batch-size", "8", "--lr", "2e-3", "--eval-every", "20",
          "--question-expert", "analysis"]  # = demo.sh; --question-expert changes nothing for --routing single and token
SETS = ("strongreject", "hh", "own-harmful", "benign", "own-benign")  # harmful, then benign
VARIANTS = {"mote": ("MoTE", []), "single": ("single LoRA", ["--routing", "single"]),
            "token": ("token-gated MoE", ["--routing", "token"]),
            "no-shared": ("MoTE, no shared expert", ["--no-shared"]),
            "no-skip": ("MoTE, no step skipping", ["--skip-p", "0"])}
MAX_STEP_TOKENS = 64  # analysis, guidance: at most 58 and 45 tokens in the demo chains; the judge reads ~300
# characters of the response (64 tokens is ~280), so every model's answer, the base's too, gets 64 tokens


def run(cmd, done):
    """Run cmd (printed first) unless the file `done` exists already."""
    print("$ " + " ".join(cmd), flush=True)
    if os.path.exists(done):
        print(f"  (skipped: {done} exists)")
        return
    subprocess.run([sys.executable] + cmd[1:], check=True)


def variant_threshold(text: str) -> tuple:
    """'mote=0.44' -> ('mote', 0.44): a variant and its auto path's threshold, in [0, 1]."""
    variant, _, t = text.partition("=")
    try:
        if 0 <= float(t) <= 1:
            return variant, float(t)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r}: give VARIANT=T with T in [0, 1], e.g. mote=0.44")


def recipe(iters: int = 0, lr: float = 0, question_expert: str = "") -> list:
    """demo.sh's training flags, with --iters, --lr and --question-expert replacing its values when given."""
    flags = list(RECIPE)
    for flag, value in (("--max-iters", f"{iters:g}"), ("--lr", f"{lr:g}"), ("--question-expert", question_expert)):
        if value not in ("", "0"):
            flags[flags.index(flag) + 1] = value
    return flags


def main():
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/outcome")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    p.add_argument("--paths", default="auto", help="inference paths to evaluate MoTE on (auto,answer,full)")
    p.add_argument("--iters", type=cli.count, default=0, help="optimizer steps per variant (0: the recipe's 120)")
    p.add_argument("--lr", type=cli.positive, default=0, help="peak learning rate of every variant (default: the recipe's 2e-3)")
    p.add_argument("--question-expert", choices=("random", "analysis"), default="analysis",
                   help="who reads the question in training (train.py; random: the paper's, the recipe's before README step 13)")
    p.add_argument("--generate", type=cli.count, default=0, help="also train on chains self-generated for N questions")
    p.add_argument("--limit", type=cli.count, default=0, help="prompts per evaluation set (0: every prompt)")
    p.add_argument("--second-choice", action="store_true", help="the threshold rule decides after the analysis too "
                   "(sample.take_steps; README, the outcome, step 14): calibrated and evaluated so; rows auto-tT-second")
    p.add_argument("--steps-threshold", action="append", default=[], type=variant_threshold, metavar="VARIANT=T",
                   help="evaluate VARIANT's auto path with threshold T for its first choice (sample.take_steps) instead of "
                   "the one calibrate.py chooses for the targets on the development sets; repeat it for each variant")
    args = p.parse_args()
    variants, thresholds = args.variants.split(","), dict(args.steps_threshold)
    if any(v not in VARIANTS for v in variants + list(thresholds)):
        p.error(f"--variants, --steps-threshold: choose variants from {list(VARIANTS)}")
    if not os.path.exists(BASE):
        run(["python", "convert.py", "smollm2"], BASE)
    os.makedirs(args.out, exist_ok=True)
    data = [("demo", DEMO)]
    if args.generate:
        selfgen, mixed = os.path.join(args.out, "selfgen.jsonl"), os.path.join(args.out, "demo+selfgen.jsonl")
        run(["python", "data.py", "generate", "--base", BASE, "--questions", HH, "--out", selfgen,
             "--limit", str(args.generate), "--max-new-tokens", "96"], selfgen)
        with open(mixed, "w", encoding="utf-8") as f:
            f.write(open(DEMO, encoding="utf-8").read() + open(selfgen, encoding="utf-8").read())
        data.append(("demo + self-generated", mixed))
    evaluation = ["--sets", ",".join(SETS), "--limit", str(args.limit), "--batch-size", "32"]
    steps = ["--max-step-tokens", str(MAX_STEP_TOKENS), "--max-new-tokens", str(3 * MAX_STEP_TOKENS + 6)]
    second = ["--second-choice"] if args.second_choice else []
    rows = []
    out = os.path.join(args.out, "eval-base")  # its answer gets the budget of a response step
    run(["python", "evaluate.py", "--base", BASE, *evaluation, "--max-new-tokens", str(MAX_STEP_TOKENS), "--out", out],
        os.path.join(out, "summary.json"))
    rows.append(("-", "base alone", "-", out, None))
    for data_name, data_file in data:
        for v in variants:
            name, flags = VARIANTS[v]
            run_dir = os.path.join(args.out, f"{'demo' if data_file == DEMO else 'mixed'}-{v}")
            run(["python", "train.py", "--base", BASE, "--data", data_file, "--out", run_dir,
                 *recipe(args.iters, args.lr, args.question_expert), "--overwrite", *flags],
                os.path.join(run_dir, "adapters.safetensors"))
            t = thresholds.get(v)
            if t is None:  # the development sets choose it, never the evaluation sets
                chosen = os.path.join(run_dir, f"calibrate{'-second' * args.second_choice}.json")
                run(["python", "calibrate.py", "--adapters", run_dir, *second, "--max-step-tokens", str(MAX_STEP_TOKENS),
                     "--out", chosen], chosen)
                t = json.load(open(chosen))["target_threshold"]
            paths = [(p, []) for p in (args.paths.split(",") if v == "mote" else ["auto"])]
            paths.append((f"auto-t{t}{'-second' * args.second_choice}", ["--steps-threshold", str(t), *second]))
            for path, threshold in paths:
                out = os.path.join(run_dir, f"eval-{path}")
                run(["python", "evaluate.py", "--adapters", run_dir, "--path", path.split("-")[0], *threshold, *evaluation,
                     *steps, "--out", out], os.path.join(out, "summary.json"))
                rows.append((data_name, name, path, out, run_dir))
    print_table(rows)


def rate(s: dict, key: str) -> str:
    """'0.93 (291/313) [0.90, 0.95]': a rate with its count and 95% Wilson interval."""
    k = s[{"refusal": "refusals", "compliance": "compliances"}[key]]
    return "{:.2f} ({}/{}) [{:.2f}, {:.2f}]".format(s[f"{key}_rate"], k, s["n"], *s[f"{key}_ci"])


def combined(sets: dict) -> str:
    """(StrongREJECT refusal + benign compliance) / 2, with a 95% normal interval (the two sets are independent)."""
    a, b = sets["strongreject"], sets["benign"]
    p, q = a["refusal_rate"], b["compliance_rate"]
    half = 1.96 * (p * (1 - p) / a["n"] + q * (1 - q) / b["n"]) ** 0.5 / 2
    return f"{(p + q) / 2:.2f} ± {half:.2f}"


def path_mix(s: dict) -> str:
    """'A+G+R 290, R 23': how many answers took each path (A analysis, G guidance, R response)."""
    short = lambda p: "+".join(step[0].upper() for step in p.split("+"))
    return ", ".join(f"{short(p)} {r['n']}" for p, r in sorted(s["paths"].items(), key=lambda kv: -kv[1]["n"]))


def print_table(rows):
    harmful, benign = SETS[:3], SETS[3:]
    print("\n| data | variant | path | val loss analysis / guidance / response | "
          + " | ".join(f"refusal, {n}" for n in harmful) + " | " + " | ".join(f"compliance, {n}" for n in benign)
          + " | combined | tokens per answer |")
    print("|---" * (6 + len(SETS)) + "|")
    summaries = [json.load(open(os.path.join(eval_dir, "summary.json"))) for _, _, _, eval_dir, _ in rows]
    for (data_name, name, path, _, run_dir), s in zip(rows, summaries):
        losses = "-"
        if run_dir:
            last = json.loads(open(os.path.join(run_dir, "metrics.jsonl")).read().splitlines()[-1])
            losses = " / ".join(f"{last[k]:.2f}" if last.get(k) is not None else "-"
                                for k in ("val_analysis", "val_guidance", "val_response"))
        sets = s["sets"]
        print(f"| {data_name} | {name} | {path} | {losses} | " + " | ".join(rate(sets[n], "refusal") for n in harmful)
              + " | " + " | ".join(rate(sets[n], "compliance") for n in benign)
              + f" | {combined(sets)} | {s['overall']['mean_tokens']:.0f} |")
    print("\nPath mix (A analysis, G guidance, R response; R alone: a direct answer):\n")
    print("| data | variant | path | " + " | ".join(SETS) + " |")
    print("|---" * (3 + len(SETS)) + "|")
    for (data_name, name, path, _, run_dir), s in zip(rows, summaries):
        if run_dir:
            print(f"| {data_name} | {name} | {path} | " + " | ".join(path_mix(s["sets"][n]) for n in SETS) + " |")
    print_against_single(rows)


def print_against_single(rows):
    """Each trained variant minus the single LoRA of the same data on the same kind of path (the
    plain auto path against the plain auto path, a threshold against a threshold), paired over
    prompts (compare.paired): how many prompts only one of the two got right, and the differences
    with 95% intervals."""
    kind = lambda path: re.sub(r"-t[0-9.]+", "-t", path)  # auto-t0.31 -> auto-t, auto-t0.21-second -> auto-t-second
    single = {(d, kind(path)): out for d, name, path, out, _ in rows if name == "single LoRA"}
    others = [(d, name, path, out) for d, name, path, out, run_dir in rows
              if run_dir and name != "single LoRA" and (d, kind(path)) in single]
    if not others:
        return
    print("\nAgainst the single LoRA, on the same prompts (only: prompts only this variant / only the single LoRA "
          "got right; differences paired over prompts, 95% intervals; compare.py):\n")
    print("| data | variant | path | single LoRA's path | " + " | ".join(SETS) + " | combined difference |")
    print("|---" * (5 + len(SETS)) + "|")
    for d, name, path, out in others:
        theirs = single[d, kind(path)]
        r = compare.paired([(compare.read(out), compare.read(theirs))])
        print(f"| {d} | {name} | {path} | {os.path.basename(theirs).removeprefix('eval-')} | "
              + " | ".join(f"only {r[n]['only_a']} / {r[n]['only_b']}, {compare.difference(r[n], 2)}" for n in SETS)
              + f" | {compare.difference(r['combined'], 2)} |")


if __name__ == "__main__":
    main()
