"""
Train mini-sd on COCO captions end to end: VAE -> latent scale -> latent cache -> UNet, through
DiffusionModel.train (checkpoints, exact resume, sample grids, a loss log). With no COCO on disk it
trains the `small` preset on the synthetic shapes dataset (same layout), on any device, in minutes.

    python train_coco.py                                   # ./coco if there (base preset), else shapes (small)
    python train_coco.py --coco-dir /data/coco --set text_encoder=openai/clip-vit-base-patch32
    torchrun --nproc_per_node 8 train_coco.py --coco-dir /data/coco
    python train_coco.py --out runs/mini-sd --resume       # the same run, from its latest checkpoint
    python mini_sd.py --checkpoint runs/mini-sd "a red circle in the top left" --out out.png
"""

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist

import mini_sd

SHAPES_N = {"tiny": 256, "small": 2000, "base": 20000}  # synthetic images per preset
COCO_HELP = ("get COCO 2017 from https://cocodataset.org/#download (train2017.zip and annotations_trainval2017.zip, "
             "unzipped into one folder), or leave out --coco-dir to train on the synthetic shapes dataset")
PER_PRESET = {k: ", ".join(f"{p} {mini_sd.TRAINING[p][s][f]}" for p in mini_sd.TRAINING)
              for k, (s, f) in dict(vae_steps=("vae", "steps"), unet_steps=("unet", "steps"), vae_batch_size=("vae", "batch_size"),
                                    batch_size=("unet", "batch_size"), vae_lr=("vae", "lr"), lr=("unet", "lr")).items()}


class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # per-preset defaults are spelt out in the help itself
        return action.help if action.default is None else super()._get_help_string(action)


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    a = p.add_argument
    a("--coco-dir", default=None, help="COCO root with <split>/ and annotations/captions_<split>.json (default ./coco; "
                                       "if absent: synthetic shapes)")
    a("--split", default="train2017", help="COCO split, e.g. train2017 or val2017")
    a("--shapes-dir", default="data/shapes", help="where the synthetic shapes dataset is built when there is no COCO")
    a("--shapes-n", type=int, default=None, help=f"number of synthetic images (default per preset: {SHAPES_N})")
    a("--preset", choices=sorted(mini_sd.PRESETS), default=None, help="model size (default: base with COCO, else small)")
    a("--config", default=None, help="a JSON file of Config fields, applied on top of --preset")
    a("--set", action="append", default=[], metavar="FIELD=VALUE",
      help="one Config field (JSON value or plain text), repeatable: --set layers_per_block=1 --set "
           "block_out_channels=[64,128,256] --set prediction_type=epsilon --set zero_terminal_snr=false")
    a("--out", default="runs/mini-sd", help="output folder: checkpoints, samples, loss log, run.json")
    for stage, what in (("vae", "VAE"), ("unet", "UNet")):
        flag = "" if stage == "unet" else "vae-"
        a(f"--{stage}-steps", type=int, default=None, help=f"{what} optimiser steps; 0 skips the stage "
                                                           f"(default per preset: {PER_PRESET[stage + '_steps']})")
        a(f"--{flag}batch-size", type=int, default=None, help=f"{what} images per process and micro-batch "
                                                             f"(default per preset: {PER_PRESET[flag.replace('-', '_') + 'batch_size']})")
        a(f"--{flag}lr", type=float, default=None, help=f"{what} peak learning rate (default per preset: {PER_PRESET[flag.replace('-', '_') + 'lr']})")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    a("--warmup", type=int, default=100, help="linear warmup steps, then cosine decay")
    a("--ema", type=float, default=0.999, help="EMA decay of the UNet weights, in [0, 1) (0 = off); samples use the EMA")
    a("--cfg-dropout", type=float, default=0.1, help="probability of training on the empty caption")
    a("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
      help="auto: bf16 where the device has bf16 units, fp16 with loss scaling on older GPUs, else fp32")
    a("--compile", action="store_true", help="torch.compile the UNet and VAE")
    a("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image loading processes")
    a("--seed", type=int, default=0)
    a("--save-every", type=int, default=500, help="checkpoint every N steps (and at the end of each stage)")
    a("--keep", type=int, default=3, help="checkpoints kept")
    a("--sample-every", type=int, default=1000, help="captioned sample grid every N UNet steps (also once early, and at the end)")
    a("--log-every", type=int, default=50, help="a progress line every N steps when the output is not a terminal")
    a("--resume", nargs="?", const="latest", default=None,
      help="continue the run in --out from its latest checkpoint with its stored arguments, or from a checkpoint PATH")
    return p


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv):
    p = parser()
    args = p.parse_args(argv)
    stored = os.path.join(args.out, "run.json")
    if args.resume and os.path.isfile(stored):  # the run's own arguments, then whatever this command line adds
        with open(stored) as f:
            p.set_defaults(**{k: v for k, v in json.load(f).items() if k not in ("resume", "out") and v is not None})
        args = p.parse_args(argv)
    limits = dict(vae_steps="steps", unet_steps="steps", vae_batch_size="batch_size", vae_lr="lr", workers="num_workers")
    try:  # every number checked before anything heavy loads
        for name, value in vars(args).items():
            key = limits.get(name, name)
            if value is not None and key in mini_sd.TRAIN_LIMITS:
                mini_sd.check_range("--" + name.replace("_", "-"), value, *mini_sd.TRAIN_LIMITS[key])
        if args.shapes_n is not None:
            mini_sd.check_range("--shapes-n", args.shapes_n, 1)
    except ValueError as e:
        fail(e)
    return args


def make_config(args, have_coco):
    preset = args.preset or ("base" if have_coco else "small")
    try:
        fields = dict(mini_sd.PRESETS[preset], preset_name=preset)
        if args.config:
            with open(args.config) as f:
                fields.update(json.load(f))
        for key, sep, value in (item.partition("=") for item in args.set):
            if not sep:
                raise ValueError(f"--set {key!r}: write FIELD=VALUE")
            with contextlib.suppress(json.JSONDecodeError):  # else plain text, e.g. a text encoder's name
                value = json.loads(value)
            fields[key] = value
        known = {f.name for f in dataclasses.fields(mini_sd.Config)}
        if set(fields) - known:
            raise ValueError(f"unknown Config field(s) {sorted(set(fields) - known)}; the fields are {sorted(known)}")
        return mini_sd.Config(**fields)
    except (OSError, ValueError) as e:
        fail(f"--config/--set: {e}")


def main(argv=None):
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # torchrun: one process per device
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    rank, world = mini_sd.rank_and_world()
    log = lambda msg: print(msg, flush=True) if rank == 0 else None
    coco_dir = args.coco_dir or "coco"
    image_dir, captions = os.path.join(coco_dir, args.split), os.path.join(coco_dir, "annotations", f"captions_{args.split}.json")
    have_coco = os.path.isdir(image_dir) and os.path.isfile(captions)
    if not have_coco and (args.coco_dir is not None or args.split != "train2017"):  # asked for COCO: say what is missing
        fail(f"no COCO {args.split} at {coco_dir}: {image_dir if not os.path.isdir(image_dir) else captions} not found; {COCO_HELP}")
    cfg = make_config(args, have_coco)
    try:  # fail now, not after an hour of training
        os.makedirs(args.out, exist_ok=True)
        tempfile.TemporaryFile(dir=args.out).close()
    except OSError as e:
        fail(f"output folder {args.out} is not writable: {e.strerror}")
    if not have_coco:
        log(f"no COCO at ./{coco_dir}: training on synthetic shapes in {args.shapes_dir}")
        image_dir, captions = os.path.join(args.shapes_dir, "train2017"), os.path.join(args.shapes_dir, "annotations", "captions_train2017.json")
        if rank == 0 and not os.path.isfile(captions):
            mini_sd.make_shapes_dataset(args.shapes_dir, n=args.shapes_n or SHAPES_N[cfg.preset_name], image_size=cfg.image_size, seed=args.seed)
        mini_sd.any_rank(False)
    try:
        data = mini_sd.CocoCaptions(image_dir, captions, cfg.image_size)
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    if rank == 0:
        with open(os.path.join(args.out, "run.json"), "w") as f:
            json.dump({k: v for k, v in vars(args).items() if k != "resume"}, f, indent=1)
    torch.manual_seed(args.seed + rank)
    model = mini_sd.DiffusionModel(cfg)
    precision = mini_sd.choose_precision(model.device, args.precision)
    log(f"preset {cfg.preset_name} on {model.device} x{world}, {precision.name} ({precision.reason}); {len(data)} images; VAE "
        f"{mini_sd.count_parameters(model.vae) / 1e6:.1f}M, UNet {mini_sd.count_parameters(model.unet) / 1e6:.1f}M params")
    common = dict(out=args.out, warmup=args.warmup, grad_accum=args.grad_accum, ema=args.ema, cfg_dropout=args.cfg_dropout,
                  precision=args.precision, compile=args.compile, num_workers=args.workers, seed=args.seed,
                  save_every=args.save_every, keep=args.keep, sample_every=args.sample_every, log_every=args.log_every)
    resume = args.resume and (True if args.resume == "latest" else args.resume)
    if args.resume == "latest" and not mini_sd.list_checkpoints(args.out):
        fail(f"--resume: no checkpoint in {args.out}")
    try:
        model.train(data, stage="vae", steps=args.vae_steps, batch_size=args.vae_batch_size, lr=args.vae_lr, resume=resume, **common)
        # the UNet stage continues from the newest checkpoint in --out, which the VAE stage may just have written
        resume = True if args.resume and mini_sd.list_checkpoints(args.out) else resume
        model.train(data, stage="unet", steps=args.unet_steps, batch_size=args.batch_size, lr=args.lr, resume=resume, **common)
    except mini_sd.Interrupted as e:
        print(f"{e}; continue with: python train_coco.py --out {args.out} --resume", file=sys.stderr)
        sys.exit(128 + e.signum)  # 130 for SIGINT, 143 for SIGTERM: scripts can tell an interrupted run from a done one
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        fail(f"{e}" + ("; lower --lr or use --precision fp32, then --resume" if isinstance(e, FloatingPointError) else ""))
    log(f"done: {args.out} (latest checkpoint), {args.out}/samples/ (grids), {args.out}/loss.csv and loss.png\n"
        f"generate: python mini_sd.py --checkpoint {args.out} \"{data.items[0][1][0]}\" --seed 0 --out out.png")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
