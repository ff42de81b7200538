#!/usr/bin/env python
"""Per-process memory of the sharded latent cache under torchrun: no process holds a private copy of it.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 torchrun --standalone --nproc_per_node 2 benchmarks/bench_cache_memory.py

Each process builds the cache of N synthetic shapes images (mini_sd.latent_cache: it encodes its share into its
own shard file), forgets it, opens it again (memory-maps every shard), then reads every latent once, as an epoch of
UNet batches would; memory is measured around the second opening, apart from the encoding pass's allocations.
It reports, per process and after each phase, RssAnon (the process's private memory) and Pss (its proportional share
of everything it maps: pages mapped by both processes count half to each), from /proc/self/status and
/proc/self/smaps_rollup. A private copy of the cache would raise RssAnon by about the cache's size; the page cache's
copy of the shard files shows in RssFile and is shared between the processes. The model is an untrained `tiny`
preset at --image-size, whose factor-4 VAE gives (4, S/4, S/4) latents: 32 KB per image in fp16 at 256 px.
"""
import argparse
import os
import re
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import mini_sd  # noqa: E402


def memory_mib():  # {RssAnon, RssFile, Pss} of this process in MiB (Linux)
    status = open("/proc/self/status").read()
    rollup = open("/proc/self/smaps_rollup").read()
    field = lambda text, name: int(re.search(rf"^{name}:\s+(\d+) kB", text, re.M).group(1)) / 1024
    return {"RssAnon": field(status, "RssAnon"), "RssFile": field(status, "RssFile"), "Pss": field(rollup, "Pss")}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4000, help="shapes images")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=1, help="loader processes per rank while encoding")
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "mini-sd-cache-memory"))
    args = p.parse_args()
    rank, world = mini_sd.init_distributed()
    image_dir, captions = mini_sd.make_shapes_dataset(os.path.join(args.out, "shapes"), args.n, args.image_size)
    data = mini_sd.CocoCaptions(image_dir, captions, args.image_size)
    torch.manual_seed(0)  # one model on every process: the cache they share is keyed by its encoder
    model = mini_sd.DiffusionModel(mini_sd.Config.preset("tiny", image_size=args.image_size))
    t0 = time.time()
    # encoded, or found on disk
    mini_sd.latent_cache(model, data, os.path.join(args.out, "run"), num_workers=args.workers)
    encoded = time.time() - t0
    model.latents = None  # forget it: what follows measures the cache itself, not the encoding pass's allocations
    phases = [("before", memory_mib())]
    cache = mini_sd.latent_cache(model, data, os.path.join(args.out, "run"))
    phases.append(("cache opened", memory_mib()))
    for start in range(0, len(cache), 256):  # every latent read once, a batch at a time
        cache.latents(range(start, min(start + 256, len(cache)))).sum()
    phases.append(("every latent read", memory_mib()))
    size = sum(s.numel() * s.element_size() for s in cache.shards) / 2**20
    mini_sd.any_rank(False)
    for r in range(world):  # one process's report at a time
        if r == rank:
            print(f"rank {rank} of {world}: {len(cache)} latents {tuple(cache.shards[0].shape[1:])} fp16, cache "
                  f"{size:.1f} MiB in {len(cache.shards)} shard files (encoding pass {encoded:.0f} s)")
            base = phases[0][1]
            for name, m in phases:
                print(f"  {name:<24} RssAnon {m['RssAnon']:7.1f} MiB ({m['RssAnon'] - base['RssAnon']:+7.1f})  "
                      f"Pss {m['Pss']:7.1f} MiB ({m['Pss'] - base['Pss']:+7.1f})  RssFile {m['RssFile']:7.1f} MiB",
                      flush=True)
        mini_sd.any_rank(False)


if __name__ == "__main__":
    main()
