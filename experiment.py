"""The ablation experiment (the paper's Table 4, replayed small and offline) on SmolLM2-135M-Instruct.

    python experiment.py                       # runs what is missing under runs/exp, prints the table
    python experiment.py --iters 10 --limit 50 --generate 40 --max-step-tokens 64   # a smaller version

Same data, same step budget, every variant: MoTE, single LoRA, token-gated MoE, MoTE without the
shared expert, MoTE without step skipping; on (a) the hand-written demo chains and (b) chains the
base wrote itself from HH-RLHF questions (python data.py generate). Then each is evaluated by
evaluate.py (greedy, offline refusal-phrase judge) on StrongREJECT, held-out HH-RLHF, benign-edgy
prompts and the project's own evaluation sets (full sets unless --limit), with the auto path, and
MoTE also with each forced path. Every rate is printed with its count and 95% Wilson interval. Every command is printed before it
runs; a step whose output exists is skipped, so an interrupted run continues. The table is built
only from the files those commands write (metrics.jsonl, summary.json).
"""
import argparse
import json
import os
import subprocess
import sys

BASE = "smollm2-135m-instruct.safetensors"
HH = os.path.join("..", "shared", "data", "hh-rlhf", "harmless-base-test.jsonl.gz")
SETS = ("strongreject", "hh", "own-harmful", "benign", "own-benign")  # harmful, then benign
VARIANTS = {"MoTE": [], "single LoRA": ["--routing", "single"], "token-gated MoE": ["--routing", "token"],
            "MoTE, no shared expert": ["--no-shared"], "MoTE, no step skipping": ["--skip-p", "0"]}


def run(cmd, done):
    """Run cmd (printed first) unless the file `done` exists already."""
    print("$ " + " ".join(cmd), flush=True)
    if os.path.exists(done):
        print(f"  (skipped: {done} exists)")
        return
    subprocess.run([sys.executable] + cmd[1:], check=True)


def slug(name):
    return name.lower().replace(", ", "-").replace(" ", "-")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/exp")
    p.add_argument("--iters", type=int, default=10, help="optimizer steps (iterations) per variant (batch 8)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--generate", type=int, default=40, help="questions to self-generate chains for")
    p.add_argument("--limit", type=int, default=0, help="prompts per evaluation set (0: every prompt)")
    p.add_argument("--max-step-tokens", type=int, default=64, help="a step is closed after this many tokens")
    args = p.parse_args()
    if not os.path.exists(BASE):
        run(["python", "convert.py", "smollm2"], BASE)
    selfgen = os.path.join(args.out, "selfgen.jsonl")
    os.makedirs(args.out, exist_ok=True)
    run(["python", "data.py", "generate", "--base", BASE, "--questions", HH, "--out", selfgen,
         "--limit", str(args.generate), "--max-new-tokens", "96"], selfgen)
    budget = 3 * args.max_step_tokens + 6  # room for the full chain: three steps and six markers
    evaluation = ["--sets", ",".join(SETS), "--limit", str(args.limit), "--max-new-tokens", str(budget),
                  "--max-step-tokens", str(args.max_step_tokens)]
    rows = []
    out = os.path.join(args.out, "eval-base")
    run(["python", "evaluate.py", "--base", BASE, *evaluation, "--out", out], os.path.join(out, "summary.json"))
    rows.append(("-", "base alone", "-", out, None))
    for data_name, data_file in (("demo", "data/demo_chains.jsonl"), ("self-generated", selfgen)):
        for name, flags in VARIANTS.items():
            run_dir = os.path.join(args.out, f"{slug(data_name)}-{slug(name)}")
            run(["python", "train.py", "--base", BASE, "--data", data_file, "--out", run_dir, "--max-iters",
                 str(args.iters), "--batch-size", "8", "--lr", str(args.lr), "--val-frac", "0.15", "--overwrite", *flags],
                os.path.join(run_dir, "adapters.safetensors"))
            for path in (["auto", "answer", "full"] if name == "MoTE" else ["auto"]):
                out = os.path.join(run_dir, f"eval-{path}")
                run(["python", "evaluate.py", "--adapters", run_dir, "--path", path, *evaluation, "--out", out],
                    os.path.join(out, "summary.json"))
                rows.append((data_name, name, path, out, run_dir))
    print_table(rows)


def rate(s: dict, key: str) -> str:
    """'0.93 (291/313) [0.90, 0.95]': a rate with its count and 95% Wilson interval."""
    k = s[{"refusal": "refusals", "compliance": "compliances"}[key]]
    return "{:.2f} ({}/{}) [{:.2f}, {:.2f}]".format(s[f"{key}_rate"], k, s["n"], *s[f"{key}_ci"])


def print_table(rows):
    harmful, benign = SETS[:3], SETS[3:]
    print("\n| data | variant | path | val loss analysis / guidance / response | "
          + " | ".join(f"refusal, {n}" for n in harmful) + " | " + " | ".join(f"compliance, {n}" for n in benign)
          + " | tokens per answer | path mix (harmful; benign) |")
    print("|---" * (6 + len(SETS)) + "|")
    for data_name, name, path, eval_dir, run_dir in rows:
        s = json.load(open(os.path.join(eval_dir, "summary.json")))
        losses = "-"
        if run_dir:
            last = json.loads(open(os.path.join(run_dir, "metrics.jsonl")).read().splitlines()[-1])
            losses = " / ".join(f"{last[k]:.2f}" if last.get(k) is not None else "-"
                                for k in ("val_analysis", "val_guidance", "val_response"))
        sets = s["sets"]
        mix = "; ".join(", ".join(f"{p} {r['n']}" for p, r in sets[n].get("paths", {}).items()) or "-"
                        for n in (harmful[0], benign[0]))
        print(f"| {data_name} | {name} | {path} | {losses} | " + " | ".join(rate(sets[n], "refusal") for n in harmful)
              + " | " + " | ".join(rate(sets[n], "compliance") for n in benign)
              + f" | {s['overall']['mean_tokens']:.0f} | {mix} |")


if __name__ == "__main__":
    main()
