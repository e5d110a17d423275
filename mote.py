"""MoTE: step markers, step-routed experts and step skipping on a frozen Llama (METHOD.md sec. 2-4).

How a token travels, from ids to experts:

    tokens (B, T) ──token_steps──► steps (B, T) in {QUESTION, 0 analysis, 1 guidance, 2 response}
                  ──route────────► route (B, T): each token's step expert (question: a chosen one)
                  ──model(tokens, route=route)──► every lora.ExpertBank mixes W0 x, its step's expert
                                                  and the shared expert for that token

A chain on the wire (METHOD.md sec. 2), any of the first two steps possibly missing:

    chat(X) <|analysis|> X_a <|/analysis|> <|guidance|> X_g <|/guidance|> <|response|> A <|/response|> <eot>
"""
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lora import ExpertBank

STEPS = ("analysis", "guidance", "response")
MARKERS = ("<|analysis|>", "<|/analysis|>", "<|guidance|>", "<|/guidance|>", "<|response|>", "<|/response|>")
QUESTION = -1  # the step id of the question and chat-template tokens before the first marker
INFERENCE_QUESTION_EXPERT = 0  # at inference the question is read by the analysis expert (ours; sec. 3)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def marker_tokens(base_vocab: int) -> dict:
    """The six marker tokens and their ids, appended after the base vocabulary (METHOD.md sec. 2)."""
    return {m: base_vocab + i for i, m in enumerate(MARKERS)}


def start_marker(base_vocab: int, step: int) -> int:
    return base_vocab + 2 * step


def end_marker(base_vocab: int, step: int) -> int:
    return base_vocab + 2 * step + 1


# ---- routing -----------------------------------------------------------------------------------

def token_steps(tokens, base_vocab: int):
    """The step of every token, read from the marker tokens (METHOD.md sec. 3).

    A token belongs to the step whose start marker it is or last follows; an end marker belongs to
    its own step (it follows its start marker); tokens before any start marker are QUESTION.
    Works on whole chains and on generated prefixes alike. tokens (B, T) -> steps (B, T) long.

        tokens: X X <a> x x </a> <r> y y </r> eot
        steps : Q Q  0  0 0   0   2  2 2   2   2"""
    T = tokens.shape[-1]
    starts = torch.tensor([start_marker(base_vocab, s) for s in range(len(STEPS))], device=tokens.device)
    is_start = tokens[..., None] == starts  # (B, T, 3)
    opened = torch.where(is_start.any(-1), is_start.int().argmax(-1), QUESTION)  # step a token opens, or -1
    index = torch.arange(T, device=tokens.device).expand_as(tokens)
    last_start = torch.where(opened >= 0, index, -1).cummax(dim=-1).values  # (B, T) latest start marker so far
    steps = opened.gather(-1, last_start.clamp(min=0))
    return torch.where(last_start >= 0, steps, QUESTION)


def next_steps(steps, tokens, base_vocab: int):
    """token_steps one token at a time, for decoding: the step of each new token (B,) given the step
    of the token before it (B,), QUESTION at first. A start marker opens its step; any other token
    (an end marker too) stays in the step it follows. Same result as token_steps, in O(1) per token."""
    offset = tokens - base_vocab
    return torch.where((offset >= 0) & (offset % 2 == 0), offset // 2, steps)


def route(steps, question_expert):
    """Each token's step expert: its own step, or question_expert (B,) for QUESTION tokens.

    Training draws question_expert at random per sequence ("any expert can process the question",
    draw_question_experts); inference uses INFERENCE_QUESTION_EXPERT."""
    return torch.where(steps == QUESTION, question_expert[:, None], steps)


def draw_question_experts(batch_size: int, generator=None, device=None, fixed: bool = False):
    """The expert that reads each training chain's question -> (B,): a step expert drawn at random
    ("any expert can process the question", sec. 3), or with fixed (ours, train.py --question-expert
    analysis) INFERENCE_QUESTION_EXPERT for all, as at inference. The draw is made either way, so the
    generator's later draws (the step drops) are the same."""
    drawn = torch.randint(0, len(STEPS), (batch_size,), generator=generator).to(device)
    return torch.full_like(drawn, INFERENCE_QUESTION_EXPERT) if fixed else drawn


# ---- step skipping -------------------------------------------------------------------------------

def draw_drops(batch_size: int, p: float, generator=None, device=None):
    """Which earlier steps each sequence drops: analysis and guidance each with probability p,
    the response never (METHOD.md sec. 4; p is ours, default 0.2). -> (B, 3) bool."""
    drop = torch.rand(batch_size, len(STEPS), generator=generator) < p
    drop[:, STEPS.index("response")] = False
    return drop.to(device)


def skip_mask(steps, dropped, valid=None):
    """Step skipping by attention masking (METHOD.md sec. 4).

    A dropped step block is invisible to every later block, and every later block takes positions
    as if it were absent; the question is always visible. Each block is then computed exactly as in
    the physically shortened chain, so one masked pass stands in for the chains (X, X_g, A),
    (X, X_a, A), (X, A), ... (the contract tests/test_mote.py checks to float precision).

    steps (B, T) from token_steps; dropped (B, 3) bool; valid (B, T) bool, False on padding.
    Returns mask (B, T, T) bool (True = query may attend key) and positions (B, T):

        steps   : Q Q a a g g r r      dropped = {analysis}
        mask row of an r token:        1 1 0 0 1 1 1 .
        positions: 0 1 2 3 2 3 4 5     (a position counts the tokens a token sees before it)"""
    B, T = steps.shape
    in_dropped = dropped.gather(1, steps.clamp(min=0)) & (steps != QUESTION)  # (B, T) key in a dropped block
    other_block = steps[:, :, None] != steps[:, None, :]  # (B, T, T) query and key in different blocks
    mask = torch.ones(T, T, dtype=torch.bool, device=steps.device).tril() & ~(in_dropped[:, None, :] & other_block)
    if valid is not None:
        mask = mask & valid[:, None, :]
        mask = mask | torch.eye(T, dtype=torch.bool, device=steps.device)  # a padding query sees itself: no empty rows
    positions = mask.sum(-1) - 1
    return mask, positions


def skip_targets(targets, steps, dropped):
    """The next-token targets of a skipping pass: a kept token predicts the next *kept* token (what
    follows it in the shortened chain: the question's last token predicts <|response|> when both
    earlier steps are dropped); a dropped block's tokens keep their own next tokens.

    targets (B, T): targets[t] = the id token t must predict, or -100 (not learned)."""
    B, T = steps.shape
    kept = ~(dropped.gather(1, steps.clamp(min=0)) & (steps != QUESTION))
    index = torch.arange(T, device=steps.device).expand(B, T)
    next_kept = torch.where(kept, index, T).flip(-1).cummin(-1).values.flip(-1)  # first kept index >= t
    next_kept = torch.cat([next_kept[:, 1:], torch.full_like(next_kept[:, :1], T)], dim=1)  # first kept > t
    source = torch.where(kept, next_kept - 1, index).clamp(max=T - 1)  # targets[t'] with t' + 1 = next kept
    return torch.where(kept & (next_kept >= T), -100, targets.gather(1, source))


# ---- attaching experts and markers ------------------------------------------------------------------

@dataclass
class ExpertConfig:
    rank: int = 16
    lora_alpha: float = 32.0  # LoRA scale s = lora_alpha / rank (ours)
    alpha: float = 0.5  # weight of the step expert; the shared expert gets 1 - alpha (METHOD.md sec. 3); unused if not shared
    routing: str = "step"  # step (MoTE) | token (gated MoE baseline) | single (one LoRA)
    shared: bool = True  # False: the "MoTE without shared expert" ablation
    top_k: int = 2  # experts per token with routing="token"

    @property
    def n_experts(self) -> int:
        if self.routing == "single":
            return 1
        return len(STEPS) + (1 if self.shared or self.routing == "token" else 0)


class MarkerEmbedding(nn.Module):
    """The frozen base embedding plus trainable rows for the marker ids (base_vocab, base_vocab + 6)."""

    def __init__(self, base: nn.Embedding, n_new: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.new = nn.Parameter(base.weight.detach().float().mean(0).repeat(n_new, 1))  # from the mean row

    def forward(self, tokens):
        V = self.base.num_embeddings
        x = self.base(tokens.clamp(max=V - 1))
        return torch.where((tokens >= V)[..., None], self.new[(tokens - V).clamp(min=0)].to(x.dtype), x)


class MarkerHead(nn.Module):
    """The frozen output head plus trainable rows scoring the marker ids."""

    def __init__(self, base: nn.Linear, n_new: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.new = nn.Parameter(base.weight.detach().float().mean(0).repeat(n_new, 1))

    def forward(self, h):
        return torch.cat([self.base(h), h @ self.new.to(h.dtype).T], dim=-1)


def attach(model, cfg: ExpertConfig = ExpertConfig()):
    """Freeze the base, wrap all seven linear layers of every block in an ExpertBank, and append the
    six trainable marker rows to the embedding and the output head (METHOD.md sec. 2-3).
    Returns the model (changed in place)."""
    model.requires_grad_(False)
    for block in model.layers:
        for name in LINEARS:
            parent, attr = block.get_submodule(name.split(".")[0]), name.split(".")[1]
            setattr(parent, attr, ExpertBank(getattr(parent, attr), cfg.n_experts, cfg.rank, cfg.lora_alpha,
                                             cfg.routing, cfg.shared, cfg.alpha, cfg.top_k))
    model.embed_tokens = MarkerEmbedding(model.embed_tokens, len(MARKERS))
    model.lm_head = MarkerHead(model.lm_head, len(MARKERS))
    model.expert_config = cfg
    return model


def banks(model):
    return [m for m in model.modules() if isinstance(m, ExpertBank)]


def parameter_counts(model) -> tuple:
    """(trainable, total) parameter counts; a tied embedding/head is counted once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)


def balance_loss(model, counted):
    """The token-gated banks' load-balancing loss of the last forward, averaged over the banks, over
    the tokens where counted (B, T) is True (lora.ExpertBank.balance_loss); 0 for the other routings."""
    gated = [b for b in banks(model) if b.routing == "token"]
    if not gated:
        return torch.zeros((), device=counted.device)
    return torch.stack([b.balance_loss(counted) for b in gated]).mean()


def mergeable(model) -> bool:
    """Whether the experts can be folded into the weights per step: step routing (MoTE, with or
    without the shared expert) and a single LoRA can; a token-gated bank cannot (lora.merge_weights)."""
    return all(b.routing != "token" for b in banks(model))


def merge_step(model, step):
    """Fold the experts of `step` into one weight per layer (lora.ExpertBank.merge); step=None
    unmerges. For decoding a single sequence: the sampler calls it when a step starts."""
    for b in banks(model):
        if step is None:
            b.unmerge()
        else:
            b.merge(step)


def cast_experts(model, dtype):
    """For inference: the experts, gates and marker rows in the base's dtype, cast once (they are
    trained in fp32; lora.py, Dtypes). Returns the model."""
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)
    for b in banks(model):
        b.mix = b.mix.to(dtype)
    return model


# ---- saving and loading the trainable tensors ----------------------------------------------------

def base_fingerprint(model) -> str:
    """Names and shapes of the frozen base tensors plus a hash of a few of them (rounded to bf16, so
    the same base loaded in fp32 or bf16 gives the same fingerprint)."""
    base = {k: p for k, p in model.named_parameters() if not p.requires_grad}
    h = hashlib.sha256(json.dumps({k: list(p.shape) for k, p in sorted(base.items())}).encode())
    for k in sorted(base)[:: max(1, len(base) // 8)]:
        h.update(base[k].detach().flatten()[:4096].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@contextmanager
def replacing(path: str):
    """Write a file at the yielded temporary path; it replaces `path` (os.replace) only when the block
    ends without an error, so `path` always holds the old file or the whole new one."""
    yield path + ".tmp"
    os.replace(path + ".tmp", path)


def save_adapters(model, path: str):
    """Write only the trainable tensors (experts, marker rows, gates) with their metadata."""
    tensors = {k: p.detach().contiguous() for k, p in model.named_parameters() if p.requires_grad}
    meta = {"expert_config": json.dumps(asdict(model.expert_config)), "steps": json.dumps(STEPS),
            "markers": json.dumps(MARKERS), "base_fingerprint": base_fingerprint(model),
            "base_args": model.args.to_json()}
    with replacing(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def load_adapters(model, path: str):
    """Attach experts to a frozen base as saved in `path` and load them. A missing file raises
    FileNotFoundError; a file that is not train.py's adapters, or adapters of another base, ValueError."""
    try:
        with safe_open(path, framework="pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        cfg, fingerprint = ExpertConfig(**json.loads(meta["expert_config"])), meta["base_fingerprint"]
    except (SafetensorError, KeyError, TypeError, ValueError) as e:  # another kind of file, cut short, or damaged
        reason = f"no {e} metadata" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"{path}: not an adapters file written by train.py ({reason})") from None
    attach(model, cfg)
    if fingerprint != base_fingerprint(model):
        raise ValueError(f"{path}: these adapters were trained on another base (fingerprint "
                         f"{fingerprint}, this base {base_fingerprint(model)}; base config "
                         f"{meta.get('base_args')})")
    expected = {k for k, p in model.named_parameters() if p.requires_grad}
    if expected != tensors.keys():
        raise ValueError(f"{path}: adapter tensors do not match the experts: missing "
                         f"{sorted(expected - tensors.keys())}, unexpected {sorted(tensors.keys() - expected)}")
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=False)
    return model
