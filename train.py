"""Train MoTE experts on reasoning chains over a frozen base (METHOD.md sec. 1-5).

    python train.py --base smollm2-135m-instruct.safetensors --data data/demo_chains.jsonl --out runs/demo

Every iteration (one optimizer step): draw a question expert and a step-drop pattern per chain,
build the skipping mask and positions (mote.skip_mask), route every token to its step's expert
(mote.route), and take the next-token loss on the steps and markers only. The loss is the mean over
every learned token of the iteration's --batch-size chains, however they are split into
--micro-batch passes. Only the experts and marker rows train (AdamW, fp32), with warmup + cosine
decay, gradient clipping, and bf16 autocast when the base is bf16 (model.resolve_dtype). Writes
DIR/adapters.safetensors (the experts, for sample.py), DIR/checkpoint.safetensors (everything
--resume needs; no pickle) and DIR/metrics.jsonl (one record per iteration, "iter"); a DIR that
holds a run is continued with --resume or replaced with --overwrite, never by accident.
"""
import json
import math
import os
import sys
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import cli
import data
import mote
import tokenizer
from model import CheckpointError, Transformer, resolve_dtype


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="base checkpoint (.safetensors file or directory)")
    p.add_argument("--data", required=True, help="JSONL reasoning chains (see README: data format)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--epochs", type=cli.positive, default=3, help="paper: 3")
    p.add_argument("--max-iters", type=cli.count, default=0, help="stop after this many optimizer steps (0: epochs decide)")
    p.add_argument("--lr", type=cli.positive, default=2e-5, help="peak learning rate (paper: 2e-5; LoRA usually wants ~1e-4 to 1e-3)")
    p.add_argument("--batch-size", type=cli.positive_int, default=16, help="chains per optimizer step (paper: 16)")
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
    p.add_argument("--question-expert", choices=("random", "analysis"), default="random",
                   help="the expert that reads the question in training: random, a step expert drawn per chain (the "
                   "paper's 'any expert can process the question'), or analysis, the one that reads it at inference (ours)")
    p.add_argument("--choice-weight", type=cli.positive, default=1.0, help="loss weight of the first choice, the first "
                   "marker the question's end predicts (ours; 1: the paper's plain mean over tokens)")
    p.add_argument("--balance-coef", type=cli.nonnegative, default=0.01, help="load-balancing loss weight (--routing token)")
    p.add_argument("--max-len", type=cli.positive_int, default=1024, help="longer chains are dropped and counted")
    p.add_argument("--val-frac", type=cli.fraction, default=0.1, help="share of chains held out for validation")
    p.add_argument("--eval-every", type=cli.count, default=0, help="validate every N iterations (0: at the end only)")
    p.add_argument("--save-every", type=cli.positive_int, default=50, help="write the resumable checkpoint every N iterations")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (an 8B base on 24 GB)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="the base's dtype; auto: bf16 on CUDA, fp32 on CPU. Experts always train in fp32")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    again.add_argument("--overwrite", action="store_true", help="replace the run in --out (else a run there is an error)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


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
    tokens, targets, _ = batch
    steps = mote.token_steps(tokens, base_vocab)
    return steps, mote.skip_targets(targets, steps, dropped)


def chain_loss(model, batch, base_vocab, question_expert, dropped):
    """One forward pass of MoTE training over a padded batch -> (per-token losses (N,), the step of
    each (N,), the balance loss of a token-gated baseline (0 for MoTE)).

    question_expert (B,) and dropped (B, 3) are the random draws (mote.draw_question_experts,
    mote.draw_drops); pass INFERENCE_QUESTION_EXPERT and no drops to evaluate."""
    tokens, _, valid = batch
    steps, targets = pass_targets(batch, base_vocab, dropped)
    mask = positions = None  # nothing dropped: plain causal attention (its fast path); right padding
    if dropped.any():        # comes after every real token, so no real token can see it
        mask, positions = mote.skip_mask(steps, dropped, valid)
    hidden = model.hidden(tokens, positions=positions, mask=mask, route=mote.route(steps, question_expert))
    # a loss counts to the step of the token it predicts: a start marker to the step it opens
    opened = mote.token_steps(targets.clamp(min=0)[..., None], base_vocab)[..., 0]
    target_steps = torch.where(opened != mote.QUESTION, opened, steps)
    balance = mote.balance_loss(model, valid & (steps != mote.QUESTION))  # over the chains' own tokens
    return chunked_token_losses(model.lm_head, hidden, targets), target_steps[targets != -100], balance


def per_step(losses, steps):
    """Sum of the token losses of each reasoning step, (3,) float64 (a plain sum: deterministic)."""
    return (F.one_hot(steps, len(mote.STEPS)).double() * losses.double()[:, None]).sum(0).cpu()


def autocast(device, dtype):
    """bf16 autocast when the base is bf16 (CUDA or CPU), else nothing (model.resolve_dtype)."""
    return torch.autocast(torch.device(device).type, torch.bfloat16, enabled=dtype == torch.bfloat16)


@torch.no_grad()
def evaluate(model, dataset, pad_id, base_vocab, micro, device, dtype):
    """Mean validation loss per step and overall: full chains, the inference question expert."""
    model.eval()
    sums, counts = torch.zeros(3, dtype=torch.float64), torch.zeros(3)
    for i in range(0, len(dataset), micro):
        batch = [t.to(device) for t in data.collate(dataset[i:i + micro], pad_id)]
        B = batch[0].shape[0]
        with autocast(device, dtype):
            losses, steps, _ = chain_loss(model, batch, base_vocab, torch.full((B,), mote.INFERENCE_QUESTION_EXPERT, device=device),
                                          torch.zeros(B, 3, dtype=torch.bool, device=device))
        sums += per_step(losses, steps)
        counts += torch.bincount(steps.cpu(), minlength=3).float()
    model.train()
    return {f"val_{k}": (sums[i] / counts[i]).item() if counts[i] else None for i, k in enumerate(mote.STEPS)} | \
        {"val_loss": (sums.sum() / counts.sum()).item() if counts.sum() else None}


def train_iteration(model, chains, base_vocab, pad_id, micro_batch, question_expert, dropped, balance_coef, device, dtype,
                    choice_weight=1.0):
    """Forward and backward over one iteration's chains, micro_batch chains per pass. The gradient is
    that of the mean loss over every token learned in the iteration (and of the balance loss, each
    pass weighted by its share of those tokens), whatever micro_batch is: each pass's summed loss is
    divided by the iteration's token count, counted before the first pass.
    choice_weight (ours; 1: the paper's plain mean): the weight in that sum of the first choice, the
    one loss per chain of the question's last token, which predicts the first marker (steps or a
    direct answer; the choice sample.take_steps thresholds), against 1 for every other token.
    question_expert (B,) and dropped (B, 3): the iteration's draws. -> (per-step loss sums (3,),
    per-step token counts (3,), chain tokens processed)."""
    passes = []
    for i in range(0, len(chains), micro_batch):
        batch = [t.to(device) for t in data.collate(chains[i:i + micro_batch], pad_id)]
        steps, targets = pass_targets(batch, base_vocab, dropped[i:i + micro_batch])
        is_choice = (steps == mote.QUESTION)[targets != -100]  # (N,), in chain_loss's order of losses
        passes.append((batch, question_expert[i:i + micro_batch], dropped[i:i + micro_batch], is_choice))
    n_learned = sum(len(is_choice) for *_, is_choice in passes)
    sums, counts, n_tokens = torch.zeros(3, dtype=torch.float64), torch.zeros(3), 0
    for batch, qexp, drop, is_choice in passes:
        with autocast(device, dtype):
            losses, steps, balance = chain_loss(model, batch, base_vocab, qexp, drop)
            weighted = torch.where(is_choice, choice_weight * losses, losses)
            loss = (weighted.sum() + balance_coef * balance * len(losses)) / max(n_learned, 1)
        loss.backward()
        sums += per_step(losses.detach(), steps)
        counts += torch.bincount(steps.cpu(), minlength=3).float()
        n_tokens += int(batch[2].sum())
    return sums, counts, n_tokens


RESUME_FREE = ("resume", "overwrite", "out", "save_every", "eval_every", "expert_config")  # may change
ADDED_FLAGS = {"choice_weight": 1.0, "question_expert": "random"}  # flags newer than some checkpoints: the value such a run trained with
RUN_FILES = ("metrics.jsonl", "checkpoint.safetensors", "adapters.safetensors")  # a folder holding one holds a run


def check_out(args, ckpt):
    """Refuse an --out that is a file, a run folder without --resume or --overwrite, or --resume
    without a checkpoint: one line, before anything is read or written."""
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        sys.exit(f"error: {args.out}: is a file; --out takes a folder for the run")
    if args.resume and not os.path.exists(ckpt):
        sys.exit(f"error: {ckpt}: does not exist, so there is no run to --resume")
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(args.out, f))]
    if held and not (args.resume or args.overwrite):
        sys.exit(f"error: {args.out}: holds a run ({', '.join(held)}); give --resume to continue it or --overwrite "
                 "to replace it")


def check_resume(saved: dict, config: dict, path: str):
    """A resumed run must be the same run: raise ValueError naming path and every flag that differs."""
    saved = ADDED_FLAGS | saved
    differ = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {config[k]!r}" for k in sorted(config)
              if k not in RESUME_FREE and saved.get(k) != config[k]]
    if differ:
        raise ValueError(f"{path}: --resume with flags that differ from the checkpoint's: " + "; ".join(differ) +
                         " (resume with the run's own flags, or start a new run in another --out)")


def save_checkpoint(path, model, opt, rng, iter_num, config):
    """Everything --resume needs, as safetensors (no pickle), written atomically (mote.replacing)."""
    params = [p for p in model.parameters() if p.requires_grad]
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {"param." + names[id(p)]: p.detach() for p in params}
    for i, p in enumerate(params):
        for key, value in opt.state.get(p, {}).items():
            tensors[f"opt.{i}.{key}"] = value.detach() if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng"] = rng.get_state()
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    with mote.replacing(path) as tmp:
        save_file(tensors, tmp, metadata={"iter_num": str(iter_num), "config": json.dumps(config)})


def read_checkpoint(path) -> tuple:
    """What save_checkpoint wrote: (config, iter_num, tensors); ValueError naming path if it is not that."""
    try:
        with safe_open(path, framework="pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        return json.loads(meta["config"]), int(meta["iter_num"]), tensors
    except (SafetensorError, KeyError, ValueError) as e:
        reason = f"no {e} metadata" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"{path}: not a checkpoint written by train.py, or cut short ({reason}); restore it, "
                         "or start over with --overwrite") from None


def load_checkpoint(tensors, model, opt, rng):
    """Restore the model's trainable tensors, the optimizer and the generator from read_checkpoint's tensors."""
    named = dict(model.named_parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for name, p in named.items():
            if p.requires_grad:
                p.copy_(tensors["param." + name])
    for i, p in enumerate(params):
        state = {k.split(".", 2)[2]: v.to(p.device) for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
        if state:
            opt.state[p] = state
    rng.set_state(tensors["rng"])


def resumed_log(path, start) -> list:
    """The lines of metrics.jsonl up to the checkpoint's iteration `start`. A half-written last line
    (a crash while appending) is dropped with a note: each record is written before its checkpoint,
    so it is of a later iteration. A missing log, any other bad line, or a log without the record
    of iteration `start` raises ValueError."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: does not exist; --resume needs the run's log beside its checkpoint (restore it, "
                         "or start over with --overwrite)")
    lines = open(path, encoding="utf-8", errors="replace").read().splitlines(keepends=True)
    kept, last, half = [], None, None
    for n, line in enumerate(lines, 1):
        try:
            it = int(json.loads(line)["iter"])
        except (ValueError, KeyError, TypeError):
            if n < len(lines) or line.endswith("\n"):
                raise ValueError(f"{path}:{n}: not a metrics record; restore the log, or start over with --overwrite") from None
            half = n
            break
        if it <= start:
            kept.append(line)
            last = it
    if last != start:
        raise ValueError(f"{path}: has no record of iteration {start}, the checkpoint's: the log is cut short; "
                         "restore it, or start over with --overwrite")
    if half:
        print(f"note: {path}:{half}: dropped a half-written last record (of an iteration after the checkpoint's)",
              file=sys.stderr)
    return kept


def main(argv=None):
    args = parse_args(argv)
    ckpt, log_path = os.path.join(args.out, "checkpoint.safetensors"), os.path.join(args.out, "metrics.jsonl")
    check_out(args, ckpt)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_dtype(args.dtype, device)
    try:
        chains = data.read_chains(args.data)
    except data.DataError as e:
        sys.exit(f"error: {e}")

    try:
        base = Transformer.from_pretrained(args.base, dtype=dtype, device=device)
        tok = tokenizer.load_tokenizer(args.base)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
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
        sys.exit(f"error: {args.data}: no training chains left ({len(train_chains)} after --val-frac {args.val_frac}, "
                 f"{n_long} of them longer than --max-len {args.max_len} tokens); raise --max-len or lower --val-frac")
    if args.val_frac > 0 and not val_set:
        sys.exit(f"error: {args.data}: no validation chains left ({len(val_chains)} held out by --val-frac "
                 f"{args.val_frac}, {n_long_val} of them longer than --max-len {args.max_len} tokens); raise --max-len "
                 "or --val-frac, or give --val-frac 0")

    torch.manual_seed(args.seed)
    cfg = mote.ExpertConfig(rank=args.rank, lora_alpha=args.lora_alpha, alpha=args.alpha,
                            routing=args.routing, shared=not args.no_shared)
    model = mote.attach(base, cfg).train()
    model.checkpointing = args.checkpointing
    trainable, total = mote.parameter_counts(model)
    print(f"experts: {cfg}; base {str(dtype).removeprefix('torch.')}; trainable {trainable:,} of {total:,} "
          f"parameters ({100 * trainable / total:.2f}%)")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    rng = torch.Generator().manual_seed(args.seed)  # question experts and step drops
    iters_per_epoch = math.ceil(len(train_set) / args.batch_size)
    total_iters = args.max_iters or math.ceil(args.epochs * iters_per_epoch)
    config = vars(args) | {"expert_config": asdict(cfg)}
    start, pad = 0, tok.eot_id
    if args.resume:
        try:
            saved_config, start, tensors = read_checkpoint(ckpt)
            check_resume(saved_config, config, ckpt)
            log = resumed_log(log_path, start)
        except ValueError as e:
            sys.exit(f"error: {e}")
        load_checkpoint(tensors, model, opt, rng)
    before = None
    if start == 0 and val_set:  # the losses before any training, for comparison
        before = {"iter": 0} | evaluate(model, val_set, pad, V, args.micro_batch, device, dtype)
        if not math.isfinite(before["val_loss"]):
            sys.exit(f"error: {args.base}: the validation loss before any training is {before['val_loss']}: the base "
                     f"holds NaN or inf weights, or overflows in {str(dtype).removeprefix('torch.')}")

    # everything is checked: only now is --out written
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        sys.exit(f"error: {args.out}: cannot create the folder ({e.strerror})")
    if args.resume:
        with mote.replacing(log_path) as tmp, open(tmp, "w") as f:  # the log of the iterations the checkpoint holds
            f.writelines(log)
        print(f"resumed from {ckpt} at iteration {start}")
    else:  # a new run: an old one is there only with --overwrite (check_out)
        for name in RUN_FILES:
            if os.path.exists(os.path.join(args.out, name)):
                os.remove(os.path.join(args.out, name))
    json.dump(config, open(os.path.join(args.out, "train_config.json"), "w"), indent=1)
    if before:
        with open(log_path, "a") as f:
            f.write(json.dumps(before) + "\n")

    uniform = math.log(V + len(mote.MARKERS))  # the loss of a uniform prediction
    saved, stuck = start, 0  # the last checkpoint's iteration; iterations in a row at the uniform loss
    bar = tqdm(range(start, total_iters), initial=start, total=total_iters, desc="train", dynamic_ncols=True)
    for iter_num in bar:
        t0 = time.time()
        epoch, k = divmod(iter_num, iters_per_epoch)
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed + epoch))
        chosen = [train_set[i] for i in order[k * args.batch_size:(k + 1) * args.batch_size].tolist()]
        lr = lr_at(iter_num, total_iters, args.warmup, args.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        # one draw per chain of the iteration, before it is split into micro-batches
        qexp = mote.draw_question_experts(len(chosen), rng, device, fixed=args.question_expert == "analysis")
        dropped = mote.draw_drops(len(chosen), args.skip_p, rng, device)
        sums, counts, n_tokens = train_iteration(model, chosen, V, pad, args.micro_batch, qexp, dropped,
                                                 args.balance_coef, device, dtype, args.choice_weight)
        loss = (sums.sum() / counts.sum()).item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip).item()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # stop before the step spoils the experts
            bar.close()
            sys.exit(f"error: {args.out}: iteration {iter_num + 1}: the loss is {loss:.4g} and the gradient norm "
                     f"{grad_norm:.4g}; stopped before its optimizer step, keeping "
                     f"{f'the checkpoint of iteration {saved}' if saved else 'no checkpoint'} and writing no "
                     "adapters (NaN or inf weights in the base, or too high a --lr?)")
        stuck = stuck + 1 if abs(loss - uniform) < 0.05 and grad_norm < 1e-6 else 0
        if stuck == 20:
            tqdm.write(f"warning: iterations {iter_num - 18}-{iter_num + 1}: the loss sits at ln(vocab) = "
                       f"{uniform:.2f} with no gradient: the model predicts a uniform distribution and learns "
                       "nothing (too high a --lr?)", file=sys.stderr)
        opt.step()
        opt.zero_grad(set_to_none=True)
        record = {"iter": iter_num + 1, "epoch": round((iter_num + 1) / iters_per_epoch, 3), "lr": lr,
                  "loss": loss, "grad_norm": grad_norm, "tokens_per_s": round(n_tokens / (time.time() - t0), 1)}
        record |= {f"loss_{s}": (sums[i] / counts[i]).item() if counts[i] else None for i, s in enumerate(mote.STEPS)}
        last = iter_num + 1 == total_iters
        if val_set and ((args.eval_every and (iter_num + 1) % args.eval_every == 0) or last):
            record |= evaluate(model, val_set, pad, V, args.micro_batch, device, dtype)
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        bar.set_postfix({k[5:] if k.startswith("loss_") else k: f"{v:.3f}" for k, v in record.items()
                         if k.startswith("loss_") and v is not None} | {"tok/s": f"{record['tokens_per_s']:.0f}"})
        if (iter_num + 1) % args.save_every == 0 or last:
            save_checkpoint(ckpt, model, opt, rng, iter_num + 1, config)
            saved = iter_num + 1
    mote.save_adapters(model, os.path.join(args.out, "adapters.safetensors"))
    final = json.loads(open(log_path).read().splitlines()[-1]) if os.path.exists(log_path) else {}
    print("final:", {k: round(v, 4) for k, v in final.items() if k.startswith(("loss", "val_")) and v is not None})
    print(f"wrote {args.out}/adapters.safetensors, checkpoint.safetensors, metrics.jsonl")


if __name__ == "__main__":
    main()
