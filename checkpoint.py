"""A training run's folder (train.py): the checks before anything is written, the resumable
checkpoint (safetensors, no pickle), the log up to a checkpoint, and starting a new or resumed run.

    DIR/train_config.json      every flag of the run (train.py --resume reads them back)
    DIR/metrics.jsonl          one record per iteration ("iter"; iteration 0: before training)
    DIR/loss.svg               the log's picture, redrawn at each validation (svg.loss_curve)
    DIR/checkpoint.safetensors the trainable tensors, AdamW's state, the generator, the iteration
    DIR/adapters.safetensors   the experts alone, for sample.py (mote.save_adapters)
"""
import json
import os
import sys

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import mote

RESUME_FREE = ("resume", "overwrite", "out", "save_every", "eval_every", "max_iters", "base_abspath", "expert_config")
# flags newer than some saved runs, with the value such a run trained with: a loss weight of 1 is the
# plain mean, so a run saved before the flag resumes as if saved with it (any other flag newer than a
# checkpoint, e.g. --question-expert, changed what the older train.py did: no value can stand for it)
NEUTRAL_WHEN_ABSENT = {"conclusion_weight": 1.0, "harmful_weight": 1.0}
RUN_FILES = ("metrics.jsonl", "checkpoint.safetensors", "adapters.safetensors", "loss.svg")  # a folder holding one holds a run


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
    """A resumed run must be the same run: raise ValueError naming path and every flag that differs
    (a flag newer than the checkpoint included: its run trained without it; NEUTRAL_WHEN_ABSENT)."""
    saved = NEUTRAL_WHEN_ABSENT | saved
    newer = sorted(k for k in config if k not in saved and k not in RESUME_FREE)
    if newer:
        raise ValueError(f"{path}: written before --{newer[0].replace('_', '-')} existed, so it cannot be resumed with "
                         "this train.py; start a new run in another --out")
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
        config = json.loads(meta["config"])
        if isinstance(config.get("data"), str):  # saved before --data took several files: the same run
            config["data"] = [config["data"]]
        return config, int(meta["iter_num"]), tensors
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


def start_run(args, config, model, opt, rng, total_iters, before_training, rank=0):
    """Write the run folder's config and the log's first lines: a new run replaces an old one (only
    with --overwrite, check_out), a resumed one restores its checkpoint and keeps the log up to it.
    before_training(): the validation record before any training. -> the iteration to start at."""
    ckpt, log_path = os.path.join(args.out, "checkpoint.safetensors"), os.path.join(args.out, "metrics.jsonl")
    start, before = 0, None
    if args.resume:
        try:
            saved_config, start, tensors = read_checkpoint(ckpt)
            check_resume(saved_config, config, ckpt)
            log = resumed_log(log_path, start)
        except ValueError as e:
            sys.exit(f"error: {e}")
        if total_iters <= start:
            sys.exit(f"error: {ckpt}: holds {start} iterations, the whole run; give --max-iters above {start} to extend it")
        load_checkpoint(tensors, model, opt, rng)
    elif rank == 0:
        before = before_training()
    if rank != 0:  # rank 0 writes the run folder
        return start
    try:  # everything is checked: only now is --out written
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        sys.exit(f"error: {args.out}: cannot create the folder ({e.strerror})")
    if args.resume:
        with mote.replacing(log_path) as tmp, open(tmp, "w") as f:  # the log of the iterations the checkpoint holds
            f.writelines(log)
        print(f"resumed from {ckpt} at iteration {start}")
    else:
        for name in RUN_FILES:
            if os.path.exists(os.path.join(args.out, name)):
                os.remove(os.path.join(args.out, name))
    json.dump(config, open(os.path.join(args.out, "train_config.json"), "w"), indent=1)
    if before:
        with open(log_path, "a") as f:
            f.write(json.dumps(before) + "\n")
    return start
