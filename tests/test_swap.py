"""swap.py, the teacher-forcing experiment: generate continues a chain from a prompt that holds
steps already, so forcing the model's own analysis gives back the response it writes itself (the
oracle), and forcing another analysis changes what the response step reads."""
import torch

import mote
import swap
from sample import generate, split_steps
from test_sample import tiny_with_experts
from tokenizer import byte_tokenizer

V = 256 + 8  # the byte tokenizer's vocabulary (tiny preset)


def setup():
    model, tok = tiny_with_experts(), byte_tokenizer()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".new"):  # the marker rows: close steps now and then
                p.normal_(0, 0.5)
    return model, tok


def test_forcing_the_own_analysis_gives_back_the_own_response():
    model, tok = setup()
    V = model.args.vocab_size
    questions = [f"question {i}?" for i in range(6)]
    whole = generate(model, [tok.chat(q) for q in questions], tok.stop_ids, max_new_tokens=24, experts=True,
                     path="analysis", max_step_tokens=8)
    analyses = [split_steps(ids, V, tok.stop_ids)["analysis"] for ids in whole]
    forced = generate(model, swap.forced_prompts(tok, questions, analyses, V), tok.stop_ids, max_new_tokens=24,
                      experts=True, max_step_tokens=8)
    for ids, cont in zip(whole, forced):
        response = split_steps(ids, V, tok.stop_ids)["response"]
        assert [t for t in cont if t < V] == response and cont[-1] == mote.end_marker(V, 2)


def test_another_analysis_reaches_the_response():
    """The forced analysis is in the response's context: swapping it changes some response."""
    model, tok = setup()
    V = model.args.vocab_size
    questions = [f"question {i}?" for i in range(6)]
    analyses = swap.own_analyses(model, tok, questions, max_step_tokens=8, batch_size=4)
    own = swap.responses(model, tok, swap.forced_prompts(tok, questions, analyses, V), 8, 4)
    other = swap.responses(model, tok, swap.forced_prompts(tok, questions, analyses[::-1], V), 8, 4)
    empty = swap.responses(model, tok, swap.forced_prompts(tok, questions, [[]] * 6, V), 8, 4)
    assert own != other and own != empty


def test_verdict_log_odds_match_one_row_at_a_time():
    """The oracle: for each analysis alone, unpadded, the two words' log-probs summed token by token
    after its text up to "Verdict:". Batched, left-padded rows of different lengths give the same;
    an analysis without a verdict gives None."""
    model, tok = setup()
    V = model.args.vocab_size
    questions = ["q?", "a longer question here?", "mid question?", "no verdict?"]
    texts = ["Fine. Verdict: harmless.", "It asks for harm; Verdict: harmful.", "Verdict: harmful. Reasons.", "None."]
    got = swap.verdict_log_odds(model, tok, questions, [tok.encode(t) for t in texts], batch_size=2)
    assert got[3] is None
    a = mote.STEPS.index("analysis")
    for q, text, x in zip(questions[:3], texts, got):
        prefix = tok.chat(q) + [mote.start_marker(V, a)] + tok.encode(text[:text.rfind("Verdict:") + len("Verdict:")])
        logps = []
        for word in (" harmful", " harmless"):
            ids = torch.tensor([prefix + tok.encode(word)])
            route = mote.route(mote.token_steps(ids, V), torch.tensor([mote.INFERENCE_QUESTION_EXPERT]))
            with torch.no_grad():
                logp = torch.log_softmax(model(ids, route=route)[0].float(), dim=-1)
            logps.append(sum(logp[len(prefix) - 1 + j, t].item() for j, t in enumerate(tok.encode(word))))
        assert abs(x - (logps[0] - logps[1])) < 1e-4
