"""Random-weight Stable Diffusion 1.x pipelines in diffusers' layout, built offline: the reference that
test_mini_sd.py's equivalence tests and benchmarks/bench_sd15.py load into mini-sd and compare against.

    clip_tokenizer(folder)        a real CLIPTokenizer, from the CLIP BPE vocabulary inside the open_clip_torch wheel
                                  (pip install --no-deps open_clip_torch: the file is read, the package never imported)
    sd_pipeline(folder, "tiny")   StableDiffusionPipeline with SD 1.x's structure at test size, saved to folder
    sd_pipeline(folder, "sd15")   the same at Stable Diffusion 1.5's full size (860M-parameter UNet)
"""
import gzip
import importlib.util
import json
import os

import torch

SIZES = {
    "tiny": dict(unet=dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=2,
                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), norm_num_groups=8,
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32),
                 vae=dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32),
                 text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2)),
    "sd15": dict(unet=dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                           attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                           up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768),
                 vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512),
                 text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)),
}


def bpe_vocabulary():  # the path of CLIP's BPE vocabulary in the open_clip_torch wheel, or None
    spec = importlib.util.find_spec("open_clip")
    path = os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz") if spec and spec.origin else ""
    return path if os.path.isfile(path) else None


def clip_tokenizer(folder):
    """vocab.json and merges.txt built as CLIP's own tokenizer builds its table -> transformers' CLIPTokenizer."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    with gzip.open(bpe_vocabulary(), "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1 : 49152 - 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def sd_pipeline(folder, size="tiny", seed=0):
    """A StableDiffusionPipeline of random weights with SD 1.x's blocks, its scheduler SD 1.5's (PNDM, scaled-linear
    betas, steps_offset 1), saved to folder -> the pipeline."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = SIZES[size]
    torch.manual_seed(seed)
    blocks = len(spec["vae"]["block_out_channels"])
    vae = AutoencoderKL(**spec["vae"], latent_channels=4, down_block_types=("DownEncoderBlock2D",) * blocks,
                        up_block_types=("UpDecoderBlock2D",) * blocks)
    unet = UNet2DConditionModel(**spec["unet"])
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **spec["text"]))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                              skip_prk_steps=True, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae, text, clip_tokenizer(os.path.join(folder, "tokenizer")), unet, scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return pipe


def dpm_solver(pipe, model, steps):
    """The pipeline's scheduler set to what mini-sd's sample() runs: DPM-Solver++(2M), first-order onto x0 at the
    last step, at mini-sd's own timesteps (diffusers' "leading" spacing for DPM-Solver divides differently)."""
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                             solver_order=2, lower_order_final=True,
                                                             final_sigmas_type="zero")
    return model.scheduler.timesteps(steps)
