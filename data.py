"""Training data: image folders, webdataset tar shards and the procedural `shapes` set.

Every source is a map-style dataset: `len(ds)` items, and `ds[i]` returns

    {"image":   float32 tensor (3, S, S) in [-1, 1], centre-cropped, NOT flipped
                (the training loop draws the flip per sample from its own generator),
     "caption": str ("" when the source has none),
     "index":   i, the dataset index that was asked for,
     "name":    the file (or `shard.tar:member`) the image came from,
     "skipped": names of the bad files passed over to produce this item}

and `shapes` items also carry "attrs", the attributes their caption states.

Bad files (zero bytes, truncated, not an image, larger than PIL's decompression-bomb limit
`PIL.Image.MAX_IMAGE_PIXELS`) do not stop training: a bad item i is replaced by the next good
one, i+1, i+2, ... (wrapping around), so the replacement depends only on i, and the bad names
travel in "skipped" for the main process to count and log, whichever worker met them. Only an
implausible share stops it: when more than half of the last 1,000 files a process read failed
(BAD_FILE_SHARE, BAD_FILE_WINDOW), reading raises TooManyBadFiles, whose one-line message names
the first errors.

Sources, chosen by `open_dataset(spec, image_size)`:
    /data/images                      a folder tree of .jpg/.jpeg/.png/.webp (any case),
                                      recursive, sorted; captions from a sidecar `name.txt`
    shards/{00000..01023}.tar         tar shards in the webdataset layout (`key.jpg` + optional
    shards/*.tar,extra/a.tar          `key.txt` / `key.json`), as paths, globs, brace ranges or
                                      comma-separated lists of those; read by seeking into the
                                      uncompressed tar files, never extracted, at the offsets of
                                      a memory-mapped index (`data.py index`, else built at first
                                      use: `.lumos_index_*` beside the first shard, or in
                                      $LUMOS_TAR_INDEX)
    shapes, shapes:N                  N procedural images (default 10000), see `ShapesDataset`
    cache:DIR                         a feature cache (`FeatureCache`): VAE posteriors and image-
                                      encoder tokens in place of images, written by `data.py cache`

Which samples a rank reads, and in which order, is decided by `GlobalSampler`; `make_loader`
wires a dataset, that sampler and `collate_samples` into a DataLoader. The loader reads a
dataset that also has `item(i, global_index)` through it (train_nvs.py's sets, which draw the
source view per training sample), else `ds[i]`.

Command line: `python data.py show SPEC --out grid.png` writes a grid of samples and prints
their captions; `python data.py stats SPEC` reads a dataset and reports bad files and speed;
`[torchrun --nproc_per_node N] data.py cache --data SPEC --out DIR --vae REPO --encoder REPO
--image-size S [--multi-scale] [--patch-tokens]` writes a feature cache of SPEC, split over the
ranks (with --multi-scale each image at its aspect-ratio bucket, for train_t2i.py --multi-scale;
with --patch-tokens the encoder's patch tokens too, for train_i2i.py --condition patch|all and
--repa-weight); `python data.py index SPEC
[--index DIR]` scans tar shards once into the index their readers memory-map; `python data.py
shapes-encoder` trains the offline default's condition encoder (assets/shapes_vit.safetensors).
"""

import argparse
import collections
import concurrent.futures
import contextlib
import datetime
import glob
import hashlib
import io
import itertools
import json
import math
import os
import re
import shlex
import shutil
import sys
import tarfile
import tempfile
import time
import uuid
import warnings
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageOps
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

# Images longer than this ratio are first trimmed around their centre (the centre crop keeps
# only that part anyway): upscaling a 1 x 100000 strip to a short side of 256 would need
# 6.5 gigapixels.
MAX_ASPECT_RATIO = 4.0

# Tags that keep the random streams of different uses apart under the same run seed.
_SAMPLER_STREAM = 1
_SHAPES_STREAM = 2


# A file-backed dataset stops with TooManyBadFiles when more than BAD_FILE_SHARE of the last
# BAD_FILE_WINDOW files that this process read failed. Stray bad files are a few percent; a share
# like that is a systematic failure (a missing codec, a bug, the wrong files) that would
# otherwise make every item scan the data for a good file, or train on the few that decode.
BAD_FILE_WINDOW = 1000
BAD_FILE_SHARE = 0.5
BAD_FILE_EXAMPLES = 3  # errors named in the message


class BadSampleError(Exception):
    """A file that cannot be turned into a training sample (it is skipped, never fatal)."""


class TooManyBadFiles(RuntimeError, ValueError):
    """Most of a dataset's recent reads failed: stop rather than skip. Its str() is one line.

    Also a ValueError, so that the command lines, which turn ValueError into one line and exit
    status 2, report it that way when it is met in the main process (e.g. reading held-out items).
    """

    def __str__(self):
        text = super().__str__()
        # torch re-raises a DataLoader worker's exception as TooManyBadFiles("Caught TooManyBadFiles
        # in DataLoader worker process 0.\nOriginal Traceback ...\ndata.TooManyBadFiles: LINE\n"):
        # keep LINE alone.
        if text.startswith("Caught TooManyBadFiles"):
            return text.rstrip().rsplit("\n", 1)[-1].split("TooManyBadFiles: ", 1)[-1]
        return text


# ---------------------------------------------------------------------------------------------
# Preprocessing


def to_rgb(image):
    """Convert a PIL image of any mode to 8-bit RGB.

    Transparent images (RGBA, LA, PA, or P/L/RGB with a transparency key) are composited on
    white, as a browser shows them: the colour under alpha 0 is arbitrary, often black.
    16-bit and 32-bit integer grayscale (I;16*, I) is scaled from 0..65535 to 0..255: PIL's own
    convert clips at 255 and would turn a 16-bit PNG white. Everything else (1, L, P, CMYK,
    YCbCr, F, ...) goes through PIL's convert.
    """
    if image.mode.startswith("I"):
        gray16 = np.asarray(image).astype(np.float64)
        gray8 = np.clip(np.round(gray16 / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray8, "L").convert("RGB")
    if "transparency" in image.info or image.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _trim_to_aspect(image, max_ratio):
    """Crop the long side of `image` around its centre to at most `max_ratio` x the short side."""
    width, height = image.size
    short = min(width, height)
    limit = max(short, round(short * max_ratio))
    if max(width, height) <= limit:
        return image
    new_width, new_height = min(width, limit), min(height, limit)
    left, top = (width - new_width) // 2, (height - new_height) // 2
    return image.crop((left, top, left + new_width, top + new_height))


def center_crop_arr(pil_image, image_size):
    """ADM's centre crop: a uint8 array (height, width, 3) from a PIL image of any mode; image_size
    is the side of a square, or (height, width) (an aspect-ratio bucket).

    Halve the image with a BOX filter while it is at least twice the target both ways (cheap and
    alias-free), resize with BICUBIC so that it just covers the target, then cut the centre.
    Extremely elongated images are trimmed to MAX_ASPECT_RATIO first.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    image = _trim_to_aspect(to_rgb(pil_image), MAX_ASPECT_RATIO)
    while image.size[0] >= 2 * width and image.size[1] >= 2 * height:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = max(width / image.size[0], height / image.size[1])
    image = image.resize(tuple(max(target, round(side * scale)) for side, target in zip(image.size, (width, height))),
                         resample=Image.BICUBIC)
    pixels = np.array(image)
    top = (pixels.shape[0] - height) // 2
    left = (pixels.shape[1] - width) // 2
    return pixels[top : top + height, left : left + width]


# PixArt-alpha's aspect-ratio buckets, as the Lumos release's utils/resolution.py lists them at
# 1024 px: height / width as its key (a string, rounded) -> [height, width] in pixels. Its 512 px
# and 256 px tables are exactly this one scaled by 1/2 and 1/4; its *_TEST tables (what the
# demos snap a requested size to) leave out the seven keys of TEST_LEFT_OUT.
ASPECT_RATIO_1024 = {
    "0.25": [512.0, 2048.0], "0.26": [512.0, 1984.0], "0.27": [512.0, 1920.0], "0.28": [512.0, 1856.0],
    "0.32": [576.0, 1792.0], "0.33": [576.0, 1728.0], "0.35": [576.0, 1664.0], "0.4": [640.0, 1600.0],
    "0.42": [640.0, 1536.0], "0.48": [704.0, 1472.0], "0.5": [704.0, 1408.0], "0.52": [704.0, 1344.0],
    "0.57": [768.0, 1344.0], "0.6": [768.0, 1280.0], "0.68": [832.0, 1216.0], "0.72": [832.0, 1152.0],
    "0.78": [896.0, 1152.0], "0.82": [896.0, 1088.0], "0.88": [960.0, 1088.0], "0.94": [960.0, 1024.0],
    "1.0": [1024.0, 1024.0], "1.07": [1024.0, 960.0], "1.13": [1088.0, 960.0], "1.21": [1088.0, 896.0],
    "1.29": [1152.0, 896.0], "1.38": [1152.0, 832.0], "1.46": [1216.0, 832.0], "1.67": [1280.0, 768.0],
    "1.75": [1344.0, 768.0], "2.0": [1408.0, 704.0], "2.09": [1472.0, 704.0], "2.4": [1536.0, 640.0],
    "2.5": [1600.0, 640.0], "2.89": [1664.0, 576.0], "3.0": [1728.0, 576.0], "3.11": [1792.0, 576.0],
    "3.62": [1856.0, 512.0], "3.75": [1920.0, 512.0], "3.88": [1984.0, 512.0], "4.0": [2048.0, 512.0],
}
TEST_LEFT_OUT = ("0.26", "0.27", "2.89", "3.11", "3.62", "3.75", "3.88")


def aspect_ratio_buckets(image_size, test=False):
    """{key: (height, width)} at `image_size` px: the 1024 px table scaled (the release's 512 and
    256 px tables for those sizes); `test`: without TEST_LEFT_OUT (the release's *_TEST tables).
    Every side is a multiple of 64 at 1024 px, so a size divisible by 16 keeps them whole."""
    if image_size <= 0 or image_size % 16:
        raise ValueError(f"aspect-ratio buckets at {image_size} px: the size must be a positive multiple of 16")
    return {key: (int(height * image_size // 1024), int(width * image_size // 1024))
            for key, (height, width) in ASPECT_RATIO_1024.items() if not (test and key in TEST_LEFT_OUT)}


def closest_bucket(height, width, buckets):
    """(key, (height, width)) of the bucket whose key is nearest height / width (the first of a tie,
    in table order: the release's get_closest_ratio)."""
    key = min(buckets, key=lambda ratio: abs(float(ratio) - height / width))
    return key, buckets[key]


def pixels_to_tensor(pixels):
    """uint8 (H, W, 3) array -> float32 tensor (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() / 127.5 - 1.0


def decode_image(data, image_size):
    """Encoded image bytes -> float32 tensor (3, image_size, image_size) in [-1, 1] (image_size
    (h, w): (3, h, w), centre-cropped to that shape).

    Raises BadSampleError for anything that is not a readable image of sane size.
    """
    if not data:
        raise BadSampleError("empty file")
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; we refuse all of it.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                # Phone photos are stored sideways with an EXIF flag saying how to turn them.
                pixels = center_crop_arr(ImageOps.exif_transpose(image), image_size)
    except Exception as error:  # PIL's decoders raise a zoo of types on broken input
        # Without "<_io.BytesIO object at 0x...>": TooManyBadFiles quotes these in one line.
        message = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(error))
        raise BadSampleError(f"{type(error).__name__}: {message}") from error
    return pixels_to_tensor(pixels)


def next_items(i, count, members=None):
    """The samples to read for item i, in order: i, then those after it, wrapping around; among
    `members` (a sorted index array holding i, such as i's aspect-ratio bucket) if given, else among
    all `count`. So the replacement of a bad or unusable sample depends only on i."""
    if members is None:
        return ((i + step) % count for step in range(count))
    first = int(np.searchsorted(members, i))
    return (int(members[(first + step) % len(members)]) for step in range(len(members)))


def bucket_members(buckets):
    """{bucket: the sorted indices of its items} of a bucket id per item."""
    return {bucket: np.flatnonzero(buckets == bucket) for bucket in np.unique(buckets).tolist()}


def image_hw(data):
    """(height, width) of encoded image bytes as decode_image turns them (EXIF orientation applied),
    read from the header alone; BadSampleError for what PIL cannot open."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            turned = image.getexif().get(0x0112) in (5, 6, 7, 8)  # stored turned by 90 degrees
    except Exception as error:
        raise BadSampleError(f"{type(error).__name__}: {error}") from error
    return (width, height) if turned else (height, width)


# ---------------------------------------------------------------------------------------------
# File-backed datasets


class _PackedStrings:
    """A read-only list of str kept in two numpy arrays.

    DataLoader workers that read a Python list of millions of str objects touch their reference
    counts and so copy every page of it into each worker; numpy buffers stay shared.
    """

    def __init__(self, strings):
        encoded = [s.encode() for s in strings]
        self.offsets = np.cumsum([0] + [len(b) for b in encoded], dtype=np.int64)
        self.data = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    @classmethod
    def from_arrays(cls, offsets, data):
        """From int64 offsets (n + 1) and uint8 bytes, e.g. memory maps of the tar index."""
        packed = cls.__new__(cls)
        packed.offsets, packed.data = offsets, data
        return packed

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        return self.data[self.offsets[i] : self.offsets[i + 1]].tobytes().decode()


class _EncodedImageDataset(Dataset):
    """Shared item logic of the file-backed sources: decode, caption, skip bad files.

    Subclasses provide `__len__`, `name(j)` and `read(j) -> (image bytes, caption str)`, the
    latter raising OSError or BadSampleError for a bad sample.
    """

    def __init__(self, image_size):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = image_size
        # This process's last reads, None for a good file, else "name: error". Each DataLoader
        # worker holds its own copy of the dataset, so each judges the files it read.
        self._reads = collections.deque(maxlen=BAD_FILE_WINDOW)
        self._bad_reads = 0

    def load(self, j, size=None):
        """Image tensor (3, S, S), or (3, h, w) for size (h, w), and caption of sample j; raises
        BadSampleError."""
        try:
            data, caption = self.read(j)
        except OSError as error:
            raise BadSampleError(f"{type(error).__name__}: {error}") from error
        return decode_image(data, size or self.image_size), caption

    def image_hw(self, j):
        """(height, width) of sample j's image, from its header; (0, 0) for a bad file."""
        try:
            return image_hw(self.read(j)[0])
        except (OSError, BadSampleError):
            return 0, 0

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range [0, {len(self)}) of {self!r}")
        return {**self.first_readable(next_items(i, len(self)))[1], "index": int(i)}

    def first_readable(self, candidates, size=None):
        """(j, item) of the first sample j among `candidates` whose file reads: item holds "image"
        (3, S, S), or (3, h, w) for size (h, w), "caption", "name" and, in "skipped", the bad files
        passed over, each counted in the window of recent reads."""
        skipped = []
        for j in candidates:
            try:
                image, caption = self.load(j, size)
            except BadSampleError as error:
                skipped.append(self.name(j))
                self._count_read(f"{self.name(j)}: {error}")
                continue
            self._count_read(None)
            return j, {"image": image, "caption": caption, "name": self.name(j), "skipped": skipped}
        raise TooManyBadFiles(f"no readable image in {self!r}: all {len(skipped)} files failed; "
                              + self._bad_file_advice())

    def _count_read(self, error):
        """Add a read (error: None if good) to the window; raise TooManyBadFiles when more than
        BAD_FILE_SHARE of a full window failed. This also ends a skip loop in __getitem__ that
        meets BAD_FILE_WINDOW bad files in a row."""
        if len(self._reads) == self._reads.maxlen:
            self._bad_reads -= self._reads[0] is not None  # about to drop out of the window
        self._reads.append(error)
        self._bad_reads += error is not None
        if len(self._reads) == self._reads.maxlen and self._bad_reads > BAD_FILE_SHARE * len(self._reads):
            raise TooManyBadFiles(f"{self._bad_reads} of the last {len(self._reads)} files read failed "
                                  f"in {self!r}; " + self._bad_file_advice())

    def _bad_file_advice(self):
        errors = [" ".join(e.split()) for e in self._reads if e is not None][:BAD_FILE_EXAMPLES]
        return (f"first errors: {' | '.join(errors)}; too many to skip: fix the files or what decodes "
                f"them (a missing codec?), check with `python data.py stats SPEC`")


class ImageFolder(_EncodedImageDataset):
    """All images under `root` (recursive, sorted by relative path, extensions in any case).

    The caption of `a/b.jpg` is the text of `a/b.txt` when that file exists. Hidden files and
    folders (names starting with ".", e.g. macOS `._x.jpg`) are ignored.
    """

    def __init__(self, root, image_size):
        super().__init__(image_size)
        self.root = os.path.abspath(root)
        images, captions = _list_folder(self.root)
        if not images:
            hint = " (it holds .tar files: pass them as DIR/*.tar)" if _holds_tars(self.root) else ""
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under "
                                    f"{root}{hint}")
        self.paths = _PackedStrings(images)
        self.has_caption = np.array([_caption_path(p) in captions for p in images], dtype=bool)

    def __len__(self):
        return len(self.paths)

    def __repr__(self):
        return f"ImageFolder({self.root!r}, {len(self)} images)"

    def name(self, j):
        return os.path.join(self.root, self.paths[j])

    def read(self, j):
        with open(self.name(j), "rb") as f:
            data = f.read()
        caption = ""
        if self.has_caption[j]:
            with open(os.path.join(self.root, _caption_path(self.paths[j])), "rb") as f:
                caption = f.read().decode("utf-8", errors="replace").strip()
        return data, caption


def _caption_path(image_path):
    return os.path.splitext(image_path)[0] + ".txt"


def _list_folder(root):
    """Sorted relative paths of the images under root, and the set of .txt files there."""
    images, captions = [], set()
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        relative = os.path.relpath(folder, root)
        for file in files:
            if file.startswith("."):
                continue
            path = os.path.normpath(os.path.join(relative, file))
            extension = os.path.splitext(file)[1].lower()
            if extension in IMAGE_EXTENSIONS:
                images.append(path)
            elif extension == ".txt":
                captions.add(path)
    return sorted(images), captions


def _holds_tars(root):
    return any(f.endswith(".tar") for _, _, files in os.walk(root) for f in files)


# One row per sample of a tar dataset: where its image and caption bytes lie in which shard.
_TAR_RECORD = np.dtype([("shard", np.int32), ("image_offset", np.int64), ("image_size", np.int64),
                        ("caption_offset", np.int64), ("caption_size", np.int64),
                        ("caption_kind", np.int8)])
_NO_CAPTION, _TXT_CAPTION, _JSON_CAPTION = 0, 1, 2

# The tar index: TarShards' rows, built once (`python data.py index SPEC`, or at first use) and
# memory-mapped by every process, so that opening 190M images neither reads the headers of 100k
# shards in every rank nor holds ~57 bytes an image in each rank's memory. A folder of raw arrays
# (np.memmap; lengths in index.json), renamed into place complete, so concurrent builders cannot
# leave a partial one:
#     records.bin        _TAR_RECORD rows in dataset order (exactly the rows a scan yields)
#     names.bin          the image member names, utf-8, concatenated
#     name_offsets.bin   int64 (n + 1): name j is names.bin[offsets[j] : offsets[j + 1]]
#     shards.bin         _SHARD_STAT rows: each shard's size and mtime when it was scanned
#     index.json         format, hash of the shard list, counts, warnings of unreadable shards
# It lives in `<folder of the first shard>/.lumos_index_<hash of the shard list>`, or in DIR from
# `--index DIR` / the environment variable LUMOS_TAR_INDEX when the data folder is read-only.
TAR_INDEX_ENV = "LUMOS_TAR_INDEX"
_TAR_INDEX_FORMAT = 1
_SHARD_STAT = np.dtype([("size", np.int64), ("mtime_ns", np.int64)])


class StaleTarIndex(ValueError):
    """A shard changed after its index was built: indices would no longer name the same samples
    (and resume elsewhere), so reading stops. Its str() is one line, also from a DataLoader worker."""

    def __str__(self):
        text = super().__str__()
        return text.rstrip().rsplit("\n", 1)[-1].split("StaleTarIndex: ", 1)[-1]


def tar_index_folder(shard_paths, index_dir=None):
    """Where the index of these shards (in this order) lives: index_dir, else $LUMOS_TAR_INDEX,
    else the folder of the first shard; the name holds a hash of the absolute shard paths."""
    paths = [os.path.abspath(p) for p in shard_paths]
    digest = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]
    parent = index_dir or os.environ.get(TAR_INDEX_ENV) or os.path.dirname(paths[0])
    return os.path.join(os.path.abspath(parent), f".lumos_index_{digest}")


def _index_command(spec, index_dir):
    quoted = shlex.quote(spec) if spec else "SPEC"  # a glob or {a..b} must reach data.py unexpanded
    return f"`python data.py index {quoted}" + (f" --index {shlex.quote(index_dir)}`" if index_dir else "`")


def build_tar_index(shard_paths, folder, workers=0, spec=None, replace=False):
    """Scan the shards into an index at `folder`; returns the index.json dict of the one there.

    Written to a private temporary folder beside `folder` and renamed into place, so readers see
    a whole index. Processes that build the same missing index at once (the ranks at first use)
    all succeed and keep the first one renamed there; replace=True (`data.py index`) replaces an
    existing one. workers > 0 scans shards in that many processes."""
    parent = os.path.dirname(folder)
    try:
        os.makedirs(parent, exist_ok=True)
        temporary = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".tmp", dir=parent)
        os.chmod(temporary, 0o755)  # mkdtemp's 0o700 would hide the index from the other users
    except OSError as error:
        raise ValueError(f"cannot write the tar index into {parent} ({error.strerror}): build it in a "
                         f"writable folder with {_index_command(spec, 'DIR')} and train with "
                         f"{TAR_INDEX_ENV}=DIR") from None
    try:
        _write_tar_index(shard_paths, temporary, workers)
        _rename_folder(temporary, folder, replace)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return read_tar_index_info(folder)


def _write_tar_index(shard_paths, folder, workers):
    """Scan shard after shard, appending to the files (memory stays that of one shard)."""
    files = {name: open(os.path.join(folder, name + ".bin"), "wb")
             for name in ("records", "names", "name_offsets", "shards")}
    count, name_bytes, problems = 0, 0, []
    files["name_offsets"].write(np.zeros(1, np.int64).tobytes())
    with contextlib.ExitStack() as stack:
        for file in files.values():
            stack.enter_context(file)
        pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(workers)) if workers > 1 else None
        scans = pool.map(_scan_shard, shard_paths, chunksize=16) if pool else map(_scan_shard, shard_paths)
        for shard, (stat, indexed, problem) in enumerate(scans):
            if problem:
                warnings.warn(problem)
                problems.append(problem)
            records = np.array([(shard,) + record for record, _ in indexed], dtype=_TAR_RECORD)
            names = [name.encode() for _, name in indexed]
            offsets = name_bytes + np.cumsum([len(n) for n in names], dtype=np.int64)
            for key, value in (("records", records.tobytes()), ("names", b"".join(names)),
                               ("name_offsets", offsets.tobytes()),
                               ("shards", np.array(stat, _SHARD_STAT).tobytes())):
                files[key].write(value)
            count, name_bytes = count + len(indexed), name_bytes + sum(map(len, names))
    if count == 0:
        raise FileNotFoundError(f"no images in the {len(shard_paths)} tar shard(s) starting "
                                f"with {shard_paths[0]}")
    info = {"format": _TAR_INDEX_FORMAT, "shard_list": os.path.basename(tar_index_folder(shard_paths)),
            "num_shards": len(shard_paths), "num_items": count, "name_bytes": name_bytes,
            "problems": problems, "build": uuid.uuid4().hex}
    write_json_atomically(os.path.join(folder, "index.json"), info)
    return info


def _scan_shard(path):
    """(size, mtime_ns) of the shard before the scan, _index_shard's rows, its problem or None."""
    try:
        stat = os.stat(path)
        stat = (stat.st_size, stat.st_mtime_ns)
    except OSError:
        stat = (-1, -1)
    return (stat,) + _index_shard(path)


def _rename_folder(new, folder, replace):
    """Rename `new` to `folder` unless another process did so first; with replace, an index
    already there is moved aside first and deleted (processes that mapped it keep their copy)."""
    old = None
    if replace and os.path.exists(folder):
        old = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".old", dir=os.path.dirname(folder))
        try:
            os.rename(folder, os.path.join(old, "index"))
        except FileNotFoundError:  # another process moved it first
            pass
    try:
        os.rename(new, folder)
    except OSError:  # another process renamed its own complete index there first: keep that one
        if not os.path.isfile(os.path.join(folder, "index.json")):
            raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


def read_tar_index_info(folder):
    path = os.path.join(folder, "index.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _map_tar_index(folder, info, rebuild):
    """The index arrays as read-only memory maps (pages are read as they are touched), of the
    same build as `info` (a DataLoader worker maps them later than its main process read it)."""
    if (read_tar_index_info(folder) or {}).get("build") != info["build"]:
        raise StaleTarIndex(f"tar index {folder} was rebuilt or removed while this run used it: "
                            f"restart the run (with {rebuild} done)")
    def mapped(name, dtype, count):
        return np.memmap(os.path.join(folder, name + ".bin"), dtype=dtype, mode="r", shape=(count,))
    n = info["num_items"]
    names = _PackedStrings.from_arrays(mapped("name_offsets", np.int64, n + 1),
                                       mapped("names", np.uint8, info["name_bytes"]))
    return (mapped("records", _TAR_RECORD, n), names,
            mapped("shards", _SHARD_STAT, info["num_shards"]))


class TarShards(_EncodedImageDataset):
    """Samples of webdataset tar shards, read in place by seeking into the files.

    A sample is the group of members that share a key (the member name up to the first "." of
    its file name): an image `key.jpg|jpeg|png|webp` and optionally `key.txt` or `key.json`
    (caption under "caption" or "text"); `.txt` wins when both exist. Members without an image
    are ignored. Where every sample lies comes from the tar index (see `tar_index_folder`), built
    at first use when missing and memory-mapped lazily by each process (pickling drops the maps,
    so DataLoader workers map it themselves); items are read with `os.pread` at the recorded
    offsets. Each process opens its own file handles lazily (pickling drops them too) and keeps at
    most MAX_OPEN_FILES of them; opening one checks that the shard is the one indexed
    (StaleTarIndex if not). A shard that cannot be indexed, in whole or from some member on, is
    reported with a warning (at every open) and the readable part is kept.
    """

    MAX_OPEN_FILES = 64

    def __init__(self, shard_paths, image_size, index_dir=None, spec=None):
        super().__init__(image_size)
        if not shard_paths:
            raise FileNotFoundError("no tar shards given")
        self.shard_paths = [os.path.abspath(p) for p in shard_paths]
        self.index = tar_index_folder(self.shard_paths, index_dir)
        self.rebuild = _index_command(spec, index_dir or os.environ.get(TAR_INDEX_ENV))
        self.info = read_tar_index_info(self.index)
        if self.info is None:
            self.info = self._build_at_first_use(spec)
        else:
            for problem in self.info["problems"]:
                warnings.warn(problem)
        expected = (_TAR_INDEX_FORMAT, os.path.basename(self.index), len(self.shard_paths))
        if tuple(self.info.get(k) for k in ("format", "shard_list", "num_shards")) != expected:
            raise ValueError(f"tar index {self.index} is of another format or shard list: "
                             f"rebuild it with {self.rebuild}")
        self._maps = None
        self._files = collections.OrderedDict()

    def _build_at_first_use(self, spec):
        """Under torchrun the node's LOCAL_RANK 0 builds the missing index and its other ranks wait
        for it (torchrun stops them if that rank fails); nodes that share the folder race harmlessly."""
        if int(os.environ.get("LOCAL_RANK", 0)) != 0:
            while (info := read_tar_index_info(self.index)) is None:
                time.sleep(1)
            for problem in info["problems"]:
                warnings.warn(problem)
            return info
        print(f"building the tar index of {len(self.shard_paths)} shards at first use into {self.index}; "
              f"{self.rebuild[:-1]} --workers N` builds it ahead, faster", file=sys.stderr)
        return build_tar_index(self.shard_paths, self.index, spec=spec)

    @property
    def records(self):
        return self._mapped()[0]

    @property
    def member_names(self):
        return self._mapped()[1]

    def _mapped(self):
        if self._maps is None:
            self._maps = _map_tar_index(self.index, self.info, self.rebuild)
        return self._maps

    def __len__(self):
        return self.info["num_items"]

    def __repr__(self):
        return (f"TarShards({len(self.shard_paths)} shards from {self.shard_paths[0]!r}, "
                f"{len(self)} images)")

    def __getstate__(self):
        # Pickling a memory map would copy the whole index into the pickle.
        return {**self.__dict__, "_files": collections.OrderedDict(), "_maps": None}

    def __del__(self):
        for fd in getattr(self, "_files", {}).values():
            os.close(fd)

    def name(self, j):
        return f"{self.shard_paths[self.records[j]['shard']]}:{self.member_names[j]}"

    def read(self, j):
        record = self.records[j]
        data = self._read_range(record["shard"], record["image_offset"], record["image_size"])
        kind = record["caption_kind"]
        if kind == _NO_CAPTION:
            return data, ""
        text = self._read_range(record["shard"], record["caption_offset"], record["caption_size"])
        text = text.decode("utf-8", errors="replace")
        if kind == _TXT_CAPTION:
            return data, text.strip()
        try:
            meta = json.loads(text)
        except ValueError as error:
            raise BadSampleError(f"caption json: {error}") from error
        caption = meta.get("caption", meta.get("text", "")) if isinstance(meta, dict) else ""
        return data, str(caption).strip()

    def _read_range(self, shard, offset, size):
        # pread does not move a shared file position, so a handle inherited through fork
        # by several DataLoader workers is still safe to use from all of them.
        data = os.pread(self._file(int(shard)), int(size), int(offset))
        if len(data) != size:
            raise BadSampleError(f"truncated: {len(data)} of {size} bytes")
        return data

    def _file(self, shard):
        if shard in self._files:
            self._files.move_to_end(shard)
        else:
            if len(self._files) >= self.MAX_OPEN_FILES:
                os.close(self._files.popitem(last=False)[1])
            fd = os.open(self.shard_paths[shard], os.O_RDONLY)
            self._check_unchanged(shard, fd)
            self._files[shard] = fd
        return self._files[shard]

    def _check_unchanged(self, shard, fd):
        """Compare the shard with its index when it is opened, not at start-up: a stat of every
        shard by every rank would be O(shards) metadata calls on the shared filesystem."""
        stat, indexed = os.fstat(fd), self._mapped()[2][shard]
        if (stat.st_size, stat.st_mtime_ns) != (indexed["size"], indexed["mtime_ns"]):
            os.close(fd)
            raise StaleTarIndex(f"tar shard {self.shard_paths[shard]} changed since its index "
                                f"{self.index} was built (size or mtime): rebuild it with {self.rebuild}")


def _index_shard(path):
    """([((image_offset, image_size, caption_offset, caption_size, caption_kind), image member
    name)] for every sample with an image in the tar file at `path`, in member order; and a
    line saying why the scan stopped early, or None)."""
    samples, problem = {}, None  # key -> {extension: (offset, size, member name)}, in order of first member
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if member.isfile():
                    folder, file = os.path.split(member.name)
                    stem, _, extension = file.partition(".")
                    key = os.path.join(folder, stem)
                    samples.setdefault(key, {})[extension.lower()] = (
                        member.offset_data, member.size, member.name)
    except (OSError, tarfile.TarError) as error:
        problem = (f"tar shard {path} is unreadable after {len(samples)} samples ({error}); "
                   "compressed shards cannot be read in place: store them as plain .tar")
    indexed = []
    for members in samples.values():
        image = next((members[e[1:]] for e in IMAGE_EXTENSIONS if e[1:] in members), None)
        if image is None:
            continue
        caption, kind = (members["txt"], _TXT_CAPTION) if "txt" in members else (
            (members["json"], _JSON_CAPTION) if "json" in members else ((-1, 0, ""), _NO_CAPTION))
        indexed.append(((image[0], image[1], caption[0], caption[1], kind), image[2]))
    return indexed, problem


# ---------------------------------------------------------------------------------------------
# The procedural `shapes` set

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 130, 30),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
# Object extent (width of its bounding box) as a fraction of the image side.
SIZES = {"small": 0.22, "medium": 0.34, "large": 0.46}
# Object centre (x, y) as fractions of the image side, on a 3 x 3 grid.
POSITIONS = {
    "top left": (0.27, 0.27), "top center": (0.5, 0.27), "top right": (0.73, 0.27),
    "center left": (0.27, 0.5), "center": (0.5, 0.5), "center right": (0.73, 0.5),
    "bottom left": (0.27, 0.73), "bottom center": (0.5, 0.73), "bottom right": (0.73, 0.73),
}
SIZE_JITTER = 0.08  # the extent varies by up to +-8 %
POSITION_JITTER = 0.04  # the centre moves by up to this fraction of the side, staying in frame
SUPERSAMPLING = 4  # drawn at 4x and box-filtered down: anti-aliased edges


def shapes_caption(attrs):
    """The caption of a shapes image: 'a large red triangle at the top left on a blue background'."""
    article = "an" if attrs["background"][0] in "aeiou" else "a"
    return (f"a {attrs['size']} {attrs['color']} {attrs['shape']} at the {attrs['position']} "
            f"on {article} {attrs['background']} background")


def shapes_vocabulary():
    """Every word of every shapes caption (shapes_caption over all attribute values), sorted: the
    vocabulary of the offline default's text encoder."""
    words = set()
    for shape, color, size, position, background in itertools.product(SHAPES, COLORS, SIZES, POSITIONS, COLORS):
        attrs = {"shape": shape, "color": color, "size": size, "position": position, "background": background}
        words.update(shapes_caption(attrs).split())
    return sorted(words)


def shape_outline(shape, cx, cy, extent):
    """Polygon vertices [(x, y), ...] of `shape` centred on (cx, cy) with bounding box side
    `extent`, in pixels (y down); None for the circle, which is drawn as an ellipse."""
    r = extent / 2
    if shape == "circle":
        return None
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":  # pointing up, base at the bottom of the bounding box
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "star":  # five points, the first one up, inner radius 0.45 of the outer
        angles = np.pi / 2 - np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return [(cx + q * np.cos(a), cy - q * np.sin(a)) for q, a in zip(radii, angles)]
    if shape == "cross":  # a plus sign with arms one third of the extent wide
        a = r / 3
        return [(cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a),
                (cx + r, cy + a), (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r),
                (cx - a, cy + a), (cx - r, cy + a), (cx - r, cy - a), (cx - a, cy - a)]
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def sample_shape_attrs(seed, index):
    """The attributes of shapes image `index` under `seed`: names from SHAPES, COLORS, SIZES and
    POSITIONS, plus the exact geometry ("cx", "cy", "extent" as fractions of the image side)."""
    rng = np.random.default_rng([seed, _SHAPES_STREAM, index])
    color = str(rng.choice(list(COLORS)))
    attrs = {
        "shape": str(rng.choice(SHAPES)),
        "color": color,
        "size": str(rng.choice(list(SIZES))),
        "position": str(rng.choice(list(POSITIONS))),
        "background": str(rng.choice([c for c in COLORS if c != color])),
    }
    extent = SIZES[attrs["size"]] * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
    for axis, centre in zip(("cx", "cy"), POSITIONS[attrs["position"]]):
        room = min(POSITION_JITTER, centre - extent / 2, 1 - centre - extent / 2)
        attrs[axis] = float(centre + rng.uniform(-room, room))
    attrs["extent"] = float(extent)
    return attrs


def render_shape(attrs, image_size):
    """uint8 array (image_size, image_size, 3) showing the object that `attrs` describes."""
    side = image_size * SUPERSAMPLING
    canvas = Image.new("RGB", (side, side), COLORS[attrs["background"]])
    draw = ImageDraw.Draw(canvas)
    cx, cy, extent = attrs["cx"] * side, attrs["cy"] * side, attrs["extent"] * side
    outline = shape_outline(attrs["shape"], cx, cy, extent)
    if outline is None:
        r = extent / 2
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLORS[attrs["color"]])
    else:
        draw.polygon(outline, fill=COLORS[attrs["color"]])
    return np.array(canvas.reduce(SUPERSAMPLING))


class ShapesDataset(Dataset):
    """`num_images` procedural images of one coloured shape on a coloured background.

    Item i depends only on (seed, i): shape (SHAPES), colour and a different background colour
    (COLORS), size (SIZES) and one of 9 grid positions (POSITIONS), with a little jitter of size
    and position; its caption states all five, e.g. "a small blue star at the bottom center on
    a yellow background", and its "attrs" hold them (see `sample_shape_attrs`).
    """

    def __init__(self, num_images, image_size, seed=0):
        if num_images <= 0 or image_size <= 0:
            raise ValueError(f"shapes needs a positive number of images and image size, got "
                             f"{num_images} and {image_size}")
        if seed < 0:
            raise ValueError(f"shapes seed must be >= 0, got {seed}")
        self.num_images, self.image_size, self.seed = num_images, image_size, seed

    def __len__(self):
        return self.num_images

    def __repr__(self):
        return f"ShapesDataset({self.num_images} images, seed {self.seed})"

    def __getitem__(self, i):
        if not 0 <= i < self.num_images:
            raise IndexError(f"shapes index {i} out of range [0, {self.num_images})")
        attrs = sample_shape_attrs(self.seed, i)
        return {"image": pixels_to_tensor(render_shape(attrs, self.image_size)),
                "caption": shapes_caption(attrs), "index": int(i), "name": f"shapes/{i:08d}",
                "skipped": [], "attrs": attrs}


# ---------------------------------------------------------------------------------------------
# Aspect-ratio buckets: PixArt-alpha's multi-scale training (train_t2i.py --multi-scale)


class AspectRatioBuckets(Dataset):
    """`dataset` (file-backed, or `shapes`) with each image centre-cropped to the size of its bucket,
    the closest in aspect ratio of aspect_ratio_buckets(image_size) (PixArt-alpha's training table).
    Items gain "img_hw" (2,), the image's own height and width in pixels, and "aspect_ratio" (1,),
    its bucket's key: PixArt-alpha's micro-conditions. `buckets[i]` is item i's bucket, for
    make_loader(buckets=...): a global batch then holds one bucket, so its images share a size.
    The sizes come from the image headers, read once here; a bad file is replaced by the next good
    item of the same bucket (and counted, as the source counts it)."""

    def __init__(self, dataset, image_size):
        self.dataset, self.table = dataset, aspect_ratio_buckets(image_size)
        self.keys = list(self.table)
        if isinstance(dataset, ShapesDataset):  # drawn square at its own size
            self.sizes = np.full((len(dataset), 2), dataset.image_size, dtype=np.int64)
        else:
            self.sizes = np.array([dataset.image_hw(j) for j in range(len(dataset))], dtype=np.int64).reshape(-1, 2)
        square = self.keys.index("1.0")  # where an unreadable file waits to be replaced
        self.buckets = np.array([self.keys.index(closest_bucket(h, w, self.table)[0]) if h and w else square
                                 for h, w in self.sizes.tolist()], dtype=np.int64)
        self._members = bucket_members(self.buckets)

    def __len__(self):
        return len(self.dataset)

    def __repr__(self):
        used = np.bincount(self.buckets, minlength=len(self.keys))
        return f"{self.dataset!r} in {np.count_nonzero(used)} aspect-ratio buckets"

    def __getitem__(self, i):
        key = self.keys[self.buckets[i]]
        if isinstance(self.dataset, ShapesDataset):  # drawn, never unreadable, in the square bucket
            j, item = i, self.dataset[i]
        else:
            candidates = next_items(i, len(self), self._members[int(self.buckets[i])])
            j, item = self.dataset.first_readable(candidates, self.table[key])
        return {**item, "index": int(i), "img_hw": torch.tensor(self.sizes[j], dtype=torch.float32),
                "aspect_ratio": torch.tensor([float(key)])}


# ---------------------------------------------------------------------------------------------
# The offline default's condition encoder (encoders.SHAPES_VIT), trained here on unlabeled shapes

SHAPES_ENCODER = dict(image_size=32, patch_size=8, width=128, depth=2, heads=2)


def train_shapes_encoder(out, steps=2500, batch_size=128, lr=1e-3, seed=0, num_images=20000, log_every=250):
    """Train a small DINO-class ViT (SHAPES_ENCODER) on the first `num_images` shapes images, the
    offline default's training set, and save it to `out` (safetensors, DINO's own key layout).

    Self-supervised by reconstruction: a small deconvolution decoder must redraw each image from the
    encoder's L2-normalised CLS, the feature Lumos conditions on, so that feature keeps what the image
    shows. DINO's own objective is left out on purpose: its views (colour jitter, crops, flips) teach
    invariance to the very colour, size and position that I2I must reproduce. No caption or attribute
    is read, and the decoder is thrown away. Returns the last step's reconstruction MSE."""
    from encoders import ViTEncoder  # only this command trains an encoder

    torch.manual_seed(seed)
    encoder = ViTEncoder(**SHAPES_ENCODER).requires_grad_(True).train()
    width, nn = SHAPES_ENCODER["width"], torch.nn
    decoder = nn.Sequential(  # the CLS -> 4 x 4 x 64 -> 8 -> 16 -> 32 px
        nn.Linear(width, 64 * 16), nn.Unflatten(1, (64, 4, 4)), nn.GELU(),
        nn.ConvTranspose2d(64, 64, 4, 2, 1), nn.GELU(), nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.GELU(),
        nn.ConvTranspose2d(32, 3, 4, 2, 1))
    optimizer = torch.optim.AdamW([*encoder.parameters(), *decoder.parameters()], lr=lr)
    images, draws = ShapesDataset(num_images, SHAPES_ENCODER["image_size"], seed), torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        indices = torch.randint(num_images, (batch_size,), generator=draws).tolist()
        batch = torch.stack([images[i]["image"] for i in indices])
        # x sqrt(width): unit-variance inputs for the decoder; the feature itself stays L2-normalised.
        loss = torch.nn.functional.mse_loss(decoder(encoder.tokens(batch)[:, 0] * width ** 0.5), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step}/{steps}: reconstruction mse {loss.item():.4f}", flush=True)
    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "num_images": num_images}
    save_file({k: v.detach().contiguous() for k, v in encoder.state_dict().items()}, out,
              metadata={"lumos_shapes_encoder": json.dumps({**SHAPES_ENCODER, **settings})})
    return loss.item()


# ---------------------------------------------------------------------------------------------
# Relative camera pose (Zero-1-to-3), the NVS condition beside the source view. Camera centres
# C = -R^T T from the world-to-camera [R|T], in spherical coordinates about the world origin with
# z up (polar angle from +z, azimuth from +x towards +y, radius); the pose of the target relative
# to the source is [d_polar, sin(d_azimuth), cos(d_azimuth), d_radius] (d_polar = -d_elevation).

POSE_DIM = 4


def camera_position(world_to_camera):
    """(3, 4) world-to-camera [R|T] -> camera centre in world coordinates (3,), -R^T T."""
    rotation, translation = world_to_camera[:, :3], world_to_camera[:, 3]
    return -rotation.T @ translation


def spherical(position):
    """(x, y, z) -> (polar angle from +z, azimuth from +x towards +y, radius), in radians."""
    x, y, z = position
    return math.atan2(math.hypot(x, y), z), math.atan2(y, x), math.sqrt(x * x + y * y + z * z)


def pose_vector(d_polar, d_azimuth, d_radius):
    """float32 (4,) [d_polar, sin d_azimuth, cos d_azimuth, d_radius] from the spherical changes
    of the camera (radians), e.g. to ask a trained model for a view 30 degrees round the object."""
    d_azimuth = d_azimuth % (2 * math.pi)
    return torch.tensor([d_polar, math.sin(d_azimuth), math.cos(d_azimuth), d_radius], dtype=torch.float32)


def relative_pose(source_camera, target_camera):
    """The pose (4,) of the target camera relative to the source one, both world-to-camera (3, 4)."""
    polar_s, azimuth_s, radius_s = spherical(camera_position(np.asarray(source_camera, np.float64)))
    polar_t, azimuth_t, radius_t = spherical(camera_position(np.asarray(target_camera, np.float64)))
    return pose_vector(polar_t - polar_s, azimuth_t - azimuth_s, radius_t - radius_s)


# ---------------------------------------------------------------------------------------------
# Opening a dataset from a spec string

DEFAULT_SHAPES_IMAGES = 10000


def split_top_level(spec, separator=","):
    """Split at separators outside {...}: 'a/{0..3}.tar,b.tar' -> ['a/{0..3}.tar', 'b.tar']."""
    parts, depth, current = [], 0, ""
    for char in spec:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == separator and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def expand_braces(pattern):
    """Shell-style brace expansion: 'x{1..3}' -> x1 x2 x3, '{08..10}' -> 08 09 10, '{a,b}' -> a b.

    Ranges keep zero padding (to the wider end, as bash does); groups expand left to right.
    """
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        width = max(len(lo), len(hi)) if lo.startswith("0") or hi.startswith("0") else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [str(n).zfill(width) for n in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        options = body.split(",")
    else:  # not a brace expression (e.g. a literal "{x}" in a file name)
        return [head + "{" + body + "}" + s for s in expand_braces(tail)]
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def resolve_paths(spec):
    """The files a spec names: comma lists, brace expansion, then globs (sorted per pattern)."""
    paths = []
    for part in split_top_level(spec):
        for pattern in expand_braces(os.path.expanduser(part.strip())):
            if re.search(r"[*?[]", pattern):
                matches = sorted(glob.glob(pattern))
                if not matches:
                    raise FileNotFoundError(f"no files match {pattern!r} (from data spec {spec!r})")
                paths.extend(matches)
            else:
                paths.append(pattern)
    return paths


def open_dataset(spec, image_size, seed=0):
    """The dataset a spec string names, with images of image_size x image_size.

    spec: "shapes" or "shapes:N" (N procedural images, default DEFAULT_SHAPES_IMAGES, drawn
    with `seed`); an image folder; or .tar shards as paths, globs, brace ranges and comma
    lists ("shards/{00000..01023}.tar"); or "cache:DIR", a feature cache of that image size.
    Raises FileNotFoundError / ValueError with one line naming the spec when it names nothing
    usable.
    """
    if spec.startswith("cache:"):
        return open_feature_cache(spec.partition(":")[2], image_size)
    if spec == "shapes" or spec.startswith("shapes:"):
        count = spec.partition(":")[2] or str(DEFAULT_SHAPES_IMAGES)
        if not count.isdigit() or int(count) == 0:
            raise ValueError(f"bad data spec {spec!r}: expected shapes:N with N a positive integer")
        return ShapesDataset(int(count), image_size, seed)
    paths = resolve_paths(spec)
    if len(paths) == 1 and os.path.isdir(paths[0]):
        return ImageFolder(paths[0], image_size)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise FileNotFoundError(f"data path not found: {missing[0]}{more} (from data spec {spec!r})")
    not_tar = [p for p in paths if not p.endswith(".tar")]
    if not_tar:
        raise ValueError(f"bad data spec {spec!r}: {not_tar[0]} is neither a folder nor a .tar shard")
    return TarShards(paths, image_size, spec=spec)


# ---------------------------------------------------------------------------------------------
# Sampling: which dataset item every rank reads at every step


def setup_distributed(timeout=None):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; plain `python` runs as a world of one. Idempotent.
    -> (rank, world size, device): this rank's GPU (NCCL), or the CPU (gloo) where there is none."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return rank, world_size, device


def epoch_permutation(num_items, seed, epoch):
    """The order (int64 array of dataset indices) in which epoch `epoch` visits the data."""
    return np.random.default_rng([seed, _SAMPLER_STREAM, epoch]).permutation(num_items)


class GlobalSampler(Sampler):
    """The rank-`rank` share of an endless stream of global batches, as (global_index, dataset_index).

    The stream: global sample g (0, 1, 2, ...) is dataset item perm_e[g % N] of epoch
    e = g // N, where perm_e = epoch_permutation(N, seed, e) (identity if shuffle=False);
    epochs follow each other without a gap, so a global batch may straddle two of them.
    The stream position is the number of global samples consumed so far; the checkpoint
    stores it, and a sampler built with start=position continues the stream exactly there.

    Layout: global batch k covers g in [start + k*G, start + (k+1)*G). Rank r takes the
    contiguous slice [r*G/W, (r+1)*G/W) of it, and the DataLoader cuts that slice into
    contiguous micro-batches for gradient accumulation. So the union over ranks of one step's
    items, in rank order, is exactly the global batch a single rank would see; the loop seeds
    per-sample randomness with g, which makes the result independent of W and accumulation.

    With `buckets` (an aspect-ratio bucket id per item), every global batch holds one bucket's
    items (bucket_batches): an epoch is then its whole batches, batches_per_epoch x G samples of
    the stream, and the stream position, the slices and the resume stay as above.

    It runs in the main process; DataLoader workers get whole micro-batches from it, so each
    worker reads a disjoint part. The DataLoader prefetches: the position to checkpoint is what
    the loop consumed (steps x G), not how far this iterator has run.
    """

    def __init__(self, num_items, global_batch_size, rank=0, world_size=1, seed=0, start=0,
                 shuffle=True, buckets=None):
        if num_items <= 0:
            raise ValueError(f"GlobalSampler needs a non-empty dataset, got {num_items} items")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if global_batch_size <= 0 or global_batch_size % world_size:
            raise ValueError(f"global batch size {global_batch_size} is not a positive multiple "
                             f"of the world size {world_size}")
        if start < 0 or seed < 0:
            raise ValueError(f"start ({start}) and seed ({seed}) must be >= 0")
        self.num_items, self.global_batch_size = num_items, global_batch_size
        self.rank, self.world_size, self.seed, self.start = rank, world_size, seed, start
        self.shuffle = shuffle
        self.per_rank = global_batch_size // world_size
        self._cached_epoch, self._cached_order = None, None
        self.buckets = None if buckets is None else np.asarray(buckets)
        if self.buckets is not None:
            if self.buckets.shape != (num_items,):
                raise ValueError(f"buckets: one per item expected, got shape {self.buckets.shape} for {num_items} items")
            _, sizes = np.unique(self.buckets, return_counts=True)
            self.batches_per_epoch = int((sizes // global_batch_size).sum())
            if self.batches_per_epoch == 0:
                raise ValueError(f"no aspect-ratio bucket holds a global batch of {global_batch_size} images "
                                 f"(the largest holds {sizes.max()}): lower the batch size or add images")

    def epoch_order(self, epoch):
        """The dataset indices of epoch `epoch` in stream order (cached: one epoch at a time)."""
        if epoch != self._cached_epoch:
            self._cached_epoch = epoch
            order = epoch_permutation(self.num_items, self.seed, epoch) if self.shuffle else np.arange(self.num_items)
            self._cached_order = order if self.buckets is None else self.bucket_batches(order).reshape(-1)
        return self._cached_order

    def bucket_batches(self, order):
        """(batches_per_epoch, G) dataset indices: walking `order`, each bucket fills global batches
        of its own items, and a batch takes its place in the stream when its last item is met
        (PixArt-alpha's aspect-ratio batches); a bucket's last partial batch waits for no one and is
        left out of the epoch."""
        G, batches, completed = self.global_batch_size, [], []
        for bucket in np.unique(self.buckets):
            positions = np.flatnonzero(self.buckets[order] == bucket)
            full = len(positions) // G * G
            batches.append(order[positions[:full]].reshape(-1, G))
            completed.append(positions[G - 1:full:G])
        return np.concatenate(batches)[np.argsort(np.concatenate(completed), kind="stable")]

    def dataset_index(self, global_index):
        """The dataset item at position global_index of the stream."""
        per_epoch = self.num_items if self.buckets is None else self.batches_per_epoch * self.global_batch_size
        epoch, offset = divmod(global_index, per_epoch)
        if not self.shuffle and self.buckets is None:
            return offset
        return int(self.epoch_order(epoch)[offset])

    def __iter__(self):
        batch_start = self.start
        while True:
            first = batch_start + self.rank * self.per_rank
            for global_index in range(first, first + self.per_rank):
                yield global_index, self.dataset_index(global_index)
            batch_start += self.global_batch_size


class WithGlobalIndex(Dataset):
    """Wraps a dataset to be indexed by GlobalSampler's (global_index, dataset_index) pairs;
    items gain "global_index". A dataset that draws part of an item per sample (the NVS sets:
    the source view) defines `item(dataset_index, global_index)`, used here in place of
    `dataset[dataset_index]`: the draw then follows the stream position, whichever rank or
    worker reads it."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        global_index, dataset_index = key
        item = getattr(self.dataset, "item", None)
        sample = item(dataset_index, global_index) if item else self.dataset[dataset_index]
        return {**sample, "global_index": global_index}


def collate_samples(items, per_sample=None):
    """List of item dicts -> batch dict: tensors stacked ("image": (B, 3, S, S)), ints as int64
    tensors ("index", "global_index"), "skipped" concatenated into one list of names, anything
    else ("caption", "name", "attrs") as a list; plus per_sample(batch) if given."""
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if key == "skipped":
            batch[key] = [name for names in values for name in names]
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], int):
            batch[key] = torch.tensor(values, dtype=torch.int64)
        else:
            batch[key] = values
    if per_sample is not None:
        batch.update(per_sample(batch))
    return batch


def make_loader(dataset, global_batch_size, micro_batch_size, rank=0, world_size=1, seed=0,
                start=0, shuffle=True, num_workers=0, per_sample=None, buckets=None):
    """An endless DataLoader of this rank's micro-batches (dicts from `collate_samples`), from
    stream position `start`; see GlobalSampler for the layout. `per_sample(batch)` ->
    dict of tensors, if given, is added to each batch in the loader's workers, beside the data
    (the training loop's per-sample randomness), and pinned with it for the copy to the GPU.
    `buckets`: an aspect-ratio bucket id per item, for batches of one bucket each (GlobalSampler)."""
    sampler = GlobalSampler(len(dataset), global_batch_size, rank, world_size, seed, start, shuffle, buckets)
    if micro_batch_size <= 0 or sampler.per_rank % micro_batch_size:
        raise ValueError(f"micro batch size {micro_batch_size} does not divide the per-rank batch "
                         f"{sampler.per_rank} (global {global_batch_size} / world {world_size})")
    return DataLoader(WithGlobalIndex(dataset), batch_size=micro_batch_size, sampler=sampler,
                      num_workers=num_workers, collate_fn=partial(collate_samples, per_sample=per_sample),
                      persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())


# ---------------------------------------------------------------------------------------------
# The feature cache: the frozen encoders run once over a dataset, the training loop reads their
# outputs instead of images (`--data cache:DIR`).
#
# DIR/cache.json holds the settings it was made with and the format; DIR/shard_00000.safetensors,
# ... hold `shard_size` consecutive items each, as tensors
#     "latent_mean"    (n, 2, C, h, w) float16: the VAE posterior mean of the image [0] and of its
#                      mirror image [1] (the loop flips per sample and the VAE does not commute
#                      with flips), in raw latent units
#     "latent_logvar"  (n, 2, C, h, w) float16: the posterior's log-variance, 2 log std
#     "cond"           (n, 2, D) float16: the L2-normalised CLS of the image encoder (DINO) of the
#                      same two images, so that the condition is always of the target's image
#     "patch_tokens"   (n, 2, N, D) float16, in a cache made with --patch-tokens: the encoder's N
#                      L2-normalised patch tokens of the two images, for --condition patch|all and
#                      REPA (ViT-B/16 at 224 px: 196 x 768 x 2 bytes = 294 KiB per mirror image)
#     "index"          (n,) int64: dataset indices, to extend the cache later (T5)
# and, as JSON lists in the safetensors metadata, "caption", "name" (source file) and "skipped"
# (bad files passed over). FeatureCache hands out float32 (mean, std = exp(logvar / 2), cond and
# patch_tokens).
#
# Why these 16-bit formats (format 2; format 1 stored float32, 70 KiB an item at 256 px, now 35):
# the std itself underflows in fp16: the SD-VAE clamps the log-variance to [-30, 20], so the std
# goes down to exp(-15) = 3e-7, below fp16's normal range (6e-5); the log-variance, within
# [-30, 20], fp16 holds to 2^-7 (half its spacing there), which moves the std by at most
# exp(2^-8) - 1 = 0.39 % (0.2 % for |logvar| < 16). fp16, not bf16, for the mean and tokens: raw SD
# latents are O(10), far inside fp16's range (65504), and fp16 rounds them to 2^-11 relative, bf16
# to 2^-8 (0.4 %), as much as the smallest noise the diffusion adds (std 0.01 at t = 0); unit-length
# tokens have entries within [-1, 1], which fp16 holds to 2^-11 absolute. So a training
# target x0 = (mean + std * noise) * scale moves by at most
#     scale * (2^-11 |mean| + 2^-25 + 0.0039 std |noise|)
# (2^-25: fp16 rounding below 6e-5); `python bench.py cache-size` checks it numerically.
# A mean beyond fp16's range stops the writer rather than being stored as inf.

CACHE_INFO = "cache.json"
CACHE_FORMAT = 2  # 16-bit posterior and condition; format 1 (float32) wrote no "format" to cache.json
CACHE_FEATURES = ("latent_mean", "latent_logvar", "cond", "patch_tokens")  # per item; patch_tokens if stored
CACHE_TEXT = ("caption", "name", "skipped")
FP16_MAX = torch.finfo(torch.float16).max


def compact_features(mean, std, cond, patch_tokens=None):
    """float32 VAE posterior (mean, std), image-encoder CLS and optional patch tokens -> the cache's
    16-bit tensors (see above)."""
    stored = {"latent_mean": mean.float().half(), "latent_logvar": (2 * std.float().log()).half(),
              "cond": cond.float().half()}
    return stored if patch_tokens is None else {**stored, "patch_tokens": patch_tokens.float().half()}


def expand_features(stored):
    """The cache's 16-bit tensors -> float32 "latent_mean", "latent_std", "cond" (and "patch_tokens"),
    as training reads them."""
    tokens = {key: stored[key].float() for key in ("cond", "patch_tokens") if key in stored}
    return {"latent_mean": stored["latent_mean"].float(),
            "latent_std": torch.exp(0.5 * stored["latent_logvar"].float()), **tokens}


def cache_item_bytes(latent_shape, cond_dim, cache_format=CACHE_FORMAT, patches=0):
    """Tensor bytes one item takes in a cache of `cache_format` (captions and names come on top):
    two mirror images' posteriors (mean and std or log-variance, each of latent_shape (C, h, w)),
    CLS features (cond_dim) and `patches` patch tokens (--patch-tokens), 4 bytes each in format 1,
    2 in format 2; and the int64 index."""
    value_bytes = {1: 4, 2: 2}[cache_format]
    return 2 * (2 * math.prod(latent_shape) + (1 + patches) * cond_dim) * value_bytes + 8


def check_cache_format(root, info):
    """An error naming `root` unless its cache.json says CACHE_FORMAT: older caches must be rebuilt."""
    found = info.get("format", 1)
    if found != CACHE_FORMAT:
        raise ValueError(f"feature cache {root} is in format {found} (made by an older data.py; this one reads "
                         f"format {CACHE_FORMAT}, 16-bit); write it anew with `python data.py cache` into another folder")


def cache_shard_path(root, shard):
    return os.path.join(root, f"shard_{shard:05d}.safetensors")


def read_cache_info(root, name=CACHE_INFO):
    """The settings in root/cache.json (or root/`name`), or None when there is no such file."""
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


@torch.no_grad()
def encode_for_cache(dataset, indices, vae, encoder, batch_size=32, num_workers=0, patch_tokens=False):
    """The cache tensors of dataset[indices] (see above) and their text metadata (JSON strings). An
    AspectRatioBuckets dataset is encoded bucket by bucket, each bucket's tensors under KEY@BUCKET
    with its "img_hw", and "layout" giving each item's [bucket, row] in index order."""
    buckets = getattr(dataset, "buckets", None)
    if buckets is None:
        tensors, text = _encode_items(dataset, indices, vae, encoder, batch_size, num_workers, patch_tokens)
        return tensors, {key: json.dumps(values) for key, values in text.items()}
    indices, tensors, layout = list(indices), {}, {}
    text = {"caption": {}, "name": {}, "skipped": []}
    for bucket in np.unique(buckets[indices]).tolist():
        key, members = dataset.keys[bucket], [i for i in indices if buckets[i] == bucket]
        group, group_text = _encode_items(dataset, members, vae, encoder, batch_size, num_workers, patch_tokens)
        tensors.update({f"{name}@{key}": value for name, value in group.items()})
        for row, i in enumerate(members):
            layout[i] = [key, row]
            text["caption"][i], text["name"][i] = group_text["caption"][row], group_text["name"][row]
        text["skipped"] += group_text["skipped"]
    text = {"caption": [text["caption"][i] for i in indices], "name": [text["name"][i] for i in indices],
            "skipped": text["skipped"], "layout": [layout[i] for i in indices]}
    return tensors, {key: json.dumps(values) for key, values in text.items()}


def _encode_items(dataset, indices, vae, encoder, batch_size, num_workers, patch_tokens):
    """(stacked cache tensors, text lists) of dataset[indices], which share one image size."""
    from encoders import image_features  # only the cache runs the encoders
    device = next(vae.parameters()).device
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate_samples)
    tensors, text = collections.defaultdict(list), collections.defaultdict(list)
    for batch in loader:
        images = batch["image"].to(device)
        both = torch.cat([images, images.flip(-1)])  # the images, then their mirror images
        stored = compact_features(*vae.encode(both), **image_features(encoder, both, patch_tokens))
        beyond = ~torch.isfinite(stored["latent_mean"]).flatten(1).all(1)
        if beyond.any():
            bad = batch["index"][beyond.chunk(2)[0] | beyond.chunk(2)[1]].tolist()
            raise ValueError(f"dataset items {bad}: a VAE posterior mean beyond fp16's range (+-{FP16_MAX:.0f}), "
                             f"which the feature cache stores in fp16; check the --vae weights")
        for key, value in stored.items():
            tensors[key].append(torch.stack(value.chunk(2), dim=1).cpu())
        tensors["index"].append(batch["index"])
        if "img_hw" in batch:
            tensors["img_hw"].append(batch["img_hw"])
        for key in CACHE_TEXT:
            text[key] += batch[key]
    return {key: torch.cat(values).contiguous() for key, values in tensors.items()}, dict(text)


def print_line(line):
    """Print `line` in one write: the ranks share stdout, and print() writes the newline apart."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def write_feature_cache(dataset, root, vae, encoder, settings, shard_size=10000, batch_size=32,
                        num_workers=0, log=print_line):
    """Encode `dataset` into the shards of a feature cache at `root`; every rank of an initialised
    process group calls this and writes its own share of the shards.

    Each shard goes to a temporary name and is renamed once complete, so a restart (with any
    number of ranks) skips the finished ones; rank 0 lists the missing shards before anyone
    writes and every rank takes every world_size-th of that list, so no two ranks write the same
    shard. `settings` (data spec, image size, encoder repos, "patch_tokens": True to store them) go
    to cache.json: writing into a cache made with other settings is an error. Returns the shards
    this rank wrote.
    """
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    settings = {**settings, "num_items": len(dataset), "shard_size": shard_size, "format": CACHE_FORMAT}
    existing = read_cache_info(root)
    if existing is not None:
        check_cache_format(root, existing)
    if existing is not None and existing != settings:
        changed = [f"{k}: {existing.get(k)!r} -> {v!r}" for k, v in settings.items() if existing.get(k) != v]
        raise ValueError(f"{root} holds a feature cache made with other settings ({'; '.join(changed)}); "
                         "pass the same arguments to finish it, or another --out")
    num_shards = -(-len(dataset) // shard_size)
    missing = None
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        if existing is None:
            write_json_atomically(os.path.join(root, CACHE_INFO), settings)
        missing = [k for k in range(num_shards) if not os.path.exists(cache_shard_path(root, k))]
    if dist.is_initialized():
        shared = [missing]
        dist.broadcast_object_list(shared, src=0)
        missing = shared[0]
    written = []
    for shard in missing[rank::world_size]:
        indices = range(shard * shard_size, min((shard + 1) * shard_size, len(dataset)))
        tensors, text = encode_for_cache(dataset, indices, vae, encoder, batch_size, num_workers,
                                         settings.get("patch_tokens", False))
        path = cache_shard_path(root, shard)
        save_file(tensors, path + ".tmp", metadata=text)
        os.replace(path + ".tmp", path)
        written.append(shard)
        skipped = json.loads(text["skipped"])
        log(f"rank {rank}: wrote {path} ({len(indices)} items" +
            (f"; skipped bad files: {', '.join(skipped)})" if skipped else ")"))
    return written


def write_atomically(path, payload, suffix=".tmp"):
    """Write bytes to `path` through `path + suffix`, synced, then renamed: a reader sees the old
    file or the whole new one, never a part (each writer of a shared folder passes its own suffix)."""
    with open(path + suffix, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + suffix, path)


def write_json_atomically(path, value, suffix=".tmp"):
    write_atomically(path, json.dumps(value, indent=1).encode(), suffix)


class FeatureCache(Dataset):
    """A complete feature cache (`python data.py cache`) as a dataset. Item i:

        {"latent_mean", "latent_std": float32 (2, C, h, w), [unflipped, flipped] VAE posterior,
         "cond": float32 (2, D), [unflipped, flipped] image-encoder CLS (all stored in 16 bits: see above),
         "patch_tokens": float32 (2, N, D), their patch tokens, in a cache made with --patch-tokens,
         "caption": str, "index": i, "name": its source file,
         "skipped": [] (bad files were reported when the cache was written)}

    Rows are read one at a time from the memory-mapped shards: no process holds a whole shard.
    Each process opens the shards lazily (pickling drops the handles, as for TarShards).
    """

    def __init__(self, root):
        self.root = os.path.abspath(root)
        self.info = read_cache_info(root)
        if self.info is None:
            raise FileNotFoundError(f"no feature cache at {root} (no {CACHE_INFO}); write one with "
                                    f"`python data.py cache --data SPEC --out {root} --vae ... --encoder ...`")
        check_cache_format(root, self.info)
        num_shards = -(-self.info["num_items"] // self.info["shard_size"])
        missing = [cache_shard_path(root, k) for k in range(num_shards)
                   if not os.path.isfile(cache_shard_path(root, k))]
        if missing:
            raise FileNotFoundError(f"feature cache {root} is incomplete: {len(missing)} of {num_shards} shards "
                                    f"missing, e.g. {missing[0]}; rerun `python data.py cache` with the same "
                                    "arguments to finish it")
        self._shards = {}
        self.image_size = self.info["image_size"]
        if self.info.get("multi_scale"):  # made of AspectRatioBuckets: item i is row _rows[i] of its bucket
            self.keys = list(aspect_ratio_buckets(self.image_size))
            layout = [entry for k in range(num_shards) for entry in self._open(k)[1]["layout"]]
            self.buckets = np.array([self.keys.index(key) for key, _ in layout], dtype=np.int64)
            self._rows = np.array([row for _, row in layout], dtype=np.int64)
        first = self._open(0)[0]
        shapes = {key.split("@")[0]: first.get_slice(key).get_shape() for key in first.keys()}  # a bucket's will do
        self._tensors = [name for name in CACHE_FEATURES if name in shapes]
        self.cond_dim = shapes["cond"][-1]
        self.patches = shapes["patch_tokens"][2] if "patch_tokens" in shapes else 0  # N; 0: none stored

    def __len__(self):
        return self.info["num_items"]

    def __repr__(self):
        return f"FeatureCache({self.root!r}, {len(self)} items of {self.info['data']!r} at {self.image_size} px)"

    def __getstate__(self):
        return {**self.__dict__, "_shards": {}}

    def _open(self, shard):
        """(safe_open handle, {"caption": [...], "name": [...]}) of a shard, opened once per process."""
        if shard not in self._shards:
            handle = safe_open(cache_shard_path(self.root, shard), framework="pt")
            metadata = handle.metadata()
            self._shards[shard] = handle, {key: json.loads(metadata[key]) for key in ("caption", "name", "layout")
                                           if key in metadata}
        return self._shards[shard]

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range [0, {len(self)}) of {self!r}")
        shard, position = divmod(i, self.info["shard_size"])
        handle, text = self._open(shard)
        suffix, row, sizes = "", position, {}
        if self.info.get("multi_scale"):
            key, row = self.keys[self.buckets[i]], int(self._rows[i])
            suffix, sizes = f"@{key}", {"img_hw": handle.get_slice(f"img_hw@{key}")[row],
                                        "aspect_ratio": torch.tensor([float(key)])}
        item = expand_features({key: handle.get_slice(key + suffix)[row] for key in self._tensors})
        return {**item, **sizes, "caption": text["caption"][position], "index": int(i),
                "name": text["name"][position], "skipped": []}


def open_feature_cache(root, image_size):
    cache = FeatureCache(root)
    if cache.image_size != image_size:
        raise ValueError(f"feature cache {root} holds {cache.image_size} px features, not {image_size} px: "
                         f"pass --image-size {cache.image_size}")
    return cache


# ---------------------------------------------------------------------------------------------
# Command line


def show(args):
    """Write a grid of the first --n items and print their captions."""
    from torchvision.utils import save_image

    dataset = open_dataset(args.spec, args.image_size, args.seed)
    items = [dataset[i] for i in range(args.first, min(args.first + args.n, len(dataset)))]
    if not items:
        raise ValueError(f"--first {args.first} is past the end of {dataset!r}")
    columns = max(1, round(len(items) ** 0.5))
    save_image(torch.stack([it["image"] for it in items]) * 0.5 + 0.5, args.out, nrow=columns,
               padding=2)
    print(f"{dataset!r}: wrote {len(items)} images to {args.out} ({columns} per row)")
    for k, item in enumerate(items):
        print(f"{k:3d} [{item['index']}] {item['name']}: {item['caption']!r}")
        for name in item["skipped"]:
            print(f"    skipped bad file {name}")


def stats(args):
    """Read --limit items (0: all) through a DataLoader; report bad files, captions and speed."""
    dataset = open_dataset(args.spec, args.image_size, args.seed)
    count = len(dataset) if args.limit == 0 else min(args.limit, len(dataset))
    loader = make_loader(dataset, args.batch_size, args.batch_size, shuffle=False,
                         num_workers=args.workers)
    bad, captioned, seen, started = set(), 0, 0, time.perf_counter()
    for batch in loader:
        take = min(len(batch["caption"]), count - seen)
        captioned += sum(bool(c) for c in batch["caption"][:take])
        bad.update(batch["skipped"])
        seen += take
        if seen >= count:
            break
    seconds = time.perf_counter() - started
    print(f"{dataset!r}\nread {seen} items at {args.image_size} px in {seconds:.1f} s "
          f"({seen / seconds:.0f} images/s, {args.workers} workers)\n"
          f"captions: {captioned}/{seen} non-empty\nbad files: {len(bad)}")
    for name in sorted(bad):
        print(f"  {name}")


def cache(args):
    """Write the feature cache of --data to --out; under torchrun the ranks split the shards."""
    from encoders import VAE, load_image_encoder  # only this command needs the encoders

    if args.data.startswith("cache:"):
        raise ValueError(f"--data {args.data} is a feature cache already; pass the images it came from")
    if args.shard_size <= 0 or args.batch_size <= 0:
        raise ValueError(f"--shard-size ({args.shard_size}) and --batch-size ({args.batch_size}) must be positive")
    dataset = open_dataset(args.data, args.image_size, args.seed)
    dataset = AspectRatioBuckets(dataset, args.image_size) if args.multi_scale else dataset
    # Long timeout: at the final barrier a rank may wait for another's last shard.
    device = setup_distributed(timeout=datetime.timedelta(hours=12))[2]
    vae, encoder = VAE.from_pretrained(args.vae).to(device), load_image_encoder(args.encoder, args.image_size, device)
    settings = {"data": args.data, "seed": args.seed, "image_size": args.image_size, "vae": args.vae,
                "encoder": args.encoder, **({"multi_scale": True} if args.multi_scale else {}),
                **({"patch_tokens": True} if args.patch_tokens else {})}
    try:
        started = time.perf_counter()
        write_feature_cache(dataset, args.out, vae, encoder, settings, args.shard_size,
                                      args.batch_size, args.workers)
        if dist.is_initialized():
            dist.barrier()
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"{FeatureCache(args.out)!r} complete after {time.perf_counter() - started:.0f} s")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def index(args):
    """(Re)build the tar index of --spec's shards, replacing one that is there."""
    paths = resolve_paths(args.spec)
    not_tar = [p for p in paths if not (p.endswith(".tar") and os.path.isfile(p))]
    if not_tar:
        raise ValueError(f"{not_tar[0]} (from {args.spec!r}) is not a .tar file: the index is of tar shards")
    folder, started = tar_index_folder(paths, args.index), time.perf_counter()
    info = build_tar_index(paths, folder, args.workers, args.spec, replace=True)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    print(f"indexed {info['num_items']} images of {len(paths)} shards in {time.perf_counter() - started:.1f} s "
          f"into {folder} ({size / max(1, info['num_items']):.0f} bytes an image)"
          + (f"; train with {TAR_INDEX_ENV}={args.index}" if args.index else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def add_command(name, function, help_text):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("spec", help="a folder; tar shards (paths, globs, {a..b}, commas); "
                                           "shapes[:N]")
        command.add_argument("--image-size", type=int, default=64)
        command.add_argument("--seed", type=int, default=0, help="seed of the shapes set")
        command.set_defaults(function=function)
        return command

    show_command = add_command("show", show, "write a PNG grid of samples, print their captions")
    show_command.add_argument("--n", type=int, default=16, help="number of images")
    show_command.add_argument("--first", type=int, default=0, help="index of the first image")
    show_command.add_argument("--out", default="samples.png")
    stats_command = add_command("stats", stats, "read a dataset: bad files, captions, images/s")
    stats_command.add_argument("--limit", type=int, default=1000, help="items to read, 0 = all")
    stats_command.add_argument("--batch-size", type=int, default=64)
    stats_command.add_argument("--workers", type=int, default=0)
    cache_command = commands.add_parser("cache", help="run the frozen VAE and DINO once over a dataset")
    cache_command.add_argument("--data", required=True, help="the images: a folder, tar shards, shapes[:N]")
    cache_command.add_argument("--out", required=True, help="the cache folder (train with --data cache:DIR)")
    cache_command.add_argument("--vae", required=True, help="SD-VAE repo or folder")
    cache_command.add_argument("--encoder", required=True, help="image encoder (as train_i2i.py's --encoder)")
    cache_command.add_argument("--patch-tokens", action="store_true",
                               help="store the encoder's patch tokens too (train_i2i.py --condition patch|all, "
                                    "--repa-weight)")
    cache_command.add_argument("--image-size", type=int, default=256)
    cache_command.add_argument("--shard-size", type=int, default=10000, help="items per shard")
    cache_command.add_argument("--batch-size", type=int, default=32)
    cache_command.add_argument("--workers", type=int, default=4, help="data loader workers")
    cache_command.add_argument("--seed", type=int, default=0, help="seed of the shapes set")
    cache_command.add_argument("--multi-scale", action="store_true",
                               help="each image at its aspect-ratio bucket (train_t2i.py --multi-scale)")
    cache_command.set_defaults(function=cache)
    index_command = commands.add_parser("index", help="scan tar shards once into the index every "
                                                      "process memory-maps")
    index_command.add_argument("spec", help="the tar shards, as training's --data names them")
    index_command.add_argument("--index", metavar="DIR", help="where to write it (default: the folder "
                               f"of the first shard); train with {TAR_INDEX_ENV}=DIR then")
    index_command.add_argument("--workers", type=int, default=os.cpu_count(), help="scanning processes")
    index_command.set_defaults(function=index)
    encoder_command = commands.add_parser("shapes-encoder", help="train the offline default's condition encoder "
                                                                 "(encoders.SHAPES_VIT) on unlabeled shapes images")
    encoder_command.add_argument("--out", default="assets/shapes_vit.safetensors")
    encoder_command.add_argument("--steps", type=int, default=2500)
    encoder_command.add_argument("--batch-size", type=int, default=128)
    encoder_command.add_argument("--lr", type=float, default=1e-3)
    encoder_command.add_argument("--seed", type=int, default=0, help="seed of the shapes set and of the weights")
    encoder_command.set_defaults(function=lambda args: train_shapes_encoder(
        args.out, args.steps, args.batch_size, args.lr, args.seed))
    args = parser.parse_args(argv)
    try:
        args.function(args)
    except (FileNotFoundError, ValueError) as error:  # TooManyBadFiles is a ValueError too
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
