"""eval_quality.py's markdown reports: the one-object report (samplers, guidance sweep, the guidance_rescale table,
FID) and the two-object one, from the results dict that is also written as JSON."""

from common import fmt, md_table
from shapes_judge import ATTRS, PAIR_ATTRS, outline_stats


def model_line(s):  # the report's line on where the model came from
    if s.get("train_images") is None:
        return f"Model: `{s['model']}` (given with --model, not trained here)."
    trained = f", trained here in {s['train_seconds']:.0f}s" if s.get("train_seconds") else ""
    return (f"Model: `{s['model']}`{trained} (VAE steps: {s['vae_steps']}, UNet steps: {s['unet_steps']}; "
            f"{s['train_images']} training images).")


def guidance_text(s):  # "5.0 (where 0 <= t / T <= 0.6)"; reports from before the interval existed guided every step
    lo, hi = s.get("guidance_interval", (0.0, 1.0))
    return f"{s['guidance']}" + ("" if (lo, hi) == (0.0, 1.0) else f" (where {lo:g} <= t / T <= {hi:g})")


def accuracy_cells(a, attrs):  # the attributes' accuracies, the last ("all") in bold
    return [fmt(a[k]) for k in attrs[:-1]] + [f"**{fmt(a[attrs[-1]])}**"]


def outline_cells(o):  # outline_stats of squares and circles: fill ratios over the prototypes', corners, counts
    return [fmt(o["square"]["fill_rel"], 3), fmt(o["circle"]["fill_rel"], 3), fmt(o["square"]["diag"], 3),
            fmt(o["circle"]["diag"], 3), f"{o['square']['n']} / {o['circle']['n']}"]


def rescale_table(res):
    """guidance x guidance_rescale at DPM-Solver++ 20: accuracy, and the outline statistics that show pinching."""
    rows = [[name] + [""] * 8 + outline_cells(o) for name, o in res["reference"].items()]
    rows += [[f"{r['guidance']:g}", f"{r['rescale']:g}", r["images"], *accuracy_cells(r["pooled"], ATTRS),
              fmt(r["seen_all"]), fmt(r["heldout_all"]), *outline_cells(r["outline"])] for r in res["rows"]]
    return "\n".join(["guidance_rescale at DPM-Solver++ 20 (accuracy in %, seen and held-out pooled unless stated). "
                      "Outlines: mean fill ratio of images prompted as squares / circles relative to the prototypes "
                      "(square 1, circle pi/4 = 0.785; pinched, concave sides lower it) and mean diagonal kurtosis "
                      "excess, the corner measure (square 0.6, circle 0); n = images with an object found.\n"]
                     + md_table("guidance | rescale | images | colour | shape | position | **all** | seen all | "
                                "held-out all | square fill / 1 | circle fill / (pi/4) | square corners (0.6) | "
                                "circle corners (0) | n square / circle", rows, align="r"))


def targets_and_timings(R):
    L = md_table("target | value | result", [[t["target"], t["value"], t["result"]] for t in R["targets"]], "lrl")
    return L + ["\nTimings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in R["timings"].items()) + "."]


def markdown(R):
    s, sc, v = R["setup"], R["scorer_real"], R["vae"]
    ranges = lambda key: ", ".join(f"{k} {r[0]}-{r[1]}" for k, r in sc[key].items())  # noqa: E731
    L = [f"## mini-sd quality evaluation ({s['preset']} preset, {s['image_size']} px)\n", model_line(s),
         f"Held-out combinations ({len(s['heldout'])}, never in training): "
         + ", ".join(f"{c} {sh} / {p}" for c, sh, p in s["heldout"]) + ".",
         f"Seen prompts: {len(s['seen'])} combinations from training. {s['images_per_prompt']} images per prompt "
         f"(seeds {s['seeds']}), guidance {guidance_text(s)} unless stated. Device: {s['device']}, "
         f"{s['threads']} threads.\n",
         f"Scorer on {sc['n']} real images (validation set, not trained on): colour {fmt(sc['colour'])}%, "
         f"shape {fmt(sc['shape'])}%, position {fmt(sc['position'])}%, all three {fmt(sc['all'])}%; "
         f"fill ratio per shape (min-max; drawn: square 1, circle 0.785, triangle 0.5): {ranges('fill_range')}"
         f"; vertical skewness (triangle -0.57, others 0): {ranges('skew_range')}"
         f"; diagonal kurtosis excess (square 0.6, others 0): {ranges('diag_range')}.",
         f"VAE reconstruction PSNR (mean per image): {v['psnr']:.2f} dB on {v['n']} validation images (seen "
         f"combinations {fmt(v['psnr_seen'], 2)} dB, held-out {fmt(v['psnr_heldout'], 2)} dB); scorer on the "
         f"reconstructions: all three {fmt(v['scorer']['all'])}% (colour {fmt(v['scorer']['colour'])}, shape "
         f"{fmt(v['scorer']['shape'])}, position {fmt(v['scorer']['position'])}).\n"]
    solidity = lambda o: f"{fmt(o['square']['solidity'], 3)} / {fmt(o['triangle']['solidity'], 3)}"  # noqa: E731
    rows = [[c["sampler"], c["steps"], f"{c['guidance']:g}", c["images"], *accuracy_cells(c["seen"], ATTRS),
             *accuracy_cells(c["heldout"], ATTRS), solidity(outline_stats(c["records"])), f"{c['seconds']:.0f}",
             f"{c['s_per_image']:.2f}"] for c in R["configs"] if not c.get("rescale")]  # rescale: in its own table
    L += md_table("sampler | steps | guidance | images | seen colour | seen shape | seen position | **seen all** | "
                  "held-out colour | held-out shape | held-out position | **held-out all** | "
                  "solidity square / triangle | time (s) | s/image", rows, align="lr")
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
    return "\n".join(L + targets_and_timings(R)) + "\n"


def markdown_pairs(R):
    s, sc, v = R["setup"], R["scorer_real"], R["vae"]
    L = [f"## mini-sd two-object evaluation ({s['preset']} preset, {s['image_size']} px)\n", model_line(s),
         f"Held-out facts ({len(s['heldout'])}, no training image has an object of that colour and shape in that "
         "relation to the other): " + ", ".join(f"{c} {sh} {r} ..." for c, sh, r in s["heldout"]) + ".",
         f"Prompts: {len(s['heldout_prompts'])} held-out, {len(s['seen_prompts'])} seen; {s['images_per_prompt']} "
         f"images per prompt, guidance {guidance_text(s)} unless stated. Device: {s['device']}, "
         f"{s['threads']} threads.\n",
         f"Scorer on {sc['n']} real two-object images (validation set, not trained on): two objects found "
         f"{fmt(sc['found'])}%, colours {fmt(sc['colour'])}%, shapes {fmt(sc['shape'])}%, relation "
         f"{fmt(sc['relation'])}%, all correct {fmt(sc['all'])}%. VAE reconstruction PSNR {v['psnr']:.2f} dB; "
         f"scorer on the reconstructions: all correct {fmt(v['scorer']['all'])}%.\n"]
    rows = [[c["sampler"], c["steps"], f"{c['guidance']:g}", c["images"], *accuracy_cells(c["seen"], PAIR_ATTRS),
             *accuracy_cells(c["heldout"], PAIR_ATTRS), f"{c['seconds']:.0f}"] for c in R["configs"]]
    L += md_table("sampler | steps | guidance | images | seen found | seen colours | seen shapes | seen binding | "
                  "seen relation | **seen all** | held-out found | held-out colours | held-out shapes | held-out "
                  "binding | held-out relation | **held-out all** | time (s)", rows, align="lr")
    L.append("\nAccuracies in %, per generated image, judged by the pixel scorer: found = two objects; colours, "
             "shapes = both objects' right; binding = each object its own colour and shape; relation = the first "
             "object's to the second; all = binding and relation. Rows with guidance "
             f"other than {s['guidance']:g} are the guidance sweep.\n")
    L.append("Held-out prompts at DPM-Solver++ 20 (all correct / images): "
             + ", ".join(f"{k} {v}" for k, v in R["per_heldout"].items()) + ".\n")
    return "\n".join(L + targets_and_timings(R)) + "\n"
