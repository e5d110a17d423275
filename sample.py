"""Generate from a base, or from a base with MoTE experts that switch at the step markers.

    python sample.py --base smollm2-135m-instruct.safetensors --prompt "What is the capital of France?"
    python sample.py --adapters runs/demo --prompt "How do I pick a lock?" --path auto
    python sample.py --adapters runs/demo --prompts questions.txt --out answers.jsonl

With experts the model starts at the first step, and every token it emits is routed to the expert of
the step it belongs to (mote.next_steps, token by token): emitting <|guidance|> switches
the active expert to guidance, and so on, until <|/response|> ends the answer (METHOD.md sec. 3-4).
--path auto lets the model choose its steps (adaptive length); direct, analysis and full force the
markers of question -> response, question -> analysis -> response, and the full chain.
"""
import codecs
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

import cli
import mote
import svg
import tokenizer
from model import CheckpointError, KVCache, Transformer, causal_mask, resolve_dtype

PATHS = {"auto": None, "direct": (2,), "analysis": (0, 2), "full": (0, 1, 2)}
COLOURS = {mote.QUESTION: "", 0: "\033[33m", 1: "\033[36m", 2: "\033[32m"}  # analysis yellow, guidance cyan, response green


def pick(logits, temperature: float, top_p: float, generators=None):
    """logits (B, V) -> next ids (B,): greedy at temperature 0, else nucleus (top-p) sampling, row i
    drawing from its own generators[i] (row_generators), so that it does not depend on its batch."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    p, idx = probs.sort(dim=-1, descending=True)
    p[(p.cumsum(-1) - p) > top_p] = 0  # keep the smallest head whose mass reaches top_p
    p = p / p.sum(-1, keepdim=True)
    choice = torch.cat([torch.multinomial(p[i], 1, generator=g) for i, g in enumerate(generators)])
    return idx.gather(-1, choice[:, None])[:, 0]


def row_generators(prompts: list, seed: int, device) -> list:
    """One random generator per row, seeded by the seed and the row's prompt ids: a prompt's sample
    is the same in any batch, at any position, and after a resumed run."""
    digests = (hashlib.sha256(json.dumps([seed, list(p)]).encode()).digest() for p in prompts)
    return [torch.Generator(device=device).manual_seed(int.from_bytes(d[:8], "little") >> 1) for d in digests]


@dataclass
class ChainState:
    """What the sampler knows of one row's chain, updated in O(1) per token (advance): the grammar
    never rescans what was generated."""
    step: int = mote.QUESTION  # the step of the last token (mote.token_steps)
    p_steps: float = 1.0  # steps_probability at the question's end, kept by take_steps for the second choice
    inside: bool = False  # a step is open: its start marker came, its end marker not yet
    n_text: int = 0  # text tokens in the open step

    def advance(self, token: int, base_vocab: int):
        if token < base_vocab:
            self.n_text += 1
            return
        self.step, self.inside, self.n_text = (token - base_vocab) // 2, (token - base_vocab) % 2 == 0, 0

    @property
    def ended(self) -> bool:  # <|/response|> came
        return self.step == mote.STEPS.index("response") and not self.inside


def step_grammar(chain: ChainState, path, base_vocab: int, max_step_tokens: int = 0):
    """Which markers may come next in a row, and whether plain text may (the chain's grammar):
    first a start marker; inside step s, text or s's end marker (only the end marker once the step
    has max_step_tokens tokens, if that is set); after an end marker, the start marker of a later
    step (auto: any later one, a forced path: its next one). -> (markers, text_ok), or None when
    the response has ended."""
    if chain.ended:
        return None
    if chain.inside:
        return [mote.end_marker(base_vocab, chain.step)], not (max_step_tokens and chain.n_text >= max_step_tokens)
    later = [s for s in PATHS[path] or (0, 1, 2) if s > chain.step]  # QUESTION (-1): every step is later
    return [mote.start_marker(base_vocab, s) for s in (later if path == "auto" else later[:1])], False


def left_padded(prompts: list, S: int, pad_id: int, device):
    """A batch of prompts, left-padded to the longest (L tokens), for a cache of S slots:
    tokens (B, L); valid (B, S), the slots a query may attend: a row's prompt tokens (each later slot
    becomes valid once written); positions (B, L), 0 at each prompt's first token; and the prefill
    mask (B, L, S): causal over the prompt, padding hidden, a padding query sees itself (no empty row)."""
    B, L = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(B, S, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, L - len(p):], valid[i, L - len(p):L] = torch.tensor(p), True
    positions = (valid[:, :L].cumsum(-1) - 1).clamp(min=0)
    mask = causal_mask(L, S, 0, device) & valid[:, None, :] | torch.eye(L, S, dtype=torch.bool, device=device)
    return tokens, valid, positions, mask


@torch.no_grad()
def next_token_probs(model, prompts: list) -> torch.Tensor:
    """The model's next-token distribution after each prompt (B, vocab), fp32: one batched pass."""
    L = max(len(p) for p in prompts)
    tokens, _, positions, mask = left_padded(prompts, L, 0, next(model.parameters()).device)
    return torch.softmax(model(tokens, positions=positions, mask=mask)[:, -1].float(), dim=-1)


@torch.no_grad()
def generate(model, prompts: list, stop_ids, max_new_tokens=256, experts=False, path="auto",
             temperature=0.0, top_p=1.0, seed=0, merge=False, on_token=None, max_step_tokens=0, steps_threshold=None,
             second_choice=False):
    """Batched decoding with a static KV cache. prompts: lists of ids -> lists of generated ids; a
    row ends at one of stop_ids (none: exactly max_new_tokens) or, with experts, after <|/response|>.

    Prompts are left-padded; padding is masked out of attention and positions start at each
    prompt's first token, so a row decodes exactly as it would alone (and samples from its own
    generator). With experts=True each new token is routed to the expert of its step
    (mote.next_steps) and the step grammar is enforced; merge=True (one row, mergeable experts: not
    token-gated) folds the active experts into the weights at every step change. Every decoding
    step has the same shapes (KVCache) and one host sync (the new ids). Generation stops at the
    model's context. on_token(row, token, step) is called for each new token (step: its reasoning
    step, or None without experts). steps_threshold: the auto path's first choice (take_steps), and
    with second_choice its choice after the analysis too."""
    device = next(model.parameters()).device
    V, context = model.args.vocab_size, model.args.max_seq_len
    B, L = len(prompts), max(len(p) for p in prompts)
    if L >= context:
        raise ValueError(f"a prompt of {L} tokens does not fit the model's context ({context} tokens)")
    max_new_tokens = min(max_new_tokens, context - L)
    S = L + max_new_tokens  # every slot of the cache
    tokens, valid, positions, mask = left_padded(prompts, S, stop_ids[0] if stop_ids else 0, device)
    cache = KVCache(model.args, B, S, device, model.dtype)
    question_expert = torch.full((B,), mote.INFERENCE_QUESTION_EXPERT, device=device)
    generators = row_generators(prompts, seed, device) if temperature > 0 else None
    merge = merge and experts and B == 1 and mote.mergeable(model)
    steps = mote.token_steps(tokens, V)  # (B, L), then (B,): the step of each row's last token
    chains = [ChainState() for _ in prompts]  # a prompt may hold steps already (a chain to continue)
    for chain, prompt in zip(chains, prompts):
        for token in prompt:
            chain.advance(token, V)
    merged = None  # the expert folded into the weights (merge=True)

    def forward(tokens, steps, positions, mask):
        nonlocal merged
        route = mote.route(steps, question_expert) if experts else None  # each new token's expert
        expert = mote.INFERENCE_QUESTION_EXPERT if chains[0].step == mote.QUESTION else chains[0].step
        if merge and expert != merged:  # a step starts: fold its experts into the weights
            merged = expert
            mote.merge_step(model, merged)
        return model(tokens, positions=positions, mask=mask, cache=cache, route=route)[:, -1].float()

    logits = forward(tokens, steps, positions, mask)  # prefill
    steps = steps[:, -1]
    out, done = [[] for _ in range(B)], [False] * B
    for t in range(max_new_tokens):
        if experts:
            logits = constrain(logits, [step_grammar(c, path, V, max_step_tokens) for c in chains], V, stop_ids)
            if path == "auto" and steps_threshold is not None:
                logits = take_steps(logits, chains, V, steps_threshold, second_choice)
        nxt = pick(logits, temperature, top_p, generators)
        for i, token in enumerate(nxt.tolist()):  # the step's one host sync
            if done[i]:
                continue
            out[i].append(token)
            chains[i].advance(token, V)
            if on_token:
                on_token(i, token, chains[i].step if experts else None)
            done[i] = token in stop_ids or (experts and chains[i].ended)
        if all(done) or t == max_new_tokens - 1:
            break
        steps = mote.next_steps(steps, nxt, V)
        valid[:, L + t] = True  # the new token's slot
        positions = positions[:, -1:] + 1
        logits = forward(nxt[:, None], steps[:, None], positions, valid[:, None, :])
    if merged is not None:
        mote.merge_step(model, None)
    return out


def generate_batches(model, tok, prompts: list, batch_size: int, bar=None, **gen) -> list:
    """generate() over prompt id lists in batches of similar length (sorted: little padding).
    -> the generated ids of each prompt, in input order. bar: a tqdm bar advanced per prompt."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [None] * len(prompts)
    for k in range(0, len(order), batch_size):
        rows = order[k:k + batch_size]
        for i, ids in zip(rows, generate(model, [prompts[i] for i in rows], tok.stop_ids, **gen)):
            out[i] = ids
        if bar is not None:
            bar.update(len(rows))
    return out


def constrain(logits, grammars, base_vocab, stop_ids):
    """Set to -inf the logits of tokens the step grammar forbids in each row (B, V + 6). A chain
    ends with <|/response|>, so a stop token (end of turn) is never allowed inside it. Broken
    experts cannot break the grammar: NaN scores count as -inf, +inf as the largest float, and a
    row whose allowed tokens all score -inf gets them at 0 (greedy then takes the first of them)."""
    allowed = torch.ones_like(logits, dtype=torch.bool)
    for i, grammar in enumerate(grammars):
        if grammar is None:  # the chain has ended: the row is done
            continue
        markers, text_ok = grammar
        allowed[i] = False
        allowed[i, markers] = True
        if text_ok:
            allowed[i, :base_vocab] = True
            allowed[i, stop_ids] = False
    logits = logits.nan_to_num(nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)
    logits = logits.masked_fill(~allowed, float("-inf"))
    dead = torch.isinf(logits).all(-1, keepdim=True)  # (B, 1): nothing allowed scores above -inf
    return torch.where(dead & allowed, 0.0, logits)


def steps_probability(logits, base_vocab: int):
    """P(<|analysis|>) + P(<|guidance|>), the probabilities taken over the three start markers: the
    model's score for thinking before it answers. logits (..., V + 6) -> (...)."""
    starts = [mote.start_marker(base_vocab, s) for s in range(len(mote.STEPS))]
    return torch.softmax(logits[..., starts].float(), -1)[..., :-1].sum(-1)


def rule_score(logits, chain: ChainState, base_vocab: int, second_choice: bool = False):
    """The path rule's score for one row (logits (V + 6,)), or None where the rule makes no choice:
    at the question's end P(steps) (steps_probability), and with second_choice, once the analysis
    has ended, P(steps) x P(<|guidance|> | the analysis), the guidance and the response scored
    against each other (chain.p_steps: the first score, kept by take_steps)."""
    if chain.step == mote.QUESTION:
        return float(steps_probability(logits, base_vocab))
    if second_choice and chain.step == 0 and not chain.inside:  # the analysis has just ended
        guidance, response = (mote.start_marker(base_vocab, s) for s in (1, 2))
        return chain.p_steps * float(torch.softmax(logits[[guidance, response]].float(), -1)[0])
    return None


def take_steps(logits, chains, base_vocab: int, threshold: float, second_choice: bool = False):
    """The auto path's choices by a threshold instead of the argmax (ours; --steps-threshold). The
    model's path decision is a classifier; this sets its operating point, chosen on the development
    sets (calibrate.py). logits (B, V + 6), constrained; changed in place for the rows at a choice.

    First choice, at the question's end: a row takes the steps iff rule_score (P(steps)) >= threshold,
    and answers directly (<|response|>) otherwise.
    Second choice (second_choice, --second-choice): the steps then start with the analysis, and at
    its end the row takes the guidance iff rule_score, P(steps) x P(<|guidance|> | the analysis), >=
    threshold; otherwise it answers (analysis, then response). So the analysis informs the decision,
    and with the product one threshold serves both choices: a question that fails the first fails
    the second."""
    starts = [mote.start_marker(base_vocab, s) for s in range(len(mote.STEPS))]
    guidance, response = starts[1:]
    for i, chain in enumerate(chains):
        score = rule_score(logits[i], chain, base_vocab, second_choice)
        if score is None:
            continue
        if chain.step == mote.QUESTION:
            chain.p_steps = score
            into = (starts[1:] if second_choice else starts[-1:])  # forbidden when the row takes the steps
            logits[i, into if score >= threshold else starts[:-1]] = float("-inf")
        else:
            logits[i, response if score >= threshold else guidance] = float("-inf")
    return logits


def split_steps(tokens: list, base_vocab: int, stop_ids=()) -> dict:
    """Generated ids -> the text ids of each step, markers and stop tokens removed: {"analysis": [...], ...}."""
    steps = mote.token_steps(torch.tensor([tokens]), base_vocab)[0].tolist() if tokens else []
    return {name: [t for t, s in zip(tokens, steps) if s == i and t < base_vocab and t not in stop_ids]
            for i, name in enumerate(mote.STEPS)}


class Streamer:
    """Prints row 0 as it is generated, with a label for each step's expert, and its text in the
    expert's colour when standard output is a terminal (not when piped, nor when NO_COLOR is set).
    Decodes incrementally: a token's bytes go through a UTF-8 decoder that holds back a partly
    generated character, so each token costs the same however long the answer is."""

    def __init__(self, tok, base_vocab, experts):
        self.tok, self.V, self.experts = tok, base_vocab, experts
        self.step, self.tty = "start", sys.stdout.isatty() and not os.environ.get("NO_COLOR")  # no-color.org
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, row, token, step):
        if row != 0:
            return
        if step != self.step and self.experts:  # the next expert takes over: label its span
            self.step = step
            label = f"[{mote.STEPS[step]} expert]"
            print(f"\n{COLOURS[step]}{label}\033[0m " if self.tty else f"\n{label} ", end="", flush=True)
        if token < self.V and token not in self.tok.stop_ids:
            new = self.utf8.decode(self.tok.decode_bytes([token]))
            print(COLOURS[step] + new + "\033[0m" if self.tty and self.experts else new, end="", flush=True)


@torch.no_grad()
def route_trace(model, tok, prompt: list, ids: list, path: str = "auto", steps_threshold=None,
                second_choice: bool = False, max_step_tokens: int = 0) -> dict:
    """What the route picture of one chain shows (--trace, svg.route_picture), from one teacher-forced
    pass over prompt + ids with the route generate used (the same logits the sampler saw, to float
    rounding):

    tokens:  every token, its step (mote.token_steps), the expert that read it (mote.route; the
             question: INFERENCE_QUESTION_EXPERT) and that expert's mixing weight; for a token-gated
             bank, the expert with the highest gate probability (the mean over the banks) and that probability.
    choices: {index in tokens: ...} where the sampler chose a way (the grammar allowed more than one
             marker and no text): the probability of each allowed marker, the path rule's score and
             threshold if a rule was used (rule_score), and the marker taken.
    legend:  (expert, colour, label) of each expert drawn; gated: whether the weights are a gate's."""
    V, cfg = model.args.vocab_size, model.expert_config
    seq = torch.tensor([prompt + ids], device=next(model.parameters()).device)
    steps = mote.token_steps(seq, V)
    route = mote.route(steps, torch.full((1,), mote.INFERENCE_QUESTION_EXPERT, device=seq.device))
    logits = model(seq, route=route)[0].float()  # (T, V + 6): position t scores token t + 1
    bank = mote.banks(model)[0]
    if cfg.routing == "token":
        gate = torch.stack([b.gate_probs[0].float() for b in mote.banks(model)]).mean(0)  # (T, E)
        weight, expert = gate.max(-1)
        legend = [(e, svg.EXPERT_COLOURS[e], f"expert {e} (token-gated; opacity: its gate probability)")
                  for e in range(cfg.n_experts)]
    elif cfg.routing == "single":
        expert, weight = torch.zeros_like(route[0]), torch.ones(seq.shape[1])
        legend = [(0, svg.SINGLE_COLOUR, "the single LoRA (every token, weight 1)")]
    else:
        expert, weight = route[0], bank.mix[route[0], route[0]]
        shared = f" + shared expert x {1 - cfg.alpha:g}" if cfg.shared else ""
        legend = [(e, svg.EXPERT_COLOURS[e], f"{name} expert x {float(bank.mix[e, e]):g}{shared}")
                  for e, name in enumerate(mote.STEPS)]
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character split over tokens: on its last
    tokens = [dict(id=t, text=utf8.decode(tok.decode_bytes([t])), step=s, expert=e, weight=w, marker=t >= V)
              for t, s, e, w in zip(seq[0].tolist(), steps[0].tolist(), expert.tolist(), weight.tolist())]
    chain, choices = ChainState(), {}
    for t in prompt:
        chain.advance(t, V)
    for k, t in enumerate(ids):
        markers, text_ok = step_grammar(chain, path, V, max_step_tokens)
        if len(markers) > 1 and not text_ok:
            row = logits[len(prompt) + k - 1]
            score = rule_score(row, chain, V, second_choice) if steps_threshold is not None else None
            rule = None
            if score is not None:
                if chain.step == mote.QUESTION:
                    chain.p_steps = score  # as take_steps keeps it, for the second choice
                what = "P(steps)" if chain.step == mote.QUESTION else "P(steps) x P(guidance | analysis)"
                rule = f"{what} = {score:.3f} {'>=' if score >= steps_threshold else '<'} {steps_threshold:g}"
            choices[len(prompt) + k] = dict(
                probs=[(tok.decode([m]), float(p)) for m, p in zip(markers, torch.softmax(row[markers], -1))],
                score=score, threshold=steps_threshold if rule else None, rule=rule, taken=tok.decode([t]))
        chain.advance(t, V)
    return dict(tokens=tokens, choices=choices, legend=legend, gated=cfg.routing == "token")


RUNS = "runs"  # train.py's run folders, under the working directory
RULE_FILE = "path_rule.json"  # a run folder's path rule, chosen on the development sets (calibrate.py --save)


def latest_run(root: str = RUNS) -> str:
    """The most recently finished run under root (the folder whose adapters.safetensors is newest)."""
    done = [os.path.join(root, d) for d in (os.listdir(root) if os.path.isdir(root) else [])
            if os.path.exists(os.path.join(root, d, "adapters.safetensors"))]
    if not done:
        sys.exit(f"error: {root}/: holds no finished run (a folder with adapters.safetensors); train one with "
                 "python train.py --base BASE, or give --adapters or --base")
    return max(done, key=lambda d: os.path.getmtime(os.path.join(d, "adapters.safetensors")))


def path_rule(adapters: str | None) -> dict:
    """The path rule stored in a run folder (calibrate.py writes RULE_FILE there), or {} (argmax):
    {"steps_threshold": T, "second_choice": bool} for generate."""
    path = os.path.join(adapters, RULE_FILE) if adapters and os.path.isdir(adapters) else ""
    if not os.path.exists(path):
        return {}
    try:
        rule = json.load(open(path))
        return {"steps_threshold": float(rule["steps_threshold"]), "second_choice": bool(rule["second_choice"])}
    except (ValueError, KeyError, TypeError):
        sys.exit(f"error: {path}: not a path rule written by calibrate.py; run calibrate.py --adapters {adapters} again, "
                 "or delete it for the plain argmax path")


def load(base: str | None, adapters: str | None, device: str, dtype: str = "auto"):
    """The base (with its tokenizer) and, if given, the trained experts on it, all in the base's
    dtype (model.choose_dtype). The base defaults to the one the run folder's config names."""
    if adapters and os.path.isdir(adapters):
        if base is None and os.path.exists(os.path.join(adapters, "train_config.json")):
            config = json.load(open(os.path.join(adapters, "train_config.json")))
            base = config["base"] if os.path.exists(config["base"]) else config.get("base_abspath", config["base"])
        adapters = os.path.join(adapters, "adapters.safetensors")
    if adapters and not os.path.exists(adapters):
        sys.exit(f"error: {adapters}: does not exist (--adapters takes a folder train.py wrote, once its run "
                 "has finished, or the adapters.safetensors in it)")
    if base is None:
        sys.exit("error: give --base (or --adapters DIR written by train.py, which names its base)")
    try:
        dtype, why = resolve_dtype(dtype, device)
        model = Transformer.from_pretrained(base, dtype=dtype, device=device)
        tok = tokenizer.load_tokenizer(base)
        if adapters:
            mote.cast_experts(mote.load_adapters(model, adapters), model.dtype)
            tok = tok.with_special_tokens(mote.marker_tokens(model.args.vocab_size))
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"dtype: {str(dtype).removeprefix('torch.')} ({why})", file=sys.stderr)
    return model, tok


def rule_flags(p):
    """--steps-threshold and --second-choice, shared by sample.py and evaluate.py: by default the run
    folder's stored rule (path_rule), --argmax for none; a typed threshold overrides the stored one."""
    p.add_argument("--steps-threshold", type=cli.fraction, help="--path auto: take the steps iff their probability "
                   "at the question's end is at least this (take_steps; default: the run folder's rule)")
    p.add_argument("--second-choice", action="store_true", help="with --steps-threshold T: start the steps with the "
                   "analysis, then take the guidance iff P(steps) x P(guidance | analysis) >= T (take_steps)")
    p.add_argument("--argmax", action="store_true", help="ignore the run folder's rule: the likeliest marker decides")


def resolve_rule(p, args) -> dict:
    """The path rule to generate with: typed flags, else the run folder's (unless --argmax), else argmax."""
    if args.second_choice and args.steps_threshold is None:
        p.error("--second-choice: give --steps-threshold T, the threshold both choices use")
    if args.steps_threshold is not None:
        return {"steps_threshold": args.steps_threshold, "second_choice": args.second_choice}
    rule = {} if args.argmax else path_rule(args.adapters)
    if rule:
        print(f"path rule: {os.path.join(args.adapters, RULE_FILE)}: --steps-threshold {rule['steps_threshold']}"
              f"{' --second-choice' * rule['second_choice']} (--argmax for none)", file=sys.stderr)
    return rule or {"steps_threshold": None, "second_choice": False}


def read_prompts(path: str) -> dict:
    """Questions from a file: one per line, or JSON objects with a 'question' string. Blank lines
    are skipped. -> {line number in the file: question}, in file order."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        sys.exit(f"error: {path}: {e.strerror}")
    except UnicodeDecodeError as e:
        sys.exit(f"error: {path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8")
    questions = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)["question"] if line.lstrip().startswith("{") else line
        except (json.JSONDecodeError, KeyError, TypeError):
            q = None
        if not isinstance(q, str) or not q.strip():
            sys.exit(f"error: {path}:{n}: expected a question per line or a JSON object with a 'question' string")
        questions[n] = q
    if not questions:
        sys.exit(f"error: {path}: no questions (the file is empty or blank)")
    return questions


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", help="base checkpoint (default: the base the adapters were trained on)")
    p.add_argument("--adapters", help="a train.py output directory, or its adapters.safetensors")
    p.add_argument("--prompt", help="one question")
    p.add_argument("--prompts", help="a file of questions (one per line, or JSONL with a 'question' field)")
    p.add_argument("--out", help="with --prompts: write one JSON record per question here")
    p.add_argument("--path", choices=list(PATHS), default="auto", help="which steps the experts take")
    p.add_argument("--raw", action="store_true", help="continue the prompt as plain text, without the chat template")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=256)
    p.add_argument("--max-step-tokens", type=cli.count, default=0, help="close a step after this many tokens (0: no limit)")
    rule_flags(p)
    p.add_argument("--temperature", type=cli.nonnegative, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=cli.fraction, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=cli.positive_int, default=8)
    p.add_argument("--no-merge", action="store_true",
                   help="with one --prompt, keep the experts routed instead of folding the active ones into W0 at each step")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="the model's dtype; auto: bf16 on CUDA and on a CPU with native bf16, else fp32 (model.choose_dtype)")
    p.add_argument("--trace", metavar="FILE.svg", help="with --prompt: draw the chain's route through the experts "
                   "and each choice of way with its probabilities (route_trace, svg.route_picture)")
    args = p.parse_args(argv)
    if not (args.prompt or args.prompts):
        p.error("give --prompt or --prompts")
    if args.trace and not args.prompt:
        p.error("--trace draws one chain: give --prompt, not --prompts")
    if args.trace and not os.path.isdir(os.path.dirname(os.path.abspath(args.trace))):
        p.error(f"--trace {args.trace}: the folder {os.path.dirname(args.trace)}/ does not exist")
    if args.adapters is None and args.base is None:
        args.adapters = latest_run()
        print(f"adapters: {args.adapters} (the most recent finished run; --adapters or --base to choose)", file=sys.stderr)
    if args.trace and args.adapters is None:
        p.error(f"--trace {args.trace}: a base alone has no experts and no step markers to draw; give --adapters")
    rule = resolve_rule(p, args)
    questions = read_prompts(args.prompts) if args.prompts and not args.prompt else None  # fail fast on a bad file
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load(args.base, args.adapters, device, args.dtype)
    experts = args.adapters is not None
    V = model.args.vocab_size
    gen = dict(max_new_tokens=args.max_new_tokens, experts=experts, path=args.path,
               temperature=args.temperature, top_p=args.top_p, seed=args.seed, max_step_tokens=args.max_step_tokens, **rule)
    encode = tok.encode if args.raw else tok.chat

    if args.prompt:
        streamer = Streamer(tok, V, experts)
        print(args.prompt if args.raw else f"> {args.prompt}", end="" if args.raw else "\n", flush=True)
        t0 = time.time()
        try:
            ids = generate(model, [encode(args.prompt)], tok.stop_ids, merge=not args.no_merge, on_token=streamer, **gen)[0]
        except ValueError as e:
            sys.exit(f"error: --prompt: {e}")
        seconds = time.time() - t0
        print()
        if experts:
            answer = tok.decode(split_steps(ids, V, tok.stop_ids)["response"]).strip()
            print(f"\n--- final answer ---\n{answer}")
        if args.trace:
            trace = route_trace(model, tok, encode(args.prompt), ids, args.path, rule["steps_threshold"],
                                rule["second_choice"], args.max_step_tokens)
            with open(args.trace, "w", encoding="utf-8") as f:
                f.write(svg.route_picture(trace, f"{args.prompt}  ({args.adapters}, --path {args.path})"))
            print(f"wrote the route picture to {args.trace}", file=sys.stderr)
        print(f"\n({len(ids)} tokens in {seconds:.1f} s, {len(ids) / seconds:.1f} tokens/s)", file=sys.stderr)
        return

    encoded = [encode(q) for q in questions.values()]
    for n, ids in zip(questions, encoded):
        if len(ids) >= model.args.max_seq_len:
            sys.exit(f"error: {args.prompts}:{n}: the question has {len(ids)} tokens, more than the model's context "
                     f"({model.args.max_seq_len}); shorten it")
    sink = open(args.out, "w") if args.out else None  # only now: a bad file leaves --out as it was
    outs = generate_batches(model, tok, encoded, args.batch_size, **gen)
    for q, ids in zip(questions.values(), outs):
        record = {"question": q, "path": args.path if experts else None, "n_tokens": len(ids)}
        if experts:
            record |= {k: tok.decode(v).strip() for k, v in split_steps(ids, V, tok.stop_ids).items()}
        else:
            record["response"] = tok.decode([t for t in ids if t not in tok.stop_ids]).strip()
        print(json.dumps(record, ensure_ascii=False), file=sink or sys.stdout, flush=True)
    if sink:
        sink.close()
        print(f"wrote {len(questions)} records to {args.out}")


if __name__ == "__main__":
    main()
