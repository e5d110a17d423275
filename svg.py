"""Pictures as SVG text, with the standard library only: the loss curve train.py writes beside its
log, the route of a chain through the experts (sample.py --trace) and the skip mask.

    python svg.py runs/smollm2-135m-instruct/metrics.jsonl > loss.svg
    python svg.py --mask > mask.svg      # mote.skip_mask for a short chain of the demo data, analysis dropped
    python sample.py --prompt "How do I pick a lock?" --trace route.svg

Text is monospace, so the layout needs no font metrics: a character is 0.6 font sizes wide.
Every drawn token and mask cell carries data-* attributes (its id, step, expert, probability) so
that the tests read back what was drawn.
"""
import argparse
import json
import os
import sys
from xml.sax.saxutils import escape, quoteattr

import torch

import mote
import tokenizer
from data import read_chains
from model import checkpoint_args

W, H, PAD = 640, 360, 48  # the picture, and the margin around the plot
SERIES = (("loss", "training", "#9aa5b1"), ("val_loss", "validation", "#d1495b"),
          ("val_analysis", "validation, analysis", "#e3a008"), ("val_guidance", "validation, guidance", "#1c7ed6"),
          ("val_response", "validation, response", "#2f9e44"))  # key in metrics.jsonl, label, colour


def loss_curve(records: list) -> str:
    """metrics.jsonl's records -> an SVG of the training loss and the validation losses against
    iterations (iteration 0: before training)."""
    points = {key: [(r["iter"], r[key]) for r in records if r.get(key) is not None] for key, _, _ in SERIES}
    xs = [x for p in points.values() for x, _ in p] or [0, 1]
    ys = [y for p in points.values() for _, y in p] or [0, 1]
    x0, x1, y0, y1 = min(xs), max(max(xs), min(xs) + 1), 0.0, max(ys) * 1.05 or 1.0
    px = lambda x: PAD + (x - x0) / (x1 - x0) * (W - 2 * PAD)
    py = lambda y: H - PAD - (y - y0) / (y1 - y0) * (H - 2 * PAD)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="black"/>',
           f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="black"/>',
           f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle">iteration</text>',
           f'<text x="14" y="{H / 2}" transform="rotate(-90 14 {H / 2})" text-anchor="middle">loss (nats per token)</text>']
    for i in range(5):  # axis ticks
        y, x = y0 + (y1 - y0) * i / 4, x0 + (x1 - x0) * i / 4
        out.append(f'<text x="{PAD - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.1f}</text>')
        out.append(f'<text x="{px(x):.1f}" y="{H - PAD + 16}" text-anchor="middle">{x:.0f}</text>')
    for n, (key, label, colour) in enumerate(SERIES):
        if not points[key]:
            continue
        line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points[key])
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="{1 if key == "loss" else 2}" points="{line}"/>')
        out.append(f'<text x="{W - PAD - 150}" y="{PAD + 14 * n}" fill="{colour}">{escape(label)}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


# ---- the route of a chain, and the skip mask ------------------------------------------------------

EXPERT_COLOURS = ("#ffd8a8", "#a5d8ff", "#b2f2bb", "#e5dbff")  # analysis, guidance, response, a 4th (token-gated)
SINGLE_COLOUR = "#dee2e6"  # the single LoRA: one expert reads every token
QUESTION_COLOUR = "#f1f3f5"  # the skip mask's question rows and columns
FONT, LINE, WIDTH, MARGIN = 13, 22, 960, 16
CHAR = 0.6 * FONT  # a monospace character's width


def shown(text: str) -> str:
    """A token's text as drawn: a newline as a visible mark, tabs and other control characters escaped."""
    return "".join("\u21b5" if c == "\n" else c if c.isprintable() or c == " " else f"\\x{ord(c):02x}" for c in text)


def page(width: float, height: float, body: list) -> str:
    return "\n".join([f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
                      f'font-family="monospace" font-size="{FONT}" xml:space="preserve">',
                      f'<rect width="{width:.0f}" height="{height:.0f}" fill="white"/>', *body, "</svg>"]) + "\n"


def route_picture(trace: dict, title: str = "") -> str:
    """sample.route_trace's record of one chain -> an SVG: each token on the colour of the expert that
    read it (a token-gated bank: its top expert, opacity its gate weight), the markers boxed, and at
    each choice of way a line with the probability of each marker, the path rule, and the way taken."""
    colour = {e: c for e, c, _ in trace["legend"]}
    gated = trace["gated"]  # token-gated: the weight of each token's top expert varies, drawn as opacity
    out, y = [], MARGIN + FONT
    if title:
        out.append(f'<text x="{MARGIN}" y="{y}" font-weight="bold">{escape(shown(title))}</text>')
        y += LINE
    out.append(f'<text x="{MARGIN}" y="{y}">colour: the expert that read the token (the question: the one that '
               f'reads it at inference); boxed: a step marker</text>')
    y += LINE
    for e, c, label in trace["legend"]:
        out.append(f'<rect x="{MARGIN}" y="{y - FONT}" width="{2 * CHAR}" height="{FONT + 4}" fill="{c}"/>'
                   f'<text x="{MARGIN + 3 * CHAR}" y="{y}" class="legend" data-expert="{e}">{escape(label)}</text>')
        y += LINE
    y += LINE / 2
    x = MARGIN
    for i, t in enumerate(trace["tokens"]):
        choice = trace["choices"].get(i)
        if choice:  # the decision, on its own lines before the marker it chose
            y += LINE if x > MARGIN else 0
            ways = " \u00b7 ".join(f"{m} {p:.2f}" for m, p in choice["probs"])
            rule = f"rule: {choice['rule']}" if choice["rule"] else "no rule: the likeliest marker"
            out.append(f'<g class="choice" data-probs={quoteattr(json.dumps(dict(choice["probs"])))} '
                       f'data-score="{choice["score"]}" data-threshold="{choice["threshold"]}" '
                       f'data-taken={quoteattr(choice["taken"])} font-style="italic" fill="#495057">'
                       f'<text x="{MARGIN}" y="{y}">choice of way, the model\'s probabilities: {escape(ways)}</text>'
                       f'<text x="{MARGIN}" y="{y + LINE}">{escape(rule)}; taken: {escape(choice["taken"])}</text></g>')
            x, y = MARGIN, y + 2 * LINE
        text = shown(t["text"])
        width = len(text) * CHAR
        opens = t["marker"] and i > 0 and trace["tokens"][i - 1]["step"] != t["step"]  # a step starts: a new line
        if (x + width > WIDTH - MARGIN or opens) and x > MARGIN:
            x, y = MARGIN, y + LINE
        opacity = f' fill-opacity="{t["weight"]:.2f}"' if gated else ""
        box, bold = ((' stroke="#212529" stroke-width="1.5"', ' font-weight="bold"') if t["marker"]
                     else (' stroke="white"', ""))  # a marker boxed; white lines between tokens
        out.append(f'<g class="token" data-id="{t["id"]}" data-step="{t["step"]}" data-expert="{t["expert"]}" '
                   f'data-weight="{t["weight"]:.4f}"><rect x="{x:.1f}" y="{y - FONT}" width="{width:.1f}" '
                   f'height="{FONT + 5}" fill="{colour[t["expert"]]}"{opacity}{box}/>'
                   f'<text x="{x:.1f}" y="{y}"{bold}>{escape(text)}</text></g>')
        x += width
        if t["text"].endswith("\n"):
            x, y = MARGIN, y + LINE
    return page(WIDTH, y + LINE, out)


def mask_picture(ids: list, labels: list, steps: list, mask, positions: list, title: str = "") -> str:
    """mote.skip_mask of one chain -> an SVG: the (T, T) grid, row q (a query token) against column
    k (a key), a filled cell where q may attend k, coloured by the key's step; rows and columns
    labelled by token (ids: their ids, kept as data-id); the positions skip_mask gives each token in
    the row beneath."""
    T, cell, side = len(labels), FONT + 3, 14 * CHAR  # side: the room for a label
    name = [shown(label).strip() or "\u2423" for label in labels]
    fill = [QUESTION_COLOUR if s < 0 else EXPERT_COLOURS[s] for s in steps]
    x0, y0 = MARGIN + side, MARGIN + 2 * LINE + side
    out = [f'<text x="{MARGIN}" y="{MARGIN + FONT}" font-weight="bold">{escape(title)}</text>',
           f'<text x="{MARGIN}" y="{MARGIN + FONT + LINE}">colour: the step of the key (grey question, orange analysis, '
           f'blue guidance, green response); position: as in the chain without the dropped step</text>']
    for i in range(T):
        out.append(f'<text x="{x0 - 4}" y="{y0 + i * cell + FONT}" text-anchor="end" class="row" '
                   f'data-id="{ids[i]}" data-step="{steps[i]}">{escape(name[i][:13])}</text>')
        cx = x0 + i * cell + FONT * 0.8
        out.append(f'<text x="{cx:.1f}" y="{y0 - 4}" transform="rotate(-90 {cx:.1f} {y0 - 4})" '
                   f'class="col">{escape(name[i][:13])}</text>')
        out.append(f'<text x="{x0 + i * cell + cell / 2:.1f}" y="{y0 + T * cell + FONT + 4}" text-anchor="middle" '
                   f'font-size="{FONT - 3}" class="position" data-k="{i}">{positions[i]}</text>')
    out.append(f'<rect x="{x0}" y="{y0}" width="{T * cell}" height="{T * cell}" fill="none" stroke="#adb5bd"/>')
    for q in range(T):
        for k in range(T):
            if mask[q][k]:
                out.append(f'<rect class="cell" data-q="{q}" data-k="{k}" x="{x0 + k * cell}" y="{y0 + q * cell}" '
                           f'width="{cell - 1}" height="{cell - 1}" fill="{fill[k]}" stroke="#868e96" stroke-width="0.5"/>')
    out.append(f'<text x="{MARGIN}" y="{y0 + T * cell + FONT + 4}" font-size="{FONT - 3}">position</text>')
    return page(x0 + T * cell + MARGIN, y0 + T * cell + LINE + MARGIN, out)


DEMO_CHAINS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo_chains.jsonl")


def demo_mask(base: str, chains: str = DEMO_CHAINS, drop: str = "analysis", keep: int = 8) -> str:
    """The mask picture of the shortest chain in `chains` that has all three steps, with `drop`
    dropped: its question and each step cut to their first `keep` tokens (a grid one can read),
    between their markers, as train.py lays a chain out (without the chat template)."""
    chain = min((c for c in read_chains(chains) if c.get("analysis") and c.get("guidance")),
                key=lambda c: len(c["question"] + c["analysis"] + c["guidance"] + c["response"]))
    V = checkpoint_args(base, [base]).vocab_size
    tok = tokenizer.load_tokenizer(base).with_special_tokens(mote.marker_tokens(V))
    ids = tok.encode(chain["question"])[:keep]
    for s, name in enumerate(mote.STEPS):
        ids += [mote.start_marker(V, s), *tok.encode(chain[name])[:keep], mote.end_marker(V, s)]
    steps = mote.token_steps(torch.tensor([ids]), V)
    dropped = torch.tensor([[name == drop for name in mote.STEPS]])
    mask, positions = mote.skip_mask(steps, dropped)
    return mask_picture(ids, [tok.decode([t]) for t in ids], steps[0].tolist(), mask[0].tolist(), positions[0].tolist(),
                        f"mote.skip_mask, the {drop} dropped: row q may attend column k where filled")


def main(argv=None):
    p = argparse.ArgumentParser(description="Pictures as SVG on standard output.")
    p.add_argument("metrics", nargs="?", help="a run's metrics.jsonl: the loss curve")
    p.add_argument("--mask", action="store_true", help="mote.skip_mask of a short demo chain, the analysis dropped")
    p.add_argument("--base", default="smollm2-135m-instruct.safetensors", help="--mask: whose tokenizer splits the chain")
    args = p.parse_args(argv)
    if args.mask == bool(args.metrics):
        p.error("give a metrics.jsonl or --mask")
    sys.stdout.write(demo_mask(args.base) if args.mask else loss_curve([json.loads(line) for line in open(args.metrics)]))


if __name__ == "__main__":
    main()
