"""Pictures as SVG text, with the standard library only: the loss curve train.py writes beside its log.

    python svg.py runs/smollm2-135m-instruct/metrics.jsonl > loss.svg
"""
import json
import sys
from xml.sax.saxutils import escape

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


if __name__ == "__main__":
    sys.stdout.write(loss_curve([json.loads(line) for line in open(sys.argv[1])]))
