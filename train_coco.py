"""
Train mini-sd on COCO captions end to end through DiffusionModel.train: VAE -> latent scale -> latent cache -> UNet,
with checkpoints, exact resume, sample grids and a loss log. With no COCO on disk it trains the `small` preset on the
synthetic shapes dataset (COCO's layout), on any device, in minutes.

    python train_coco.py                                   # ./coco if there (base preset), else shapes (small)
    python train_coco.py --coco-dir /data/coco --set text_encoder=openai/clip-vit-base-patch32
    python train_coco.py --data my_images/                 # your own: metadata.jsonl, or a .txt beside each image
    torchrun --nproc_per_node 8 train_coco.py --coco-dir /data/coco
    python train_coco.py --out runs/mini-sd --resume       # the same run, from its latest checkpoint
    python mini_sd.py --checkpoint runs/mini-sd "a red circle in the top left" --out out.png
"""

import argparse
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
STAGE_FLAGS = {"vae": dict(steps="--vae-steps", batch_size="--vae-batch-size", lr="--vae-lr"),
               "unet": dict(steps="--unet-steps", batch_size="--batch-size", lr="--lr")}
SHARED = dict(  # TrainConfig fields both stages take from one flag; "": the field's own name says it
    grad_accum="", warmup="", ema="", cfg_dropout="", seed="", save_every="", keep="", sample_every="", log_every="",
    precision="auto: bf16 where the device has bf16 units, fp16 with loss scaling on older GPUs, else fp32",
    flip="random horizontal flips (they swap 'left' and 'right' in captions)",
    init_from="fine-tune from these weights: a mini-sd checkpoint, or Stable Diffusion in diffusers' layout (a folder "
              "or hub name, whose config the model then takes); a checkpoint in --out to resume wins",
    gradient_checkpointing="recompute the UNet's activations in the backward: less memory",
    ema_device="keep the UNet's EMA there, e.g. cpu, to spare the GPU's memory",
    compile="torch.compile the UNet and VAE")


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--coco-dir", help="COCO root with <split>/ and annotations/captions_<split>.json (default ./coco, else shapes)")
    a("--split", default="train2017", help="COCO split, e.g. train2017 or val2017")
    a("--data", help="a folder of your own captioned images instead of COCO (mini_sd.ImageFolder's layouts)")
    a("--shapes-dir", default="data/shapes", help="where the synthetic shapes dataset is built when there is no COCO")
    a("--shapes-n", type=int, help=f"number of synthetic images (default per preset: {SHAPES_N})")
    a("--preset", choices=sorted(mini_sd.PRESETS), help="model size (default: base with COCO or --data, else small)")
    a("--set", action="append", default=[], metavar="FIELD=VALUE", help="one Config field (JSON value or plain text), "
      "repeatable: --set block_out_channels=[64,128,256] --set prediction_type=epsilon --set zero_terminal_snr=false")
    a("--out", default="runs/mini-sd", help="output folder: checkpoints, samples, loss log, run.json (%(default)s)")
    for stage, flags in STAGE_FLAGS.items():
        defaults = {k: ", ".join(f"{p} {mini_sd.TRAINING[p][stage][k]}" for p in mini_sd.TRAINING) for k in flags}
        a(flags["steps"], type=int, help=f"{stage} optimiser steps; 0 skips the stage ({defaults['steps']})")
        a(flags["batch_size"], type=int, help=f"{stage} images per process and micro-batch ({defaults['batch_size']})")
        a(flags["lr"], type=float, help=f"{stage} peak learning rate ({defaults['lr']})")
    for name, text in SHARED.items():
        flag, default = "--" + name.replace("_", "-"), getattr(mini_sd.TrainConfig(), name)
        if default is False:  # a switch
            a(flag, action="store_true", help=text)
            continue
        a(flag, type=str if default is None else type(default), default=default,  # None: a path or a device
          choices=mini_sd.PRECISIONS if name == "precision" else None,
          help=(text or f"TrainConfig.{name}") + ("" if default is None else " (default %(default)s)"))
    a("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image loading processes (default %(default)s)")
    a("--resume", nargs="?", const="latest", help="continue the run in --out from its latest checkpoint with its "
      "stored arguments (flags given again win), or from a checkpoint PATH")
    return p


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def stage_args(args, stage):  # TrainConfig's fields of one stage, from the command line
    own = {k: getattr(args, flag[2:].replace("-", "_")) for k, flag in STAGE_FLAGS[stage].items()}
    return dict(stage=stage, **own, **{k: getattr(args, k) for k in SHARED}, num_workers=args.workers, out=args.out)


def parse_args(argv):  # every number checked before anything heavy loads
    p = parser()
    args = p.parse_args(argv)
    stored = os.path.join(args.out, "run.json")
    if args.resume and os.path.isfile(stored):  # the run's own arguments, then whatever this command line adds
        with open(stored) as f:
            saved = {k: v for k, v in json.load(f).items() if k not in ("resume", "out") and v is not None}
        if "config" in saved:  # runs started before --config went
            fail(f"{stored}: the run was started with --config {saved['config']}, which is gone: give its fields "
                 "with --set")
        p.set_defaults(**saved)
        args = p.parse_args(argv)
    for stage in STAGE_FLAGS:
        try:
            mini_sd.TrainConfig(**stage_args(args, stage))
        except ValueError as e:
            name, flags = str(e).split()[0], {**STAGE_FLAGS[stage], "num_workers": "--workers"}
            fail(flags.get(name, "--" + name.replace("_", "-")) + str(e)[len(name):])
    if args.shapes_n is not None and args.shapes_n < 1:
        fail(f"--shapes-n must be >= 1, got {args.shapes_n}")
    return args


def json_or_text(value):  # a --set value: JSON (a list, a number, true), else the text itself (flow, a model name)
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def make_config(args, preset):
    fields, flag = dict(mini_sd.PRESETS[preset], preset_name=preset), "--init-from"
    try:
        if args.init_from and mini_sd.is_diffusers(args.init_from):  # SD: its architecture, schedule and text
            root = mini_sd.pretrained_folder(args.init_from, mini_sd.PIPELINE_FILES)
            fields = {**mini_sd.sd_config(root), "text_encoder": args.init_from}
        flag = "--set"
        for key, sep, value in (item.partition("=") for item in args.set):
            if not sep:
                raise ValueError(f"--set {key!r}: write FIELD=VALUE")
            fields[key] = json_or_text(value)
        known = {f.name for f in dataclasses.fields(mini_sd.Config)}
        if set(fields) - known:
            raise ValueError(f"unknown Config field(s) {sorted(set(fields) - known)}; the fields are {sorted(known)}")
        return mini_sd.Config(**fields)
    except (OSError, ValueError) as e:
        fail(f"{flag}: {e}")


def load_data(args, rank):  # -> (dataset maker, preset): your folder, COCO, or the synthetic shapes
    root = args.coco_dir or "coco"
    images, captions = os.path.join(root, args.split), os.path.join(root, "annotations", f"captions_{args.split}.json")
    if args.data:
        return (lambda cfg: mini_sd.ImageFolder(args.data, cfg.image_size)), "base"
    if os.path.isdir(images) and os.path.isfile(captions):
        return (lambda cfg: mini_sd.CocoCaptions(images, captions, cfg.image_size)), "base"
    if args.coco_dir is not None or args.split != "train2017":  # asked for COCO: say what is missing
        fail(f"no COCO {args.split} at {root}: {captions if os.path.isdir(images) else images} not found; {COCO_HELP}")
    print(f"no COCO at ./{root}: training on synthetic shapes in {args.shapes_dir}", flush=True) if rank == 0 else None
    n = lambda cfg: args.shapes_n or SHAPES_N[cfg.preset_name]
    return (lambda cfg: mini_sd.CocoCaptions(*mini_sd.make_shapes_dataset(args.shapes_dir, n(cfg), cfg.image_size,
                                                                          args.seed), cfg.image_size)), "small"


def main(argv=None):
    args = parse_args(argv)
    rank, world = mini_sd.init_distributed()
    make_data, preset = load_data(args, rank)
    cfg = make_config(args, args.preset or preset)
    if args.resume == "latest" and not (os.path.isdir(args.out) and mini_sd.list_checkpoints(args.out)):
        fail(f"--resume: no checkpoint in {args.out}")
    try:  # fail now, not after an hour of training
        os.makedirs(args.out, exist_ok=True)
        tempfile.TemporaryFile(dir=args.out).close()
        if args.resume:  # a checkpoint of another config: said before the data is touched
            mini_sd.check_config(args.out if args.resume == "latest" else args.resume, cfg)
        data = make_data(cfg)
    except OSError as e:
        fail(f"output folder {args.out} is not writable: {e.strerror}" if e.filename in (None, args.out) else e)
    except ValueError as e:
        fail(e)
    if rank == 0:
        with open(os.path.join(args.out, "run.json"), "w") as f:
            json.dump({k: v for k, v in vars(args).items() if k != "resume"}, f, indent=1)
    torch.manual_seed(args.seed + rank)
    model = mini_sd.DiffusionModel(cfg)
    millions = lambda m: f"{mini_sd.count_parameters(m) / 1e6:.1f}M"
    print(f"preset {cfg.preset_name} on {model.device} x{world}; {len(data)} images; VAE {millions(model.vae)}, "
          f"UNet {millions(model.unet)} params", flush=True) if rank == 0 else None
    resume = args.resume and (True if args.resume == "latest" else args.resume)
    try:
        model.train(data, **stage_args(args, "vae"), resume=resume)
        # the UNet stage continues from the newest checkpoint in --out, which the VAE stage may just have written
        latest = bool(args.resume) and bool(mini_sd.list_checkpoints(args.out))
        model.train(data, **stage_args(args, "unet"), resume=True if latest else resume)
    except mini_sd.Interrupted as e:
        print(f"{e}; continue with: python train_coco.py --out {args.out} --resume", file=sys.stderr)
        sys.exit(128 + e.signum)  # 130 for SIGINT, 143 for SIGTERM: scripts can tell an interrupted run from a done one
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError) as e:
        hint = "; lower --lr or use --precision fp32, then --resume" if isinstance(e, FloatingPointError) else ""
        fail(f"{e}{hint}")
    if rank == 0:
        print(f"done: {args.out} (latest checkpoint), {args.out}/samples/ (grids), {args.out}/loss.csv\n"
              f"generate: python mini_sd.py --checkpoint {args.out} \"{data.items[0][1][0]}\" --seed 0 --out out.png")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
