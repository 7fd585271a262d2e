"""Lumos stage 2, text to image: fine-tune the I2I prior on captioned images, conditioned on T5
token features through the same cross-attention.

    python train_t2i.py                    # offline default: runs/i2i/ema.safetensors on `shapes` captions, CPU
    python train_t2i.py --n-captions 200   # fine-tune on the first 200 captioned images only
    python train_t2i.py --init scratch --n-captions 2000 --out runs/t2i_scratch   # the no-prior baseline
    python train_t2i.py --multi-scale --image-size 64 --data my_pairs/    # mixed aspect ratios, buckets
    python train_t2i.py cache-text --data /data/pairs/{00000..00999}.tar --t5 DeepFloyd/t5-v1_1-xxl --out /data/t5
    torchrun --nproc_per_node=8 train_t2i.py --init Lumos_I2I.pth --vae stabilityai/sd-vae-ft-ema \\
        --t5 DeepFloyd/t5-v1_1-xxl --text-cache /data/t5 --data /data/pairs/{00000..00999}.tar \\
        --image-size 256 --global-batch-size 256 --lr 2e-5 --precision bf16 --out runs/t2i
    torchrun --nproc_per_node=8 train_t2i.py --init Lumos_T2I.pth --vae stabilityai/sd-vae-ft-mse \\
        --t5 DeepFloyd/t5-v1_1-xxl --text-cache /data/t5 --data /data/pairs/{00000..00999}.tar \\
        --global-batch-size 64 --lr 2e-5 --precision bf16 --out runs/t2i_1024   # the release's 1024 px model

The multi-scale model (`--multi-scale`, or a multi-scale --init such as Lumos_T2I.pth; see dit.py)
trains as PixArt-alpha's does: each image goes to the aspect-ratio bucket closest to its own shape
(data.AspectRatioBuckets: the 1024 px table, scaled to --image-size), is resized and centre-cropped
to it, and each global batch holds one bucket (data.GlobalSampler), in a stream that the seed fixes,
so resume and any number of ranks give the same batches. The micro-conditions: `img_hw` is the
image's own size, `aspect_ratio` its bucket's. From a single-scale prior the size embedders are new,
their last layers zero, so the model starts as the single-scale one; lewei_scale is the prior's,
scaled by the change of size (PixArt-alpha: 1 up to 512 px, 2 at 1024 px, as the release). The
bucket sides are multiples of --image-size / 16, so the patch (x 8 in latent space) must divide
that: 256 px and up in latent space with /2 patches. The image sizes are read from every image's
header when the run starts; a feature cache for this model holds the buckets (`data.py cache
--multi-scale`), and a cache made otherwise is refused.

The model is the I2I LumosDiT with its condition swapped for T5 tokens: cond_dim becomes the T5
width (4096 for XXL) and cond_tokens 120. Only the condition projection (`y_embedder.y_proj`) and
the null condition (`y_embedder.y_embedding`) are new, initialised as LumosDiT initialises them
(N(0, 0.02) weights, zero biases; randn / sqrt(cond_dim)); every other weight carries over from
--init (`pos_embed` is recomputed for the model's size). --init takes train_i2i.py's
ema.safetensors, a training checkpoint or run folder (its "ema", or --init-entry model), the
official `Lumos_I2I.pth`, or `scratch`. Without --init the default I2I run's export
runs/i2i/ema.safetensors is required: if it is missing, this script says how to make it and exits
with status 2, so the default run is always the fine-tuned one (--init scratch is the baseline).

The condition of a batch: the captions' T5 features after the final norm, cut to the batch's
longest caption (at most 120 tokens, longer captions truncated as T5's tokenizer does), padding
zero and masked out. Caption dropout for classifier-free guidance is the model's own condition
dropout (the loop draws it per sample): there is no second one here.

Captions: tar shards with `key.txt` / `key.json`, a folder with sidecar `.txt` files, or `shapes`.
An image without a caption (none, or empty) is skipped and counted: its item is replaced by the next
captioned one and its name travels in "skipped", which the loop logs and counts in `skipped_files`
(as it does for unreadable files). `--n-captions N` trains on the first N captioned images only.

The text encoder: a T5 v1.1 encoder from the Hub (`--t5`, frozen; bf16 on GPU, fp32 on CPU), run on
each batch, or its features read from a text-feature cache (`--text-cache DIR`, written by
`cache-text`, see `write_text_cache`), where every distinct caption was encoded once. The offline
default `--t5 random-t5` is a tiny T5 of the same class with frozen random weights (seeded) and a
tokenizer built in memory from the words of the `shapes` captions: it shows the pipeline end to
end; the export's metadata holds its config, seed and vocabulary, so sample.py rebuilds it.
"""
import argparse
import copy
import hashlib
import os
import sys
from functools import partial

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

import data
from data import setup_distributed
from dit import DiT_models, LumosDiT
from encoders import (MAX_TEXT_TOKENS, RANDOM_T5, load_text_encoder, pad_token_features, random_t5_description,
                      text_condition)
from evaluate import alignment_scores, attribute_distance, detect_shape_attrs, parse_shapes_caption
from sample import to_uint8
from train_i2i import (CONDITION_KEYS, DEFAULT_I2I_EXPORT, Task, add_train_args, check_args, exit_with_usage_error,
                       held_out_items, model_size, print_transfer, resolve_init, train, transfer_weights)

#################################################################################
#                               Captioned data                                  #
#################################################################################

def has_caption(item):
    return bool(item["caption"].strip())


class SkipUncaptioned(Dataset):
    """The captioned items of `dataset`: item i is dataset[i] if that has a caption, else the next one
    that has (i+1, i+2, ..., wrapping around; of i's own aspect-ratio bucket when the dataset has
    `buckets`), so the replacement depends only on i. The images passed over are named in "skipped"
    (with data.py's bad files), for the loop to count and log."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.buckets = getattr(dataset, "buckets", None)
        self._members = None if self.buckets is None else data.bucket_members(self.buckets)

    def __len__(self):
        return len(self.dataset)

    def __repr__(self):
        return f"captioned items of {self.dataset!r}"

    def __getitem__(self, i):
        skipped = []
        members = None if self.buckets is None else self._members[int(self.buckets[i])]
        for j in data.next_items(i, len(self.dataset), members):
            item = self.dataset[j]
            skipped += item["skipped"]
            if has_caption(item):
                return {**item, "index": int(i), "skipped": skipped}
            skipped.append(f"{item['name']} (no caption)")
        raise RuntimeError(f"no image of {self.dataset!r} has a caption: T2I needs sidecar .txt files "
                           f"(folders) or .txt/.json members (tar shards)")


class FirstCaptioned(Dataset):
    """The first `count` captioned images of `dataset`, in dataset order (--n-captions). The images
    without a caption among them are listed in `skipped` once, here, as training never reads them."""

    def __init__(self, dataset, count):
        if count <= 0:
            raise ValueError(f"--n-captions {count}: must be positive")
        self.dataset, self.indices, self.skipped = dataset, [], []
        names = set()
        for j in range(len(dataset)):
            if len(self.indices) == count:
                break
            item = dataset[j]
            if item["name"] in names:  # a bad file j stands in as the next good one, already seen
                continue
            names.add(item["name"])
            if has_caption(item):
                self.indices.append(j)
            else:
                self.skipped.append(item["name"])
        if len(self.indices) < count:
            raise ValueError(f"--n-captions {count}: {dataset!r} has only {len(self.indices)} captioned images")
        self.buckets = None if getattr(dataset, "buckets", None) is None else dataset.buckets[self.indices]

    def __len__(self):
        return len(self.indices)

    def __repr__(self):
        return f"the first {len(self)} captioned images of {self.dataset!r}"

    def __getitem__(self, i):
        return {**self.dataset[self.indices[i]], "index": int(i)}


def t2i_eval_items(base, train_set, image_size, seed, count):
    """The sample grids' captions and reference images: for `shapes`, images past the whole set, never
    trained on; otherwise captioned images spread over the training set (train_i2i.held_out_items)."""
    return held_out_items(base if isinstance(base, data.ShapesDataset) else train_set, image_size, seed, count)


def read_caption(dataset, j):
    """The caption of dataset item j without decoding its image: "" for none, None for a bad file."""
    if isinstance(dataset, data.ShapesDataset):
        return data.shapes_caption(data.sample_shape_attrs(dataset.seed, j))
    if hasattr(dataset, "read"):  # data.py's file-backed sources: read(j) -> (image bytes, caption)
        try:
            return dataset.read(j)[1]
        except (OSError, data.BadSampleError):
            return None
    return dataset[j]["caption"]


class _Captions(Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, j):
        return read_caption(self.dataset, j)


def dataset_captions(dataset, workers=0, show_progress=True):
    """Every non-empty caption of `dataset`, in dataset order, repeats included."""
    loader = DataLoader(_Captions(dataset), batch_size=1024, num_workers=workers, collate_fn=list)
    batches = tqdm(loader, desc="reading captions", disable=not show_progress, dynamic_ncols=True)
    return [caption for batch in batches for caption in batch if caption]


#################################################################################
#                             The text-feature cache                            #
#################################################################################
# DIR/text_cache.json holds the settings; DIR/text_00000.safetensors, ... hold `shard_size`
# consecutive captions of the list of distinct captions each:
#     "tokens"   (T, C) the captions' valid-token features, concatenated, in the encoder's dtype
#                (bf16 on a GPU, fp32 on the CPU) or, with cache-text --dtype bf16, in bf16
#     "offsets"  (n + 1,) int64: caption i's tokens are tokens[offsets[i]:offsets[i + 1]]
#     "keys"     (n,) int64: caption_key of each caption, how training finds a caption's row
# Nothing is padded: a caption takes its own number of tokens (a shapes caption takes ~13, not 120).
# So a caption takes 16 + (its tokens, EOS included) x 4096 x 2 bytes for T5-XXL in bf16: 8 KiB a
# token (16 KiB in fp32). bf16 rounds a feature to 2^-8 relative (round to nearest, 8 significant
# bits; T5's features are far inside bf16's range); the GPU's bf16 T5 computes in bf16 anyway.

TEXT_CACHE_INFO = "text_cache.json"


def caption_key(caption):
    """A 64-bit key of the caption's text (blake2b), as a signed int64."""
    return int.from_bytes(hashlib.blake2b(caption.encode(), digest_size=8).digest(), "little", signed=True)


def text_shard_path(root, shard):
    return os.path.join(root, f"text_{shard:05d}.safetensors")


def distinct_captions(captions):
    """The captions without repeats, in order of first appearance, and their keys; a key shared by
    two different captions (a 64-bit collision) is an error rather than a silent mix-up."""
    distinct = list(dict.fromkeys(captions))
    first_with_key = {}
    for caption in distinct:
        other = first_with_key.setdefault(caption_key(caption), caption)
        if other != caption:
            raise ValueError(f"captions {other!r} and {caption!r} share the key {caption_key(caption)}; "
                             f"change one of them")
    return distinct, list(first_with_key)


def encode_once(encoder, captions, batch_size):
    """[(n_i, C)] token features of distinct `captions`, batched by similar length (less padding)."""
    order = sorted(range(len(captions)), key=lambda i: len(captions[i]))
    features = [None] * len(captions)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        for row, feature in zip(rows, encoder.token_features([captions[r] for r in rows])):
            features[row] = feature
    return features


def write_text_cache(captions, root, encoder, settings, shard_size=10000, batch_size=64, rank=0, world_size=1,
                     log=print, dtype=None):
    """Encode each distinct caption of `captions` once into the shards at `root` (layout above).

    Rank r of `world_size` (separate processes, no communication) writes the missing shards k with
    k % world_size == r. Each shard goes to a temporary name and is renamed once complete, so a
    restart skips the finished ones; `settings` (data, t5, ...) and what fixes the shards' content
    go to text_cache.json, and writing into a cache made otherwise is an error. Returns the shards
    this rank wrote. `dtype`: that of the stored features, by default the encoder's.
    """
    dtype = dtype or encoder.dtype
    distinct, keys = distinct_captions(captions)
    if not distinct:
        raise ValueError(f"no captions to encode in {settings.get('data')!r}")
    digest = hashlib.blake2b(np.array(keys, dtype=np.int64).tobytes(), digest_size=16).hexdigest()
    settings = {**settings, "num_captions": len(distinct), "captions_digest": digest, "shard_size": shard_size,
                "width": encoder.width, "dtype": str(dtype).removeprefix("torch.")}
    existing = data.read_cache_info(root, TEXT_CACHE_INFO)
    if existing is not None and existing != settings:
        changed = [f"{k}: {existing.get(k)!r} -> {v!r}" for k, v in settings.items() if existing.get(k) != v]
        raise ValueError(f"{root} holds a text cache made otherwise ({'; '.join(changed)}); pass the same "
                         f"arguments to finish it, or another --out")
    os.makedirs(root, exist_ok=True)
    data.write_json_atomically(os.path.join(root, TEXT_CACHE_INFO), settings, suffix=f".tmp{rank}")
    written = []
    for shard in range(rank, -(-len(distinct) // shard_size), world_size):
        path = text_shard_path(root, shard)
        if os.path.exists(path):
            continue
        rows = slice(shard * shard_size, (shard + 1) * shard_size)
        features = encode_once(encoder, distinct[rows], batch_size)
        lengths = torch.tensor([len(f) for f in features])
        tensors = {"tokens": torch.cat(features).to(dtype).contiguous(),
                   "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
                   "keys": torch.tensor(keys[rows], dtype=torch.int64)}
        save_file(tensors, path + ".tmp")
        os.replace(path + ".tmp", path)
        written.append(shard)
        log(f"rank {rank}: wrote {path} ({len(features)} captions, {len(tensors['tokens'])} tokens)")
    return written


class TextFeatureCache:
    """A complete text-feature cache: captions -> the T2I condition, as TextEncoder gives it.

        features, mask = TextFeatureCache(root)(captions)    # (B, L, C) float32, (B, L) bool

    Holds every shard's keys and offsets in memory and reads the features from the memory-mapped
    shards; used in the training process itself (the loop's condition), not in loader workers.
    """

    def __init__(self, root):
        self.root = root
        self.info = data.read_cache_info(root, TEXT_CACHE_INFO)
        if self.info is None:
            raise FileNotFoundError(f"no text cache at {root} (no {TEXT_CACHE_INFO}); write one with "
                                    f"`python train_t2i.py cache-text --data SPEC --t5 REPO --out {root}`")
        num_shards = -(-self.info["num_captions"] // self.info["shard_size"])
        missing = [text_shard_path(root, k) for k in range(num_shards) if not os.path.isfile(text_shard_path(root, k))]
        if missing:
            raise FileNotFoundError(f"text cache {root} is incomplete: {len(missing)} of {num_shards} shards missing, "
                                    f"e.g. {missing[0]}; rerun cache-text with the same arguments to finish it")
        self.width = self.info["width"]
        self._handles = [safe_open(text_shard_path(root, k), framework="pt") for k in range(num_shards)]
        self._offsets = [handle.get_tensor("offsets").numpy() for handle in self._handles]
        keys = [handle.get_tensor("keys").numpy() for handle in self._handles]
        where = np.concatenate([np.stack([np.full(len(k), shard), np.arange(len(k))], 1) for shard, k in enumerate(keys)])
        keys = np.concatenate(keys)
        order = np.argsort(keys)
        self._keys, self._where = keys[order], where[order]

    def __repr__(self):
        return f"TextFeatureCache({self.root!r}, {self.info['num_captions']} captions of {self.info['data']!r})"

    def _row(self, caption):
        """(shard, row) of `caption`, or None when it is not in the cache."""
        key = caption_key(caption)
        i = int(np.searchsorted(self._keys, key))
        return tuple(self._where[i]) if i < len(self._keys) and self._keys[i] == key else None

    def __contains__(self, caption):
        return self._row(caption) is not None

    def token_features(self, captions):
        """-> [(n_i, C)] valid-token features, in the dtype they were stored in."""
        features = []
        for caption in captions:
            location = self._row(caption)
            if location is None:
                raise ValueError(f"caption {caption!r} is not in the text cache {self.root}; "
                                 f"rerun cache-text with the training run's --data")
            shard, row = location
            start, end = self._offsets[shard][row:row + 2]
            features.append(self._handles[shard].get_slice("tokens")[int(start):int(end)])
        return features

    def __call__(self, captions):
        return pad_token_features(self.token_features(captions))


def open_text_cache(args, eval_captions):
    """--text-cache, checked against the run: the same text encoder and data, the grid's captions in it."""
    cache = TextFeatureCache(args.text_cache)
    made = {"t5": cache.info["t5"], "data": cache.info["data"], "seed": cache.info["seed"]}
    given = {"t5": args.t5, "data": args.data, "seed": args.seed}
    if made != given:
        raise ValueError(f"--text-cache {args.text_cache} was made with "
                         f"{' '.join(f'--{k} {v}' for k, v in made.items())}; pass those "
                         f"(given: {' '.join(f'--{k} {v}' for k, v in given.items())})")
    if not cache.info.get("clean_captions"):
        raise ValueError(f"--text-cache {args.text_cache} holds features of uncleaned captions (made before "
                         f"train_t2i.py cleaned prompts as the release does): write it anew with cache-text")
    missing = [caption for caption in eval_captions if caption not in cache]
    if missing:
        raise ValueError(f"--text-cache {args.text_cache} lacks {len(missing)} caption(s) of the sample grid, "
                         f"e.g. {missing[0]!r}: make it with this run's --num-samples ({args.num_samples})")
    return cache


#################################################################################
#                       The model, from the I2I prior                           #
#################################################################################

# The multi-scale model's micro-condition embedders: new from a single-scale prior.
SIZE_EMBEDDER_KEYS = tuple(f"{name}.mlp.{layer}.{kind}" for name in ("csize_embedder", "ar_embedder")
                           for layer in (0, 2) for kind in ("weight", "bias"))


def is_multi_scale(args, prior_info):
    """The run trains the multi-scale model: --multi-scale, or a multi-scale prior (Lumos_T2I.pth)."""
    return args.multi_scale or bool(prior_info and prior_info["config"].get("multi_scale"))


def t2i_model(args, prior_state, prior_info, text_width):
    """The T2I LumosDiT: the prior's config (or --model's from scratch) with T5 tokens as the condition,
    multi-scale with --multi-scale (or when the prior is). From I2I weights every key but
    CONDITION_KEYS carries over (train_i2i.transfer_weights); from T2I weights every key. The size
    embedders a single-scale prior lacks are new, their last layers zero: the model then computes
    the single-scale model's function at step 0, whatever the sizes."""
    if prior_state is None:
        name, overrides = model_size(args)
        config = {**DiT_models[name].keywords, **overrides, "in_channels": 4 if args.vae else 3,
                  "learn_sigma": args.learn_sigma}
    else:
        config = prior_info["config"]
    multi_scale = is_multi_scale(args, prior_info)
    # lewei_scale divides the positions: PixArt-alpha's models take 1 up to 512 px and 2 at 1024 px
    # (the release's T2I model too), so a 1024 px grid of 64 spans the range of a 512 px grid of 32.
    # From a prior, a new size scales the prior's value by the same rule (its range of positions is
    # kept); the same size keeps it, so the prior's function is kept too.
    if prior_info is None:
        lewei_scale = max(1.0, args.image_size / 512) if multi_scale else 1.0
    else:
        lewei_scale = config.get("lewei_scale", 1.0) * args.image_size / prior_info["image_size"]
    input_size = args.image_size // (8 if args.vae else 1)
    model = LumosDiT(**{**config, "input_size": input_size, "cond_dim": text_width, "cond_tokens": MAX_TEXT_TOKENS,
                        "multi_scale": multi_scale, "lewei_scale": lewei_scale})
    if prior_state is not None:
        from_t2i = prior_info["task"] == "t2i"
        new_keys = (() if from_t2i else CONDITION_KEYS) + (SIZE_EMBEDDER_KEYS if multi_scale and not
                                                            config.get("multi_scale") else ())
        report = transfer_weights(model, prior_state, new_keys=new_keys, source=f"--init {args.init}")
        what = [] if from_t2i else [f"T5 condition of width {text_width}, initialised as LumosDiT does"]
        if set(SIZE_EMBEDDER_KEYS) & set(new_keys):
            what.append("the size embedders, their last layers zero")
            with torch.no_grad():
                for name in ("csize_embedder", "ar_embedder"):
                    getattr(model, name).mlp[2].weight.zero_()
                    getattr(model, name).mlp[2].bias.zero_()
        print_transfer(args.init, report, "; ".join(what) or "none")
    return model


#################################################################################
#                                  The task                                     #
#################################################################################

def t2i_task(args, i2i_state, i2i_info, device):
    """The T2I Task for the loop: captioned data, T5 tokens (online or cached), the swapped model."""
    base = data.open_dataset(args.data, args.image_size, seed=args.seed)
    if isinstance(base, data.FeatureCache) and base.info["vae"] != args.vae:
        raise ValueError(f"--data {args.data} was made with --vae {base.info['vae']}; pass it (given: --vae {args.vae})")
    multi_scale = is_multi_scale(args, i2i_info)
    cached = isinstance(base, data.FeatureCache)
    if cached and multi_scale != bool(base.info.get("multi_scale")):
        raise ValueError(f"--data {args.data} was made {'without' if multi_scale else 'with'} --multi-scale: the "
                         f"{'multi' if multi_scale else 'single'}-scale model needs a cache made "
                         f"{'with' if multi_scale else 'without'} it")
    buckets = data.AspectRatioBuckets(base, args.image_size) if multi_scale and not cached else base
    train_set = FirstCaptioned(buckets, args.n_captions) if args.n_captions else SkipUncaptioned(buckets)
    if args.n_captions and train_set.skipped and int(os.environ.get("RANK", 0)) == 0:
        print(f"--n-captions {args.n_captions}: skipped {len(train_set.skipped)} images without a caption "
              f"before them, e.g. {train_set.skipped[0]}", flush=True)
    if multi_scale:  # the grids: square images of the run's size (the bucket 1.0)
        if cached:  # the cache's square ones
            square_set = Subset(train_set, np.flatnonzero(train_set.buckets == base.keys.index("1.0")))
            if not len(square_set):
                raise ValueError(f"--data {args.data}: no image in the square bucket 1.0, which the sample grids draw")
        else:  # the same captioned images, cropped square
            square_set = SkipUncaptioned(base)
            square_set = Subset(square_set, train_set.indices) if args.n_captions else square_set
        square = {"img_hw": torch.tensor([float(args.image_size)] * 2), "aspect_ratio": torch.tensor([1.0])}
        eval_items = [{**square, **item} for item in
                      t2i_eval_items(base, square_set, args.image_size, args.seed, args.num_samples)]
    else:
        eval_items = t2i_eval_items(base, train_set, args.image_size, args.seed, args.num_samples)
    if args.text_cache:
        encode = open_text_cache(args, [item["caption"] for item in eval_items])
    else:
        encode = load_text_encoder(args.t5, device, vocabulary=data.shapes_vocabulary())
    torch.manual_seed(args.seed)  # the new condition weights
    template = t2i_model(args, i2i_state, i2i_info, encode.width)
    step = template.patch_size * (8 if args.vae else 1)  # a side the model can patchify, in pixels
    if multi_scale and (args.image_size // 16) % step:
        raise ValueError(f"--image-size {args.image_size}: its aspect-ratio buckets have sides in steps of "
                         f"{args.image_size // 16} px, which the model's {step} px patches do not divide; use a "
                         f"multiple of {16 * step}")
    metadata = {"task": "t2i", "init": args.init, "n_captions": args.n_captions, "max_text_tokens": MAX_TEXT_TOKENS,
                "clean_captions": True,
                **(random_t5_description(data.shapes_vocabulary()) if args.t5 == RANDOM_T5 else {})}
    # No flips (as PixArt): captions name left and right, and a mirrored image would contradict its own.
    condition = text_condition(encode, device)
    if multi_scale:
        condition = partial(with_size_conditions, condition)
    return Task(build_model=lambda: copy.deepcopy(template), condition=condition,
                dataset=train_set, eval_items=eval_items, metadata=metadata, hflip=False,
                evaluate=caption_accuracy if isinstance(base, data.ShapesDataset) else None)


def with_size_conditions(condition, batch, space):
    """Task.condition of the multi-scale model: the text condition, and the batch's micro-conditions."""
    return {**condition(batch, space), "img_hw": batch["img_hw"], "aspect_ratio": batch["aspect_ratio"]}


def caption_accuracy(images, batch):
    """Task.evaluate of T2I on `shapes`: per attribute, how often the grid's samples show what their
    held-out captions state (evaluate.alignment_scores), and the mean total-variation distance of
    their attributes' distribution to the held-out references' (evaluate.attribute_distance)."""
    detected = [detect_shape_attrs(image) for image in to_uint8(images)]
    scores = alignment_scores(detected, [parse_shapes_caption(caption) for caption in batch["caption"]])
    references = [detect_shape_attrs(image) for image in to_uint8(batch["image"])]
    return {**{f"caption_{name}": value for name, value in scores.items() if name != "images"},
            "attribute_distance": attribute_distance(detected, references)["mean"]}


#################################################################################
#                               Command line                                    #
#################################################################################

# Fixed by the prior's weights: taken from --init when not given, an error when given otherwise.
INHERITED_ARGS = {"i2i": ("model", "vae", "learn_sigma"), "t2i": ("model", "vae", "learn_sigma")}
# Defaults of a run from scratch, and of settings the I2I run leaves open.
SCRATCH_DEFAULTS = {"image_size": 32}  # prediction and variances: train_i2i.RUN_DEFAULTS, by --model


def read_init(args):
    """train_i2i.resolve_init, after T2I's own rules: the condition encoder is the text encoder
    (--t5), and the default --init must exist (the default run is always the fine-tuned one)."""
    if args.encoder is not None:
        raise ValueError("--encoder names the I2I image encoder, which T2I does not use; pass the text encoder as --t5")
    args.encoder = args.t5  # the loop records the condition encoder under "encoder"
    if args.init == DEFAULT_I2I_EXPORT and not os.path.exists(DEFAULT_I2I_EXPORT):
        raise FileNotFoundError(f"no I2I prior at {DEFAULT_I2I_EXPORT}: make it with `python train_i2i.py` (the "
                                f"offline default), or pass --init (an export, a run folder, Lumos_I2I.pth, or scratch)")
    return resolve_init(args, INHERITED_ARGS, SCRATCH_DEFAULTS)


def add_t2i_args(parser):
    add_train_args(parser)
    parser.set_defaults(out="runs/t2i", data="shapes:20000", steps=300, lr=3e-4, warmup_steps=50,
                        sample_every=150, ckpt_every=150, encoder=None, **{k: None for k in SCRATCH_DEFAULTS})
    a = parser.add_argument
    a("--init", default=DEFAULT_I2I_EXPORT,
      help="I2I weights: an ema.safetensors export, a checkpoint or run folder, the official Lumos_I2I.pth, or scratch")
    a("--init-entry", default="ema", choices=["ema", "model"], help="which weights of a training checkpoint")
    a("--t5", default=RANDOM_T5, help=f"T5 v1.1 encoder repo/folder (DeepFloyd/t5-v1_1-xxl), or {RANDOM_T5} (tiny, random)")
    a("--text-cache", default=None, help="read the T5 features from this cache (`train_t2i.py cache-text`)")
    a("--n-captions", type=int, default=None, help="train on the first N captioned images only")
    a("--multi-scale", action="store_true",
      help="the multi-scale model (as Lumos_T2I.pth; implied by a multi-scale --init) on aspect-ratio buckets")
    return parser


def cache_text(argv):
    """`train_t2i.py cache-text`: the text-feature cache of --data (and of the sample grid's captions)."""
    parser = argparse.ArgumentParser(
        prog="train_t2i.py cache-text", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Encode every distinct caption of --data once with the frozen T5 (under torchrun, the ranks "
                    "split the shards); train with --text-cache DIR and the same --data, --t5 and --seed.")
    a = parser.add_argument
    a("--data", required=True, help="the training data: a folder, tar shards, shapes[:N], or cache:DIR")
    a("--t5", default=RANDOM_T5, help=f"T5 v1.1 encoder repo/folder, or {RANDOM_T5}")
    a("--out", required=True, help="the cache folder (train with --text-cache DIR)")
    a("--image-size", type=int, default=32, help="as in training (a cache:DIR data spec checks it)")
    a("--seed", type=int, default=0, help="as in training (the shapes set and the sample grid depend on it)")
    a("--num-samples", type=int, default=64, help="as in training: the sample grid's captions are cached too")
    a("--shard-size", type=int, default=10000, help="captions per shard")
    a("--batch-size", type=int, default=64)
    a("--workers", type=int, default=0, help="data loader workers reading the captions")
    a("--dtype", choices=["encoder", "bf16"], default="encoder",
      help="of the stored features: the encoder's (bf16 on a GPU, fp32 on the CPU), or bf16: half of fp32's "
           "bytes, rounded to 2^-8 relative")
    args = parser.parse_args(argv)
    # The ranks share no process group: each writes its own shards (write_text_cache).
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    try:
        if args.shard_size <= 0 or args.batch_size <= 0:
            raise ValueError(f"--shard-size ({args.shard_size}) and --batch-size ({args.batch_size}) must be positive")
        base = data.open_dataset(args.data, args.image_size, seed=args.seed)
        eval_items = t2i_eval_items(base, SkipUncaptioned(base), args.image_size, args.seed, args.num_samples)
        captions = dataset_captions(base, args.workers, show_progress=rank == 0) + [item["caption"] for item in eval_items]
        encoder = load_text_encoder(args.t5, device, vocabulary=data.shapes_vocabulary())
        settings = {"data": args.data, "seed": args.seed, "num_samples": args.num_samples, "t5": args.t5,
                    "clean_captions": encoder.clean, "max_length": MAX_TEXT_TOKENS}
        dtype = torch.bfloat16 if args.dtype == "bf16" else None
        written = write_text_cache(captions, args.out, encoder, settings, args.shard_size, args.batch_size,
                                   rank, world_size, dtype=dtype)
        print(f"rank {rank}: wrote {len(written)} shards" if world_size > 1 else f"{TextFeatureCache(args.out)!r} complete")
    except (ValueError, FileNotFoundError) as error:
        exit_with_usage_error(error, "train_t2i.py cache-text")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["cache-text"]:
        return cache_text(argv[1:])
    parser = add_t2i_args(argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="`python train_t2i.py cache-text --help`: encode the captions once, beforehand"))
    args = parser.parse_args(argv)
    _, world_size, device = setup_distributed()  # train() finds it set up
    try:
        state, info = read_init(args)
        check_args(args, world_size)
        task = t2i_task(args, state, info, device)
    except (ValueError, FileNotFoundError) as error:
        exit_with_usage_error(error, "train_t2i.py")
    del state  # the weights live in the task's template model now
    train(args, task)


if __name__ == "__main__":
    main()
