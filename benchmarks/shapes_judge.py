"""The shapes task of eval_quality.py: the vocabulary of its prompts (mini_sd.make_shapes_dataset's colours, shapes,
positions and relations), the held-out combinations and the training data without them, and the judge: what an
image shows, read from its pixels alone, no learned judge (eval_quality.py's docstring, step 3 and "Two objects",
says how).
"""

import json
import math
import os
import re
import shutil
import sys
from collections import deque

import numpy as np
from PIL import Image

from common import log  # common puts the repository root, mini_sd.py, on sys.path
import mini_sd  # noqa: E402

COLOURS = list(mini_sd.SHAPE_COLOURS)
SHAPES = list(mini_sd.SHAPES)
POSITIONS = list(mini_sd.POSITIONS)
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
SHAPE_PROTO = {"square": (1.0, 0.0, 0.6), "circle": (math.pi / 4, 0.0, 0.0),
               "triangle": (0.5, -2 * math.sqrt(2) / 5, 0.0)}
SHAPE_SCALE = (0.25, 0.25, 0.2)
# An object: pixels at least ROUGH (RGB distance) from the background, a blob of at least MIN_FRAC of the image; a
# second object at least MIN_SECOND of the first's pixels (drawn pairs: 0.39 at least), so that specks and fragments
# are not taken for one
ROUGH, MIN_FRAC, MIN_SECOND = 40.0, 0.002, 0.15

# two-object scenes (--two-objects): (colour, shape, relation, colour2, shape2), the relation read from the first object
RELATIONS = list(mini_sd.RELATIONS)
CONVERSE = {r: next(k for k, v in mini_sd.RELATIONS.items() if v == (-dx, -dy))
            for r, (dx, dy) in mini_sd.RELATIONS.items()}
PAIR_PROMPT = "a {c} {s} {r} a {c2} {s2}"  # mini_sd.PAIR_CAPTION_TEMPLATES[0] (the converse one has the same form)
PAIR_RE = re.compile(r"^a (\w+) (\w+) (.+) a (\w+) (\w+)$")
# found: two objects; colour, shape: both objects right; binding: each object its own colour and shape; relation
PAIR_ATTRS = ("found", "colour", "shape", "binding", "relation", "all")


def parse_caption(caption):
    m = PROMPT_RE.match(caption.strip())
    if m and m.group(1) in COLOURS and m.group(2) in SHAPES and m.group(3) in POSITIONS:
        return m.group(1), m.group(2), m.group(3)
    return None


def parse_pair(caption):
    m = PAIR_RE.match(caption.strip())
    if (m and {m.group(1), m.group(4)} <= set(COLOURS) and {m.group(2), m.group(5)} <= set(SHAPES)
            and m.group(3) in RELATIONS):
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
    files, labels = {im["id"]: im["file_name"] for im in coco["images"]}, image_labels(coco, parse)
    return [(files[i], labels[i]) for i in sorted(files) if i in labels]


def image_labels(coco, parse):  # {image_id: label} from its first caption that parses (two objects: not the converse)
    labels = {}
    for ann in coco["annotations"]:
        if ann["image_id"] not in labels and (lab := parse(ann["caption"])) is not None:
            labels[ann["image_id"]] = lab
    return labels


def evenly(labels, units, n, seed):
    """The ids of n of the labelled images spread as evenly as the pool allows over its distinct scenes (one object:
    its combination; two: both objects and their relation), taken round-robin over the scenes in a seeded order."""
    scenes = {}
    for i, lab in labels.items():
        scenes.setdefault(frozenset(units(lab)), []).append(i)
    groups = [scenes[k] for k in sorted(scenes, key=sorted)]
    np.random.default_rng(seed).shuffle(groups)
    order = [ids[j] for j in range(max(map(len, groups), default=0)) for ids in groups if j < len(ids)]
    if len(order) < n:
        sys.exit(f"error: --balanced {n}: the generated pool holds only {len(order)} usable images; raise --n")
    return set(order[:n])


def build_shapes(root, n, image_size, seed, heldout=(), objects=1, balanced=None):
    """make_shapes_dataset into root, then drop the images (files and captions) of the held-out combinations
    (objects=2: of the scenes with a held-out fact); balanced: keep that many of the rest, spread evenly over the
    distinct scenes (evenly). Reused when root/eval_data.json says it was built with the same settings."""
    meta = {"n": n, "image_size": image_size, "seed": seed, "heldout": [list(c) for c in heldout]}
    if objects != 1:
        meta["objects"] = objects
    if balanced:
        meta["balanced"] = balanced
    # the held-out unit of a label: the combination itself, or a scene's two facts
    parse, units, thirds = ((parse_caption, lambda lab: {lab}, POSITIONS) if objects == 1
                            else (parse_pair, facts, RELATIONS))
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
    labels = image_labels(coco, parse)  # every caption of an image names the same scene
    drop = {i for i, lab in labels.items() if units(lab) & held}
    if balanced:
        kept = evenly({i: lab for i, lab in labels.items() if i not in drop}, units, balanced, seed)
        drop |= {im["id"] for im in coco["images"]} - kept
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
    image = Image.fromarray(a.astype(np.float32), mode="F")
    return np.asarray(image.resize((k * a.shape[1], k * a.shape[0]), Image.BILINEAR))


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
            while len(h) > 1 and ((h[-1][0] - h[-2][0]) * (p[1] - h[-2][1])
                                  - (h[-1][1] - h[-2][1]) * (p[0] - h[-2][0])) <= 0:
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


def score_image(img):
    """PIL image -> {"colour", "shape", "position", "fill", "centre", "rgb", "area"}; the labels are None when
    no object is found (nothing far enough from the background)."""
    a, bg, dist = _pixels(img)
    return _describe(a, bg, dist, _largest_blob(dist > ROUGH))


def score_pair(img):
    """PIL image -> the two largest objects as score_image describes them, largest first: a list of 0, 1 or 2 (the
    second blob counts only at MIN_SECOND of the first's pixels or more)."""
    a, bg, dist = _pixels(img)
    blobs = _blobs(dist > ROUGH)[:2]
    objs = [_describe(a, bg, dist, b) for b in blobs if b.sum() >= MIN_SECOND * blobs[0].sum()]
    return [o for o in objs if o["colour"] is not None]


def relation(p, q):
    """The relation of object p to object q (score_image dicts): the direction of RELATIONS nearest the offset
    between their centroids."""
    dx, dy = p["centre"][0] - q["centre"][0], p["centre"][1] - q["centre"][1]
    return max(RELATIONS, key=lambda r: dx * mini_sd.RELATIONS[r][0] + dy * mini_sd.RELATIONS[r][1])


def _describe(a, bg, dist, blob):
    """One object, the blob (a boolean mask) of the image a, judged as score_image says."""
    H, W, _ = a.shape
    none = {"colour": None, "shape": None, "position": None, "fill": None, "skew": None, "diag": None, "solidity": None,
            "centre": None, "rgb": None, "area": 0.0}
    if blob.sum() < max(3, MIN_FRAC * H * W):
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
    ok = {"found": True, "colour": p["colour"] == c and q["colour"] == c2,
          "shape": p["shape"] == s and q["shape"] == s2, "relation": relation(p, q) == r}
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
        out[shape] = {"n": len(rs), "fill_rel": mean("fill") / SHAPE_PROTO[shape][0] if rs else None,
                      "diag": mean("diag"), "solidity": mean("solidity")}
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
