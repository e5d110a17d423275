"""A bank of LoRA experts around one frozen linear layer, routed per token.

          x (..., in)
          ├──────────────► W0 (frozen, out x in) ─────────────────────────┐
          │                                                                ├──► y (..., out)
          └─► A_e (r x in) ──► B_e (out x r) ──► * s * w_e(t), summed over e ┘
                                                          A: (E, r, in)   B: (out, E, r)

    y_t = W0 x_t + sum_e w_e(t) * s * B_e A_e x_t          s = lora_alpha / r

A is Kaiming-initialised and B is zero, so a fresh bank computes exactly W0 x. What differs between
MoTE and its ablation baselines (METHOD.md section 3) is only the mixing weights w(t), (E,) per token:

    routing="step"   MoTE. alpha on the expert of token t's step, 1 - alpha on the shared expert
                     (the last one), 0 on the rest: step_weights(). The route is an argument.
    routing="token"  the "vanilla MoE" row: a learned gate picks top-k experts per token, with a
                     load-balancing loss: gate_weights().
    routing="single" one plain LoRA: E = 1, w = 1.

Vectorised form: one matmul makes every expert's down-projection A_e x (E*r = 64 columns), the
experts a token does not use are zeroed, and one matmul makes the up-projections. No loop over
experts or tokens. Sorting tokens by expert into a padded batched matmul, or a loop over experts,
measured slower on CPU (see bench.py); the extra rank costs little because these matmuls are
dominated by reading x and writing y, which a single LoRA does too.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class ExpertBank(nn.Module):
    def __init__(self, base: nn.Linear, n_experts: int, rank: int = 16, lora_alpha: float = 32.0,
                 routing: str = "step", shared: bool = True, alpha: float = 0.5, top_k: int = 2):
        super().__init__()
        if routing not in ("step", "token", "single"):
            raise ValueError(f"routing must be step, token or single, not {routing!r}")
        self.base = base.requires_grad_(False)  # W0, frozen
        self.routing, self.shared, self.alpha, self.top_k = routing, shared, alpha, top_k
        self.rank, self.scale = rank, lora_alpha / rank
        out_features, in_features = base.weight.shape
        self.A = nn.Parameter(torch.empty(n_experts, rank, in_features, device=base.weight.device))
        # B is kept as (out, E, r) so that the up-projection of all experts is one matmul with B
        # viewed as (out, E*r), without a copy: that matters when decoding one token at a time
        self.B = nn.Parameter(torch.zeros(out_features, n_experts, rank, device=base.weight.device))
        for a in self.A:  # each expert as nn.Linear / PEFT initialise LoRA's A
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.register_buffer("mix", self.mixing_table(n_experts, shared, alpha).to(base.weight.device), persistent=False)
        if routing == "token":
            self.gate = nn.Linear(in_features, n_experts, bias=False, device=base.weight.device)
            nn.init.zeros_(self.gate.weight)  # start from uniform routing
            self.balance_loss = torch.zeros(())  # set by every forward; read by mote.balance_loss
        self.merged = None  # the step folded into W0 by merge(), or None

    @property
    def n_experts(self) -> int:
        return self.A.shape[0]

    def step_weights(self, route):
        """MoTE's hard step-level routing (METHOD.md sec. 3): token t uses the expert
        of its step with weight alpha and the shared expert with weight 1 - alpha. No gate, no
        balance loss. route (...,) long in [0, n_step_experts) -> weights (..., E): a row of

            mixing_table: step s -> [0 .. alpha (at s) .. 0, 1 - alpha (shared, last)]"""
        return self.mix[route]

    @staticmethod
    def mixing_table(n_experts: int, shared: bool, alpha: float):
        """(n_step_experts, E): row s holds the expert weights of a token of step s."""
        n_steps = n_experts - 1 if shared else n_experts
        table = torch.eye(n_steps) * alpha
        if shared:
            table = torch.cat([table, torch.full((n_steps, 1), 1.0 - alpha)], dim=1)
        return table

    def gate_weights(self, x):
        """Token-level gated MoE (the ablation's "vanilla MoE"): softmax gate, top-k experts per token,
        weights renormalised over the k; sets self.balance_loss = E * sum_e f_e * P_e (Switch
        Transformer), f_e the share of tokens sent to e, P_e the mean gate probability of e."""
        probs = F.softmax(self.gate(x).float(), dim=-1)  # (..., E)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        w = torch.zeros_like(probs).scatter(-1, top_i, top_p / top_p.sum(-1, keepdim=True))
        chosen = torch.zeros_like(probs).scatter(-1, top_i, 1.0).reshape(-1, self.n_experts)
        f = chosen.mean(0) / self.top_k
        self.balance_loss = self.n_experts * (f * probs.reshape(-1, self.n_experts).mean(0)).sum()
        return w.to(self.A.dtype)

    def expert_weights(self, x, route):
        """(..., E) mixing weights of every token over the experts, for this bank's routing."""
        if self.routing == "step":
            if route is None:
                raise ValueError("a step-routed expert bank needs the route of every token (see mote.route)")
            return self.step_weights(route)
        if self.routing == "token":
            return self.gate_weights(x)
        return torch.ones(*x.shape[:-1], 1, device=x.device, dtype=self.A.dtype)

    def forward(self, x, route=None):
        """x (..., in), route (...,) one expert index per token (routing="step") -> (..., out)."""
        y = self.base(x)
        if self.merged is not None:  # the experts are inside W0 (see merge)
            return y
        E, r, d_in = self.A.shape
        w = self.expert_weights(x, route) * self.scale  # (..., E)
        h = x @ self.A.view(E * r, d_in).to(x.dtype).T  # (..., E*r): every expert's down-projection, one matmul
        h = (h.unflatten(-1, (E, r)) * w.to(h.dtype)[..., None]).flatten(-2)  # a token keeps only its experts
        return y + h @ self.B.view(-1, E * r).to(x.dtype).T  # (..., out): every up-projection, one matmul

    def delta(self, step: int):
        """The dense (out, in) update of a token of `step`: sum_e w_e * s * B_e A_e, in fp32."""
        w = self.step_weights(torch.tensor(step, device=self.A.device)).float()
        return torch.einsum("e,oer,eri->oi", w, self.B.float(), self.A.float()) * self.scale

    @torch.no_grad()
    def merge(self, step: int):
        """Fold the shared expert and the expert of `step` into W0, for fast decoding of that step:
        afterwards forward() is one plain matmul and ignores the route. Undo with unmerge()."""
        if self.routing != "step" or self.merged is not None:
            raise RuntimeError("merge() needs a step-routed bank that is not merged already")
        self.base.weight += self.delta(step).to(self.base.weight.dtype)
        self.merged = step

    @torch.no_grad()
    def unmerge(self):
        """Subtract what merge() added. Exact up to rounding: in fp32 the round trip moves W0 by
        ~1e-7 relative; in bf16 by up to one unit in the last place per round trip."""
        if self.merged is None:
            raise RuntimeError("unmerge() on a bank that is not merged")
        self.base.weight -= self.delta(self.merged).to(self.base.weight.dtype)
        self.merged = None
