"""The training objective as train.py composes it (METHOD.md sections 1-4), checked against oracles
that share no code with it:

  * chain_loss of a masked skipping pass == the per-token losses of physically shortened chains,
    encoded from chain dicts and run without any mask, for every drop pattern, with padding, with
    activation checkpointing on and off;
  * the gradient of an iteration does not depend on how its chains are split into micro-batches;
  * --conclusion-weight weighs the tokens of the analysis's last sentence, and only those;
    --harmful-weight the text of an analysis that concludes harmful, and only that;
  * each ablation flag changes exactly what it names (mixing table, drop rate, expert count)."""
import itertools
import json

import pytest
import torch
import torch.nn.functional as F

import data
import mote
import train
from model import ModelArgs, Transformer
from tokenizer import byte_tokenizer

V = 264
TOK = byte_tokenizer().with_special_tokens(mote.marker_tokens(V))
CHAINS = [  # every shape of chain: full, analysis only, guidance only, answer only
    {"question": "Can I pick this lock?", "analysis": "Lock picking. Verdict: harmless.", "guidance": "Ask why.", "response": "If it's yours."},
    {"question": "How do knots hold?", "analysis": "Benign.", "response": "Friction."},
    {"question": "Kill a process?", "guidance": "Explain kill.", "response": "Use kill PID."},
    {"question": "Hi", "response": "Hello there, friend!"},
]
OPTIONAL = ("analysis", "guidance")  # the steps a pass may drop (the response never)


def tiny_model(seed=0, **cfg):
    """A random tiny base with trained-looking experts (B != 0): every expert and the markers matter."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs.preset("tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    mote.attach(model, mote.ExpertConfig(**cfg)).train()
    with torch.no_grad():
        for b in mote.banks(model):
            b.B.normal_(0, 0.3)
        model.embed_tokens.new.normal_(0, 1.0)
        model.lm_head.new.normal_(0, 1.0)  # distinct marker logits: a wrong marker target must cost
    return model


def block_ranges(chain: dict) -> list:
    """[(block, first, end)] of encode_chain's layout, computed from the texts alone: the prompt,
    then each present step as <start> text <end>; the final end of turn belongs to the response."""
    ranges, at = [("question", 0, len(TOK.chat(chain["question"])))], len(TOK.chat(chain["question"]))
    for block, key in zip(mote.STEPS, ("analysis", "guidance", "response")):
        if chain.get(key):
            n = len(TOK.encode(chain[key].strip())) + 2 + (block == "response")
            ranges.append((block, at, at + n))
            at += n
    return ranges


def without(chain: dict, blocks) -> dict:
    return {k: v for k, v in chain.items() if k not in blocks}


def plain_losses(model, chain: dict, question_expert: int):
    """Per-position next-token losses of a chain run alone, causal, default positions, no mask ->
    (losses (T,), learned (T,) bool)."""
    tokens, targets, *_ = (torch.tensor([x]) for x in data.encode_chain(TOK, chain, V))
    route = mote.route(mote.token_steps(tokens, V), torch.tensor([question_expert]))
    logits = model(tokens, route=route)[0].float()
    return F.cross_entropy(logits, targets[0].clamp(min=0), reduction="none"), targets[0] != -100


def oracle_losses(model, chain: dict, dropped: set, question_expert: int):
    """What a skipping pass must compute for one chain, block by block: a kept block (and the
    question) as in the chain with every dropped step removed; a dropped block as in the chain
    with the dropped steps before it removed (it is still learned, with its own next tokens)."""
    out = []
    for block, _, _ in block_ranges(chain):
        before = set(OPTIONAL[:mote.STEPS.index(block)]) if block != "question" else set()
        view = without(chain, dropped if block not in dropped else dropped & before)
        losses, learned = plain_losses(model, view, question_expert)
        _, first, end = next(r for r in block_ranges(view) if r[0] == block)
        out.append(losses[first:end][learned[first:end]])
    return torch.cat(out)


PATTERNS = [set(p) for n in range(3) for p in itertools.combinations(OPTIONAL, n)]  # {}, {a}, {g}, {a, g}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("pattern", range(len(PATTERNS) + 1))
def test_chain_loss_equals_the_shortened_chains(pattern, checkpointing):
    """One masked pass over a padded batch == every chain shortened by hand (the last pattern
    drops a different set in each row)."""
    model = tiny_model()
    model.checkpointing = checkpointing
    drops = [PATTERNS[pattern]] * len(CHAINS) if pattern < len(PATTERNS) else PATTERNS
    dropped = torch.tensor([[s in d for s in mote.STEPS] for d in drops])
    qexp = torch.tensor([1, 2, 0, 1])
    batch = data.collate([data.encode_chain(TOK, c, V) for c in CHAINS], TOK.eot_id)
    with torch.enable_grad():
        losses, *_ = train.chain_loss(model, batch, V, qexp, dropped)
        losses.sum().backward()  # the checkpointed path recomputes in backward: it must run too
    expected = torch.cat([oracle_losses(model, c, d, int(q)) for c, d, q in zip(CHAINS, drops, qexp)])
    torch.testing.assert_close(losses.detach(), expected.detach(), atol=2e-5, rtol=2e-5)


def demo_chains(n=8):
    chains = data.read_chains("data/demo_chains.jsonl")
    return [data.encode_chain(TOK, c, V) for c in sorted(chains, key=lambda c: len(json.dumps(c)))[:n]]


@pytest.mark.parametrize("routing", ["step", "single"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_does_not_depend_on_the_micro_batch(routing, checkpointing):
    """The iteration's objective is the mean over all its learned tokens: micro-batches of 1, 2 and 8
    chains (different padding, different pass sizes) give the same gradient."""
    chains = demo_chains(8)
    g = torch.Generator().manual_seed(0)
    qexp, dropped = mote.draw_question_experts(8, g), mote.draw_drops(8, 0.5, g)
    grads = []
    for micro in (1, 2, 8):
        model = tiny_model(routing=routing)
        model.checkpointing = checkpointing
        train.train_iteration(model, chains, V, TOK.eot_id, micro, qexp, dropped, 0.0, "cpu", torch.float32)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    for other in grads[1:]:
        torch.testing.assert_close(other, grads[0], atol=1e-6, rtol=1e-4)


def test_the_iteration_loss_is_the_mean_over_learned_tokens_for_every_drop_pattern():
    """The iteration's loss is every learned token's loss over the learned-token count, with each
    chain shortened by its own drop pattern (the first block learned after the question's last
    token is the first marker of the shortened chain), against oracle_losses."""
    drops = PATTERNS  # a different pattern in each row: the choice predicts <a>, <g>, <a> and <r>
    dropped = torch.tensor([[s in d for s in mote.STEPS] for d in drops])
    qexp = torch.tensor([1, 2, 0, 1])
    encoded = [data.encode_chain(TOK, c, V) for c in CHAINS]
    model = tiny_model()
    train.train_iteration(model, encoded, V, TOK.eot_id, 2, qexp, dropped, 0.0, "cpu", torch.float32)
    oracle = tiny_model()
    losses = [oracle_losses(oracle, c, d, int(q)) for c, d, q in zip(CHAINS, drops, qexp)]
    (sum(l.sum() for l in losses) / sum(len(l) for l in losses)).backward()
    for (name, p), q in zip(model.named_parameters(), oracle.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)


def weight_flags(chain: dict):
    """Whether each learned token of oracle_losses (block by block) is in the analysis's last
    sentence, and whether it is in the text of an analysis that concludes harmful, found from the
    texts alone: the analysis block is <a> text </a>, and the sentence's tokens are the last ones of
    its text."""
    last = len(TOK.encode(chain["analysis"].split(". ")[-1])) if chain.get("analysis") else 0
    harmful = chain.get("analysis", "").endswith("Verdict: harmful.")
    conclusion, in_harmful = [], []
    for block, first, end in block_ranges(chain):
        n_learned = 1 if block == "question" else end - first - (block == "response")  # eot: -100
        positions = range(first + 1, end + 1)[:n_learned]  # the position of each learned target
        conclusion += [block == "analysis" and end - 1 - last <= t < end - 1 for t in positions]
        in_harmful += [block == "analysis" and harmful and first < t < end - 1 for t in positions]
    return torch.tensor(conclusion), torch.tensor(in_harmful)


# the first chain concluding harmful: both weights, one on the other's tokens
WEIGHED = [{**CHAINS[0], "analysis": "Lock picking. Verdict: harmful."}, *CHAINS[1:]]


@pytest.mark.parametrize("weight,harmful_weight,checkpointing", [(1.0, 1.0, False), (5.0, 1.0, False), (5.0, 1.0, True),
                                                                 (1.0, 3.0, False), (5.0, 3.0, True)])
def test_the_loss_weights_weigh_the_conclusion_and_the_harmful_analyses(weight, harmful_weight, checkpointing):
    """With --conclusion-weight w and --harmful-weight h the iteration's loss is the weighted mean
    sum(w_i l_i) / sum(w_i), w_i = w on the tokens of each analysis's last sentence (predicted by the
    token before each), times h on the text of the analysis that ends "Verdict: harmful." (not its
    markers), 1 elsewhere, for every drop pattern, against oracle_losses and flags found from the
    texts."""
    dropped = torch.tensor([[s in d for s in mote.STEPS] for d in PATTERNS])
    qexp = torch.tensor([1, 2, 0, 1])
    model = tiny_model()
    model.checkpointing = checkpointing
    train.train_iteration(model, [data.encode_chain(TOK, c, V) for c in WEIGHED], V, TOK.eot_id, 2, qexp, dropped,
                          0.0, "cpu", torch.float32, conclusion_weight=weight, harmful_weight=harmful_weight)
    oracle = tiny_model()
    losses = torch.cat([oracle_losses(oracle, c, d, int(q)) for c, d, q in zip(WEIGHED, PATTERNS, qexp)])
    conclusion, harmful = (torch.cat(f) for f in zip(*[weight_flags(c) for c in WEIGHED]))
    assert conclusion.sum() == len("Verdict: harmful.") + len("Benign.")  # byte tokens; one-sentence analyses: all
    assert harmful.sum() == len("Lock picking. Verdict: harmful.")
    w = torch.where(conclusion, weight, 1.0) * torch.where(harmful, harmful_weight, 1.0)
    ((losses * w).sum() / w.sum()).backward()
    for (name, p), q in zip(model.named_parameters(), oracle.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("objective")
    torch.manual_seed(0)
    Transformer(ModelArgs.preset("tiny")).save(str(d / "tiny.safetensors"), metadata={"tokenizer": "byte"})
    chains = sorted(data.read_chains("data/demo_chains.jsonl"), key=lambda c: len(json.dumps(c)))[:20]
    (d / "chains.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chains))
    return d


def train_run(base, out, *flags):
    train.main(["--base", str(base / "tiny.safetensors"), "--data", str(base / "chains.jsonl"), "--out", str(base / out),
                "--batch-size", "8", "--max-iters", "1", "--val-frac", "0", "--lr", "1e-3", *flags])
    return [json.loads(line) for line in open(base / out / "metrics.jsonl")]


@pytest.mark.parametrize("dtype,rel", [("float32", 1e-5), ("bfloat16", 1e-2)])
def test_train_py_logs_the_same_iteration_for_any_micro_batch(base, dtype, rel):
    """Through train.py: the same draws (made per iteration, before the split) and the same
    token-weighted objective give the same loss and gradient norm for --micro-batch 1, 2, 8; to fp32
    rounding in fp32, and in bf16 to its rounding (bf16 matmuls round differently for other shapes)."""
    logs = [train_run(base, f"{dtype}-micro{m}", "--micro-batch", str(m), "--dtype", dtype)[0] for m in (1, 2, 8)]
    for log in logs[1:]:
        for key in ("loss", "grad_norm", "loss_analysis", "loss_guidance", "loss_response"):
            assert log[key] == (None if logs[0][key] is None else pytest.approx(logs[0][key], rel=rel)), key


DEFAULT = mote.ExpertConfig()
SHARED_TABLE = torch.tensor([[0.5, 0, 0, 0.5], [0, 0.5, 0, 0.5], [0, 0, 0.5, 0.5]])


@pytest.mark.parametrize("flags,changed,n_experts,table,skip_p", [
    ([], {}, 4, SHARED_TABLE, 0.2),
    (["--no-shared"], {"shared": False}, 3, torch.eye(3), 0.2),
    (["--routing", "single"], {"routing": "single"}, 1, None, 0.2),
    (["--routing", "token"], {"routing": "token"}, 4, None, 0.2),
    (["--skip-p", "0"], {}, 4, SHARED_TABLE, 0.0),
    (["--skip-p", "0.7"], {}, 4, SHARED_TABLE, 0.7),
])
def test_each_ablation_flag_changes_exactly_what_it_names(base, monkeypatch, flags, changed, n_experts, table, skip_p):
    drawn = []
    real = mote.draw_drops
    monkeypatch.setattr(mote, "draw_drops", lambda n, p, *a, **k: drawn.append(p) or real(n, p, *a, **k))
    out = "flags" + "".join(flags)
    train_run(base, out, *flags)
    config = json.loads((base / out / "train_config.json").read_text())["expert_config"]
    assert {k: v for k, v in config.items() if getattr(DEFAULT, k) != v} == changed
    assert drawn == [skip_p]
    model = mote.load_adapters(Transformer.from_pretrained(str(base / "tiny.safetensors")),
                               str(base / out / "adapters.safetensors"))
    assert {b.n_experts for b in mote.banks(model)} == {n_experts}
    for b in mote.banks(model):
        assert (b.routing == "token") == hasattr(b, "gate")
        if table is not None:
            assert torch.equal(b.mix, table)


def test_drop_rate_is_p_for_earlier_steps_and_zero_for_the_response():
    drops = mote.draw_drops(20000, 0.3, torch.Generator().manual_seed(0)).float().mean(0)
    assert abs(drops[0] - 0.3) < 0.015 and abs(drops[1] - 0.3) < 0.015 and drops[2] == 0


def test_a_fresh_token_gate_spreads_tokens_over_the_experts():
    """The gated baseline starts near-uniform but not tied: different tokens pick different top-2
    (a zero gate ties every expert, and topk then sends every token to the same two)."""
    model = tiny_model(routing="token")
    batch = data.collate([data.encode_chain(TOK, c, V) for c in CHAINS], TOK.eot_id)
    model.hidden(batch[0], route=mote.route(mote.token_steps(batch[0], V), torch.zeros(4, dtype=torch.long)))
    for b in mote.banks(model):
        assert len({tuple(sorted(t)) for t in b.gate_top.flatten(0, -2).tolist()}) > 1
        assert b.gate_probs.max() < 0.5  # near-uniform over 4 experts


def test_the_balance_loss_counts_only_the_chains_step_tokens():
    """Padding and the question are left out: chain_loss's balance loss equals the banks' loss over
    the tokens of the steps, located from the texts alone (block_ranges)."""
    model = tiny_model(routing="token")
    batch = data.collate([data.encode_chain(TOK, c, V) for c in CHAINS], TOK.eot_id)
    counted = torch.zeros_like(batch[0], dtype=torch.bool)
    for i, chain in enumerate(CHAINS):
        for block, first, end in block_ranges(chain)[1:]:
            counted[i, first:end] = True
    *_, balance = train.chain_loss(model, batch, V, torch.zeros(4, dtype=torch.long), torch.zeros(4, 3, dtype=torch.bool))
    torch.testing.assert_close(balance, torch.stack([b.balance_loss(counted) for b in mote.banks(model)]).mean())
    assert not torch.allclose(balance, torch.stack([b.balance_loss(batch[2]) for b in mote.banks(model)]).mean())
