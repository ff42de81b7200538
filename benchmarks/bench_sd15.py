#!/usr/bin/env python
"""Stable Diffusion 1.5 at full size (860M-parameter UNet, random weights: the real ones cannot be downloaded here)
loaded into mini-sd from diffusers' layout, against diffusers' own StableDiffusionPipeline; and the peak memory of one
SD 1.5-size fine-tuning step.

    HF_HUB_OFFLINE=1 python benchmarks/bench_sd15.py compare --size 512 --steps 3
    HF_HUB_OFFLINE=1 python benchmarks/bench_sd15.py finetune --size 512 --gradient-checkpointing --ema off

compare: both sides sample the same prompt from the same latents in fp32 (DPM-Solver++ at mini-sd's timesteps,
guidance 7.5 at every step), and the decoded float images are compared (max |a - b| / max |b|); a guided UNet step
(batch 2) is timed on each side, alternating, median of --rounds.
finetune: one UNet training step of DiffusionModel.train's optimiser (Trainer: AdamW, fp32 weights and gradients)
at batch 1 on --size px latents, in a fresh process; peak RSS (VmHWM) and what the weights alone take.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import mini_sd  # noqa: E402
import sd_reference  # noqa: E402


def peak_rss_gib():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) / 2**20


def build(folder):  # the random-weight SD 1.5 pipeline, written once
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        print(f"building a random-weight SD 1.5 pipeline in {folder} ...", flush=True)
        sd_reference.sd_pipeline(folder, "sd15")


def compare(args):
    from diffusers import StableDiffusionPipeline

    build(args.folder)
    pipe = StableDiffusionPipeline.from_pretrained(args.folder)
    model = mini_sd.DiffusionModel.from_pretrained(args.folder, image_size=args.size)
    n_unet = mini_sd.count_parameters(model.unet)
    n_peer = sum(p.numel() for p in pipe.unet.parameters())
    print(f"UNet {n_unet / 1e6:.0f}M parameters (diffusers {n_peer / 1e6:.0f}M), "
          f"{args.size} px, {args.steps} steps, torch threads {torch.get_num_threads()}", flush=True)
    h = args.size // 8
    latents = torch.randn(1, 4, h, h, generator=torch.Generator().manual_seed(0))
    prompt = "a photograph of an astronaut riding a horse"
    t0 = time.time()
    ours = model.sample([prompt], steps=args.steps, guidance_scale=7.5, guidance_interval=(0, 1), latents=latents,
                        output_type="pt", precision="fp32")
    t_ours = time.time() - t0
    timesteps = sd_reference.dpm_solver(pipe, model, args.steps)
    t0 = time.time()
    theirs = pipe([prompt], timesteps=timesteps, guidance_scale=7.5, latents=latents, output_type="pt").images
    t_theirs = time.time() - t0
    diff = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    print(f"decoded images: max |mini-sd - diffusers| / max |diffusers| = {diff:.2e}; whole sample() {t_ours:.1f} s, "
          f"pipeline {t_theirs:.1f} s", flush=True)
    context, mask = model.text_encoder(["", prompt])
    x, t = torch.cat([latents, latents]), torch.tensor([500, 500])
    times = {"mini-sd": [], "diffusers": []}
    with torch.no_grad():
        out = (model.unet(x, t, context, mask), pipe.unet(x, t, encoder_hidden_states=context).sample)
        rel = ((out[0] - out[1]).abs().max() / out[1].abs().max()).item()
        print(f"one guided UNet step: max relative difference {rel:.2e}")
        for r in range(args.rounds):
            for side in (["mini-sd", "diffusers"] if r % 2 == 0 else ["diffusers", "mini-sd"]):
                t0 = time.time()
                model.unet(x, t, context, mask) if side == "mini-sd" else pipe.unet(x, t, encoder_hidden_states=context)
                times[side].append(time.time() - t0)
    m, d = (statistics.median(times[s]) for s in ("mini-sd", "diffusers"))
    print(f"guided UNet step (batch 2, {h}x{h} latents, fp32), median of {args.rounds}: mini-sd {m:.2f} s, "
          f"diffusers {d:.2f} s, ratio {d / m:.2f}")


def finetune(args):
    if not args.child:  # a fresh process, so that the peak is this step's alone
        cmd = [sys.executable, __file__, "finetune", "--child", *sys.argv[2:]]
        sys.exit(subprocess.run(cmd).returncode)
    build(args.folder)
    model = mini_sd.DiffusionModel.from_pretrained(args.folder, image_size=args.size)
    weights = sum(p.numel() * p.element_size() for p in model.unet.parameters()) / 2**30
    before = peak_rss_gib()
    tc = mini_sd.TrainConfig(stage="unet", steps=10, batch_size=1, lr=1e-5, ema=0.0 if args.ema == "off" else 0.999,
                             ema_device="cpu" if args.ema == "cpu" else None, precision="fp32",
                             gradient_checkpointing=args.gradient_checkpointing)
    trainer = mini_sd.Trainer(model, tc)
    h = args.size // 8
    t0 = time.time()
    loss = trainer.step([(torch.randn(1, 4, h, h), ["a photograph of an astronaut riding a horse"])])
    print(f"SD 1.5-size UNet fine-tuning step, batch 1, {args.size} px ({h}x{h} latents), fp32, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, EMA {args.ema}: loss {loss:.4f}, "
          f"{time.time() - t0:.0f} s; peak RSS {peak_rss_gib():.2f} GiB (the model loaded: {before:.2f} GiB; "
          f"the UNet's fp32 weights {weights:.2f} GiB, so weights + gradients + AdamW's two moments = "
          f"{4 * weights:.2f} GiB)")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("what", choices=["compare", "finetune"])
    p.add_argument("--folder", default="/tmp/mini-sd-sd15", help="where the random-weight pipeline is built (4.3 GB)")
    p.add_argument("--size", type=int, default=512, help="image size in pixels")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--ema", choices=["off", "cpu", "device"], default="off")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    compare(args) if args.what == "compare" else finetune(args)


if __name__ == "__main__":
    main()
