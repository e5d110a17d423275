"""lora.py: the expert bank against formulas computed by hand, one token at a time."""
import torch
import torch.nn as nn

from lora import ExpertBank

IN, OUT, R = 12, 10, 4


def make_bank(seed=0, **kw):
    torch.manual_seed(seed)
    base = nn.Linear(IN, OUT, bias=False)
    bank = ExpertBank(base, kw.pop("n_experts", 4), rank=R, lora_alpha=8.0, **kw)
    with torch.no_grad():
        bank.B.normal_()  # B starts at zero; make every expert do something
    return bank


def lora(bank, e, x):
    """The textbook LoRA update of expert e: s * B_e A_e x."""
    return bank.scale * bank.B[:, e] @ (bank.A[e] @ x)


def test_fresh_bank_computes_the_base_layer():
    base = nn.Linear(IN, OUT, bias=False)
    x = torch.randn(3, 5, IN)
    assert torch.equal(ExpertBank(base, 4, rank=R)(x, torch.zeros(3, 5, dtype=torch.long)), base(x))


def test_step_routing_matches_the_formula_token_by_token():
    """y_t = W0 x_t + alpha * E_route(t)(x_t) + (1 - alpha) * E_shared(x_t)   (METHOD.md sec. 3)."""
    bank = make_bank(alpha=0.3)
    x = torch.randn(2, 7, IN)
    route = torch.randint(0, 3, (2, 7))
    y = bank(x, route)
    for b in range(2):
        for t in range(7):
            xt, e = x[b, t], route[b, t]
            expected = bank.base.weight @ xt + 0.3 * lora(bank, e, xt) + 0.7 * lora(bank, 3, xt)
            torch.testing.assert_close(y[b, t], expected, atol=1e-5, rtol=1e-5)


def test_single_expert_and_no_shared_with_alpha_one_are_plain_lora():
    x = torch.randn(6, IN)
    single = make_bank(n_experts=1, routing="single", shared=False)
    torch.testing.assert_close(single(x), (single.base.weight @ x.T).T + torch.stack([lora(single, 0, xt) for xt in x]))
    routed = make_bank(n_experts=3, shared=False, alpha=0.5)  # no shared expert: weight 1, alpha unused
    route = torch.tensor([0, 1, 2, 2, 1, 0])
    expected = torch.stack([routed.base.weight @ xt + lora(routed, e, xt) for xt, e in zip(x, route)])
    torch.testing.assert_close(routed(x, route), expected, atol=1e-5, rtol=1e-5)


def test_token_gate_top_k_and_balance_loss():
    bank = make_bank(routing="token", top_k=2)
    with torch.no_grad():
        bank.gate.weight.normal_()
    x = torch.randn(9, IN)
    w = bank.gate_weights(x)
    assert ((w > 0).sum(-1) == 2).all() and torch.allclose(w.sum(-1), torch.ones(9))
    probs = torch.softmax(x @ bank.gate.weight.T, -1)
    top = probs.topk(2, -1).indices
    f = torch.stack([(top == e).any(-1).float().mean() / 2 for e in range(4)])
    torch.testing.assert_close(bank.balance_loss(torch.ones(9, dtype=torch.bool)), 4 * (f * probs.mean(0)).sum())
    counted = torch.tensor([True, False] * 4 + [True])  # only the counted tokens enter the loss
    fc = torch.stack([(top[counted] == e).any(-1).float().mean() / 2 for e in range(4)])
    torch.testing.assert_close(bank.balance_loss(counted), 4 * (fc * probs[counted].mean(0)).sum())
    expected = torch.stack([bank.base.weight @ xt + sum(w[t, e] * lora(bank, e, xt) for e in range(4))
                            for t, xt in enumerate(x)])
    torch.testing.assert_close(bank(x), expected, atol=1e-5, rtol=1e-5)


def test_gradient_of_a_step_reaches_only_its_expert_and_the_shared_one():
    bank = make_bank()
    x = torch.randn(20, IN)
    route = torch.randint(0, 3, (20,))
    for s in range(3):
        bank.zero_grad()
        bank(x, route)[route == s].pow(2).sum().backward()
        for e in range(4):
            reached = bank.A.grad[e].abs().sum() > 0 and bank.B.grad[:, e].abs().sum() > 0
            untouched = torch.equal(bank.A.grad[e], torch.zeros_like(bank.A.grad[e])) and \
                torch.equal(bank.B.grad[:, e], torch.zeros_like(bank.B.grad[:, e]))
            assert reached if e in (s, 3) else untouched, (s, e)
    assert bank.base.weight.grad is None


def test_merge_then_unmerge():
    bank = make_bank()
    x = torch.randn(5, IN)
    w0 = bank.base.weight.clone()
    for step in range(3):
        routed = bank(x, torch.full((5,), step))
        bank.merge(step)
        torch.testing.assert_close(bank(x, None), routed, atol=1e-5, rtol=1e-5)
        bank.unmerge()
        assert torch.equal(bank.base.weight, w0)
        assert bank.merged is None
