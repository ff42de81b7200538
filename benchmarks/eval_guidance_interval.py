#!/usr/bin/env python
"""FID and class accuracy of eval_fid checkpoints, each sampled with several guidance intervals.

    HF_HUB_OFFLINE=1 python benchmarks/eval_guidance_interval.py runs/eval-fid/runs/default/ckpt-unet-0001200 \
        4,0,1,20 4,0,0.6,20 4,0,0.6,10       # checkpoints, then guidance,low,high,steps per configuration

The same images as eval_fid.py judges (50 per digit, DPM-Solver++(2M), the same prompts and starting noise), the same
1,000 held-out reference digits and the same classifier recipe; each configuration samples with
sample(guidance_scale=guidance, guidance_interval=(low, high), steps=steps). Prints one JSON line per configuration.
"""

import json
import os
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402  (the MNIST digits, their judge and sampling, shared with eval_fid.py)
import mini_sd  # noqa: E402  (on the path that common sets)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    images, labels = C.load_mnist()
    held = C.per_class(labels, 100, np.random.RandomState(0))  # eval_fid's defaults: --holdout 1000, --seed 0
    held_pils = [Image.fromarray(im) for im in images[held]]
    judge = C.Judge(held_pils, None, C.train_classifier(held_pils, labels[held], 0)[0], 50, out=None)
    checkpoints, specs = [a for a in sys.argv[1:] if "," not in a], [a for a in sys.argv[1:] if "," in a]
    for checkpoint in checkpoints:
        model = mini_sd.DiffusionModel.load(checkpoint)
        for spec in specs:
            guidance, low, high, steps = spec.split(",")
            t0 = time.time()
            out = C.generate(model, judge.jobs, "dpm++", int(steps), float(guidance), C.SAMPLE_BATCH,
                             guidance_interval=(float(low), float(high)))
            seconds = time.time() - t0
            print(json.dumps({"checkpoint": checkpoint, "guidance,low,high,steps": spec,
                              "fid": round(judge.fid_of(out), 2), "accuracy": round(judge.accuracy(out), 1),
                              "sampling_s": round(seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
