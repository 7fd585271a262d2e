"""Lumos stage 1: image-to-image pre-training of the DiT on unlabeled images, conditioned on the
frozen DINO CLS feature through cross-attention. One loop for one CPU, one GPU and many nodes.

    python train_i2i.py                    # offline default: a small DiT on `shapes`, 32 px pixels, CPU
    python train_i2i.py --resume           # continue from the latest complete checkpoint in --out
    python train_i2i.py --condition patch  # the paper's ablation: the encoder's patch tokens, not its CLS
    python train_i2i.py --repa-weight 0.5  # REPA: block 2's tokens aligned to the encoder's patch tokens
    torchrun --nproc_per_node=8 train_i2i.py --model DiT-XL/2 --data /data/images \\
        --vae stabilityai/sd-vae-ft-mse --encoder facebook/dino-vitb16 --image-size 256 \\
        --global-batch-size 256 --lr 1e-4 --precision bf16 --grad-checkpointing --out runs/xl2
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint $HOST:29500 train_i2i.py \
        --shard-group 8 --out /shared/runs/xl2 ...   # HSDP: shard in a node, replicate across; --out shared

The offline default (about 5 minutes on 2 CPU cores) conditions on `shapes-vit`, a small ViT of the
DINO class trained self-supervised on the unlabeled `shapes` images (`python data.py shapes-encoder`,
committed in assets/), predicts x0 (RUN_DEFAULTS) and logs the I2I agreement of its held-out grids
(evaluate.i2i_agreement); the prior itself comes from the real DINO.

Real runs encode each image anew at every step unless the frozen encoders ran once beforehand:
    torchrun --nproc_per_node=8 data.py cache --data /data/images --out /data/cache256 \
        --vae stabilityai/sd-vae-ft-mse --encoder facebook/dino-vitb16 --image-size 256
    torchrun ... train_i2i.py --data cache:/data/cache256 --vae stabilityai/sd-vae-ft-mse \
        --encoder facebook/dino-vitb16 --image-size 256 ...
reads the VAE posteriors and DINO features of each image and its mirror image from the cache and
never runs the encoders; the VAE is still loaded, since its decoder draws the sample grids.
`data.py cache --patch-tokens` also stores the patch tokens that --condition patch|all and REPA need.

--condition cls|patch|all picks the image encoder's tokens the DiT attends to (each L2-normalised).
--repa-weight W adds REPA (Yu et al., ICLR 2025): W x the negative cosine similarity between the
tokens after block --repa-block, through a training-only MLP projector, and the encoder's patch
tokens resized to the DiT's grid; the projector is checkpointed with the model, never exported.

Interface for train_t2i.py / train_nvs.py: they call `train(args, task)` with a `Task`:
    build_model() -> nn.Module       LumosDiT, or a module with the same forward(x, t, **cond) and
                                     forward_with_cfg(x, t, cfg_scale=..., **cond), and `.config`
    condition(batch, space) -> dict  the model's keyword arguments for this batch, e.g.
                                     {"y": (B, L, C) condition tokens, "mask": (B, L) or None};
                                     `batch` is a dict from data.collate_samples ("image":
                                     (B, 3, S, S) in [-1, 1], "caption", ...) on the device, or
                                     from a data.FeatureCache ("latent_mean", "latent_std",
                                     "cond" in place of "image"), after `mirrored`: sample i is
                                     the mirror image where the loop drew a flip, so condition
                                     and target always show one image; `space` is the
                                     ImageSpace (e.g. to encode a source view)
    dataset                          a map-style dataset of such items (data.py)
    eval_items                       a few held-out items: conditions and references of the grids
    evaluate(images, batch) -> dict  optional metrics of the grid's images (B, 3, S, S) in [-1, 1]
                                     against their held-out batch, logged with the loss
    features(batch) -> batch         optional: adds the frozen image encoder's outputs to a batch
                                     of images as a feature cache holds them ("cond", the CLS,
                                     and "patch_tokens"), once per batch (I2I without a cache)
    repa_dim                         the width of the batch's "patch_tokens", which REPA aligns
                                     to (--repa-weight); 0: the task has none, REPA is refused
    metadata                         extra fields for the exported safetensors
    hflip                            random horizontal flips of the training images, target and
                                     condition alike (off for NVS, where a flip would mirror the
                                     camera, and for T2I, where captions name left and right)
Per-sample randomness (flip, timestep, noise, condition dropout, VAE posterior noise) is drawn
from a generator seeded by (--seed, the sample's global index), so results do not depend on how
samples are split across ranks, loader workers or accumulation steps.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.tensor import DTensor
from torchvision.utils import save_image
from tqdm import tqdm

import data
from data import setup_distributed
from diffusion import PREDICTION_TYPES, GaussianDiffusion, beta_schedule, draw_samples, sample_generator
from dit import (DiT_models, build_model, checkpoint_dir, forward_flops, latest_checkpoint, read_weights,
                 upgrade_config)
from encoders import (CONDITIONS, RANDOM_VIT, SHAPES_VIT, VAE, ImageSpace, condition_token_count, encoder_config,
                      image_condition, image_features, load_image_encoder)
from evaluate import i2i_agreement
from sample import to_uint8

# Dense bf16 peak TFLOP/s of common accelerators (vendor datasheets, without sparsity), for MFU.
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "A10": 125.0,
               "L40S": 362.0, "RTX 4090": 165.0, "RTX 3090": 71.0}

class UsageError(ValueError):
    """Bad arguments found once the run has started (e.g. a --resume with another configuration):
    one line on rank 0, and every rank exits with status 2."""


@dataclasses.dataclass
class Task:
    build_model: Callable
    condition: Callable
    dataset: object
    eval_items: list
    evaluate: Optional[Callable] = None
    features: Optional[Callable] = None
    repa_dim: int = 0
    metadata: dict = dataclasses.field(default_factory=dict)
    hflip: bool = True


#################################################################################
#                                 Arguments                                     #
#################################################################################

def add_train_args(parser):
    """The loop's arguments; train_t2i.py / train_nvs.py add theirs and change defaults."""
    a = parser.add_argument
    a("--out", default="runs/i2i", help="run folder: checkpoints, sample grids, metrics.jsonl, ema.safetensors")
    a("--data", default="shapes:20000",
      help="image folder, tar shards (globs, {000..099} ranges), shapes[:N], or cache:DIR (data.py cache)")
    a("--model", default=None, help="a name from dit.DiT_models (default: the offline model, see model_size)")
    a("--depth", type=int, help="override the model's depth")
    a("--hidden-size", type=int, help="override the model's width")
    a("--num-heads", type=int, help="override the model's head count")
    a("--image-size", type=int, default=32)
    a("--vae", default=None, help="SD-VAE repo or folder (latent space); none: pixel space")
    a("--encoder", default=SHAPES_VIT, help=f"DINO repo/folder/.pth; {SHAPES_VIT} (a small ViT trained on shapes, "
      f"`data.py shapes-encoder`) or {RANDOM_VIT} (a small frozen random ViT)")
    a("--prediction", default=None, choices=PREDICTION_TYPES, help="default: see RUN_DEFAULTS")
    a("--learn-sigma", action=argparse.BooleanOptionalAction, default=None, help="default: see RUN_DEFAULTS")
    a("--steps", type=int, default=None, help="optimizer steps in total (default: see RUN_DEFAULTS)")
    a("--global-batch-size", type=int, default=64)
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step on each rank")
    a("--shard-group", type=int, default=None,
      help="ranks that shard the model between them (HSDP: the GPUs of a node); default: all (FSDP)")
    a("--lr", type=float, default=1e-3)
    a("--warmup-steps", type=int, default=100)
    a("--weight-decay", type=float, default=0.0)
    a("--max-grad-norm", type=float, default=1.0)
    a("--ema-decay", type=float, default=None, help="EMA decay (default: see RUN_DEFAULTS)")
    a("--precision", default=None, choices=["fp32", "bf16"], help="default: bf16 on a GPU, fp32 on the CPU")
    a("--grad-checkpointing", action="store_true")
    a("--compile", action="store_true", help="torch.compile each block")
    a("--seed", type=int, default=0)
    a("--num-workers", type=int, default=None, help="data loader workers (default: 8 on GPU, 0 on CPU)")
    a("--log-every", type=int, default=25)
    a("--sample-every", type=int, default=None, help="steps between sample grids; 0: never, not even at the end")
    a("--ckpt-every", type=int, default=None, help="steps between checkpoints; 0: only on a signal (benchmarks)")
    a("--keep-last", type=int, default=2, help="complete checkpoints kept")
    a("--resume", action="store_true", help="continue from the latest complete checkpoint in --out")
    a("--num-samples", type=int, default=64, help="held-out conditions in each sample grid (and its metrics)")
    a("--sample-method", default="ddim", choices=["ddpm", "ddim", "dpm++"])
    a("--sample-steps", type=int, default=50)
    a("--cfg-scale", type=float, default=1.0)
    a("--peak-tflops", type=float, default=None, help="device peak for MFU (known for common GPUs)")
    a("--max-nonfinite", type=int, default=20, help="consecutive non-finite steps before stopping")
    a("--repa-weight", type=float, default=0.0,
      help="REPA: weight of the alignment of a block's tokens to the image encoder's patch tokens; 0: off")
    a("--repa-block", type=int, default=None, help="REPA: the block (1..depth) whose output is aligned "
      "(default: see RUN_DEFAULTS)")
    a("--repa-width", type=int, default=None, help="REPA: the projector MLP's hidden width (default: see RUN_DEFAULTS)")
    return parser


# Defaults of a real run (--model given: DiT's 400K steps, its EMA and its epsilon prediction with
# learned variances, a checkpoint about every 5-10 minutes on 8 GPUs, each 13 GB at XL/2; REPA's
# block 8 of 28 and its 2048-wide projector) and of the offline default (a few minutes on a CPU;
# README says why x0 prediction there; REPA at block 2 of 4 with a projector twice its width).
RUN_DEFAULTS = {"steps": (400_000, 1000), "ema_decay": (0.9999, 0.99), "sample_every": (5_000, 250),
                "ckpt_every": (5_000, 250), "prediction": ("epsilon", "x0"), "learn_sigma": (True, False),
                "repa_block": (8, 2), "repa_width": (2048, 256)}


def check_args(args, world_size):
    """Fill the defaults that depend on the run (RUN_DEFAULTS, --precision), then one clear line
    for every argument problem that would otherwise fail deep inside a run."""
    for name, (real_run, offline) in RUN_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, real_run if args.model else offline)
    if args.precision is None:
        args.precision = "bf16" if torch.cuda.is_available() else "fp32"
    per_rank = args.global_batch_size // world_size if args.global_batch_size % world_size == 0 else 0
    if args.global_batch_size <= 0 or per_rank == 0 or per_rank % args.grad_accum:
        raise ValueError(f"--global-batch-size {args.global_batch_size} must be divisible by world size "
                         f"{world_size} x --grad-accum {args.grad_accum}")
    if args.shard_group and (args.shard_group < 1 or world_size % args.shard_group):
        raise ValueError(f"--shard-group {args.shard_group} must divide the world size {world_size}")
    name, overrides = model_size(args)
    if name not in DiT_models:
        raise ValueError(f"unknown --model {name!r}: choose one of {', '.join(DiT_models)}")
    depth = overrides.get("depth", DiT_models[name].keywords["depth"])
    if args.repa_weight < 0 or (args.repa_weight and not 1 <= args.repa_block <= depth):
        raise ValueError(f"--repa-weight {args.repa_weight} must be >= 0 and --repa-block {args.repa_block} within "
                         f"1..{depth} (the model's depth): pass another")
    multiple = (8 if args.vae else 1) * int(name.rsplit("/", 1)[1])
    if args.image_size % multiple:
        raise ValueError(f"--image-size {args.image_size} must be divisible by {multiple} "
                         f"({'8 (VAE) x ' if args.vae else ''}patch size of {name})")


OFFLINE_MODEL = ("DiT-S/4", dict(depth=4, hidden_size=128, num_heads=2))


def model_size(args):
    """(DiT_models name, size overrides) from --model and --depth/--hidden-size/--num-heads.
    Without --model: the offline default, DiT-S/4 cut to depth 4 and width 128 for a CPU."""
    name, overrides = (args.model, {}) if args.model else OFFLINE_MODEL
    explicit = {k: getattr(args, k) for k in ("depth", "hidden_size", "num_heads") if getattr(args, k)}
    return name, {**overrides, **explicit}


#################################################################################
#            One image per sample: mirror images, targets, references          #
#################################################################################

def mirrored(batch, flips):
    """The batch with sample i mirrored where flips[i]: its image, or, from a feature cache (which
    holds both mirror images' posteriors, CLS and patch tokens, [unflipped, flipped]), the rows of
    that mirror image. Target and condition both read this batch, so they are of one image, as the
    paper's z = E(x), tau(x) are: a mirrored target beside the unmirrored image's condition would
    teach the model that the reference's left and right are a coin flip."""
    if "latent_mean" in batch:
        rows, which = torch.arange(len(flips), device=flips.device), flips.long()
        per_image = [key for key in ("latent_mean", "latent_std", "cond", "patch_tokens") if key in batch]
        return {**batch, **{key: batch[key][rows, which] for key in per_image}}
    return {**batch, "image": torch.where(flips[:, None, None, None], batch["image"].flip(-1), batch["image"])}


def diffusion_targets(batch, posterior_noise, space):
    """x0 (B, C, h, w) of a `mirrored` batch in the diffusion's space: a VAE posterior sample drawn
    with `posterior_noise`, from the cached posterior (the VAE does not run) or the image."""
    if "latent_mean" in batch:
        return space.from_posterior(batch["latent_mean"], batch["latent_std"], posterior_noise)
    return space.encode(batch["image"], posterior_noise)


def reference_images(batch, space):
    """(B, 3, S, S) in [-1, 1] of a `mirrored` batch: its images, or the VAE decoding of their
    cached posterior means."""
    if "image" in batch:
        return batch["image"].float().clamp(-1, 1)
    return space.decode(space.from_posterior(batch["latent_mean"], batch["latent_std"]))


#################################################################################
#          REPA: a block's tokens aligned to the image encoder's patches        #
#################################################################################

def repa_projector(hidden_size, width, encoder_dim):
    """REPA's projector (Yu et al., ICLR 2025): an MLP from the DiT's tokens (B, T, hidden_size) to the
    encoder's width (B, T, encoder_dim). Trained with the DiT as `model.repa_projector`; the EMA and
    the export never hold it."""
    return nn.Sequential(nn.Linear(hidden_size, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                         nn.Linear(width, encoder_dim))


def repa_loss(projected, patch_tokens, grid_hw):
    """REPA's loss per sample (B,): the negative cosine similarity of each projected DiT token
    (B, h*w, C) with the encoder's patch token at its place, averaged over the tokens. The encoder's
    square grid of N patch tokens (B, N, C) is resized to the DiT's (h, w) grid (bilinear, antialiased
    when shrinking), as where a 224 px ViT-B/16's 14 x 14 meets a 256 px XL/2's 16 x 16."""
    side = math.isqrt(patch_tokens.shape[1])
    grid = patch_tokens.float().transpose(1, 2).unflatten(2, (side, side))  # (B, C, side, side)
    if (side, side) != tuple(grid_hw):
        grid = F.interpolate(grid, size=tuple(grid_hw), mode="bilinear", align_corners=False, antialias=True)
    return -F.cosine_similarity(projected.float(), grid.flatten(2).transpose(1, 2), dim=-1).mean(1)


#################################################################################
#                                 Parallelism                                   #
#################################################################################

def device_mesh(args, world_size, device):
    """The ranks' layout for FSDP2: None on one rank; a 1-D mesh that shards over all ranks (FSDP);
    or, with --shard-group N < world size, HSDP as torchtitan builds it: a 2-D mesh whose "shard"
    dimension is N ranks (a node: all-gathers and reduce-scatters stay on its fast links) and
    whose "replicate" dimension holds world / N such groups, which only all-reduce gradients."""
    if world_size == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh
    shard = args.shard_group or world_size
    if shard == world_size:
        return init_device_mesh(device.type, (world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(device.type, (world_size // shard, shard), mesh_dim_names=("replicate", "shard"))


def layout(mesh):
    """How the ranks hold the model, for the start line."""
    if mesh is None:
        return ""
    return f" (HSDP {mesh.size(0)} x {mesh.size(1)})" if mesh.ndim == 2 else " (FSDP)"


def parallelize(model, args, mesh, train=True):
    """torchtitan's order: activation checkpointing, then compile each block, then FSDP2 per block
    and at the root. The backward pass recomputes each block by calling it again, compiled graph
    and FSDP all-gather included; compile per block, since the blocks are identical and one graph
    serves all; shard per block, so each block's all-gather overlaps the previous block's compute.
    `Module.compile` compiles in place, so state-dict keys stay plain (no `_orig_mod.`).

    Precision is the same on one rank and many. bf16 keeps fp32 master weights: FSDP gathers them
    in bf16 and reduces gradients in fp32, and the forward runs under the loop's autocast, as on
    one rank. FSDP must not cast the forward's inputs (its default): that rounds the timesteps
    (999 -> 1000 in bf16), the condition and the fp32 residual stream between blocks, none of
    which autocast touches. The EMA (train=False) stays fp32, as the 1-rank grids sample it."""
    model.grad_checkpointing = train and args.grad_checkpointing
    if train and args.compile:
        for block in model.blocks:
            block.compile()
    if mesh is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
        bf16 = train and args.precision == "bf16"
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else torch.float32,
                                      reduce_dtype=torch.float32, cast_forward_inputs=False)
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        if hasattr(model, "repa_projector"):  # its own unit: the loop calls it apart from the forward
            fully_shard(model.repa_projector, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        # The guided forward calls self.forward directly, past the hooks that gather the root's
        # parameters: register it as a forward of its own.
        register_fsdp_forward_method(model, "forward_with_cfg")
    return model


def check_shared_out(out, rank):
    """--out must be one folder that every rank sees (checkpoints are written there by all ranks
    and committed by rank 0): rank 0 writes a fresh token there, and every rank must read it."""
    os.makedirs(out, exist_ok=True)
    if not dist.is_initialized():
        return
    token = [os.urandom(8).hex()]
    dist.broadcast_object_list(token, src=0)
    path = os.path.join(out, ".shared_by_all_ranks")
    if rank == 0:
        data.write_atomically(path, token[0].encode())
    barrier()
    try:
        with open(path) as f:
            seen = f.read() == token[0]
    except OSError:
        seen = False
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, (seen, os.uname().nodename))  # every rank has read the file
    if rank == 0:
        os.remove(path)
    blind = sorted({host for seen_there, host in views if not seen_there})
    if blind:
        raise UsageError(f"--out {out}: the ranks on {', '.join(blind)} do not see the files rank 0 writes there; "
                         f"pass a folder on a filesystem that every node mounts")


def reshard(model):
    """Free the root's gathered parameters after an inference forward. FSDP2 keeps a root's
    parameters unsharded after its forward (training would gather them again for the backward at
    once), but the EMA runs no backward: left so, its full tensors meet the model's shards in
    the next EMA update."""
    if hasattr(model, "reshard"):
        model.reshard()


def local(tensor):
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def all_reduce(values, device, op=None):
    """Sum (or `op`) a list of floats over ranks; identity in a world of one."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor.tolist()


def device_peak_tflops(device, override=None):
    """bf16 peak TFLOP/s for MFU: the flag if given, else looked up from the GPU's name, else None."""
    if override or device.type != "cuda":
        return override
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


#################################################################################
#                        Per-sample randomness                                  #
#################################################################################

def sample_randomness(global_indices, seed, x_shape, num_timesteps, dropout_prob, latent):
    """Every random choice of a training sample, from a generator seeded by (seed, global index),
    drawn on the CPU in the loader's workers beside the data (data.make_loader's per_sample), so
    the step neither waits for it nor reads the indices back from the GPU.

    Returns {"flip": (B,) bool, "t": (B,) int64, "drop_cond": (B,) bool, "noise": (B, *x_shape)},
    and in latent space "posterior_noise" (B, *x_shape), the VAE posterior sample's noise; drawn in
    this fixed order.
    """
    draws = {"flip": [], "t": [], "drop_cond": [], "noise": [], "posterior_noise": []}
    for g in global_indices.tolist():
        gen = sample_generator(seed, g)
        draws["flip"].append(torch.rand((), generator=gen) < 0.5)
        draws["t"].append(torch.randint(num_timesteps, (), generator=gen))
        draws["drop_cond"].append(torch.rand((), generator=gen) < dropout_prob)
        draws["noise"].append(torch.randn(x_shape, generator=gen))
        if latent:
            draws["posterior_noise"].append(torch.randn(x_shape, generator=gen))
    return {key: torch.stack(values) for key, values in draws.items() if values}


def batch_randomness(batch, seed, channels, downsampling, num_timesteps, dropout_prob, latent):
    """sample_randomness for a collated batch (data.make_loader's per_sample): x0's shape is the
    batch's own, which aspect-ratio buckets vary from batch to batch."""
    if "latent_mean" in batch:
        x_shape = tuple(batch["latent_mean"].shape[-3:])
    else:
        x_shape = (channels, *(side // downsampling for side in batch["image"].shape[-2:]))
    return sample_randomness(batch["global_index"], seed, x_shape, num_timesteps, dropout_prob, latent)


#################################################################################
#                                Checkpoints                                    #
#################################################################################

def training_state(model, ema, optimizer, counters):
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "ema": get_model_state_dict(ema), "optim": optim_state,
            "counters": counters, "rng": torch.get_rng_state()}


class Checkpointer:
    """Checkpoints a step does not wait for. dcp.async_save copies the state to host memory (the
    only part the step waits for) and every rank writes its shards into step_N.tmp in a background
    thread; once all have, rank 0 commits it: renames it to step_N (atomic), points `latest` at it
    (atomic replace) and deletes the oldest beyond --keep-last. A run killed before the commit
    resumes from the previous checkpoint. Rank 0 writes the EMA export in the background too."""

    def __init__(self, args, rank):
        self.args, self.rank = args, rank
        # async_save's collectives run in its thread, on the CPU: a gloo group beside NCCL's, and
        # another for asking whether all ranks are done (one group must not serve two threads).
        self.group, self.done_group = ((dist.new_group(backend="gloo"), dist.new_group(backend="gloo"))
                                       if dist.is_initialized() else (None, None))
        self.export_writer = ThreadPoolExecutor(1)
        self.in_flight, self.export = None, None  # (future, tmp folder, run config); rank 0's export write

    def save(self, model, ema, optimizer, counters, run_config, metadata):
        self.commit(wait=True)
        tmp = os.path.join(checkpoint_dir(self.args.out), f"step_{int(counters[0]):07d}.tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier()
        state = training_state(model, ema, optimizer, counters.clone())
        self.in_flight = (dcp.async_save(state, checkpoint_id=tmp, process_group=self.group), tmp, run_config)
        # The export: gathered to rank 0 here (a collective), written in the background.
        full = get_model_state_dict(ema, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.export is not None:
            self.export.result()
        if self.rank == 0:
            self.export = self.export_writer.submit(write_export, self.args.out, full, metadata)

    def commit(self, wait):
        """Commit the checkpoint in flight once every rank has written it; `wait`: block until then."""
        if self.in_flight is None:
            return
        future, tmp, run_config = self.in_flight
        if not wait:
            done = torch.tensor([float(future.done())])
            if self.done_group is not None:
                dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self.done_group)
            if not done.item():
                return
        future.result()
        barrier()
        if self.rank == 0:
            with open(os.path.join(tmp, "run_config.json"), "w") as f:
                json.dump(run_config, f, indent=1)
            final = tmp.removesuffix(".tmp")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            data.write_atomically(os.path.join(checkpoint_dir(self.args.out), "latest"), os.path.basename(final).encode())
            complete = sorted(d for d in os.listdir(checkpoint_dir(self.args.out))
                              if d.startswith("step_") and not d.endswith(".tmp"))
            for old in complete[:-self.args.keep_last]:
                shutil.rmtree(os.path.join(checkpoint_dir(self.args.out), old), ignore_errors=True)
        barrier()
        self.in_flight = None

    def close(self):
        self.commit(wait=True)
        if self.export is not None:
            self.export.result()


def load_checkpoint(path, model, ema, optimizer, run_config):
    """Restore everything from `path` in place; returns the counters tensor."""
    with open(os.path.join(path, "run_config.json")) as f:
        saved = json.load(f)
    saved["model_config"] = upgrade_config(saved["model_config"])  # saved by an earlier version
    run_config = json.loads(json.dumps(run_config))  # as saved: tuples are lists there (the random T5's pieces)
    changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in run_config.items() if saved.get(k) != v]
    if changed:
        raise UsageError(f"--resume: {path} was made with another configuration ({'; '.join(changed)}); "
                         f"use the same arguments or another --out")
    state = training_state(model, ema, optimizer, torch.zeros(4, dtype=torch.int64))
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    set_model_state_dict(ema, state["ema"])
    torch.set_rng_state(state["rng"])
    return state["counters"]


def write_export(out, state_dict, metadata):
    """out/ema.safetensors: the weights, and in its metadata all that sample.py needs to rebuild
    the model and its inputs (atomic replace)."""
    path = os.path.join(out, "ema.safetensors")
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, path + ".tmp", metadata={k: json.dumps(v) for k, v in metadata.items()})
    os.replace(path + ".tmp", path)


def barrier():
    if dist.is_initialized():
        dist.barrier()


#################################################################################
#                                  Sampling                                     #
#################################################################################

@torch.no_grad()
def sample_grid(ema, task, space, diffusion, eval_batch, args, path):
    """EMA samples of the held-out conditions, image i drawn as sample.py draws image i
    (diffusion.draw_samples, seeded by (--seed, i)), written under their references when `path`
    (.png) is given, and each set as uint8 arrays beside it (PATH.samples.npz, PATH.references.npz,
    `arr_0` as evaluate.py reads them). -> (B, 3, S, S) in [-1, 1]."""
    ema.eval()
    size = args.image_size // space.downsampling
    x0 = draw_samples(diffusion, ema, task.condition(eval_batch, space), (space.channels, size, size),
                      range(len(eval_batch["index"])), args.seed, args.sample_method, args.sample_steps,
                      args.cfg_scale, eval_batch["index"].device, clip_denoised=space.vae is None)
    reshard(ema)
    images = space.decode(x0)
    if path is not None:
        references = reference_images(eval_batch, space)
        rows = [t for pair in zip(references.split(8), images.split(8)) for t in pair]
        save_image(torch.cat(rows) * 0.5 + 0.5, path, nrow=8, padding=1)
        for name, batch in (("samples", images), ("references", references)):
            np.savez_compressed(path.removesuffix(".png") + f".{name}.npz", arr_0=to_uint8(batch))
    return images


#################################################################################
#                                 The loop                                      #
#################################################################################

def train(args, task):
    """Train `task` with `args` (add_train_args); every rank runs this same function."""
    rank, world_size, device = setup_distributed()
    try:
        _train(args, task, rank, world_size, device)
    except UsageError as error:
        exit_with_usage_error(error, os.path.basename(sys.argv[0]))
    except data.TooManyBadFiles as error:
        # Met by the rank whose reads failed while the others may wait in a collective: no
        # barrier (exit_with_usage_error's), this rank prints its one line and exits; torchrun
        # ends the rest. str(error) is one line even when a DataLoader worker raised it; the
        # newline ends tqdm's progress line.
        print(f"\n{os.path.basename(sys.argv[0])}: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(args, task, rank, world_size, device):
    torch.manual_seed(args.seed)
    if device.type == "cuda":  # TF32 for what runs in fp32 (the frozen encoders, an fp32 run)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    space = ImageSpace(VAE.from_pretrained(args.vae).to(device) if args.vae else None)
    model = task.build_model().to(device)
    ema = task.build_model().to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    config = model.config
    num_params = sum(p.numel() for p in model.parameters())
    flops_per_image = 3 * forward_flops(model)  # forward + backward (2x), nanoGPT's accounting
    repa = args.repa_weight > 0
    if repa and not task.repa_dim:
        raise UsageError("--repa-weight: this task has no image-encoder patch tokens to align to; REPA is "
                         "for train_i2i.py")
    if repa:
        model.repa_projector = repa_projector(config["hidden_size"], args.repa_width, task.repa_dim).to(device)
        tokens = (config["input_size"] // config["patch_size"]) ** 2
        flops_per_image += 3 * 2 * tokens * sum(p.numel() for p in model.repa_projector.parameters())
    mesh = device_mesh(args, world_size, device)
    parallelize(model, args, mesh)
    parallelize(ema, args, mesh, train=False)
    # Fused: one kernel for the update, and it takes the step's found-inf flag on the device.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  betas=(0.9, 0.999), fused=True)
    diffusion = GaussianDiffusion(beta_schedule("linear", 1000), prediction=args.prediction)

    run_config = {k: getattr(args, k) for k in ("model", "image_size", "global_batch_size", "vae", "encoder",
                                                 "prediction", "data", "seed", "learn_sigma")}
    run_config.update(model_config=config, task_metadata=task.metadata)
    if repa:
        run_config.update(repa={"weight": args.repa_weight, "block": args.repa_block, "width": args.repa_width})
    check_shared_out(args.out, rank)
    counters = torch.zeros(4, dtype=torch.int64)  # step, skipped files, non-finite steps, spare
    ckpt = latest_checkpoint(args.out) if args.resume else None
    if ckpt:
        counters = load_checkpoint(ckpt, model, ema, optimizer, run_config)
    step = int(counters[0])
    if rank == 0:
        os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
        print(f"{model_size(args)[0]} ({num_params:,} parameters, {flops_per_image / 3e9:.2f} GFLOPs/image forward) "
              f"on {task.dataset!r}; world {world_size}{layout(mesh)}, device {device}; "
              + (f"resumed from {ckpt} at step {step}" if ckpt else "from scratch"), flush=True)

    per_rank = args.global_batch_size // world_size
    micro = per_rank // args.grad_accum
    workers = args.num_workers if args.num_workers is not None else (8 if device.type == "cuda" else 0)
    randomness = partial(batch_randomness, seed=args.seed, channels=space.channels, downsampling=space.downsampling,
                         num_timesteps=diffusion.num_timesteps, dropout_prob=config["cond_dropout_prob"],
                         latent=space.vae is not None)
    batches = iter(data.make_loader(task.dataset, args.global_batch_size, micro, rank, world_size, args.seed,
                                    start=step * args.global_batch_size, num_workers=workers, per_sample=randomness,
                                    buckets=getattr(task.dataset, "buckets", None)))
    num_eval = len(task.eval_items[: args.num_samples])
    eval_batch = mirrored(to_device(data.collate_samples(task.eval_items[:num_eval]), device),
                          torch.zeros(num_eval, dtype=torch.bool, device=device))
    eval_batch = task.features(eval_batch) if task.features else eval_batch
    autocast = (lambda: torch.autocast(device.type, torch.bfloat16)) if args.precision == "bf16" else contextlib.nullcontext
    peak = device_peak_tflops(device, args.peak_tflops)
    metadata = {"lumos": {"task": task.metadata.get("task", "i2i"), "model": args.model, "config": config,
                          "space": "latent" if args.vae else "pixel", "vae": args.vae, "image_size": args.image_size,
                          "encoder": args.encoder, "prediction": args.prediction, **task.metadata}}

    stop = {"signal": None}
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: stop.update(signal=signum))

    block_tokens = {}  # REPA: the aligned block's output, kept by the forward for the loss

    def model_fn(x, t, **kwargs):
        if not repa:
            return model(x, t, **kwargs).float()
        output, block_tokens["tokens"] = model(x, t, **kwargs, return_block=args.repa_block)
        return output.float()

    progress = tqdm(total=args.steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    window = new_window(device)
    checkpoints = Checkpointer(args, rank)
    signalled = False
    model.train()
    while step < args.steps:
        lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro_step in range(args.grad_accum):
            batch = to_device(next(batches), device)
            window["skipped"] += batch.get("skipped", [])
            # The frozen encoders run in fp32 whatever --precision is: the feature cache holds their
            # fp32 outputs, and both paths must train on the same targets and conditions.
            with torch.no_grad():
                batch = mirrored(batch, batch["flip"] & task.hflip)
                batch = task.features(batch) if task.features else batch
                x0 = diffusion_targets(batch, batch.get("posterior_noise"), space)
                cond = task.condition(batch, space)
            if hasattr(model, "set_requires_gradient_sync"):
                model.set_requires_gradient_sync(micro_step == args.grad_accum - 1)
            with autocast():
                losses = diffusion.training_losses(model_fn, x0.float(), batch["t"],
                                                   {**cond, "drop_cond": batch["drop_cond"]}, noise=batch["noise"])
                if repa:
                    grid_hw = [side // config["patch_size"] for side in x0.shape[-2:]]
                    projected = model.repa_projector(block_tokens.pop("tokens"))
                    losses["repa"] = repa_loss(projected, batch["patch_tokens"], grid_hw)
            loss = losses["loss"] + args.repa_weight * losses["repa"] if repa else losses["loss"]
            (loss.sum() / per_rank).backward()
            window["sums"][:4] += torch.stack([losses[k].detach().sum() if k in losses else losses["mse"].new_zeros(())
                                               for k in ("loss", "mse", "vb", "repa")]).double()
            window["sums"][4] += len(x0)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
        skip = ~torch.isfinite(grad_norm)
        optimizer.found_inf = skip.float()  # the fused AdamW skips the whole update, on the device
        optimizer.step()
        update_ema(ema, model, args.ema_decay, skip)
        optimizer.zero_grad(set_to_none=True)
        count_nonfinite(window, skip, grad_norm)
        step += 1
        counters[0] = step
        progress.update(1)

        checkpoint_now = args.ckpt_every and (step % args.ckpt_every == 0 or step == args.steps)
        # The host reads the device only here, every --log-every steps (and at checkpoints).
        if step % args.log_every == 0 or step == args.steps:
            log_metrics(args, window, lr, step, counters, flops_per_image, peak, world_size, device, rank, progress)
        elif checkpoint_now:
            read_nonfinite(args, window, step, counters)
        if args.sample_every and (step % args.sample_every == 0 or step == args.steps):
            path = os.path.join(args.out, "samples", f"step_{step:07d}.png") if rank == 0 else None
            images = sample_grid(ema, task, space, diffusion, eval_batch, args, path)
            if task.evaluate and rank == 0:
                scores = task.evaluate(images, eval_batch)
                log_line(args, rank, {"step": step, **scores})
                tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
            model.train()
        signalled = step % args.log_every == 0 and all_reduce([float(stop["signal"] is not None)], device,
                                                              dist.ReduceOp.MAX)[0] > 0
        if signalled or checkpoint_now:
            count_skipped_files(window, counters, rank)
            checkpoints.save(model, ema, optimizer, counters, run_config, {**metadata, "step": step})
        elif step % args.log_every == 0:
            checkpoints.commit(wait=False)
        if signalled:
            break
    checkpoints.close()
    progress.close()
    if signalled and rank == 0:
        print(f"signal {stop['signal']}: saved the checkpoint at step {step}, exiting", flush=True)


def update_ema(ema, model, decay, skip):
    """ema = decay * ema + (1 - decay) * model, in fp32, shard by shard under FSDP; unchanged where
    the step was skipped (`skip`, a bool tensor read on the device, not on the host)."""
    ema_params = [local(p) for p in ema.parameters()]
    trained = [p for name, p in model.named_parameters() if not name.startswith("repa_projector.")]  # not in the EMA
    model_params = [local(p).detach().to(e.dtype) for p, e in zip(trained, ema_params, strict=True)]
    weight = (~skip).float() * (1.0 - decay)
    torch._foreach_lerp_(ema_params, model_params, [weight] * len(ema_params))


def new_window(device):
    """What the steps between two log lines leave on the device, read on the host at the next
    one: a read every step would make the host wait for the GPU, which would then idle while the
    host queues the next step. "sums": loss, mse, vb, repa and samples; "nonfinite": skipped steps,
    the current run of them, the longest run; "grad_norm": the last step's."""
    return {"sums": torch.zeros(5, dtype=torch.float64, device=device),
            "nonfinite": torch.zeros(3, dtype=torch.int64, device=device),
            "grad_norm": torch.zeros((), device=device), "time": time.perf_counter(), "skipped": []}


def count_nonfinite(window, skip, grad_norm):
    nonfinite, skipped = window["nonfinite"], skip.long()
    nonfinite[0] += skipped
    nonfinite[1] = (nonfinite[1] + 1) * skipped
    nonfinite[2] = torch.maximum(nonfinite[2], nonfinite[1])
    window["grad_norm"] = grad_norm.detach()


def read_nonfinite(args, window, step, counters):
    """Fold the window's skipped steps into counters[2]; stop the run once --max-nonfinite steps in
    a row were non-finite (found here, at the latest --log-every steps after it happened)."""
    count, run, longest = window["nonfinite"].tolist()  # the same on every rank: the norm is global
    counters[2] += count
    if longest >= args.max_nonfinite:
        raise RuntimeError(f"{longest} consecutive steps with a non-finite loss or gradient by step {step}: "
                           f"lower --lr, use --precision fp32, or check the data")
    window["nonfinite"][0], window["nonfinite"][2] = 0, run


def count_skipped_files(window, counters, rank):
    """Add the bad files every rank skipped since the last call to counters[1]; rank 0 names them."""
    names = [window["skipped"]]
    if dist.is_initialized():
        names = [None] * dist.get_world_size()
        dist.all_gather_object(names, window["skipped"])
    for name in (name for rank_names in names for name in rank_names):
        counters[1] += 1
        if rank == 0:
            tqdm.write(f"skipped bad file {name}")
    window["skipped"] = []


def peak_memory_gib(device):
    """GPU: the most memory tensors have held. CPU: this process's peak resident set, VmHWM from
    /proc (Linux; None elsewhere), which exec resets, where getrusage's would keep a parent's peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if not os.path.exists("/proc/self/status"):
        return None
    with open("/proc/self/status") as status:
        kib = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    return int(kib) / 2**20


def log_metrics(args, window, lr, step, counters, flops_per_image, peak, world_size, device, rank, progress):
    count_skipped_files(window, counters, rank)
    read_nonfinite(args, window, step, counters)
    sums = window["sums"].clone()
    if dist.is_initialized():
        dist.all_reduce(sums)
    loss, mse, vb, repa, samples = sums.tolist()
    grad_norm = float(window["grad_norm"])
    elapsed = time.perf_counter() - window["time"]
    images_per_s = samples / elapsed
    tflops = flops_per_image * images_per_s / 1e12
    line = {"step": step, "loss": loss / samples, "mse": mse / samples, "vb": vb / samples, "grad_norm": grad_norm,
            **({"repa_loss": repa / samples} if args.repa_weight else {}),  # "loss" is the diffusion loss
            "lr": lr, "images_per_s": images_per_s, "tflops": tflops,
            "mfu": tflops / (peak * world_size) if peak else None,
            "skipped_files": int(counters[1]), "nonfinite_steps": int(counters[2]),
            "peak_memory_gib": peak_memory_gib(device)}
    log_line(args, rank, line)
    progress.set_postfix(loss=f"{line['loss']:.4f}", gnorm=f"{grad_norm:.2f}", img_s=f"{images_per_s:.1f}",
                         mfu="-" if peak is None else f"{100 * line['mfu']:.1f}%")
    window["sums"].zero_()
    window["time"] = time.perf_counter()


def log_line(args, rank, line):
    if rank == 0:
        with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


#################################################################################
#                Fine-tuning from I2I weights (train_t2i.py, train_nvs.py)      #
#################################################################################

DEFAULT_I2I_EXPORT = os.path.join("runs", "i2i", "ema.safetensors")  # `python train_i2i.py`'s output


def resolve_init(args, inherited, scratch_defaults):
    """Read --init (dit.read_weights: an export, checkpoint or run folder, the official .pth; or
    scratch) and fill into `args` what the weights fix. `inherited` maps each task whose weights may
    start this run ("i2i"; "t2i" too for NVS) to the arguments they fix (taken when not given,
    refused when given otherwise); the image size and prediction are taken when not given; then
    `scratch_defaults` for whatever is still unset. -> (state dict or None, info or None)."""
    state = info = None
    if args.init != "scratch":
        state, info = read_weights(args.init, args.init_entry)
        task = info["task"]
        if task not in inherited:
            raise ValueError(f"--init {args.init}: a {task!r} model; start from an "
                             f"{' or '.join(t.upper() for t in inherited)} model")
        fixed = inherited[task]
        sizes = [f"--{k.replace('_', '-')}" for k in ("depth", "hidden_size", "num_heads") if getattr(args, k)]
        if sizes:
            raise ValueError(f"{', '.join(sizes)}: the model's size comes from --init {args.init}; "
                             f"these apply only with --init scratch")
        saved = {**info, "learn_sigma": info["config"]["learn_sigma"]}
        for name in fixed:
            given = getattr(args, name)
            if given is not None and saved.get(name) is not None and given != saved[name]:
                raise ValueError(f"--{name.replace('_', '-')} {given}: --init {args.init} was trained with "
                                 f"{saved[name]}; drop the flag or use --init scratch")
        for name in (*fixed, "image_size", "prediction"):
            if getattr(args, name) is None:
                setattr(args, name, saved.get(name))
        channels = info["config"]["in_channels"]
        if channels != (4 if args.vae else 3):
            raise ValueError(f"--init {args.init} is a {channels}-channel model, but this run is in "
                             f"{'latent' if args.vae else 'pixel'} space: " +
                             ("pass --vae (the SD-VAE it was trained with)" if channels == 4 else "drop --vae"))
    for name, default in scratch_defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return state, info


# The weights that depend on the condition's width: new whenever the condition changes (I2I -> T2I,
# T2I -> NVS).
CONDITION_KEYS = ("y_embedder.y_proj.fc1.weight", "y_embedder.y_proj.fc1.bias", "y_embedder.y_proj.fc2.weight",
                  "y_embedder.y_proj.fc2.bias", "y_embedder.y_embedding")


def transfer_weights(model, state_dict, new_keys=(), widened_keys=(), source="checkpoint"):
    """Load an I2I model's weights into `model`, a LumosDiT with the same blocks and some new or
    wider layers (T2I: the condition projection and null condition are new; NVS: pose_mixer is new
    and x_embedder also takes the source view's channels). A widened tensor gets the checkpoint's
    values in the leading part of dim 1 (the input channels) and zeros after, so the new inputs
    start switched off; a new key keeps the model's initialisation; pos_embed is recomputed
    (LumosDiT). Any other key missing, unexpected or of another shape is a ValueError naming it.
    -> {"carried", "widened", "new"}: lists of keys, for print_transfer."""
    expected = model.state_dict()
    state = {key: value for key, value in state_dict.items() if key not in new_keys}
    for key in widened_keys:
        saved = state.get(key)
        if saved is not None and saved.ndim > 1 and saved.shape[1] < expected[key].shape[1]:
            padding = saved.new_zeros(saved.shape[0], expected[key].shape[1] - saved.shape[1], *saved.shape[2:])
            state[key] = torch.cat([saved, padding], dim=1)
    wrong_shape = [f"{key} {tuple(value.shape)} vs model {tuple(expected[key].shape)}" for key, value in state.items()
                   if key in expected and key != "pos_embed" and value.shape != expected[key].shape]
    loaded = model.load_state_dict(state, strict=False) if not wrong_shape else None
    found = {"wrong-shape": wrong_shape} if wrong_shape else {
        "missing": [key for key in loaded.missing_keys if key not in new_keys and key != "pos_embed"],
        "unexpected": loaded.unexpected_keys}
    problems = [f"{len(keys)} {kind} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"
                for kind, keys in found.items() if keys]
    if problems:
        raise ValueError(f"{source}: does not fit {type(model).__name__}: {'; '.join(problems)}")
    carried = [key for key in expected if key in state and key not in widened_keys]
    return {"carried": carried, "widened": list(widened_keys), "new": list(new_keys)}


def print_transfer(init, report, new_what):
    """What transfer_weights did, on rank 0: the blocks' keys collapsed to `blocks.{0..N-1}.* (K each)`."""
    def describe(keys):
        block_ids = sorted({int(m.group(1)) for m in (re.match(r"blocks\.(\d+)\.", k) for k in keys) if m})
        parts = [k for k in keys if not k.startswith("blocks.")]
        if block_ids:
            parts.append(f"blocks.{{{block_ids[0]}..{block_ids[-1]}}}.* ({sum(k.startswith('blocks.0.') for k in keys)} each)")
        return ", ".join(parts) or "none"
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"from {init}: loaded {describe(report['carried'])} (pos_embed recomputed for this size)"
              + (f"\n  widened, the new input channels zero: {describe(report['widened'])}" if report["widened"] else "")
              + f"\n  new ({new_what}): {describe(report['new'])}", flush=True)


#################################################################################
#                                    I2I                                        #
#################################################################################

def held_out_items(dataset, image_size, seed, count):
    """Conditions and references of the sample grids. For `shapes`: images past the training set,
    never trained on. For real data: `count` items spread evenly over the dataset (pass a separate
    folder to --data of an evaluation run for truly held-out ones)."""
    if isinstance(dataset, data.ShapesDataset):
        extended = data.ShapesDataset(len(dataset) + count, image_size, seed)
        return [extended[len(dataset) + k] for k in range(count)]
    return [dataset[k * len(dataset) // count] for k in range(min(count, len(dataset)))]


def i2i_task(args, device):
    """I2I: the condition is --condition's tokens of the frozen image encoder's view of the image
    itself (encoders.condition_tokens), computed on the fly, or read from a feature cache (--data
    cache:DIR), where the encoder is never loaded. Patch tokens are computed or read only when the
    condition or REPA needs them."""
    dataset = data.open_dataset(args.data, args.image_size, seed=args.seed)
    patch_tokens = args.condition != "cls" or args.repa_weight > 0
    if isinstance(dataset, data.FeatureCache):
        check_cache_settings(dataset, args, patch_tokens)
        features, width, patches = None, dataset.cond_dim, dataset.patches
    else:
        encoder = load_image_encoder(args.encoder, args.image_size, device)
        features = lambda batch: {**batch, **image_features(encoder, batch["image"], patch_tokens)}  # noqa: E731
        width, patches = encoder.norm.normalized_shape[0], encoder.grid ** 2
    name, overrides = model_size(args)
    build = lambda: build_model(name, input_size=args.image_size // (8 if args.vae else 1),
                                in_channels=4 if args.vae else 3, learn_sigma=args.learn_sigma, cond_dim=width,
                                cond_tokens=condition_token_count(args.condition, patches), **overrides)
    # "condition" only where it is not the CLS: exports and checkpoints from before the flag say none.
    condition = {"condition": args.condition} if args.condition != "cls" else {}
    return Task(build_model=build, condition=image_condition(args.condition), dataset=dataset,
                eval_items=held_out_items(dataset, args.image_size, args.seed, args.num_samples),
                evaluate=shapes_agreement if isinstance(dataset, data.ShapesDataset) else None,
                features=features, repa_dim=width,
                metadata={"task": "i2i", "encoder_config": encoder_config(args.encoder, args.image_size), **condition})


def shapes_agreement(images, batch):
    """Task.evaluate of I2I on `shapes`: the I2I agreement (evaluate.i2i_agreement) of the grid's
    samples with their held-out references, per attribute."""
    scores = i2i_agreement(to_uint8(images), to_uint8(batch["image"]))
    return {f"agreement_{name}": value for name, value in scores.items() if name != "images"}


def check_cache_settings(cache, args, patch_tokens=False):
    """The run names the encoders the cache was made with: the VAE decodes the grids, and the
    export records both for sample.py. `patch_tokens`: the run needs the cache to hold them."""
    made = (cache.info["vae"], cache.info["encoder"])
    if cache.info.get("multi_scale"):
        raise ValueError(f"--data cache:{cache.root} holds aspect-ratio buckets (made with --multi-scale), for "
                         f"train_t2i.py --multi-scale; write a cache without it")
    if (args.vae, args.encoder) != made:
        raise ValueError(f"--data cache:{cache.root} was made with --vae {made[0]} --encoder {made[1]}; "
                         f"pass those (given: --vae {args.vae} --encoder {args.encoder})")
    if patch_tokens and not cache.patches:
        raise ValueError(f"--data cache:{cache.root} holds no patch tokens, which --condition {args.condition}"
                         f"{' and --repa-weight' if args.repa_weight else ''} need: write the cache with "
                         f"`data.py cache --patch-tokens`")


def exit_with_usage_error(error, prog):
    """One line on rank 0's stderr, then every rank exits with status 2 (argparse's). Under torchrun
    the ranks meet at a barrier first: the first rank to exit gets the others killed, and that
    must not happen before rank 0 has printed."""
    rank = setup_distributed()[0]
    if rank == 0:
        print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(2)


def main(argv=None):
    parser = add_train_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    parser.add_argument("--condition", default="cls", choices=CONDITIONS,
                        help="the image encoder's tokens the DiT attends to: its CLS (Lumos), its patch tokens, or all")
    args = parser.parse_args(argv)
    _, world_size, device = setup_distributed()  # train() finds it set up
    try:
        check_args(args, world_size)
        task = i2i_task(args, device)
    except (ValueError, FileNotFoundError) as error:
        exit_with_usage_error(error, "train_i2i.py")
    train(args, task)


if __name__ == "__main__":
    main()
