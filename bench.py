"""Benchmarks, each a table of variants measured side by side in one run.

    python bench.py model                                   # DiT-S/2 on 32x32x4, CPU-sized
    python bench.py model --model DiT-XL/2 --image-size 256 --batch-size 32 --variants bf16-compiled
    python bench.py encoders                                # T5 .bin loaded encoder-only vs whole
    python bench.py train                                   # the training loop: compile, bf16, cache, FSDP2
    python bench.py cache-size                              # feature cache bytes per item; target error
    python bench.py data-index --images 1000000 --baseline OLD_DATA_PY   # tar shards: scan vs index
    python bench.py t2i                                     # Lumos_T2I.pth's model: 1024 px forward, 512 px sample

FLOPs are counted as nanoGPT and the DiT paper do (2 per multiply-add of the matmuls and
attention, `dit.forward_flops`); a training step is 3x the forward. MFU = achieved FLOP/s over
the device's peak (`--peak-tflops`, or known for common GPUs).
"""
import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from safetensors.torch import save_file

import data
from dit import build_model, forward_flops
from encoders import VAE, ViTEncoder, T5Config, T5Encoder, is_t5_encoder_key
from diffusion import GaussianDiffusion, beta_schedule, draw_samples
from sample import PRECISIONS
from train_i2i import device_peak_tflops, peak_memory_gib

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device, warmup, iters):
    """Seconds per call of `step`, after `warmup` calls (compilation happens there)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def print_table(rows, columns):
    widths = [max(len(col), *(len(str(row[col])) for row in rows)) for col in columns]
    print("  ".join(col.ljust(w) for col, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(str(row[col]).ljust(w) for col, w in zip(columns, widths)))


# The -math-attn variants run attention as plain matmuls and softmax (SDPA's MATH backend): the
# reference the fused kernels are measured against.
MODEL_VARIANTS = {  # name -> (autocast dtype, compile, math attention)
    "fp32": (None, False, False),
    "fp32-math-attn": (None, False, True),
    "bf16": (torch.bfloat16, False, False),
    "bf16-math-attn": (torch.bfloat16, False, True),
    "fp32-compiled": (None, True, False),
    "bf16-compiled": (torch.bfloat16, True, False),
}


def bench_model(args):
    device = torch.device(args.device)
    latent_size = args.image_size // 8 if args.latent else args.image_size
    channels = 4 if args.latent else 3
    peak = device_peak_tflops(device, args.peak_tflops)
    rows = []
    for variant in args.variants.split(","):
        dtype, compiled, math_attention = MODEL_VARIANTS[variant]
        torch.manual_seed(0)
        model = build_model(args.model, input_size=latent_size, in_channels=channels,
                            grad_checkpointing=args.grad_checkpointing).to(device).train()
        if compiled:
            for block in model.blocks:
                block.compile()
        x = torch.randn(args.batch_size, channels, latent_size, latent_size, device=device)
        t = torch.rand(args.batch_size, device=device) * 999
        y = torch.randn(args.batch_size, model.cond_tokens, model.cond_dim, device=device)
        target = torch.randn(args.batch_size, model.pred_channels, latent_size, latent_size, device=device)

        def step():
            autocast = torch.autocast(device.type, dtype) if dtype else contextlib.nullcontext()
            attention = sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext()
            with attention:  # around the backward too: gradient checkpointing recomputes the forward there
                with autocast:
                    loss = F.mse_loss(model(x, t, y).float(), target)
                loss.backward()
            model.zero_grad(set_to_none=True)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = time_steps(step, device, args.warmup, args.iters)
        images_per_s = args.batch_size / seconds
        train_flops = 3 * forward_flops(model)
        achieved = train_flops * images_per_s / 1e12
        rows.append({"variant": variant, "img/s": f"{images_per_s:.1f}", "ms/step": f"{1e3 * seconds:.1f}",
                     "TFLOP/s": f"{achieved:.2f}", "MFU": f"{100 * achieved / peak:.1f}%" if peak else "-",
                     "peak GiB": f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if device.type == "cuda" else "-"})
    params = sum(p.numel() for p in build_model(args.model, input_size=latent_size, in_channels=channels).parameters())
    print(f"{args.model} on {channels}x{latent_size}x{latent_size} inputs, batch {args.batch_size}, {device}: "
          f"{params:,} parameters, {forward_flops_of(args.model, latent_size, channels) / 1e9:.1f} GFLOPs/image forward, "
          f"train step = 3x; peak {peak or 'unknown'} TFLOP/s")
    print_table(rows, ["variant", "img/s", "ms/step", "TFLOP/s", "MFU", "peak GiB"])


def forward_flops_of(name, latent_size, channels):
    with torch.device("meta"):
        return forward_flops(build_model(name, input_size=latent_size, in_channels=channels))


def t5_checkpoint_shapes(config, num_decoder_layers):
    """Key -> shape of a T5 v1.1 encoder+decoder checkpoint (the layout of google/t5-v1_1-*)."""
    with torch.device("meta"):
        shapes = {key: tuple(value.shape) for key, value in T5Encoder(config).state_dict().items()}
    d_model, inner = config.d_model, config.num_heads * config.d_kv
    for i in range(num_decoder_layers):
        layer = f"decoder.block.{i}.layer"
        for attention in ("0.SelfAttention", "1.EncDecAttention"):
            shapes.update({f"{layer}.{attention}.{name}.weight": (inner, d_model) for name in "qkv"})
            shapes[f"{layer}.{attention}.o.weight"] = (d_model, inner)
        shapes[f"{layer}.2.DenseReluDense.wi_0.weight"] = (config.d_ff, d_model)
        shapes[f"{layer}.2.DenseReluDense.wi_1.weight"] = (config.d_ff, d_model)
        shapes[f"{layer}.2.DenseReluDense.wo.weight"] = (d_model, config.d_ff)
        shapes.update({f"{layer}.{j}.layer_norm.weight": (d_model,) for j in range(3)})
    shapes["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
        config.relative_attention_num_buckets, config.num_heads)
    shapes["decoder.final_layer_norm.weight"] = (d_model,)
    shapes["lm_head.weight"] = (config.vocab_size, d_model)
    return shapes


def t5_config_of_size(gigabytes):
    """The narrowest 24+24-layer T5 v1.1 (d_ff = 2.75 d_model, as in v1.1 large) whose fp32
    encoder+decoder checkpoint reaches `gigabytes`."""
    for d_model in range(64, 8193, 64):
        config = T5Config(d_model=d_model, num_heads=d_model // 64, d_ff=d_model * 11 // 4 // 64 * 64)
        shapes = t5_checkpoint_shapes(config, config.num_layers)
        if 4 * sum(torch.Size(shape).numel() for shape in shapes.values()) >= gigabytes * 1e9:
            break
    return config, shapes


def write_t5_checkpoint(folder, gigabytes):
    """Random fp32 T5 encoder+decoder in one pytorch_model.bin plus config.json -> (file bytes, encoder bytes)."""
    config, shapes = t5_config_of_size(gigabytes)
    state = {key: torch.randn(shape) for key, shape in shapes.items()}
    # The tied input embedding is stored under all three names, one storage, as in the Hub file.
    state["encoder.embed_tokens.weight"] = state["decoder.embed_tokens.weight"] = state["shared.weight"]
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({**dataclasses.asdict(config), "feed_forward_proj": "gated-gelu"}))
    encoder_bytes = sum(4 * torch.Size(shape).numel() for key, shape in shapes.items() if is_t5_encoder_key(key))
    return (folder / "pytorch_model.bin").stat().st_size, encoder_bytes


# Runs in a fresh interpreter so that each peak is that load's alone: VmHWM (peak RSS) is reset by
# exec, where ru_maxrss would carry the parent's peak over. VmRSS after the load is what stays
# resident; the peak also counts the memory-mapped checkpoint pages read while copying.
_LOAD_IN_CHILD = r"""
import json, re, sys, time
import torch
from {module} import T5Encoder
method, folder = sys.argv[1], sys.argv[2]
start = time.perf_counter()
if method == "torch.load":
    loaded = torch.load(folder + "/pytorch_model.bin", map_location="cpu", weights_only=True)
elif method == "encoder-only":
    loaded = T5Encoder.from_pretrained(folder)
seconds = time.perf_counter() - start
def resident():
    with open("/proc/self/status") as status:
        return dict(re.findall(r"(VmHWM|VmRSS):\s+(\d+) kB", status.read()))
kib = resident()
if method == "encoder-only":  # a forward pass reads every encoder weight from the mapped file
    with torch.no_grad():
        loaded(torch.ones(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.long))
used_kib = int(resident()["VmRSS"])
print(json.dumps({{"seconds": seconds, "peak_kib": int(kib["VmHWM"]), "after_kib": int(kib["VmRSS"]),
                  "used_kib": used_kib}}))
"""


def measure_load_in_child(method, folder):
    """(seconds, peak RSS GiB during the load, RSS GiB once loaded, RSS GiB once used) of one load,
    in its own process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
    code = _LOAD_IN_CHILD.format(module=T5Encoder.__module__)
    result = subprocess.run([sys.executable, "-c", code, method, str(folder)],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{method} load failed:\n{result.stderr}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report["seconds"], report["peak_kib"] / 2**20, report["after_kib"] / 2**20, report["used_kib"] / 2**20


def bench_encoders(args):
    """Encoder-only loading of a T5 encoder+decoder .bin (as google/t5-v1_1-xxl ships) against
    torch.load of the whole file: time and peak resident memory, each in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        file_bytes, encoder_bytes = write_t5_checkpoint(folder, args.t5_gb)
        print(f"T5-style encoder+decoder pytorch_model.bin: {file_bytes / 2**30:.2f} GiB "
              f"(encoder tensors {encoder_bytes / 2**30:.2f} GiB), written in {time.perf_counter() - start:.0f} s; "
              f"page cache warm for every load")
        rows = []
        for method, label in [("baseline", "python + torch, nothing loaded"),
                              ("encoder-only", "T5Encoder.from_pretrained (mmap, encoder keys)"),
                              ("torch.load", "torch.load of the whole file")]:
            seconds, peak_gib, held_gib, used_gib = measure_load_in_child(method, folder)
            rows.append({"method": label, "load s": f"{seconds:.2f}", "peak RSS GiB": f"{peak_gib:.2f}",
                         "RSS after GiB": f"{held_gib:.2f}",
                         "after a forward GiB": f"{used_gib:.2f}" if method == "encoder-only" else "-"})
    print_table(rows, ["method", "load s", "peak RSS GiB", "RSS after GiB", "after a forward GiB"])


# The sizes of stabilityai/sd-vae-ft-mse (its config.json) and of DINO ViT-B/16: the encoders
# of the real run, with random weights.
SD_VAE_CONFIG = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
                 "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
                 "act_fn": "silu", "down_block_types": ["DownEncoderBlock2D"] * 4,
                 "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 256}
VAE_SCALE = 0.18215  # SD-VAE's scaling_factor
DINO_VITB16 = {"image_size": 224, "patch_size": 16, "width": 768, "depth": 12, "heads": 12}


def write_random_encoders(folder, vae_config=SD_VAE_CONFIG, dino_config=DINO_VITB16, seed=0):
    """A random SD-VAE in the diffusers layout and a random DINO ViT in the original DINO layout
    (so heads = width / 64, as DINO's), in folder/vae and folder/dino; returns the two paths,
    which VAE.from_pretrained and ViTEncoder.from_pretrained (and so --vae, --encoder) accept."""
    torch.manual_seed(seed)
    vae_dir, dino_dir = Path(folder) / "vae", Path(folder) / "dino"
    vae_dir.mkdir(parents=True, exist_ok=True)
    dino_dir.mkdir(parents=True, exist_ok=True)
    (vae_dir / "config.json").write_text(json.dumps(vae_config))
    save_file(VAE.from_config(vae_config).state_dict(), vae_dir / "diffusion_pytorch_model.safetensors")
    dino_state = ViTEncoder(**dino_config).state_dict()
    torch.save({key.replace("patch_embed.", "patch_embed.proj."): value for key, value in dino_state.items()},
               dino_dir / "dino_vitbase16_pretrain.pth")
    return str(vae_dir), str(dino_dir)


def train_variants(precision, num_gpus):
    """(name, settings): the base run (cached features, no compile, no checkpointing, one rank),
    then one change at a time."""
    base = {"features": "cache", "precision": precision, "compile": False, "ckpt": False, "ranks": 1}
    other_precision = "fp32" if precision == "bf16" else "bf16"
    variants = [("base", base), ("compiled", {**base, "compile": True}),
                (other_precision, {**base, "precision": other_precision}), ("grad-ckpt", {**base, "ckpt": True}),
                ("on-the-fly", {**base, "features": "on the fly"})]
    if num_gpus != 1:  # FSDP2 takes a GPU per rank; on the CPU the two ranks share the cores
        variants.append(("fsdp2", {**base, "ranks": 2}))
    return variants


def run_training(flags, ranks, out):
    """train_i2i.py with `flags` in `ranks` fresh processes (torchrun when > 1) -> its metrics lines."""
    launcher = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    here = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([*launcher, os.path.join(here, "train_i2i.py"), *flags, "--out", out],
                            capture_output=True, text=True, cwd=here)
    if result.returncode != 0:
        raise RuntimeError(f"train_i2i.py {' '.join(flags)} failed:\n{result.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def bench_train(args):
    """The training loop of train_i2i.py, one run per variant in fresh processes: throughput over
    the steps after the warm-up ones (compilation happens there), MFU, and peak memory (GPU: the
    most memory tensors held; CPU: the peak RSS of the rank-0 process, interpreter included)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = args.model or ("DiT-XL/2" if cuda else "DiT-S/2")
    image_size = args.image_size or (256 if cuda else 32)
    batch = args.batch_size or (32 if cuda else 4)
    precision = args.precision or ("bf16" if cuda else "fp32")
    warmup, timed_steps = args.warmup or (3 if cuda else 1), args.steps or (10 if cuda else 2)
    # The loop reads the device only at log steps: the timed steps are one log window of their own,
    # after whole windows of warm-up, so the measurement holds no host read but its last.
    warmup = -(-warmup // timed_steps) * timed_steps
    steps = warmup + timed_steps
    images = f"shapes:{steps * batch}"  # no step sees an image twice
    with tempfile.TemporaryDirectory() as tmp:
        vae, dino = write_random_encoders(tmp)
        cache = os.path.join(tmp, "cache")
        dataset = data.open_dataset(images, image_size)
        start = time.perf_counter()
        data.write_feature_cache(dataset, cache, VAE.from_pretrained(vae).to(device),
                                 ViTEncoder.from_pretrained(dino).to(device),
                                 {"data": images, "seed": 0, "image_size": image_size, "vae": vae, "encoder": dino},
                                 batch_size=batch, log=lambda line: None)
        cache_seconds = time.perf_counter() - start
        if cuda:
            torch.cuda.empty_cache()  # leave the GPU to the training processes
        print(f"{model} at {image_size} px ({image_size // 8} px latents), global batch {batch}, {warmup} "
              f"warm-up + {timed_steps} timed steps, {device}; SD-VAE and DINO ViT-B/16 with random weights; "
              f"the feature cache of {len(dataset)} images took {cache_seconds:.1f} s "
              f"({len(dataset) / cache_seconds:.1f} images/s, both flips)", flush=True)
        common = ["--model", model, "--image-size", str(image_size), "--vae", vae, "--encoder", dino,
                  "--global-batch-size", str(batch), "--steps", str(steps), "--warmup-steps", "1",
                  "--log-every", str(timed_steps), "--sample-every", "0", "--ckpt-every", "0", "--num-samples", "1"]
        common += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
        rows = []
        for name, variant in train_variants(precision, torch.cuda.device_count()):
            flags = common + ["--data", f"cache:{cache}" if variant["features"] == "cache" else images,
                              "--precision", variant["precision"]]
            flags += ["--compile"] * variant["compile"] + ["--grad-checkpointing"] * variant["ckpt"]
            timed = run_training(flags, variant["ranks"], os.path.join(tmp, name))[-1]  # the timed window
            seconds = batch / timed["images_per_s"]  # images_per_s: the global batch over the window
            mfu_per_image_s = timed["mfu"] / timed["images_per_s"] if timed["mfu"] else None
            peak_gib = timed["peak_memory_gib"]  # a running maximum
            yes_no = {key: "yes" if variant[key] else "no" for key in ("compile", "ckpt")}
            rows.append({"variant": name, **variant, **yes_no,
                         "img/s": f"{batch / seconds:.2f}", "ms/step": f"{1e3 * seconds:.0f}",
                         "MFU": f"{100 * mfu_per_image_s * batch / seconds:.1f}%" if mfu_per_image_s else "-",
                         "peak GiB": "-" if peak_gib is None else f"{peak_gib:.2f}"})
            print(f"  {name}: {rows[-1]['img/s']} img/s", flush=True)
    print_table(rows, list(rows[0]))
    if not cuda:
        print(f"peak GiB: the peak RSS of the rank-0 process. Threads: {torch.get_num_threads()} for one rank, "
              f"{os.environ.get('OMP_NUM_THREADS', 1)} per rank for two (torchrun's default: 1)")
    elif torch.cuda.device_count() == 1:
        print("fsdp2: left out, it needs two GPUs")


def fp16_half_step(x):
    """Half the spacing of fp16 numbers at |x|: the most round-to-nearest moves x (2^-25 below 2^-14)."""
    binade = torch.floor(torch.log2(x.abs().double().clamp(min=2.0 ** -14)))
    return torch.exp2(binade - 11)


def compact_target_bound(mean, std, noise, scale):
    """The most the 16-bit cache (data.py) moves a training target x0 = (mean + std * noise) * scale:
    the mean's fp16 rounding, plus the std's, exp(0.5 * logvar) with logvar rounded to fp16 after
    an fp32 log round trip (1e-6 * |logvar| at most), plus fp32 arithmetic (2^-21 of the terms)."""
    mean, std, noise = (t.double() for t in (mean, std, noise))
    logvar = 2 * std.log()
    logvar_error = fp16_half_step(logvar.abs() + 1e-6 * logvar.abs().clamp(min=1)) + 1e-6 * logvar.abs().clamp(min=1)
    std_error = std * noise.abs() * (torch.expm1(0.5 * logvar_error) + 2.0 ** -22)
    return scale * (fp16_half_step(mean) + std_error + 2.0 ** -21 * (mean.abs() + std * noise.abs()))


def target_errors(mean, std, noise, scale):
    """Over the elements: max |x0 compact - x0 fp32|, that relative to scale * (|mean| + std |noise|),
    and its largest share of compact_target_bound."""
    expanded = data.expand_features(data.compact_features(mean, std, torch.zeros(0)))
    exact = (mean + std * noise) * scale
    compact = (expanded["latent_mean"] + expanded["latent_std"] * noise) * scale
    error = (compact.double() - exact.double()).abs()
    size = scale * (mean.double().abs() + std.double() * noise.double().abs())
    return (error.max().item(), (error / size).max().item(),
            (error / compact_target_bound(mean, std, noise, scale)).max().item())


def bench_cache_size(args):
    """Bytes per item of the feature cache, format 1 (float32) against 2 (16-bit), by the layout and
    on disk; and the worst change of the training target between them, against its bound."""
    latent = (4, args.image_size // 8, args.image_size // 8)
    before, after = (data.cache_item_bytes(latent, args.cond_dim, f) for f in (1, 2))
    with tempfile.TemporaryDirectory() as tmp:
        tiny_vae = {**SD_VAE_CONFIG, "block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4}
        tiny_dino = {**DINO_VITB16, "width": args.cond_dim, "depth": 1}
        vae_dir, dino_dir = write_random_encoders(tmp, tiny_vae, tiny_dino)
        vae, dino = VAE.from_pretrained(vae_dir), ViTEncoder.from_pretrained(dino_dir)
        dataset = data.open_dataset(f"shapes:{args.items}", args.image_size)
        data.write_feature_cache(dataset, f"{tmp}/cache", vae, dino, {"data": f"shapes:{args.items}"},
                                 shard_size=args.items, batch_size=8, log=lambda line: None)
        path = data.cache_shard_path(f"{tmp}/cache", 0)
        with open(path, "rb") as f:
            header = 8 + int.from_bytes(f.read(8), "little")
        file_bytes = os.path.getsize(path)
        images = torch.stack([dataset[i]["image"] for i in range(args.items)])
        vae_latents = vae.encode(torch.cat([images, images.flip(-1)]))
    columns = [f"feature cache at {args.image_size} px", "bytes/item", "KiB/item", "TB for 190M items"]
    sizes = [("format 1: float32, by the layout", before), ("format 2: 16-bit, by the layout", after),
             (f"format 2: tensors on disk / {args.items} items", (file_bytes - header) / args.items),
             (f"format 2: whole shard file / {args.items} items", file_bytes / args.items)]
    print_table([dict(zip(columns, (name, f"{size:.0f}", f"{size / 1024:.1f}", f"{size * 190e6 / 1e12:.1f}")))
                 for name, size in sizes], columns)
    generator = torch.Generator().manual_seed(0)
    n = args.samples
    uniform = lambda low, high: low + (high - low) * torch.rand(n, generator=generator)
    wide = {"mean": uniform(-40, 40), "std": torch.exp(0.5 * uniform(-30, 20))}
    small = {"mean": torch.exp(uniform(-14 * math.log(2), 0)) * torch.randn(n, generator=generator).sign(),
             "std": torch.exp(0.5 * uniform(-30, 0))}
    rows, columns = [], ["x0 = (mean + std * noise) * 0.18215", "values", "max |error|", "max relative", "max error / bound"]
    for name, (mean, std) in [("mean in [-40, 40], logvar in [-30, 20]", (wide["mean"], wide["std"])),
                              ("|mean| in [2^-14, 1], logvar in [-30, 0]", (small["mean"], small["std"])),
                              ("tiny random SD-layout VAE's posteriors", vae_latents)]:
        noise = torch.randn(mean.shape, generator=generator)
        error, relative, share = target_errors(mean.float(), std.float(), noise, VAE_SCALE)
        rows.append(dict(zip(columns, (name, mean.numel(), f"{error:.3g}", f"{relative:.3g}", f"{share:.3f}"))))
    print_table(rows, columns)
    print("bound per value: 0.18215 * (2^-11 |mean| + 2^-25 + 0.0039 std |noise|), to fp32 arithmetic "
          "(bench.compact_target_bound); relative: to 0.18215 * (|mean| + std |noise|)")
# One tar-index variant in a fresh interpreter (VmHWM is that variant's own peak): opens the
# shards with the data.py at argv[2] (the current one, or an older one given by --baseline),
# then reads 10,000 random names, as a training run touches the index.
_TAR_OPEN_IN_CHILD = r"""
import importlib.util, json, re, sys, time
import numpy as np
spec = importlib.util.spec_from_file_location("data_under_test", sys.argv[2])
data = importlib.util.module_from_spec(spec); spec.loader.exec_module(data)
variant, index_dir, paths = sys.argv[1], sys.argv[3], sys.argv[4:]
def resident():
    with open("/proc/self/status") as status:
        return {k: int(v) * 1024 for k, v in re.findall(r"(VmHWM|VmRSS|RssFile):\s+(\d+) kB", status.read())}
before, start = resident(), time.perf_counter()
if variant == "build":
    data.build_tar_index(paths, data.tar_index_folder(paths, index_dir), replace=True)
elif variant != "python":
    dataset = data.TarShards(paths, 64, **({"index_dir": index_dir} if variant == "open" else {}))
seconds, after = time.perf_counter() - start, resident()
if variant in ("open", "scan"):
    for j in np.random.default_rng(0).integers(0, len(dataset), 10000):
        dataset.name(int(j))
used = resident()
print(json.dumps({"seconds": seconds, "after": after["VmRSS"], "used": used["VmRSS"],
                  "mapped": used["RssFile"] - before["RssFile"], "peak": used["VmHWM"]}))
"""


def write_tiny_shards(folder, images, per_shard):
    """images samples (a 1x1 PNG and a .txt caption each) in shards of per_shard -> their paths."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    members = {"png": buffer.getvalue(), "txt": b"a black pixel"}
    paths = []
    for shard in range(-(-images // per_shard)):
        paths.append(str(folder / f"{shard:05d}.tar"))
        with tarfile.open(paths[-1], "w") as tar:
            for key in range(shard * per_shard, min(images, (shard + 1) * per_shard)):
                for extension, content in members.items():
                    info = tarfile.TarInfo(f"{key:09d}.{extension}")
                    info.size = len(content)
                    tar.addfile(info, io.BytesIO(content))
    return paths


def bench_data_index(args):
    """Opening tar shards: every rank scanning every header (--baseline, the data.py before the
    index) against the memory-mapped index; time and RSS of each in its own process."""
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        started = time.perf_counter()
        paths = write_tiny_shards(Path(tmp), args.images, args.per_shard)
        tar_bytes = sum(os.path.getsize(p) for p in paths)
        print(f"{args.images} images in {len(paths)} shards ({tar_bytes / 2**30:.2f} GiB) written in "
              f"{time.perf_counter() - started:.0f} s; page cache warm for every variant")
        variants = [("python", "python + torch + data.py, nothing opened", data.__file__)]
        if args.baseline:
            variants.append(("scan", "before: TarShards scans every header", args.baseline))
        variants += [("build", "python data.py index (1 process)", data.__file__),
                     ("open", "TarShards from the built index", data.__file__)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
        rows, base = [], None
        for variant, label, module in variants:
            result = subprocess.run([sys.executable, "-c", _TAR_OPEN_IN_CHILD, variant, module, tmp, *paths],
                                    capture_output=True, text=True, env=env)
            if result.returncode != 0:
                raise RuntimeError(f"{variant} failed:\n{result.stderr}")
            report = json.loads(result.stdout.strip().splitlines()[-1])
            base = base or report
            private = report["used"] - report["mapped"] if variant in ("open", "scan") else report["peak"]
            rows.append({"variant": label, "s": f"{report['seconds']:.3f}",
                         "RSS after open MiB": f"{report['after'] / 2**20:.0f}",
                         "peak MiB": f"{report['peak'] / 2**20:.0f}",
                         "after 10k names MiB": f"{report['used'] / 2**20:.0f}" if variant in ("open", "scan") else "-",
                         "of it file pages MiB": f"{report['mapped'] / 2**20:.0f}",
                         "private B/image": f"{(private - base['after']) / args.images:.1f}" if variant != "python" else "-"})
        index = data.tar_index_folder(paths, tmp)
        index_bytes = sum(os.path.getsize(os.path.join(index, f)) for f in os.listdir(index))
    print_table(rows, list(rows[0]))
    print(f"index on disk: {index_bytes / 2**20:.1f} MiB, {index_bytes / args.images:.1f} bytes an image; "
          "file pages: the page cache the process mapped, shared by the ranks of a node and dropped under pressure; "
          "private B/image: RSS less file pages after 10k names (peak RSS for the build) over the first row's RSS")


def multi_scale_t2i(name, image_size, device):
    """The release's T2I model at `name`'s size for `image_size` px (SD-VAE latents, T5-XXL's 120 x 4096
    tokens, lewei_scale as dit.config_from_state gives it), random weights: a forward's time does not
    depend on their values, and N(0, 0.02) everywhere skips the slow initialisation of 826 M weights."""
    with torch.device("meta"):
        model = build_model(name, input_size=image_size // 8, cond_dim=4096, cond_tokens=120, multi_scale=True,
                            lewei_scale=image_size / 512)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.normal_(0, 0.02)
    return model.eval().requires_grad_(False)


def t2i_inputs(batch, image_size, device):
    """A caption of 20 real tokens padded to 120 (as the T2I demo pads), the square bucket's sizes."""
    mask = (torch.arange(120) < 20).expand(batch, -1).to(device)
    return {"y": torch.randn(batch, 120, 4096, device=device) * mask[..., None], "mask": mask,
            "img_hw": torch.full((batch, 2), float(image_size), device=device),
            "aspect_ratio": torch.ones(batch, 1, device=device)}


def measure_t2i(args):
    """One measurement of `bench.py t2i`, in this (fresh) process: prints a JSON line."""
    device, dtype = torch.device(args.device), PRECISIONS[args.precision]
    size = args.sample_size if args.one == "sample" else args.forward_size
    model = multi_scale_t2i(args.model, size, device) if args.one != "decode" else None
    vae = None
    if args.one != "forward":
        vae_config = {**SD_VAE_CONFIG, "block_out_channels": args.vae_widths,
                      "norm_num_groups": math.gcd(SD_VAE_CONFIG["norm_num_groups"], *args.vae_widths)}
        vae = VAE.from_pretrained(write_random_encoders(args.tmp, vae_config, {**DINO_VITB16, "depth": 1})[0])
        vae = vae.to(device).eval()
    cond, latent = t2i_inputs(1, size, device), torch.randn(1, 4, size // 8, size // 8, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype or torch.bfloat16, enabled=dtype is not None):
        start = time.perf_counter()
        if args.one == "forward":
            model(latent, torch.full((1,), 500.0, device=device), **cond)
        elif args.one == "sample":
            diffusion = GaussianDiffusion(beta_schedule("linear", 1000))
            vae.decode(draw_samples(diffusion, model, cond, (4, size // 8, size // 8), [0], 0, "dpm++", args.steps,
                                    4.5, device, skip_type="time_uniform", clip_denoised=False))
        else:
            vae.decode(latent)
        synchronize(device)
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_gib": peak_memory_gib(device)}))


def bench_t2i(args):
    """The multi-scale T2I model of Lumos_T2I.pth (random weights): one 1024 px forward, one whole
    512 px sample (DPM-Solver++, guidance 4.5: two passes a step, then the SD-VAE decode), and the
    SD-VAE decode of one 1024 px image, each in a fresh process: time and peak memory (CPU: peak
    RSS, interpreter included)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, size in (("forward", args.forward_size), ("sample", args.sample_size), ("decode", args.forward_size)):
            for precision in args.precisions:
                command = [sys.executable, os.path.abspath(__file__), "t2i", "--one", kind, "--precision", precision,
                           "--tmp", tmp, *args.passthrough]
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode != 0:
                    raise RuntimeError(f"bench.py t2i --one {kind} failed:\n{result.stderr}")
                report = json.loads(result.stdout.strip().splitlines()[-1])
                passes = {"forward": 1, "sample": 2 * args.steps, "decode": 0}[kind]
                tflops = passes * forward_flops(multi_scale_t2i(args.model, size, "meta")) / 1e12
                what = {"forward": "DiT forward", "sample": f"sample, {args.steps} steps + decode", "decode": "VAE decode"}
                rows.append({"what": f"{what[kind]} {size} px", "precision": precision,
                             "seconds": f"{report['seconds']:.1f}", "DiT TFLOPs": f"{tflops:.1f}" if passes else "-",
                             "DiT TFLOP/s": f"{tflops / report['seconds']:.3f}" if passes else "-",
                             "peak GiB": "-" if report["peak_gib"] is None else f"{report['peak_gib']:.2f}"})
                print(f"  {rows[-1]}", flush=True)
    print(f"{args.model}, multi-scale, 120 T5-XXL tokens (20 real), batch 1, device {args.device}, "
          f"{torch.get_num_threads()} threads; TFLOP/s counts the DiT's matmuls only (the decode is extra time)")
    print_table(rows, list(rows[0]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    model = sub.add_parser("model", help="forward+backward throughput of the backbone")
    model.add_argument("--model", default="DiT-S/2")
    model.add_argument("--image-size", type=int, default=256)
    model.add_argument("--latent", action=argparse.BooleanOptionalAction, default=True,
                       help="inputs are VAE latents (image-size / 8, 4 channels); --no-latent: pixels")
    model.add_argument("--batch-size", type=int, default=8)
    model.add_argument("--variants", default=",".join(MODEL_VARIANTS))
    model.add_argument("--grad-checkpointing", action="store_true")
    model.add_argument("--warmup", type=int, default=2)
    model.add_argument("--iters", type=int, default=5)
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    model.add_argument("--peak-tflops", type=float, default=None)
    model.set_defaults(func=bench_model)
    encoders = sub.add_parser("encoders", help="T5 .bin loaded encoder-only vs torch.load of all of it")
    encoders.add_argument("--t5-gb", type=float, default=2.5,
                          help="size of the generated fp32 encoder+decoder checkpoint, in GB")
    encoders.set_defaults(func=bench_encoders)
    train = sub.add_parser("train", help="the training loop: eager/compiled, fp32/bf16, checkpointing, cache, FSDP2")
    train.add_argument("--model", help="default: DiT-XL/2 on a GPU, DiT-S/2 on the CPU")
    train.add_argument("--image-size", type=int, help="default: 256 on a GPU, 32 on the CPU")
    train.add_argument("--batch-size", type=int, help="global batch; default: 32 on a GPU, 4 on the CPU")
    train.add_argument("--precision", choices=["fp32", "bf16"], help="of the base run; default: bf16 on a GPU, fp32 on the CPU")
    train.add_argument("--warmup", type=int, help="untimed steps first (compilation); default: 3 on a GPU, 1 on the CPU")
    train.add_argument("--steps", type=int, help="timed steps; default: 10 on a GPU, 2 on the CPU")
    train.add_argument("--peak-tflops", type=float, default=None)
    train.set_defaults(func=bench_train)
    cache_size = sub.add_parser("cache-size", help="feature cache bytes per item, float32 vs 16-bit; target error")
    cache_size.add_argument("--image-size", type=int, default=256)
    cache_size.add_argument("--cond-dim", type=int, default=768, help="DINO width (ViT-B/16: 768)")
    cache_size.add_argument("--items", type=int, default=8, help="items of the cache written to measure")
    cache_size.add_argument("--samples", type=int, default=1_000_000, help="random posteriors per range")
    cache_size.set_defaults(func=bench_cache_size)
    tar_index = sub.add_parser("data-index", help="tar shards: every rank scanning them vs the memory-mapped index")
    tar_index.add_argument("--images", type=int, default=100_000, help="tiny samples to generate")
    tar_index.add_argument("--per-shard", type=int, default=1000)
    tar_index.add_argument("--baseline", help="a data.py from before the index (git show REV:data.py > FILE)")
    tar_index.add_argument("--dir", help="where to write the shards (default: the temp folder)")
    tar_index.set_defaults(func=bench_data_index)
    t2i = sub.add_parser("t2i", help="Lumos_T2I.pth's model: a 1024 px forward and a 512 px DPM-Solver++ sample")
    t2i.add_argument("--model", default="DiT-XL/2")
    t2i.add_argument("--forward-size", type=int, default=1024)
    t2i.add_argument("--sample-size", type=int, default=512)
    t2i.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps of the sample")
    t2i.add_argument("--precisions", nargs="+", default=["bf16"], choices=["bf16", "fp32"])
    t2i.add_argument("--vae-widths", type=int, nargs=4, default=SD_VAE_CONFIG["block_out_channels"],
                     help="the random VAE's block_out_channels (default: SD-VAE's)")
    t2i.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t2i.add_argument("--one", choices=["forward", "sample", "decode"], help=argparse.SUPPRESS)  # a child's measurement
    t2i.add_argument("--precision", default="bf16", help=argparse.SUPPRESS)
    t2i.add_argument("--tmp", help=argparse.SUPPRESS)
    t2i.set_defaults(func=lambda args: measure_t2i(args) if args.one else bench_t2i(args))
    args = parser.parse_args()
    if args.command == "t2i":  # what the children need to build the same model
        args.passthrough = ["--model", args.model, "--forward-size", str(args.forward_size), "--sample-size",
                            str(args.sample_size), "--steps", str(args.steps), "--device", args.device,
                            "--vae-widths", *map(str, args.vae_widths)]
    args.func(args)


if __name__ == "__main__":
    main()
