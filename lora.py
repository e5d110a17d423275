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
                     (the last one), 0 on the rest; without a shared expert, 1 on the step's
                     expert: step_weights() and mixing_table(). The route is an argument.
    routing="token"  the "vanilla MoE" row: a learned gate picks top-k experts per token, with a
                     load-balancing loss: gate_weights().
    routing="single" one plain LoRA: E = 1, w = 1.

Vectorised form: one matmul makes every expert's down-projection A_e x (E*r = 64 columns), the
experts a token does not use are zeroed, and one matmul makes the up-projections. No loop over
experts or tokens. The extra rank costs little: these matmuls are dominated by reading x and
writing y, which a single LoRA does too.

Dtypes: A, B, the gate and the marker rows (mote.py) are created in fp32 whatever the base's dtype,
train in fp32 under autocast, and are cast once to the base's dtype for inference (mote.cast_experts).
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
        fp32 = dict(device=base.weight.device, dtype=torch.float32)  # trainable tensors: fp32 (see Dtypes above)
        self.A = nn.Parameter(torch.empty(n_experts, rank, in_features, **fp32))
        # B is kept as (out, E, r) so that the up-projection of all experts is one matmul with B
        # viewed as (out, E*r), without a copy: that matters when decoding one token at a time
        self.B = nn.Parameter(torch.zeros(out_features, n_experts, rank, **fp32))
        for a in self.A:  # each expert as nn.Linear / PEFT initialise LoRA's A
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.register_buffer("mix", self.mixing_table(n_experts, shared, alpha).to(**fp32), persistent=False)
        if routing == "token":
            self.gate = nn.Linear(in_features, n_experts, bias=False, **fp32)
            # small random logits: near-uniform routing whose top-k differs from token to token (a zero
            # gate ties every expert, and topk then sends every token to the same k experts)
            nn.init.normal_(self.gate.weight, std=0.02)
            self.gate_probs = self.gate_top = None  # of the last forward; read by balance_loss()
        self.merged = None  # the step folded into merged_weight by merge(), or None
        self.merged_weight = None  # W0 + the merged experts' delta, a second tensor (W0 is never changed)

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
        """(n_step_experts, E): row s holds the expert weights of a token of step s. With a shared
        expert (the last column): alpha on expert s, 1 - alpha on the shared one. Without (the
        "no shared expert" ablation, METHOD.md sec. 3): 1 on expert s, alpha unused.

            shared, alpha=0.5:  [[.5 0 0 .5]      shared=False:  [[1 0 0]
                                 [0 .5 0 .5]                      [0 1 0]
                                 [0 0 .5 .5]]                     [0 0 1]]"""
        if not shared:
            return torch.eye(n_experts)
        n_steps = n_experts - 1
        return torch.cat([torch.eye(n_steps) * alpha, torch.full((n_steps, 1), 1.0 - alpha)], dim=1)

    def gate_weights(self, x):
        """Token-level gated MoE (the ablation's "vanilla MoE"): softmax gate, top-k experts per token,
        weights renormalised over the k. Keeps the gate's probabilities and choices for balance_loss()."""
        probs = F.softmax(F.linear(x, self.gate.weight.to(x.dtype)).float(), dim=-1)  # (..., E)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        self.gate_probs, self.gate_top = probs, top_i
        return torch.zeros_like(probs).scatter(-1, top_i, top_p / top_p.sum(-1, keepdim=True))

    def balance_loss(self, counted):
        """The Switch Transformer load-balancing loss of the last forward, over the tokens where
        counted (...,) is True (real step tokens: not padding, not the question): E * sum_e f_e P_e,
        f_e the share of the counted tokens' top-k picks that went to e, P_e their mean gate
        probability of e. It is 1 when routing is uniform, E / k when every token picks the same k."""
        probs = self.gate_probs[counted]  # (N, E)
        chosen = torch.zeros_like(probs).scatter(-1, self.gate_top[counted], 1.0)
        return self.n_experts * (chosen.mean(0) / self.top_k * probs.mean(0)).sum()

    def expert_weights(self, x, route):
        """(..., E) mixing weights of every token over the experts, for this bank's routing."""
        if self.routing == "step":
            if route is None:
                raise ValueError("a step-routed expert bank needs the route of every token (see mote.route)")
            return self.step_weights(route)
        if self.routing == "token":
            return self.gate_weights(x)
        return torch.ones(*x.shape[:-1], 1, device=x.device, dtype=x.dtype)

    def forward(self, x, route=None):
        """x (..., in), route (...,) one expert index per token (routing="step") -> (..., out)."""
        if self.merged_weight is not None:  # W0 and the active experts are one weight (see merge)
            return F.linear(x, self.merged_weight)
        y = self.base(x)
        E, r, d_in = self.A.shape
        w = self.expert_weights(x, route) * self.scale  # (..., E)
        h = x @ self.A.view(E * r, d_in).to(x.dtype).T  # (..., E*r): every expert's down-projection, one matmul
        h = (h.unflatten(-1, (E, r)) * w.to(h.dtype)[..., None]).flatten(-2)  # a token keeps only its experts
        return y + h @ self.B.view(-1, E * r).to(x.dtype).T  # (..., out): every up-projection, one matmul

    def merge_weights(self, step: int):
        """(E,) the expert weights that every token of `step` gets: a row of the mixing table, or 1
        for a single LoRA. A token-gated bank has none: its weights differ from token to token."""
        if self.routing == "token":
            raise RuntimeError("a token-gated expert bank cannot be merged: its expert weights differ per token")
        return self.mix[step].float() if self.routing == "step" else torch.ones(1, device=self.A.device)

    def delta(self, step: int):
        """The dense (out, in) update of a token of `step`: sum_e w_e * s * B_e A_e, in fp32."""
        return torch.einsum("e,oer,eri->oi", self.merge_weights(step), self.B.float(), self.A.float()) * self.scale

    @torch.no_grad()
    def merge(self, step: int):
        """Fold the experts of `step` into one weight, W0 + delta(step), for decoding a stretch of
        tokens of one step: forward() is then one plain matmul that ignores the route.

        W0 itself is never changed: the merged weight is a second tensor, summed in fp32 and rounded
        once to W0's dtype, so unmerge() restores W0 exactly, however many times the sampler switches
        steps. The price is one more copy of the layer's weight while merged (sample.py --no-merge
        avoids it). Subtracting the delta back would not restore W0 in bf16."""
        self.merged_weight = (self.base.weight.float() + self.delta(step)).to(self.base.weight.dtype)
        self.merged = step

    def unmerge(self):
        """Back to routed experts around the untouched W0."""
        self.merged = self.merged_weight = None
