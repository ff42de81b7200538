"""
Train mini-sd on COCO captions end to end: VAE -> latent scale -> latent cache -> UNet, with
checkpoints, exact resume, sample grids and a loss log. With no COCO on disk it trains on the
synthetic shapes dataset (same layout), so `python train_coco.py` works offline on a laptop.

    python train_coco.py                                   # ./coco if there, else ./data/shapes
    python train_coco.py --coco-dir /data/coco --preset base
    torchrun --nproc_per_node 8 train_coco.py --coco-dir /data/coco
    python train_coco.py --resume                          # the latest checkpoint in --out
    python mini_sd.py --checkpoint runs/mini-sd/model "a red circle in the top left" --out out.png
"""

import argparse
import csv
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

import mini_sd
from mini_sd import Config, DiffusionModel, Trainer

# Per preset: the steps and batch that make a sensible default run. small is sized to finish in
# about 10-15 minutes on 2 CPU cores; base is a starting point for 256 px COCO on one GPU.
DEFAULTS = {
    "tiny": dict(vae_steps=100, unet_steps=200, vae_batch_size=16, batch_size=16, vae_lr=1e-3, lr=1e-3, shapes_n=256),
    "small": dict(vae_steps=400, unet_steps=1600, vae_batch_size=16, batch_size=32, vae_lr=1e-3, lr=5e-4, shapes_n=2000),
    "base": dict(vae_steps=30000, unet_steps=300000, vae_batch_size=16, batch_size=64, vae_lr=2e-4, lr=1e-4,
                 shapes_n=20000),
}
PROMPTS = {
    "shapes": ["a red circle in the top left", "a blue square in the bottom right", "a green triangle in the center",
               "a yellow circle in the top right", "a purple square in the bottom left", "a red triangle in the top right",
               "a blue circle in the center", "a green square in the top left"],
    "coco": ["a cat sitting on a couch", "a plate of food with broccoli", "a man riding a wave on a surfboard",
             "a red double decker bus on a street", "a kitchen with white cabinets", "a giraffe standing in a field",
             "a bowl of fruit on a table", "an airplane flying in a blue sky"],
}
COCO_HELP = ("get COCO 2017 from https://cocodataset.org/#download (train2017.zip and annotations_trainval2017.zip, "
             "unzipped into one folder), or leave out --coco-dir to train on the synthetic shapes dataset")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--coco-dir", default=None, help="COCO root holding <split>/ and annotations/captions_<split>.json (default ./coco; "
                                       "if absent, train on synthetic shapes)")
    a("--split", default="train2017", help="COCO split, e.g. train2017 or val2017")
    a("--shapes-dir", default="data/shapes", help="where the synthetic shapes dataset is built when there is no COCO")
    a("--shapes-n", type=int, default=None, help="number of synthetic images (default per preset)")
    a("--preset", choices=sorted(mini_sd.PRESETS), default=None, help="model size (default: small on CPU, base on GPU)")
    a("--out", default="runs/mini-sd", help="output folder: checkpoints, samples, loss log")
    a("--vae-steps", type=int, default=None, help="VAE optimiser steps (default per preset)")
    a("--unet-steps", type=int, default=None, help="UNet optimiser steps (default per preset)")
    a("--skip-vae", action="store_true", help="keep the VAE of --resume and go straight to the UNet")
    a("--skip-unet", action="store_true", help="stop after the VAE, its latent scale and the latent cache")
    a("--vae-batch-size", type=int, default=None, help="VAE images per process, per micro-batch (default per preset)")
    a("--batch-size", type=int, default=None, help="UNet latents per process, per micro-batch (default per preset)")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    a("--lr", type=float, default=None, help="UNet peak learning rate (default per preset)")
    a("--vae-lr", type=float, default=None, help="VAE peak learning rate (default per preset)")
    a("--warmup", type=int, default=100, help="linear warmup steps, then cosine decay")
    a("--ema", type=float, default=0.999, help="EMA decay of the UNet weights (0 = off); samples use the EMA")
    a("--cfg-dropout", type=float, default=0.1, help="probability of training on the empty caption")
    a("--precision", choices=["bf16", "fp32"], default=None, help="bf16 autocast (default where supported) or fp32")
    a("--compile", action="store_true", help="torch.compile the UNet and VAE")
    a("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image loading processes")
    a("--seed", type=int, default=0)
    a("--save-every", type=int, default=500, help="checkpoint every N steps (and at the end of each stage)")
    a("--keep", type=int, default=3, help="checkpoints kept")
    a("--sample-every", type=int, default=1000, help="sample grid every N UNet steps (and at the end)")
    a("--log-every", type=int, default=50, help="print a progress line every N steps")
    a("--resume", nargs="?", const="latest", default=None, help="continue from the latest checkpoint in --out, or a path")
    return p.parse_args(argv)


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# -----------------------------------------------------------------------------
# Checkpoints: model.save() plus the training state, tensors in safetensors and the rest in JSON


def flatten(obj, tensors, prefix="t"):
    """Nested state (optimizer, RNG, ...) -> JSON-able structure; tensors move to `tensors` by key."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}.{len(tensors)}"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[flatten(k, tensors), flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [flatten(v, tensors) for v in obj]
    return obj


def unflatten(obj, tensors):
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict):
        return {unflatten(k, tensors): unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


def save_checkpoint(out, model, state, keep):
    """Write out/ckpt-<stage>-<step>/ in a temporary folder, then rename: a crash never leaves half a checkpoint."""
    name = f"ckpt-{state['stage']}-{state['step']:07d}"
    final, tmp = os.path.join(out, name), os.path.join(out, f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp)
    tensors = {}
    structure = flatten(state, tensors)
    mini_sd.save_safetensors(tensors, os.path.join(tmp, "trainer.safetensors"), {"state": json.dumps(structure)})
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out):  # oldest first: stage order, then step
    names = [n for n in os.listdir(out) if n.startswith("ckpt-") and os.path.isfile(os.path.join(out, n, "trainer.safetensors"))]
    return [os.path.join(out, n) for n in sorted(names, key=lambda n: (n.split("-")[1] == "unet", n))]


def load_checkpoint(path, model):
    model.load_weights(path)  # a checkpoint of another config fails here, naming the fields
    tensors, meta = mini_sd.load_safetensors(os.path.join(path, "trainer.safetensors"))
    return unflatten(json.loads(meta["state"]), tensors)


# -----------------------------------------------------------------------------
# Data order: a seeded permutation per epoch, sharded across processes, resumable at any batch


def batch_order(n, batch_size, seed, rank, world, start):
    per_epoch = n // world // batch_size
    if per_epoch == 0:
        fail(f"{n} images are fewer than one batch of {batch_size} per process")
    epoch, perm = -1, None
    for b in range(start, sys.maxsize):
        if b // per_epoch != epoch:
            epoch = b // per_epoch
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))[rank::world]
        i = b % per_epoch
        yield perm[i * batch_size : (i + 1) * batch_size].tolist()


class Readable(Dataset):  # (image or None, index): the latent cache records which images could be read
    def __init__(self, coco):
        self.coco = coco

    def __len__(self):
        return len(self.coco)

    def __getitem__(self, i):
        return self.coco.load(i), i


def ignore_signals(worker_id):  # Ctrl-C reaches the loader processes too: only the main process may act on it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def collate_readable(batch):
    ok = [(x, i) for x, i in batch if x is not None]
    return (torch.stack([x for x, _ in ok]) if ok else None), [i for _, i in ok]


@torch.no_grad()
def latent_cache(model, coco, args, cache_dir):
    """Encode every image once (posterior means, unscaled); reused until the VAE or the data change."""
    h = hashlib.sha256()
    for k, v in model.vae.encoder.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps([coco.image_size, [p for p, _ in coco.items]]).encode())
    path = os.path.join(cache_dir, f"latents-{h.hexdigest()[:16]}.safetensors")
    if args.rank == 0 and not os.path.exists(path):
        os.makedirs(cache_dir, exist_ok=True)
        loader = DataLoader(Readable(coco), batch_size=args.batch_size, num_workers=args.workers,
                            collate_fn=collate_readable, worker_init_fn=ignore_signals, generator=torch.Generator())
        latents, index, t0 = [], [], time.time()
        for images, idx in loader:
            if images is not None:
                latents.append(model.vae.encode(images.to(model.device))[0].cpu())
                index += idx
        mini_sd.save_safetensors({"latents": torch.cat(latents), "index": torch.tensor(index)}, path)
        log(args, f"latent cache: {len(index)} images encoded in {time.time() - t0:.0f}s, "
                  f"{len(coco) - len(index)} unreadable skipped -> {path}")
    barrier(args)
    tensors, _ = mini_sd.load_safetensors(path)
    return tensors["latents"], tensors["index"].tolist()


# -----------------------------------------------------------------------------
# Logging, samples and the loss curve (rank 0 only)


def log(args, msg):
    if args.rank == 0:
        print(msg, flush=True)


def barrier(args):
    if args.world > 1:
        dist.barrier()


def plot_losses(rows, path, width=900, height=320):
    """The loss log as a PNG: one panel per stage, raw loss in grey and a running mean in colour, log scale."""
    stages = [s for s in ("vae", "unet") if any(r["stage"] == s for r in rows)]
    img = Image.new("RGB", (width, height * len(stages)), "white")
    draw = ImageDraw.Draw(img)
    for k, stage in enumerate(stages):
        steps = [int(r["step"]) for r in rows if r["stage"] == stage]
        loss = [max(float(r["loss"]), 1e-8) for r in rows if r["stage"] == stage]
        ys = [math.log10(v) for v in loss]
        smooth = [sum(ys[max(0, i - 24) : i + 1]) / len(ys[max(0, i - 24) : i + 1]) for i in range(len(ys))]
        lo, hi, top, x0, x1 = min(ys), max(ys) + 1e-9, k * height, 60, width - 20
        to_xy = lambda s, y: (x0 + (x1 - x0) * (s - steps[0]) / max(1, steps[-1] - steps[0]),
                              top + 30 + (height - 60) * (hi - y) / (hi - lo))
        draw.rectangle([x0, top + 30, x1, top + height - 30], outline="black")
        draw.text((x0, top + 8), f"{stage} loss (log10), steps {steps[0]}-{steps[-1]}", fill="black")
        draw.text((4, top + 30), f"{10 ** hi:.3g}", fill="black")
        draw.text((4, top + height - 40), f"{10 ** lo:.3g}", fill="black")
        if len(steps) > 1:
            draw.line([to_xy(s, y) for s, y in zip(steps, ys)], fill=(190, 190, 190))
            draw.line([to_xy(s, y) for s, y in zip(steps, smooth)], fill=(200, 40, 40), width=2)
    img.save(path)


def sample_grid(model, prompts, path, seed):
    images = model.sample(prompts, steps=25, guidance_scale=5.0, seed=seed)
    mini_sd.make_grid(images, cols=4).save(path)


# -----------------------------------------------------------------------------
# Training


def train_stage(stage, model, args, data, state):
    """Run one stage from `state` (a resumed checkpoint's, or a fresh one) to its last step."""
    steps, lr, batch_size = ((args.vae_steps, args.vae_lr, args.vae_batch_size) if stage == "vae"
                             else (args.unet_steps, args.lr, args.batch_size))
    trainer = Trainer(model, stage, steps, lr, args.warmup, ema=args.ema, cfg_dropout=args.cfg_dropout,
                      autocast=args.precision == "bf16")
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        if len(state["rng"]) == args.world:
            torch.set_rng_state(state["rng"][args.rank])
        else:
            log(args, f"warning: checkpoint has {len(state['rng'])} processes' RNG states, this run has {args.world}")
    if trainer.step_count >= steps:
        return
    start = trainer.step_count * args.grad_accum
    order = batch_order(len(data), batch_size, args.seed + (stage == "unet"), args.rank, args.world, start)
    if stage == "vae":  # images from disk, decoded in worker processes
        batches = iter(DataLoader(data, batch_sampler=order, num_workers=args.workers, generator=torch.Generator(),
                                  worker_init_fn=ignore_signals))
    else:  # cached latents in memory, one of each image's captions drawn from the (checkpointed) torch RNG
        latents, captions, scale = data.latents, data.captions, model.vae.scaling_factor.item()
        batches = ((latents[idx] * scale,
                    [captions[i][torch.randint(len(captions[i]), ()).item()] for i in idx]) for idx in order)
    model.train()
    t0, done = time.time(), trainer.step_count
    while trainer.step_count < steps:
        try:
            loss = trainer.step([next(batches) for _ in range(args.grad_accum)])
        except FloatingPointError as e:
            ckpts = list_checkpoints(args.out)
            fail(f"{e}. The last good checkpoint is {ckpts[-1] if ckpts else 'none (none saved yet)'}; "
                 "lower --lr or use --precision fp32, then --resume")
        step = trainer.step_count
        if args.rank == 0:
            args.log_writer.writerow([stage, step, f"{loss:.6f}", f"{trainer.sched.get_last_lr()[0]:.3e}"])
            args.log_file.flush()
        if step % args.log_every == 0 or step == steps:
            rate = (time.time() - t0) / (step - done)
            log(args, f"{stage} step {step}/{steps}  loss {loss:.4f}  lr {trainer.sched.get_last_lr()[0]:.2e}  {rate:.2f} s/step")
        stop = stop_requested(args)
        if step % args.save_every == 0 or step == steps or stop:
            checkpoint(model, trainer, stage, args)
        if stage == "unet" and args.rank == 0 and (step % args.sample_every == 0 or step == steps):
            sample_grid(model, args.prompts, os.path.join(args.out, "samples", f"step-{step:07d}.png"), args.seed)
        if stop:
            log(args, f"stopped by signal at {stage} step {step}; continue with: python train_coco.py --out {args.out} --resume")
            sys.exit(0)
    model.eval()


def checkpoint(model, trainer, stage, args):
    rng = torch.get_rng_state()
    rngs = [rng] if args.world == 1 else all_gather(rng, args)
    if args.rank == 0:
        state = {"stage": stage, "step": trainer.step_count, "trainer": trainer.state_dict(), "rng": rngs}
        path = save_checkpoint(args.out, model, state, args.keep)
        log(args, f"saved {path}")
    barrier(args)


def all_gather(tensor, args):
    out = [None] * args.world
    dist.all_gather_object(out, tensor)
    return out


STOP = []


def stop_requested(args):  # every process must agree, or one would wait forever in a collective
    flag = torch.tensor([1.0 if STOP else 0.0])
    if args.world > 1:
        dist.all_reduce(flag)
    return flag.item() > 0


class Latents:
    def __init__(self, latents, captions):
        self.latents, self.captions = latents, captions

    def __len__(self):
        return len(self.latents)


def setup(args):
    args.world = int(os.environ.get("WORLD_SIZE", "1"))
    args.rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if args.world > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    device = mini_sd.default_device()
    args.preset = args.preset or ("small" if device.type == "cpu" else "base")
    for k, v in DEFAULTS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.precision is None:
        args.precision = "bf16" if mini_sd.bf16_supported(device) else "fp32"
    try:  # fail now, not after an hour of training
        os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
        tempfile.TemporaryFile(dir=args.out).close()
    except OSError as e:
        fail(f"output folder {args.out} is not writable: {e.strerror}")
    for sig in (signal.SIGINT, signal.SIGTERM):  # finish the step, save, exit
        signal.signal(sig, lambda *_: STOP.append(True))


def find_data(args, image_size):
    coco_dir = args.coco_dir or "coco"
    image_dir, captions = os.path.join(coco_dir, args.split), os.path.join(coco_dir, "annotations", f"captions_{args.split}.json")
    if not (os.path.isdir(image_dir) and os.path.isfile(captions)):
        if args.coco_dir is not None or args.split != "train2017":  # asked for COCO explicitly: say what is missing
            missing = image_dir if not os.path.isdir(image_dir) else captions
            fail(f"no COCO {args.split} at {coco_dir}: {missing} not found; {COCO_HELP}")
        image_dir = os.path.join(args.shapes_dir, "train2017")
        captions = os.path.join(args.shapes_dir, "annotations", "captions_train2017.json")
        log(args, f"no COCO at ./{coco_dir}: training on synthetic shapes in {args.shapes_dir}")
        if args.rank == 0 and not os.path.isfile(captions):
            mini_sd.make_shapes_dataset(args.shapes_dir, n=args.shapes_n, image_size=image_size, seed=args.seed)
        barrier(args)
    coco = mini_sd.CocoCaptions(image_dir, captions, image_size)
    # sample grids at prompts the data can answer: shape prompts for a shapes set (also a derived one, e.g.
    # eval_quality.py's with held-out combinations dropped), also when given as --coco-dir
    args.prompts = PROMPTS["shapes" if coco.description.startswith(mini_sd.SHAPES_DESCRIPTION) else "coco"]
    return coco


def main(argv=None):
    args = parse_args(argv)
    setup(args)
    torch.manual_seed(args.seed + args.rank)
    model = DiffusionModel(Config.preset(args.preset))
    coco = find_data(args, model.config.image_size)
    state = None
    if args.resume:
        ckpts = list_checkpoints(args.out) if args.resume == "latest" else [args.resume]
        if not ckpts:
            fail(f"--resume: no checkpoint in {args.out}")
        try:
            state = load_checkpoint(ckpts[-1], model)
        except (FileNotFoundError, ValueError) as e:
            fail(f"--resume: {e}")
        log(args, f"resumed {ckpts[-1]} ({state['stage']} step {state['step']})")
    if args.compile:
        model.compile()
    # the loss log keeps only the steps before the checkpoint, so a resumed run continues it exactly
    log_path = os.path.join(args.out, "loss.csv")
    rows = list(csv.DictReader(open(log_path))) if state is not None and os.path.isfile(log_path) else []
    order = lambda r: (r["stage"] == "unet", int(r["step"]))
    rows = [r for r in rows if state is not None and order(r) <= (state["stage"] == "unet", state["step"])]
    if args.rank == 0:
        args.log_file = open(log_path, "w", newline="")
        args.log_writer = csv.writer(args.log_file)
        args.log_writer.writerow(["stage", "step", "loss", "lr"])
        args.log_writer.writerows([[r["stage"], r["step"], r["loss"], r["lr"]] for r in rows])
    log(args, f"preset {args.preset} on {model.device} x{args.world}, {args.precision}; {len(coco)} images; "
              f"VAE {mini_sd.count_parameters(model.vae) / 1e6:.1f}M, UNet {mini_sd.count_parameters(model.unet) / 1e6:.1f}M params")

    in_unet = state is not None and state["stage"] == "unet"
    if args.skip_vae and state is None:
        fail("--skip-vae keeps the VAE of a checkpoint: add --resume PATH")
    if not args.skip_vae and not in_unet:
        train_stage("vae", model, args, coco, state)
    latents, index = latent_cache(model, coco, args, os.path.join(args.out, "cache"))
    if not in_unet:  # 1 / std of the real latents, over the whole dataset
        model.vae.scaling_factor.fill_(1.0 / latents.float().std().item())
        log(args, f"latent scaling_factor {model.vae.scaling_factor.item():.4f}")
    if not args.skip_unet:
        data = Latents(latents, [coco.items[i][1] for i in index])
        train_stage("unet", model, args, data, state if in_unet else None)
    if args.rank == 0:
        args.log_file.close()
        plot_losses(list(csv.DictReader(open(log_path))), os.path.join(args.out, "loss.png"))
        model.save(os.path.join(args.out, "model"))
        print(f"done: {args.out}/model (checkpoint), {args.out}/samples/ (grids), {args.out}/loss.csv and loss.png\n"
              f"generate: python mini_sd.py --checkpoint {args.out}/model \"{args.prompts[0]}\" --seed 0 --out out.png")
    if args.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
