"""Generate images from a Lumos checkpoint: ours (export or training run) or the official release.

    python sample.py i2i --ckpt runs/i2i/ema.safetensors --images a.png b.png --per-image 4
    python sample.py interpolate --ckpt runs/i2i/ema.safetensors --images a.png b.png --frames 8
    python sample.py t2i --ckpt runs/t2i/ema.safetensors --prompts "a red circle" "a blue star"
    python sample.py nvs --ckpt runs/nvs/ema.safetensors --images view.png --poses 0,30,0 0,60,0
    python sample.py i2i --ckpt Lumos_I2I.pth --images a.png        # official: XL/2, 256 px, SD-VAE, DINO
    python sample.py t2i --ckpt Xiaomabufei/lumos/Lumos_T2I.pth --prompts "a chair" --height 1024 --width 768 \\
        --per-image 1 --precision bf16                            # official: 1024 px multi-scale, T5-XXL
    torchrun --nproc_per_node 8 sample.py t2i --ckpt runs/t2i/ema.safetensors \\
        --prompt-file captions.txt --num-samples 30000 --out samples/coco  # many, for FID: -> samples/coco.npz

All of a sample's noise (initial and, for ddpm, ancestral) comes from a generator seeded by
(--seed, its global index), so a result does not depend on batch size or world size, and
`--num-samples` runs resume: files that exist are skipped.

--ckpt OWNER/REPO/FILE (e.g. Xiaomabufei/lumos/Lumos_I2I.pth) is a file of a Hub repo, downloaded and
cached by huggingface_hub. A multi-scale model (Lumos_T2I.pth) draws --height x --width snapped to the
closest aspect-ratio bucket of the release's test table at its size, as the release's T2I demo does.
An I2I model trained on other tokens than the CLS (train_i2i.py --condition patch|all) is
conditioned here on the same tokens of the references, as its export records.
T2I encodes every prompt first and frees the text encoder before sampling: T5-XXL alone is 19 GB in
fp32 (9.5 GB in bf16, as it runs on a GPU), so the 1024 px model samples on a 24 GB machine.
"""
import argparse
import gc
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torchvision.utils import save_image

import data
from diffusion import SAMPLING_METHODS, GaussianDiffusion, beta_schedule, draw_samples
from dit import LumosDiT, read_weights
from encoders import (VAE, ImageSpace, condition_tokens, image_features, load_image_encoder, load_into, nvs_condition,
                      pad_token_features, text_encoder_from_metadata)

# The official release gives weights only: the rest of its set-up per task (SPEC sections 2, 2b
# and 4; the T2I demo's defaults: sd-vae-ft-mse, T5 v1.1 XXL, 120 tokens, cleaned prompts).
OFFICIAL_SETUP = {
    "i2i": {"vae": "stabilityai/sd-vae-ft-mse", "encoder": "facebook/dino-vitb16", "prediction": "epsilon"},
    "t2i": {"vae": "stabilityai/sd-vae-ft-mse", "encoder": "DeepFloyd/t5-v1_1-xxl", "prediction": "epsilon",
            "max_text_tokens": 120, "clean_captions": True},
}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


#################################################################################
#                               Loading a model                                 #
#################################################################################

def load_generator(ckpt, device):
    """(model, info) from an export (ema.safetensors of any task), a training run or checkpoint
    folder, or the official `Lumos_I2I.pth` / `Lumos_T2I.pth` (dit.read_weights). info: task, space,
    vae, encoder, image_size, prediction, and the task's own fields (text encoder, pose, ...)."""
    state, info = read_weights(ckpt)
    with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
        model = LumosDiT(**info["config"])
    load_into(model, state, ckpt, assign=True)
    if info.get("release"):  # the official files: weights only
        info.update({k: v for k, v in OFFICIAL_SETUP[info["task"]].items() if info.get(k) is None})
    info.update(space="latent" if info["vae"] else "pixel")
    return model.to(device).eval().requires_grad_(False), info


#################################################################################
#                                Conditions                                     #
#################################################################################

def read_images(paths, image_size):
    """Image files -> (N, 3, S, S) in [-1, 1], center-cropped as in training."""
    images = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--images: no file {path}")
        try:
            with Image.open(path) as image:
                images.append(data.pixels_to_tensor(data.center_crop_arr(image, image_size)))
        except (OSError, SyntaxError) as error:  # PIL: UnidentifiedImageError, truncated data, "broken PNG"
            raise ValueError(f"{path}: not an image PIL can read ({error}); pass a PNG or JPEG file") from None
    return torch.stack(images)


def i2i_conditions(args, info, space, device):
    """Reference images, each repeated --per-image times -> (batch of references, kwargs fn)."""
    references = read_images(args.images, info["image_size"]).repeat_interleave(args.per_image, dim=0)
    tokens = image_condition_tokens(info, references, device)
    return references, lambda rows: {"y": tokens[rows], "mask": None}


def interpolation_conditions(args, info, space, device):
    """Two images, --frames mixes of their normalised condition tokens (shared noise, as the demo)."""
    if len(args.images) != 2:
        raise ValueError(f"interpolate takes exactly two --images, got {len(args.images)}")
    references = read_images(args.images, info["image_size"])
    first, second = image_condition_tokens(info, references, device)
    weights = torch.linspace(0, 1, args.frames, device=device)[:, None, None]
    tokens = (1 - weights) * first + weights * second
    return references, lambda rows: {"y": tokens[rows], "mask": None}


def t2i_conditions(args, info, space, device):
    """Prompts (--prompts, or --prompt-file: one a line), each repeated --per-image times. The
    export's text encoder encodes every distinct prompt now and is freed before any sampling; each
    batch then pads its prompts' tokens. The prompts stand where reference images would."""
    prompts = list(args.prompts)
    if args.prompt_file:
        if not os.path.isfile(args.prompt_file):
            raise FileNotFoundError(f"--prompt-file: no file {args.prompt_file}")
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError("t2i needs --prompts or --prompt-file")
    prompts = [prompt for prompt in prompts for _ in range(args.per_image)]
    encoder, distinct, tokens = text_encoder_from_metadata(info, device), list(dict.fromkeys(prompts)), {}
    for start in range(0, len(distinct), args.batch_size):
        batch = distinct[start:start + args.batch_size]
        tokens.update(zip(batch, encoder.token_features(batch)))  # each prompt's valid tokens, on the CPU
    del encoder
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    def condition(rows):
        y, mask = pad_token_features([tokens[prompts[r]] for r in rows])
        return {"y": y.to(device), "mask": mask.to(device)}
    return prompts, condition


def nvs_conditions(args, info, space, device):
    """One source view (--images) seen from each of --poses "d_polar,d_azimuth,d_radius" (degrees,
    degrees, distance; Zero-1-to-3's relative camera). The source stands where references would."""
    if len(args.images) != 1 or not args.poses:
        raise ValueError("nvs takes one source image (--images) and one or more --poses")
    try:
        poses = [[float(v) for v in pose.split(",")] for pose in args.poses]
        poses = torch.stack([data.pose_vector(np.radians(p), np.radians(a), r) for p, a, r in poses]).to(device)
    except ValueError:
        raise ValueError(f"--poses {' '.join(args.poses)}: each must be d_polar,d_azimuth,d_radius") from None
    source = read_images(args.images, info["image_size"]).expand(len(poses), -1, -1, -1)
    cond = nvs_condition(condition_encoder(info, device))({"source": source.to(device), "pose": poses}, space)
    return source, lambda rows: {key: value[rows] if value is not None else None for key, value in cond.items()}


def condition_encoder(info, device):
    """The frozen image encoder of the checkpoint: its repo or folder, or its seeded random ViT."""
    return load_image_encoder(info["encoder"], info["image_size"], device, info.get("encoder_config"))


def image_condition_tokens(info, images, device):
    """(B, L, D) condition tokens of images (B, 3, S, S) in [-1, 1], as the checkpoint was trained
    on: its encoder's tokens of its --condition (an export without one: the CLS)."""
    condition = info.get("condition", "cls")
    features = image_features(condition_encoder(info, device), images.to(device), patch_tokens=condition != "cls")
    return condition_tokens(features, condition)


CONDITIONS = {"i2i": i2i_conditions, "interpolate": interpolation_conditions, "t2i": t2i_conditions,
              "nvs": nvs_conditions}


def output_size(args, info, model):
    """(height, width) of the images to draw and the model's size inputs for one image. A multi-scale
    model snaps --height x --width (default: its own size) to the closest bucket of the release's
    test table at its size: img_hw is the bucket's size, aspect_ratio its key, as the T2I demo passes
    them. Any other model draws its own square size."""
    size = info["image_size"]
    if not model.multi_scale:
        if (args.height or size, args.width or size) != (size, size):
            raise ValueError(f"--height/--width: this model draws {size} x {size} images only (a multi-scale "
                             f"model, such as Lumos_T2I.pth, takes other sizes)")
        return (size, size), {}
    key, (height, width) = data.closest_bucket(args.height or size, args.width or size,
                                               data.aspect_ratio_buckets(size, test=True))
    if not dist.is_initialized() or dist.get_rank() == 0:  # one line, not one per rank
        print(f"{args.height or size} x {args.width or size} px: the bucket {key}, {height} x {width} px", flush=True)
    return (height, width), {"img_hw": torch.tensor([[float(height), float(width)]]),
                             "aspect_ratio": torch.tensor([[float(key)]])}


#################################################################################
#                                 Sampling                                      #
#################################################################################

@torch.no_grad()
def generate(model, info, space, cond_fn, indices, rows, args, device):
    """Samples for global `indices`, conditioned on condition rows `rows` -> (B, 3, S, S) in [-1, 1].
    Image i is diffusion.draw_samples' image i of --seed, as in the training grids; interpolate's
    frames of one interpolation share all their noise (index i // frames), as in the demo, so that
    only the condition moves."""
    height, width = (side // space.downsampling for side in info["output_size"])
    noise_indices = [i // args.frames for i in indices] if args.mode == "interpolate" else indices
    diffusion = GaussianDiffusion(beta_schedule("linear", 1000), prediction=info.get("prediction", "epsilon"))
    dtype = PRECISIONS[args.precision]
    with torch.autocast(device.type, dtype or torch.bfloat16, enabled=dtype is not None):
        x0 = draw_samples(diffusion, model, cond_fn(rows), (space.channels, height, width), noise_indices, args.seed,
                          args.method, args.steps, args.cfg_scale, device, skip_type=args.skip_type,
                          clip_denoised=space.vae is None)
        return space.decode(x0)


def to_uint8(images):
    """(B, 3, S, S) in [-1, 1] -> (B, S, S, 3) uint8, rounded as the ADM evaluation expects."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def write_png(array, path):
    Image.fromarray(array).save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


def sample_few(model, info, space, references, cond_fn, num_rows, args, device):
    """All condition rows at once: single images and a grid (references on top)."""
    os.makedirs(args.out, exist_ok=True)
    images = []
    for start in range(0, num_rows, args.batch_size):
        rows = list(range(start, min(start + args.batch_size, num_rows)))
        images.append(generate(model, info, space, cond_fn, rows, rows, args, device))
    images = torch.cat(images)
    for i, array in enumerate(to_uint8(images)):
        write_png(array, os.path.join(args.out, f"{i:06d}.png"))
    grid = torch.cat([references.float().cpu(), images.cpu()]) if torch.is_tensor(references) else images.cpu()
    save_image(grid * 0.5 + 0.5, os.path.join(args.out, "grid.png"), nrow=args.grid_columns or len(references), padding=1)
    print(f"wrote {len(images)} images and grid.png to {args.out}")


def sample_many(model, info, space, cond_fn, num_rows, args, device, rank, world_size):
    """--num-samples images, sample i conditioned on row i % num_rows; rank r makes i = r, r + W, ...
    Existing files are skipped (restart-safe); rank 0 then packs all into <out>.npz (arr_0, NHWC)."""
    os.makedirs(args.out, exist_ok=True)
    path = lambda i: os.path.join(args.out, f"{i:06d}.png")
    todo = [i for i in range(rank, args.num_samples, world_size) if not os.path.exists(path(i))]
    for start in range(0, len(todo), args.batch_size):
        indices = todo[start:start + args.batch_size]
        images = generate(model, info, space, cond_fn, indices, [i % num_rows for i in indices], args, device)
        for i, array in zip(indices, to_uint8(images)):
            write_png(array, path(i))
        if rank == 0:
            print(f"rank 0: {start + len(indices)}/{len(todo)} of its samples", flush=True)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        arrays = np.stack([np.asarray(Image.open(path(i)).convert("RGB")) for i in range(args.num_samples)])
        np.savez(args.out + ".npz.tmp.npz", arr_0=arrays)
        os.replace(args.out + ".npz.tmp.npz", args.out + ".npz")
        print(f"wrote {args.out}.npz: {arrays.shape} uint8")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("mode", choices=sorted(CONDITIONS))
    parser.add_argument("--ckpt", required=True, help="ema.safetensors, a run folder, or an official .pth")
    parser.add_argument("--images", nargs="+", default=[], help="reference / source images")
    parser.add_argument("--per-image", type=int, default=4, help="i2i, t2i: variations per reference / prompt")
    parser.add_argument("--prompts", nargs="+", default=[], help="t2i: text prompts")
    parser.add_argument("--prompt-file", help="t2i: a text file of prompts, one a line")
    parser.add_argument("--poses", nargs="+", default=[], help="nvs: target cameras d_polar,d_azimuth,d_radius")
    parser.add_argument("--frames", type=int, default=8, help="interpolate: frames")
    parser.add_argument("--method", default="dpm++", choices=SAMPLING_METHODS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip-type", default="time_uniform", choices=["time_uniform", "logSNR"],
                        help="dpm++: time steps uniform in t (the Lumos demos) or in logSNR")
    parser.add_argument("--cfg-scale", type=float, default=4.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                        help="autocast of the DiT and the VAE decoder (the T2I demo runs the DiT in fp16)")
    parser.add_argument("--height", type=int, help="t2i with a multi-scale model: image height in pixels")
    parser.add_argument("--width", type=int, help="t2i with a multi-scale model: image width in pixels")
    parser.add_argument("--num-samples", type=int, default=0, help="many samples for FID (0: one per condition)")
    parser.add_argument("--grid-columns", type=int, default=0)
    parser.add_argument("--out", default="samples")
    parser.add_argument("--vae", help="override the checkpoint's VAE repo/folder")
    parser.add_argument("--encoder", help="override the checkpoint's condition encoder repo/folder")
    args = parser.parse_args(argv)
    rank, world_size, device = data.setup_distributed()
    try:
        model, info = load_generator(args.ckpt, device)
        info.update({k: getattr(args, k) for k in ("vae", "encoder") if getattr(args, k)})
        info["output_size"], size_inputs = output_size(args, info, model)
        space = ImageSpace(VAE.from_pretrained(info["vae"]).to(device) if info.get("vae") else None)
        # The official .pth files are memory-mapped: on the CPU their weights are read only as sampling
        # first touches them, so T2I's text encoder, freed by t2i_conditions, never shares memory with them.
        references, conditions = CONDITIONS[args.mode](args, info, space, device)
    except (ValueError, FileNotFoundError) as error:
        if rank == 0:
            print(f"sample.py: error: {error}", file=sys.stderr)
        sys.exit(2)

    def cond_fn(rows):  # a multi-scale model's size inputs, the same for every image
        return {**conditions(rows), **{k: v.expand(len(rows), -1).to(device) for k, v in size_inputs.items()}}

    # Interpolation's condition rows are its frames; its references are only the two images.
    num_rows = args.frames if args.mode == "interpolate" else len(references)
    if args.num_samples:
        sample_many(model, info, space, cond_fn, num_rows, args, device, rank, world_size)
    else:
        sample_few(model, info, space, references, cond_fn, num_rows, args, device)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
