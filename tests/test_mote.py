"""mote.py: the method's executable specification (METHOD.md sections 2-4).

Chains here are written by hand with a tiny byte-level base (vocabulary 264): marker ids are
264..269, so <a> = 264, </a> = 265, <g> = 266, </g> = 267, <r> = 268, </r> = 269."""
import itertools

import pytest
import torch

import mote
from model import ModelArgs, Transformer

V = 264
A, A_, G, G_, R, R_ = range(V, V + 6)
EOT = 260


def chain(question=(1, 2, 3, 4), analysis=(10, 11, 12), guidance=(20, 21), answer=(30, 31, 32)):
    """Token ids of a chain; pass None to leave a step out."""
    ids = list(question)
    for start, body, end in ((A, analysis, A_), (G, guidance, G_), (R, answer, R_)):
        if body is not None:
            ids += [start, *body, end]
    return torch.tensor([ids + [EOT]])


def tiny_with_experts(seed=0, **cfg):
    torch.manual_seed(seed)
    model = Transformer(ModelArgs.preset("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    mote.attach(model, mote.ExpertConfig(**cfg))
    with torch.no_grad():  # trained-looking experts: B != 0, every expert different
        for b in mote.banks(model):
            b.B.normal_(0, 0.3)
    return model


# ---- markers and routes --------------------------------------------------------------------------

def test_marker_ids_follow_the_base_vocabulary():
    assert mote.marker_tokens(V) == {"<|analysis|>": 264, "<|/analysis|>": 265, "<|guidance|>": 266,
                                     "<|/guidance|>": 267, "<|response|>": 268, "<|/response|>": 269}


def test_steps_from_markers_full_chain():
    Q = mote.QUESTION
    #          1  2  3  4  <a> 10 11 12 </a> <g> 20 21 </g> <r> 30 31 32 </r> eot
    expected = [Q, Q, Q, Q, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]
    assert mote.token_steps(chain(), V)[0].tolist() == expected


def test_steps_with_missing_steps_and_generated_prefixes():
    Q = mote.QUESTION
    assert mote.token_steps(chain(analysis=None, guidance=None), V)[0].tolist() == [Q] * 4 + [2] * 6
    assert mote.token_steps(chain(guidance=None), V)[0].tolist() == [Q] * 4 + [0] * 5 + [2] * 6
    prefix = chain()[:, :7]  # generation stopped inside the analysis
    assert mote.token_steps(prefix, V)[0].tolist() == [Q] * 4 + [0] * 3
    assert mote.token_steps(torch.tensor([[5, 6, 7]]), V)[0].tolist() == [Q] * 3


def test_question_tokens_take_the_drawn_expert():
    steps = mote.token_steps(torch.cat([chain(), chain()]), V)
    route = mote.route(steps, torch.tensor([2, 1]))
    assert route[:, :4].tolist() == [[2] * 4, [1] * 4]
    assert torch.equal(route[:, 4:], steps[:, 4:])


# ---- gradient isolation ----------------------------------------------------------------------------

def expert_grads(model, e):
    return sum(b.A.grad[e].abs().sum() + b.B.grad[:, e].abs().sum() for b in mote.banks(model))


def test_question_tokens_reach_only_their_drawn_expert_and_the_shared_one():
    model = tiny_with_experts()
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    for q in range(3):
        model.zero_grad()
        route = mote.route(mote.token_steps(tokens, V), torch.tensor([q]))
        model(tokens, route=route).logsumexp(-1).sum().backward()
        for e in range(4):
            assert (expert_grads(model, e) > 0) == (e in (q, 3)), (q, e)


def test_an_analysis_only_chain_never_reaches_the_guidance_or_response_experts():
    model = tiny_with_experts()
    tokens = chain(guidance=None, answer=None)[:, :-1]
    route = mote.route(mote.token_steps(tokens, V), torch.tensor([0]))
    model(tokens, route=route).logsumexp(-1).sum().backward()
    assert expert_grads(model, 0) > 0 and expert_grads(model, 3) > 0
    assert expert_grads(model, 1) == 0 and expert_grads(model, 2) == 0


# ---- step skipping: the masked pass == the shortened chain ----------------------------------------

def run_masked(model, tokens, dropped, question_expert):
    steps = mote.token_steps(tokens, V)
    mask, positions = mote.skip_mask(steps, dropped)
    return model(tokens, positions=positions, mask=mask, route=mote.route(steps, question_expert))


def next_token_targets(tokens):
    return torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -100)], dim=1)


@pytest.mark.parametrize("drop", [("analysis",), ("guidance",), ("analysis", "guidance")])
def test_skip_mask_equals_the_physically_shortened_chain(drop):
    """Contract of METHOD.md sec. 4 (ours): for every drop pattern, each kept token's logits (fp32,
    experts attached) and target equal those of the chain with the dropped steps deleted."""
    model = tiny_with_experts()
    full = chain()
    dropped = torch.tensor([[s in drop for s in mote.STEPS]])
    short = chain(analysis=None if "analysis" in drop else (10, 11, 12), guidance=None if "guidance" in drop else (20, 21))
    steps = mote.token_steps(full, V)
    kept = ~(dropped.gather(1, steps.clamp(min=0)) & (steps != mote.QUESTION))
    assert torch.equal(full[kept], short[0])
    for q in range(3):
        masked = run_masked(model, full, dropped, torch.tensor([q]))
        shortened = model(short, route=mote.route(mote.token_steps(short, V), torch.tensor([q])))
        torch.testing.assert_close(masked[kept], shortened[0], atol=1e-5, rtol=1e-5)
    targets = mote.skip_targets(next_token_targets(full), steps, dropped)
    assert torch.equal(targets[kept], next_token_targets(short)[0])


def test_skip_mask_in_a_padded_batch_with_different_drop_patterns():
    model = tiny_with_experts(seed=1)
    a, b = chain(), chain(guidance=None)
    tokens = torch.cat([a, torch.nn.functional.pad(b, (0, a.shape[1] - b.shape[1]), value=0)])
    valid = torch.zeros_like(tokens, dtype=torch.bool)
    valid[0], valid[1, : b.shape[1]] = True, True
    patterns = torch.tensor([[True, False, False], [True, False, False]])  # both drop their analysis
    steps = mote.token_steps(tokens, V)
    mask, positions = mote.skip_mask(steps, patterns, valid)
    logits = model(tokens, positions=positions, mask=mask, route=mote.route(steps, torch.tensor([0, 0])))
    for row, short in ((0, chain(analysis=None)), (1, chain(analysis=None, guidance=None))):
        kept = valid[row] & ~((steps[row] == 0))
        expected = model(short, route=mote.route(mote.token_steps(short, V), torch.tensor([0])))[0]
        torch.testing.assert_close(logits[row][kept], expected, atol=1e-5, rtol=1e-5)


def test_nothing_dropped_is_the_plain_causal_pass():
    model = tiny_with_experts()
    tokens = chain()
    route = mote.route(mote.token_steps(tokens, V), torch.tensor([1]))
    torch.testing.assert_close(run_masked(model, tokens, torch.zeros(1, 3, dtype=torch.bool), torch.tensor([1])),
                               model(tokens, route=route), atol=1e-6, rtol=1e-6)


def test_drop_draws_never_drop_the_response():
    drops = mote.draw_drops(10000, 0.2, torch.Generator().manual_seed(0))
    assert not drops[:, 2].any()
    assert 0.18 < drops[:, 0].float().mean() < 0.22 and 0.18 < drops[:, 1].float().mean() < 0.22


# ---- attaching, markers, saving -----------------------------------------------------------------------

def test_attach_wraps_all_seven_linears_and_freezes_the_base():
    model = tiny_with_experts(rank=4)
    assert len(mote.banks(model)) == 7 * model.args.n_layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if n.endswith((".A", ".B", "embed_tokens.new", "lm_head.new"))}
    n_train, n_total = mote.parameter_counts(model)
    lora = sum(b.A.numel() + b.B.numel() for b in mote.banks(model))
    assert n_train == lora + 2 * 6 * model.args.dim and n_total > n_train


def test_marker_rows_start_at_the_mean_and_only_they_learn():
    torch.manual_seed(0)
    model = Transformer(ModelArgs.preset("tiny"))
    mean = model.embed_tokens.weight.detach().mean(0)
    mote.attach(model)
    assert torch.allclose(model.embed_tokens.new, mean.expand(6, -1))
    tokens = chain()
    logits = model(tokens, route=mote.route(mote.token_steps(tokens, V), torch.tensor([0])))
    assert logits.shape[-1] == V + 6
    torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:]).backward()
    assert model.embed_tokens.new.grad.abs().sum() > 0 and model.lm_head.new.grad.abs().sum() > 0
    assert model.embed_tokens.base.weight.grad is None


def test_save_load_round_trip_and_wrong_base(tmp_path):
    model = tiny_with_experts()
    tokens = chain()
    route = mote.route(mote.token_steps(tokens, V), torch.tensor([0]))
    path = str(tmp_path / "experts.safetensors")
    mote.save_adapters(model, path)
    torch.manual_seed(0)  # the same base: rebuild it exactly as tiny_with_experts did
    base = Transformer(ModelArgs.preset("tiny")).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.3)
    loaded = mote.load_adapters(base, path)
    assert torch.equal(loaded(tokens, route=route), model(tokens, route=route))
    other = Transformer(ModelArgs.preset("tiny"))
    with pytest.raises(ValueError, match="trained on another base"):
        mote.load_adapters(other, path)


@pytest.mark.parametrize("routing,shared", [("single", False), ("token", True), ("step", False)])
def test_ablation_variants_run_and_save(routing, shared, tmp_path):
    model = tiny_with_experts(routing=routing, shared=shared)
    assert {b.n_experts for b in mote.banks(model)} == {1 if routing == "single" else (3 if not shared else 4)}
    tokens = chain()
    out = model(tokens, route=mote.route(mote.token_steps(tokens, V), torch.tensor([0])))
    assert torch.isfinite(out).all()
    assert (mote.balance_loss(model, torch.ones_like(tokens, dtype=torch.bool)) > 0) == (routing == "token")
    mote.save_adapters(model, str(tmp_path / "a.safetensors"))


def test_merge_step_equals_routed_decoding():
    model = tiny_with_experts()
    tokens = torch.tensor([[1, 2, R, 30, 31]])
    route = torch.full_like(tokens, 2)
    routed = model(tokens, route=route)
    mote.merge_step(model, 2)
    torch.testing.assert_close(model(tokens), routed, atol=1e-5, rtol=1e-5)
    mote.merge_step(model, None)
    torch.testing.assert_close(model(tokens, route=route), routed, atol=1e-5, rtol=1e-5)


def test_all_drop_patterns_cover_every_shortened_chain():
    """The masked pass stands in for every chain the paper would materialise: one pattern each."""
    seen = set()
    for drop in itertools.product([False, True], repeat=2):
        dropped = torch.tensor([[drop[0], drop[1], False]])
        steps = mote.token_steps(chain(), V)
        kept = ~(dropped.gather(1, steps.clamp(min=0)) & (steps != mote.QUESTION))
        seen.add(tuple(chain()[kept].tolist()))
    assert len(seen) == 4


# ---- the vectorised one-liners against plain loops ---------------------------------------------------

def loop_token_steps(ids: list) -> list:
    """token_steps, read token by token: a start marker opens its step, every later token (its end
    marker too) belongs to the step opened last; before any start marker: QUESTION."""
    step, out = mote.QUESTION, []
    for t in ids:
        if t in (A, G, R):
            step = (A, G, R).index(t)
        out.append(step)
    return out


def loop_skip_targets(targets: list, steps: list, dropped: list) -> list:
    """skip_targets, token by token: a kept token predicts the token after the next kept token
    (-100 when none is left); a token of a dropped step keeps its own target."""
    kept = [s == mote.QUESTION or not dropped[s] for s in steps]
    out = []
    for t in range(len(targets)):
        if not kept[t]:
            out.append(targets[t])
            continue
        nxt = next((u for u in range(t + 1, len(targets)) if kept[u]), None)
        out.append(-100 if nxt is None else targets[nxt - 1])
    return out


def random_chains(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        parts = [None if torch.rand(1, generator=g) < 0.4 else tuple(range(int(torch.randint(0, 4, (1,), generator=g))))
                 for _ in range(2)]
        ids = chain(question=range(int(torch.randint(1, 5, (1,), generator=g))), analysis=parts[0], guidance=parts[1])[0]
        yield ids[: int(torch.randint(1, len(ids) + 1, (1,), generator=g))]  # generated prefixes too


def test_token_steps_equals_the_loop():
    for ids in random_chains(300):
        assert mote.token_steps(ids[None], V)[0].tolist() == loop_token_steps(ids.tolist())


def test_skip_targets_equals_the_loop():
    g = torch.Generator().manual_seed(1)
    for ids in random_chains(300, seed=2):
        steps = mote.token_steps(ids[None], V)
        targets = torch.cat([ids[1:], torch.tensor([-100])])[None]
        targets[0, torch.rand(len(ids), generator=g) < 0.2] = -100
        dropped = torch.rand(1, 3, generator=g) < 0.5
        dropped[0, 2] = False
        assert mote.skip_targets(targets, steps, dropped)[0].tolist() == \
            loop_skip_targets(targets[0].tolist(), steps[0].tolist(), dropped[0].tolist())


def test_next_steps_equals_token_steps_one_token_at_a_time():
    for ids in random_chains(200, seed=3):
        steps, last = [], torch.tensor([mote.QUESTION])
        for t in ids:
            last = mote.next_steps(last, t[None], V)
            steps.append(int(last))
        assert steps == mote.token_steps(ids[None], V)[0].tolist()
