"""Train MoTE experts on reasoning chains over a frozen base (METHOD.md sec. 1-5).

    python train.py --base smollm2-135m-instruct.safetensors     # the recipe, into runs/smollm2-135m-instruct
    python train.py --resume --out runs/smollm2-135m-instruct    # continue it (the flags come from its config)

Every iteration (one optimizer step): draw a question expert and a step-drop pattern per chain,
build the skipping mask and positions (mote.skip_mask), route every token to its step's expert
(mote.route), and take the next-token loss on the steps and markers only. The loss is the mean over
every learned token of the iteration's --batch-size chains, however they are split into
--micro-batch passes (--conclusion-weight weighs the analysis's last sentence more, --harmful-weight
every analysis that concludes harmful). Only the experts and marker rows train (AdamW, fp32), with warmup + cosine decay, gradient clipping, and bf16
autocast when the base is bf16 (model.resolve_dtype). Writes
DIR/adapters.safetensors (the experts, for sample.py), DIR/checkpoint.safetensors (everything
--resume needs; no pickle), DIR/metrics.jsonl (one record per iteration, "iter") and its picture
DIR/loss.svg (redrawn at each validation); a DIR that
holds a run is continued with --resume or replaced with --overwrite, never by accident.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import cli
import data
import mote
import parallel
import svg
import tokenizer
from checkpoint import check_out, read_checkpoint, save_checkpoint, start_run
from model import CheckpointError, Transformer, resolve_dtype


HERE = os.path.dirname(os.path.abspath(__file__))
RECIPE_DATA = os.path.join(HERE, "data", "demo_chains.jsonl")
RECIPE_EPOCHS = 1.5


def parse_args(argv=None):
    """The flags; every default is the recipe's (README). With --resume, a flag not on the command
    line takes the run's own value (from its checkpoint), so `--resume --out DIR` is enough."""
    p = cli.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)  # typed flags are matched whole
    p.add_argument("--base", help="base checkpoint (.safetensors file or directory)")
    p.add_argument("--data", nargs="+", default=[RECIPE_DATA],
                   help="JSONL files of reasoning chains, read in order (README: the data; default: the recipe's)")
    p.add_argument("--out", help="the run folder (default: runs/<base name>)")
    p.add_argument("--epochs", type=cli.positive, default=RECIPE_EPOCHS, help="passes over the training chains (paper: 3)")
    p.add_argument("--max-iters", type=cli.count, default=0, help="stop after this many optimizer steps (0: epochs decide)")
    p.add_argument("--lr", type=cli.positive, default=2e-3, help="peak learning rate (paper: 2e-5, for full fine-tuning)")
    p.add_argument("--batch-size", type=cli.positive_int, default=8, help="chains per optimizer step (paper: 16)")
    p.add_argument("--micro-batch", type=cli.positive_int, default=4, help="chains per forward pass; gradients accumulate to --batch-size")
    p.add_argument("--warmup", type=cli.fraction, default=0.05, help="warmup, as a fraction of the iterations")
    p.add_argument("--weight-decay", type=cli.nonnegative, default=0.0)
    p.add_argument("--clip", type=cli.positive, default=1.0, help="gradient-norm clipping")
    p.add_argument("--rank", type=cli.positive_int, default=16)
    p.add_argument("--lora-alpha", type=cli.positive, default=32.0, help="LoRA scale = lora_alpha / rank")
    p.add_argument("--alpha", type=cli.fraction, default=0.5, help="step-expert weight; the shared expert gets 1 - alpha")
    p.add_argument("--skip-p", type=cli.fraction, default=0.2, help="probability of dropping each earlier step (0: no skipping)")
    p.add_argument("--routing", choices=("step", "token", "single"), default="step",
                   help="step: MoTE; token: gated MoE baseline; single: one LoRA")
    p.add_argument("--no-shared", action="store_true", help="ablation: no shared expert (the step expert gets weight 1)")
    p.add_argument("--question-expert", choices=("random", "analysis"), default="analysis",
                   help="the expert that reads the question in training: random, a step expert drawn per chain (the "
                   "paper's 'any expert can process the question'), or analysis, the one that reads it at inference (ours)")
    p.add_argument("--conclusion-weight", type=cli.positive, default=1.0,
                   help="loss weight of the tokens of the analysis's last sentence, its verdict (1: every token counts "
                   "once, the paper's plain mean)")
    p.add_argument("--harmful-weight", type=cli.positive, default=1.0,
                   help="loss weight of the text of every analysis that concludes harmful (1: the paper's plain mean)")
    p.add_argument("--balance-coef", type=cli.nonnegative, default=0.01, help="load-balancing loss weight (--routing token)")
    p.add_argument("--max-len", type=cli.positive_int, default=1024, help="longer chains are dropped and counted")
    p.add_argument("--val-frac", type=cli.fraction, default=0.1, help="share of chains held out for validation")
    p.add_argument("--eval-every", type=cli.count, default=20, help="validate every N iterations (0: at the end only)")
    p.add_argument("--save-every", type=cli.positive_int, default=50, help="write the resumable checkpoint every N iterations")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction,
                   help="activation checkpointing (default: on for a base of more than 1B parameters, e.g. 8B on 24 GB)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="the base's dtype; auto: bf16 on CUDA and on a CPU with native bf16, else fp32 (model.choose_dtype). Experts always train in fp32")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    again.add_argument("--overwrite", action="store_true", help="replace the run in --out (else a run there is an error)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.resume:  # the run's own flags, except those given again (check_resume judges those)
        if not args.out:
            p.error("--resume: give --out, the run folder to continue")
        ckpt = os.path.join(args.out, "checkpoint.safetensors")
        if not os.path.exists(ckpt):
            sys.exit(f"error: {ckpt}: does not exist, so there is no run to --resume")
        try:
            saved = read_checkpoint(ckpt)[0]
        except ValueError as e:
            sys.exit(f"error: {e}")
        typed = {a.dest for a in p._actions for o in a.option_strings for w in (argv if argv is not None else sys.argv[1:])
                 if w == o or w.startswith(o + "=")}
        for key, value in saved.items():
            if key in vars(args) and key not in typed and key not in ("resume", "overwrite", "out"):
                setattr(args, key, saved.get("base_abspath", value) if key == "base" and not os.path.exists(value) else value)
    if not args.base:
        p.error("give --base, the frozen model to train experts on (or --resume --out RUN)")
    args.out = args.out or os.path.join("runs", os.path.basename(args.base.rstrip("/")).removesuffix(".safetensors"))
    return args


def split(chains, val_frac, seed):
    """A fixed split: a seeded permutation; its first val_frac of the chains are the validation set."""
    order = torch.randperm(len(chains), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = round(len(chains) * val_frac)
    return [chains[i] for i in order[n_val:]], [chains[i] for i in order[:n_val]]


def lr_at(iter_num, total, warmup, peak):
    """Linear warmup to peak, then cosine decay to peak / 10."""
    warm = max(1, round(warmup * total))
    if iter_num < warm:
        return peak * (iter_num + 1) / warm
    progress = (iter_num - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def token_losses(head, h, y):
    return F.cross_entropy(head(h).float(), y, reduction="none")


def chunked_token_losses(head, hidden, targets, chunk=1024):
    """Per-token cross-entropy of the learned positions (targets != -100) without holding fp32
    logits for the whole batch: logits are made chunk by chunk and recomputed in the backward pass
    (for a 128k vocabulary, logits of 16 x 2048 tokens would be 16 GiB in fp32)."""
    h, y = hidden[targets != -100], targets[targets != -100]  # (N, dim), (N,)
    return torch.cat([checkpoint(token_losses, head, h[i:i + chunk], y[i:i + chunk], use_reentrant=False)
                      for i in range(0, len(y), chunk)] or [hidden.new_zeros(0)])


def pass_targets(batch, base_vocab, dropped):
    """The step of every token and the next-token targets of one skipping pass over a padded batch
    (mote.skip_targets; -100 = nothing learned) -> steps (B, T), targets (B, T)."""
    tokens, targets, *_ = batch
    steps = mote.token_steps(tokens, base_vocab)
    return steps, mote.skip_targets(targets, steps, dropped)


def chain_loss(model, batch, base_vocab, question_expert, dropped):
    """One forward pass of MoTE training over a padded batch -> (per-token losses (N,), the step of
    each (N,), whether each is a token of the analysis's conclusion (N,) and of an analysis that
    concludes harmful (N,), the balance loss of a token-gated baseline (0 for MoTE)); N: the learned
    positions.

    question_expert (B,) and dropped (B, 3) are the random draws (mote.draw_question_experts,
    mote.draw_drops); pass INFERENCE_QUESTION_EXPERT and no drops to evaluate."""
    tokens, _, valid, conclusion, harmful = batch
    steps, targets = pass_targets(batch, base_vocab, dropped)
    mask = positions = None  # nothing dropped: plain causal attention (its fast path); right padding
    if dropped.any():        # comes after every real token, so no real token can see it
        mask, positions = mote.skip_mask(steps, dropped, valid)
    hidden = model.hidden(tokens, positions=positions, mask=mask, route=mote.route(steps, question_expert))
    # a loss counts to the step of the token it predicts: a start marker to the step it opens
    opened = mote.token_steps(targets.clamp(min=0)[..., None], base_vocab)[..., 0]
    target_steps = torch.where(opened != mote.QUESTION, opened, steps)
    balance = mote.balance_loss(model, valid & (steps != mote.QUESTION))  # over the chains' own tokens
    learned = targets != -100
    return (chunked_token_losses(model.lm_head, hidden, targets), target_steps[learned], conclusion[learned], harmful[learned],
            balance)


def per_step(losses, steps):
    """Sum of the token losses of each reasoning step, (3,) float64 (a plain sum: deterministic)."""
    return (F.one_hot(steps, len(mote.STEPS)).double() * losses.double()[:, None]).sum(0).cpu()


def autocast(device, dtype):
    """bf16 autocast when the base is bf16 (CUDA or CPU), else nothing (model.resolve_dtype)."""
    return torch.autocast(torch.device(device).type, torch.bfloat16, enabled=dtype == torch.bfloat16)


@torch.no_grad()
def validation_loss(model, dataset, pad_id, base_vocab, micro, device, dtype):
    """Mean validation loss per step and overall: full chains, the inference question expert."""
    model.eval()
    sums, counts = torch.zeros(3, dtype=torch.float64), torch.zeros(3)
    for i in range(0, len(dataset), micro):
        batch = [t.to(device) for t in data.collate(dataset[i:i + micro], pad_id)]
        B = batch[0].shape[0]
        with autocast(device, dtype):
            losses, steps, *_ = chain_loss(model, batch, base_vocab, torch.full((B,), mote.INFERENCE_QUESTION_EXPERT, device=device),
                                             torch.zeros(B, 3, dtype=torch.bool, device=device))
        sums += per_step(losses, steps)
        counts += torch.bincount(steps.cpu(), minlength=3).float()
    model.train()
    return {f"val_{k}": (sums[i] / counts[i]).item() if counts[i] else None for i, k in enumerate(mote.STEPS)} | \
        {"val_loss": (sums.sum() / counts.sum()).item() if counts.sum() else None}


def token_weights(conclusion, harmful, conclusion_weight, harmful_weight):
    """The weight of each learned token in the loss: conclusion_weight for a token of the analysis's
    conclusion ("Verdict: harmful."), times harmful_weight for a token of an analysis that concludes
    harmful, 1 for every other (1 everywhere: the paper's plain mean)."""
    return (1 + (conclusion_weight - 1) * conclusion.float()) * (1 + (harmful_weight - 1) * harmful.float())


def train_iteration(model, chains, base_vocab, pad_id, micro_batch, question_expert, dropped, balance_coef, device, dtype,
                    conclusion_weight=1.0, harmful_weight=1.0):
    """Forward and backward over one iteration's chains, micro_batch chains per pass. The gradient is
    that of the weighted mean loss over every token learned in the iteration (token_weights; and of
    the balance loss, each pass weighted by its share of that weight), whatever micro_batch is: each
    pass's weighted loss sum is divided by the iteration's total weight, counted before the first
    pass. Under torchrun each rank takes every world-th chain, the weight and the gradients are
    summed over the ranks, so the step is the one-process step (parallel.all_sum). question_expert
    (B,) and dropped (B, 3): the iteration's draws. -> (per-step loss sums (3,), per-step token
    counts (3,), chain tokens processed), of all ranks, unweighted."""
    chains, question_expert, dropped = (parallel.share(x) for x in (chains, question_expert, dropped))
    passes = []
    for i in range(0, len(chains), micro_batch):
        batch = [t.to(device) for t in data.collate(chains[i:i + micro_batch], pad_id)]
        _, targets = pass_targets(batch, base_vocab, dropped[i:i + micro_batch])
        learned = targets != -100
        weight = token_weights(batch[3][learned], batch[4][learned], conclusion_weight, harmful_weight).sum().item()
        passes.append((batch, question_expert[i:i + micro_batch], dropped[i:i + micro_batch], weight))
    total = parallel.all_sum(torch.tensor(float(sum(w for *_, w in passes)))).item()
    sums, counts, n_tokens = torch.zeros(3, dtype=torch.float64), torch.zeros(3), torch.zeros(())
    for batch, qexp, drop, _ in passes:
        with autocast(device, dtype):
            losses, steps, conclusion, harmful, balance = chain_loss(model, batch, base_vocab, qexp, drop)
            weights = token_weights(conclusion, harmful, conclusion_weight, harmful_weight)
            loss = ((losses * weights).sum() + balance_coef * balance * weights.sum()) / max(total, 1)
        loss.backward()
        sums += per_step(losses.detach(), steps)
        counts += torch.bincount(steps.cpu(), minlength=3).float()
        n_tokens += batch[2].sum().cpu()
    for p in model.parameters():
        if p.grad is not None:
            parallel.all_sum(p.grad)
    return parallel.all_sum(sums), parallel.all_sum(counts), int(parallel.all_sum(n_tokens))


def load(args, device, dtype):
    """The base, its tokenizer with the markers, and the encoded training and validation chains;
    every problem is one line before anything is written."""
    try:
        chains = [c for path in args.data for c in data.read_chains(path)]
        base = Transformer.from_pretrained(args.base, dtype=dtype, device=device)
        tok = tokenizer.load_tokenizer(args.base)
    except (data.DataError, CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if args.max_len > base.args.max_seq_len:
        sys.exit(f"error: --max-len {args.max_len} is longer than the model's context ({base.args.max_seq_len} tokens)")
    V = base.args.vocab_size
    tok = tok.with_special_tokens(mote.marker_tokens(V))
    train_chains, val_chains = split(chains, args.val_frac, args.seed)
    train_set, n_long = data.encode_chains(tok, train_chains, V, args.max_len)
    val_set, n_long_val = data.encode_chains(tok, val_chains, V, args.max_len)
    with_a = sum(1 for c in chains if c.get("analysis", "").strip())
    with_g = sum(1 for c in chains if c.get("guidance", "").strip())
    print(f"data: {len(chains)} chains ({with_a} with analysis, {with_g} with guidance); train {len(train_set)}, "
          f"val {len(val_set)}; dropped as longer than {args.max_len} tokens: {n_long + n_long_val}")
    if not train_set:
        sys.exit(f"error: {' '.join(args.data)}: no training chains left ({len(train_chains)} after --val-frac {args.val_frac}, "
                 f"{n_long} of them longer than --max-len {args.max_len} tokens); raise --max-len or lower --val-frac")
    if args.val_frac > 0 and not val_set:
        sys.exit(f"error: {' '.join(args.data)}: no validation chains left ({len(val_chains)} held out by --val-frac "
                 f"{args.val_frac}, {n_long_val} of them longer than --max-len {args.max_len} tokens); raise --max-len "
                 "or --val-frac, or give --val-frac 0")
    return base, tok, train_set, val_set


def attach_experts(args, base, dtype_why):
    """The expert banks on the frozen base (mote.attach) and the optimizer over what trains."""
    torch.manual_seed(args.seed)
    cfg = mote.ExpertConfig(rank=args.rank, lora_alpha=args.lora_alpha, alpha=args.alpha,
                            routing=args.routing, shared=not args.no_shared)
    n_base = sum(p.numel() for p in base.parameters())
    model = mote.attach(base, cfg).train()
    model.checkpointing = n_base > 1e9 if args.checkpointing is None else args.checkpointing
    trainable, total = mote.parameter_counts(model)
    print(f"experts: {cfg}; base {str(model.dtype).removeprefix('torch.')} ({dtype_why}); trainable {trainable:,} of {total:,} "
          f"parameters ({100 * trainable / total:.2f}%); activation checkpointing {'on' if model.checkpointing else 'off'}")
    params = [p for p in model.parameters() if p.requires_grad]
    return model, cfg, params, torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def main(argv=None):
    args = parse_args(argv)
    rank = parallel.join(args.batch_size)  # 0 without torchrun; only rank 0 writes
    ckpt, log_path = os.path.join(args.out, "checkpoint.safetensors"), os.path.join(args.out, "metrics.jsonl")
    check_out(args, ckpt)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # under torchrun: this rank's GPU (parallel.join)
    dtype, why = resolve_dtype(args.dtype, device)
    base, tok, train_set, val_set = load(args, device, dtype)
    V, pad = base.args.vocab_size, tok.eot_id
    model, cfg, params, opt = attach_experts(args, base, why)
    rng = torch.Generator().manual_seed(args.seed)  # question experts and step drops: the same on every rank
    iters_per_epoch = math.ceil(len(train_set) / args.batch_size)
    total_iters = args.max_iters or math.ceil(args.epochs * iters_per_epoch)
    config = vars(args) | {"base_abspath": os.path.abspath(args.base),  # sample.load finds it from any folder
                           "expert_config": asdict(cfg)}
    validate = lambda: validation_loss(model, val_set, pad, V, args.micro_batch, device, dtype)

    def before_training():  # the losses before any training, for comparison
        before = {"iter": 0} | validate() if val_set else None
        if before and not math.isfinite(before["val_loss"]):
            sys.exit(f"error: {args.base}: the validation loss before any training is {before['val_loss']}: the base "
                     f"holds NaN or inf weights, or overflows in {str(dtype).removeprefix('torch.')}")
        return before

    start = start_run(args, config, model, opt, rng, total_iters, before_training, rank)
    print(f"training {total_iters - start} iterations of {args.batch_size} chains into {args.out}") if rank == 0 else None
    saved, stuck = start, 0  # the last checkpoint's iteration; iterations in a row at the uniform loss
    bar = tqdm(range(start, total_iters), initial=start, total=total_iters, desc="train", dynamic_ncols=True,
               disable=rank != 0)
    for iter_num in bar:
        t0 = time.time()
        epoch, k = divmod(iter_num, iters_per_epoch)
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed + epoch))
        chosen = [train_set[i] for i in order[k * args.batch_size:(k + 1) * args.batch_size].tolist()]
        lr = lr_at(iter_num, total_iters, args.warmup, args.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        # one draw per chain of the iteration, before it is split into micro-batches (and ranks)
        qexp = mote.draw_question_experts(len(chosen), rng, device, fixed=args.question_expert == "analysis")
        dropped = mote.draw_drops(len(chosen), args.skip_p, rng, device)
        sums, counts, n_tokens = train_iteration(model, chosen, V, pad, args.micro_batch, qexp, dropped,
                                                 args.balance_coef, device, dtype, args.conclusion_weight,
                                                 args.harmful_weight)
        loss = (sums.sum() / counts.sum()).item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip).item()
        stuck = check_progress(args, loss, grad_norm, iter_num, saved, stuck, V, bar)
        opt.step()
        opt.zero_grad(set_to_none=True)
        record = {"iter": iter_num + 1, "epoch": round((iter_num + 1) / iters_per_epoch, 3), "lr": lr, "loss": loss,
                  "grad_norm": grad_norm, "tokens_per_s": round(n_tokens / (time.time() - t0), 1)}
        record |= {f"loss_{s}": (sums[i] / counts[i]).item() if counts[i] else None for i, s in enumerate(mote.STEPS)}
        last = iter_num + 1 == total_iters
        if rank == 0:
            if val_set and ((args.eval_every and (iter_num + 1) % args.eval_every == 0) or last):
                record |= validate()
            log(args.out, record, bar)
            if (iter_num + 1) % args.save_every == 0 or last:
                save_checkpoint(ckpt, model, opt, rng, iter_num + 1, config)
        saved = iter_num + 1 if (iter_num + 1) % args.save_every == 0 or last else saved
    if rank == 0:
        mote.save_adapters(model, os.path.join(args.out, "adapters.safetensors"))
        final = json.loads(open(log_path).read().splitlines()[-1]) if os.path.exists(log_path) else {}
        print("final:", {k: round(v, 4) for k, v in final.items() if k.startswith(("loss", "val_")) and v is not None})
        print(f"wrote {args.out}/adapters.safetensors, checkpoint.safetensors, metrics.jsonl, loss.svg")
    parallel.leave()


def check_progress(args, loss, grad_norm, iter_num, saved, stuck, base_vocab, bar) -> int:
    """Stop before the optimizer step of a non-finite loss or gradient spoils the experts (one line);
    warn once a loss has sat at ln(vocab), a uniform prediction, with no gradient for 20 iterations.
    -> the count of such iterations in a row."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        bar.close()
        sys.exit(f"error: {args.out}: iteration {iter_num + 1}: the loss is {loss:.4g} and the gradient norm "
                 f"{grad_norm:.4g}; stopped before its optimizer step, keeping "
                 f"{f'the checkpoint of iteration {saved}' if saved else 'no checkpoint'} and writing no "
                 "adapters (NaN or inf weights in the base, or too high a --lr?)")
    uniform = math.log(base_vocab + len(mote.MARKERS))
    stuck = stuck + 1 if abs(loss - uniform) < 0.05 and grad_norm < 1e-6 else 0
    if stuck == 20:
        tqdm.write(f"warning: iterations {iter_num - 18}-{iter_num + 1}: the loss sits at ln(vocab) = "
                   f"{uniform:.2f} with no gradient: the model predicts a uniform distribution and learns "
                   "nothing (too high a --lr?)", file=sys.stderr)
    return stuck


def log(out, record, bar):
    """Append the iteration's record to metrics.jsonl, redraw loss.svg at a validation, show it on the bar."""
    log_path = os.path.join(out, "metrics.jsonl")
    with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if "val_loss" in record:  # the picture of the log so far, beside it
        with mote.replacing(os.path.join(out, "loss.svg")) as tmp, open(tmp, "w") as f:
            f.write(svg.loss_curve([json.loads(line) for line in open(log_path)]))
    bar.set_postfix({k[5:]: f"{v:.3f}" for k, v in record.items() if k.startswith("loss_") and v is not None}
                    | {"tok/s": f"{record['tokens_per_s']:.0f}"})


if __name__ == "__main__":
    main()
