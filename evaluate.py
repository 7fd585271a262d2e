"""Evaluation metrics, computed as the literature computes them, in plain PyTorch/numpy.

    FID            Frechet distance of Inception pool3 features (the 2015-12-05 TensorFlow Inception
                   that pytorch-fid and the ADM evaluator use, rebuilt here as `FIDInception`)
    FD-DINOv2      the same distance in DINOv2 ViT-L/14 CLS features (dgm-eval's preprocessing)
    IS             Inception Score from the same network's 1008-way classifier, 10 splits
    precision,     Kynkaanniemi et al. 2019: k = 3 nearest-neighbour balls around each feature
    recall
    PSNR, SSIM     per image, on images in [0, 1]; SSIM as scikit-image's default
    LPIPS          v0.1 (AlexNet or VGG16), from the `lpips` package's linear weights and a torchvision
                   backbone file
    shapes         a deterministic detector of the `shapes` set's attributes: how often generated images
                   show what their caption asks for (a miniature GenEval), how far the attribute
                   distributions of generated and real images are apart, and the I2I agreement of
                   samples with their references; a linear probe of the attributes in a condition

Images go in as uint8 (H, W, 3) arrays: a (N, H, W, 3) array, an `.npz` holding one as `arr_0` (the
ADM evaluator's format), or a folder (recursive, sorted by path). Reference statistics can also be a
saved `.npz` with `mu` and `sigma` (pytorch-fid's and ADM's files; `save_statistics` writes them).

Command line (one JSON result on stdout):
    python evaluate.py fid --real DIR|NPZ --fake DIR|NPZ [--inception PATH]
    python evaluate.py fd-dinov2 --real DIR|NPZ --fake DIR|NPZ [--dinov2 REPO_OR_DIR]
    python evaluate.py inception-score --images DIR|NPZ
    python evaluate.py precision-recall --real DIR|NPZ --fake DIR|NPZ [--features inception|dinov2]
    python evaluate.py stats --images DIR|NPZ --out STATS.npz [--features inception|dinov2]
    python evaluate.py nvs --pred DIR|NPZ --target DIR|NPZ [--lpips-linear alex.pth --lpips-backbone PATH]
    python evaluate.py shapes --images DIR|NPZ [--captions FILE] [--real DIR|NPZ|shapes:N]
    python evaluate.py shapes-probe --encoder shapes-vit|random-vit|REPO   # what a condition holds
    torchrun --nproc_per_node 8 evaluate.py coco-fid --annotations captions_val2014.json \\
        --images val2014/ --ckpt runs/t2i/ema.safetensors        # MS-COCO FID-30K, one command
"""

import argparse
import collections
import contextlib
import hashlib
import json
import math
import os
import pathlib
import pickle
import re
import shlex
import sys
import urllib.error
import urllib.request
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.ops import FrozenBatchNorm2d
from tqdm import tqdm

from data import (
    COLORS, IMAGE_EXTENSIONS, POSITIONS, SHAPES, SIZES, center_crop_arr, render_shape, sample_shape_attrs,
    shape_outline, to_rgb,
)
import sample
from encoders import IMAGENET_MEAN, IMAGENET_STD, ViTEncoder, load_image_encoder, load_into


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def full_float32():
    """A context without TF32 convolutions: features in true float32, as the TensorFlow reference
    computes them (PyTorch lets cuDNN round convolution inputs to TF32 by default on recent GPUs)."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------------------------
# Images in: a uint8 (N, H, W, 3) array, an .npz holding one, or a folder of image files.
# ----------------------------------------------------------------------------------------------


class FolderImages:
    """The images under `root` (recursive, sorted by relative path, hidden files skipped), read one at a
    time as uint8 (H, W, 3) arrays; a sequence like the arrays it stands in for."""

    def __init__(self, root):
        self.root = pathlib.Path(root)
        self.paths = sorted(
            path for path in self.root.rglob("*")
            if path.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in path.relative_to(self.root).parts)
        )
        if not self.paths:
            raise FileNotFoundError(f"{root}: no {'/'.join(IMAGE_EXTENSIONS)} images in this folder")

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            with Image.open(self.paths[index]) as image:
                return np.asarray(to_rgb(image))
        except OSError as err:  # PIL's UnidentifiedImageError, truncated files
            raise ValueError(f"{self.paths[index]}: not a readable image ({err})") from None


def _check_image_array(images, source):
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"{source}: expected uint8 images (N, H, W, 3), got {images.dtype} {tuple(images.shape)}"
        )
    return images


def load_images(path):
    """A folder of images, or an .npz whose `arr_0` is uint8 (N, H, W, 3) -> a sequence of uint8 (H, W, 3)."""
    path = pathlib.Path(path)
    if path.is_dir():
        return FolderImages(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such folder or .npz file of images")
    if path.suffix != ".npz":
        raise ValueError(f"{path}: expected a folder of images or an .npz with `arr_0` (uint8 N x H x W x 3)")
    with np.load(path) as npz:
        if "arr_0" not in npz:
            raise ValueError(f"{path}: no `arr_0` array of images in this .npz (it has: {', '.join(npz.files)})")
        return _check_image_array(npz["arr_0"], path)


def _batches(images, batch_size):
    """Lists of at most `batch_size` uint8 (H, W, 3) arrays, in order."""
    for start in tqdm(range(0, len(images), batch_size), unit="batch", leave=False, disable=None):
        batch = [np.asarray(images[i]) for i in range(start, min(start + batch_size, len(images)))]
        for image in batch:
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"images must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        yield batch


def _unit_tensor(image):
    """uint8 (H, W, 3) array -> float32 tensor (1, 3, H, W) in [0, 1]."""
    pixels = torch.from_numpy(np.array(image))  # a copy: arrays from PIL and np.load can be read-only
    return pixels.permute(2, 0, 1)[None].float() / 255


def _unit_batches(batch):
    """A list of uint8 (H, W, 3) images -> (B, 3, H, W) tensors in [0, 1]: one for images of one size,
    one per image when sizes differ (a folder of mixed sizes)."""
    if len({image.shape for image in batch}) == 1:
        return [torch.cat([_unit_tensor(image) for image in batch])]
    return [_unit_tensor(image) for image in batch]


# ----------------------------------------------------------------------------------------------
# Frechet distance between Gaussians fitted to features.
# ----------------------------------------------------------------------------------------------


def feature_statistics(features):
    """features (N, D) -> mean (D,) and covariance (D, D) in float64, covariance with ddof = 1 as pytorch-fid."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need at least 2 feature vectors (N, D) for a covariance, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix):
    """Symmetric square root of a symmetric positive semi-definite matrix; round-off negatives clipped to 0."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(eigenvalues.clip(min=0))) @ eigenvectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64, as a Python float.

    S1 S2 and sqrt(S1) S2 sqrt(S1) have the same eigenvalues (AB and BA always do), and the second is
    symmetric positive semi-definite: tr((S1 S2)^(1/2)) is the sum of the square roots of its
    eigenvalues. This needs no general matrix square root: no complex round-off and no diagonal
    offset for singular covariances, which scipy's sqrtm (used by pytorch-fid) needs.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} and {mu2.shape}, sigma {sigma1.shape} and {sigma2.shape}"
        )
    sqrt_sigma1 = _psd_sqrt(sigma1)
    product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)  # symmetrised against round-off
    trace_sqrt_product = np.sqrt(eigenvalues.clip(min=0)).sum()
    mean_term = np.sum((mu1 - mu2) ** 2)
    return float(mean_term + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product)


# Which features a saved statistics file describes. Files without the name (pytorch-fid's, ADM's
# reference batches) hold Inception pool3 statistics.
INCEPTION_FEATURES = "inception-pool3"
DINOV2_FEATURES = "dinov2-cls"


def save_statistics(path, mu, sigma, feature_name):
    """Write mu, sigma and the name of the features they describe (INCEPTION_FEATURES, ...) to an .npz."""
    np.savez(path, mu=mu, sigma=sigma, feature_name=np.array(feature_name))


def load_statistics(path, feature_name):
    """(mu, sigma) from an .npz holding `mu` and `sigma` of the features `feature_name` names; None when
    `path` is not such a file."""
    path = pathlib.Path(path)
    if path.suffix != ".npz" or not path.is_file():
        return None
    with np.load(path) as npz:
        if "mu" not in npz or "sigma" not in npz:
            return None
        saved_name = str(npz["feature_name"]) if "feature_name" in npz else INCEPTION_FEATURES
        if saved_name != feature_name:
            raise ValueError(f"{path}: holds statistics of {saved_name} features, not {feature_name}")
        return npz["mu"], npz["sigma"]


def statistics(source, feature_name, extract):
    """(mu, sigma) of `source`: saved statistics (.npz with mu, sigma), a folder or .npz of images, or a
    sequence of uint8 (H, W, 3) images. `extract(images) -> (N, D)` computes the features of images."""
    if isinstance(source, (str, os.PathLike)):
        saved = load_statistics(source, feature_name)
        if saved is not None:
            return saved
        source = load_images(source)
    return feature_statistics(extract(source))


# ----------------------------------------------------------------------------------------------
# The FID Inception network: TensorFlow's 2015-12-05 Inception v3 as ported by pytorch-fid.
# It differs from torchvision's Inception v3 in its weights, a 1008-way classifier, average pools
# that do not count padding (TensorFlow's), and a max pool in the last block's pooling branch.
# Module names follow torchvision's Inception3, the layout of the weights file.
# ----------------------------------------------------------------------------------------------

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)


class ConvBN(nn.Module):
    """Convolution without bias, BatchNorm with frozen statistics (eps 1e-3), ReLU: every layer of the network."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = FrozenBatchNorm2d(out_channels, eps=1e-3)

    def forward(self, x):
        """x (B, C_in, H, W) -> (B, C_out, H', W')."""
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    """3x3 average pool, stride 1, whose border averages leave the padding out, as TensorFlow's."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35 x 35 block: 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, in_channels, pool_channels):
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_channels, 1)

    def forward(self, x):
        """x (B, C_in, H, W) -> (B, 224 + pool_channels, H, W)."""
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction: strided 3x3, strided double 3x3 and max-pool branches."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        """x (B, C_in, H, W) -> (B, 480 + C_in, (H - 3) / 2 + 1, (W - 3) / 2 + 1)."""
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), branch3x3dbl, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """17 x 17 block: 1x1, factorised 7x7, factorised double 7x7 and pooled branches."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x):
        """x (B, C_in, H, W) -> (B, 768, H, W)."""
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """17 -> 8 reduction: strided 3x3, strided 7x7-then-3x3 and max-pool branches."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        """x (B, C_in, H, W) -> (B, 512 + C_in, (H - 3) / 2 + 1, (W - 3) / 2 + 1)."""
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = layer(branch7x7x3)
        return torch.cat([branch3x3, branch7x7x3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8 x 8 block: 1x1, 3x3 split into 1x3 + 3x1, double 3x3 split likewise, and pooled branches.

    `max_pool`: the pooling branch max-pools instead of averaging. The FID network does this in its
    last block (Mixed_7c), a quirk of the TensorFlow graph that FID scores depend on.
    """

    def __init__(self, in_channels, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x):
        """x (B, C_in, H, W) -> (B, 2048, H, W)."""
        branch3x3 = self.branch3x3_1(x)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3),
            self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl),
            self.branch_pool(pooled),
        ], 1)


class FIDInception(nn.Module):
    """The Inception v3 of FID and IS. Load its weights with `load_fid_inception`."""

    INPUT_SIZE = 299  # the resolution the network was trained at and FID is defined at

    def __init__(self):
        super().__init__()
        # CamelCase attribute names: they are the keys of the published weights file.
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_channels=32)
        self.Mixed_5c = InceptionA(256, pool_channels=64)
        self.Mixed_5d = InceptionA(288, pool_channels=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)
        self.eval().requires_grad_(False)

    def forward(self, images):
        """images (B, 3, H, W) in [0, 1], any size -> pool3 features (B, 2048) and the classifier's
        logits without its bias (B, 1008): the original Inception Score code leaves `fc.bias` out.

        Resized to 299 x 299 bilinearly (no antialiasing) and scaled to [-1, 1], as pytorch-fid does.
        """
        x = F.interpolate(images, size=(self.INPUT_SIZE, self.INPUT_SIZE), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(2 * x - 1)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)  # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool3 = x.mean(dim=(2, 3))  # (B, 2048)
        return pool3, pool3 @ self.fc.weight.T


def _hash_prefix(filename):
    """The sha256 prefix in a torch.hub-style file name ('name-6726825d.pth' -> '6726825d'), or None."""
    match = re.search(r"-([0-9a-f]{8,64})\.[^.]+$", filename)
    return match.group(1) if match else None


def download(url, destination):
    """Fetch `url` to `destination` through a temporary file, checking the sha256 prefix in its name."""
    destination = pathlib.Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as file:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                file.write(chunk)
    except (urllib.error.URLError, OSError) as err:
        partial.unlink(missing_ok=True)
        raise FileNotFoundError(
            f"could not download {url} ({err}); fetch it elsewhere and put it at {destination}"
        ) from None
    expected = _hash_prefix(destination.name)
    if expected and not digest.hexdigest().startswith(expected):
        partial.unlink()
        raise ValueError(f"{url}: downloaded file has sha256 {digest.hexdigest()[:12]}..., expected {expected}...")
    partial.replace(destination)
    return destination


def read_weights(path):
    """A dict of tensors from a .pth/.bin file, through torch.load(weights_only=True). Files in the
    zip format are memory-mapped; older (legacy-format) files, such as the `lpips` package's, cannot
    be and are read whole."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{path}: not a checkpoint torch.load(weights_only=True) can read ({reason})") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict)")
    return state


def fid_inception_path(path=None, download_missing=True):
    """The FID Inception weights file: `path` if given, else pytorch-fid's file in the torch hub cache
    (`<torch hub dir>/checkpoints/`, where pytorch-fid keeps it), downloaded there when missing."""
    if path is not None:
        if not pathlib.Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such Inception weights file (get it from {FID_WEIGHTS_URL})")
        return pathlib.Path(path)
    cached = pathlib.Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_URL.rsplit("/", 1)[-1]
    if cached.is_file():
        return cached
    if not download_missing:
        raise FileNotFoundError(
            f"no FID Inception weights at {cached}; download {FID_WEIGHTS_URL} there, or pass its path (--inception)"
        )
    return download(FID_WEIGHTS_URL, cached)


def load_fid_inception(path=None, device=None, download_missing=True):
    """FIDInception with the published weights (see `fid_inception_path`), frozen, on `device`."""
    path = fid_inception_path(path, download_missing)
    # BatchNorm's batch counter is a training statistic; the frozen layers have none.
    state = {key: value for key, value in read_weights(path).items() if not key.endswith("num_batches_tracked")}
    model = FIDInception()
    load_into(model, state, path)
    return model.to(device or default_device())


@torch.no_grad()
def inception_features(images, inception, batch_size=50):
    """uint8 (H, W, 3) images (a sequence; sizes may differ) -> pool3 features (N, 2048) and
    Inception Score logits (N, 1008), float64 numpy arrays."""
    device = next(inception.parameters()).device
    pools, logits = [], []
    with full_float32():
        for batch in _batches(images, batch_size):
            for pixels in _unit_batches(batch):
                pool, logit = inception(pixels.to(device))
                pools.append(pool.double().cpu())
                logits.append(logit.double().cpu())
    return torch.cat(pools).numpy(), torch.cat(logits).numpy()


def fid(real, fake, inception=None, batch_size=50):
    """FID between two image sets, each a folder, an .npz of images or saved Inception statistics, or a
    sequence of uint8 (H, W, 3) images. `inception`: a loaded FIDInception (default: `load_fid_inception()`)."""
    if inception is None:
        inception = load_fid_inception()

    def pool3(images):
        return inception_features(images, inception, batch_size)[0]

    return frechet_distance(*statistics(real, INCEPTION_FEATURES, pool3), *statistics(fake, INCEPTION_FEATURES, pool3))


def inception_score(logits, splits=10):
    """Inception Score (mean, std over `splits` consecutive splits) from logits (N, classes), as the
    original code: exp(E_x KL(p(y|x) || p(y))) with p(y) the mean prediction within the split."""
    log_probs = torch.as_tensor(logits, dtype=torch.float64).log_softmax(dim=1)
    count = len(log_probs)
    if count < splits:
        raise ValueError(f"Inception Score with {splits} splits needs at least {splits} images, got {count}")
    scores = []
    for i in range(splits):
        split = log_probs[i * count // splits : (i + 1) * count // splits]
        log_marginal = split.exp().mean(dim=0).log()
        kl = (split.exp() * (split - log_marginal)).sum(dim=1)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------------
# FD-DINOv2 (Stein et al. 2023, dgm-eval): DINOv2 ViT-L/14 CLS features.
# ----------------------------------------------------------------------------------------------

DINOV2_REPO = "facebook/dinov2-large"
DINOV2_INPUT_SIZE = 224


def load_dinov2(repo_or_dir=DINOV2_REPO, device=None):
    return ViTEncoder.from_pretrained(repo_or_dir).to(device or default_device())


def dinov2_input(image):
    """uint8 (H, W, 3) -> (1, 3, 224, 224) ImageNet-normalised, as dgm-eval: PIL bicubic resize of the
    uint8 image to 224 x 224 (the aspect ratio is not kept), then to [0, 1] and normalised."""
    resized = Image.fromarray(image).resize((DINOV2_INPUT_SIZE, DINOV2_INPUT_SIZE), Image.BICUBIC)
    pixels = _unit_tensor(np.asarray(resized))
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (pixels - mean) / std


@torch.no_grad()
def dinov2_features(images, encoder, batch_size=50):
    """uint8 (H, W, 3) images -> the final-norm CLS token (N, D), not L2-normalised, float64 numpy.

    At 224 px the encoder bicubic-resizes its 37 x 37 position embeddings to 16 x 16 as transformers'
    Dinov2Model does; torch.hub's DINOv2, which dgm-eval runs, resizes by a scale factor offset by 0.1,
    so its features differ slightly from these."""
    device = encoder.pos_embed.device
    features = []
    with full_float32():
        for batch in _batches(images, batch_size):
            pixels = torch.cat([dinov2_input(image) for image in batch]).to(device, encoder.pos_embed.dtype)
            features.append(encoder(pixels)[:, 0].double().cpu())
    return torch.cat(features).numpy()


def fd_dinov2(real, fake, encoder=None, batch_size=50):
    """FD-DINOv2 between two image sets (as `fid` takes them; saved statistics must be DINOv2's).
    `encoder`: a ViTEncoder (default: `load_dinov2()`, DINOv2 ViT-L/14)."""
    if encoder is None:
        encoder = load_dinov2()

    def cls_features(images):
        return dinov2_features(images, encoder, batch_size)

    return frechet_distance(
        *statistics(real, DINOV2_FEATURES, cls_features), *statistics(fake, DINOV2_FEATURES, cls_features)
    )


# ----------------------------------------------------------------------------------------------
# Precision and recall (Kynkaanniemi et al. 2019).
# ----------------------------------------------------------------------------------------------


def _neighbour_radii(features, k, chunk_size):
    """Distance from each feature vector (N, D) to its k-th nearest other vector: (N,)."""
    radii = [torch.cdist(chunk, features).kthvalue(k + 1, dim=1).values  # k + 1: the vector itself is at 0
             for chunk in features.split(chunk_size)]
    return torch.cat(radii)


def _fraction_inside(queries, manifold, radii, chunk_size):
    """Fraction of `queries` within the radius of at least one `manifold` vector."""
    inside = [(torch.cdist(chunk, manifold) <= radii).any(dim=1) for chunk in queries.split(chunk_size)]
    return torch.cat(inside).double().mean().item()


def precision_recall(real_features, fake_features, k=3, chunk_size=4096):
    """Precision: fraction of fake samples inside the real manifold (the union of balls reaching each
    real sample's k-th nearest real neighbour); recall: real samples inside the fake manifold.
    Features (N, D) in any array type; distances in float32 on the features' device."""
    real = torch.as_tensor(real_features, dtype=torch.float32)
    fake = torch.as_tensor(fake_features, dtype=torch.float32, device=real.device)
    if min(len(real), len(fake)) <= k:
        raise ValueError(
            f"precision/recall with k={k} needs more than {k} samples per set, got {len(real)} and {len(fake)}"
        )
    real_radii, fake_radii = _neighbour_radii(real, k, chunk_size), _neighbour_radii(fake, k, chunk_size)
    return {
        "precision": _fraction_inside(fake, real, real_radii, chunk_size),
        "recall": _fraction_inside(real, fake, fake_radii, chunk_size),
    }


# ----------------------------------------------------------------------------------------------
# Reconstruction metrics for novel view synthesis: PSNR, SSIM, LPIPS. Images (B, C, H, W) in [0, 1].
# ----------------------------------------------------------------------------------------------


def _check_pair(images, targets):
    if images.shape != targets.shape or images.ndim != 4:
        raise ValueError(
            f"need two image batches (B, C, H, W) of one shape, got {tuple(images.shape)} and {tuple(targets.shape)}"
        )
    for name, batch in (("images", images), ("targets", targets)):
        if batch.min() < 0 or batch.max() > 1:
            raise ValueError(
                f"{name} must lie in [0, 1] (clamp generated images first), got [{batch.min():.3g}, {batch.max():.3g}]"
            )


def psnr(images, targets):
    """Per-image PSNR in dB (B,), float64, with data range 1: 10 log10(1 / MSE); inf for identical images."""
    _check_pair(images, targets)
    mse = (images.double() - targets.double()).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(1 / mse)


SSIM_WINDOW = 7
SSIM_K1, SSIM_K2 = 0.01, 0.03


def ssim(images, targets):
    """Per-image SSIM (B,), float64: scikit-image's `structural_similarity(image, target, channel_axis=...,
    data_range=1)` with its defaults, as NVS evaluations call it: uniform 7x7 window, sample (N - 1)
    covariances, K1 = 0.01, K2 = 0.03, the SSIM map averaged over channels and over the pixels at least
    3 from the border. Those pixels are exactly the windows that fit inside the image, so a pooling
    without padding gives them; no border handling enters."""
    _check_pair(images, targets)
    if min(images.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW} x {SSIM_WINDOW}, got {tuple(images.shape[-2:])}")
    x, y = images.double(), targets.double()

    def window_mean(z):
        return F.avg_pool2d(z, SSIM_WINDOW, stride=1)

    window_pixels = SSIM_WINDOW**2
    sample_correction = window_pixels / (window_pixels - 1)
    mean_x, mean_y = window_mean(x), window_mean(y)
    var_x = sample_correction * (window_mean(x * x) - mean_x**2)
    var_y = sample_correction * (window_mean(y * y) - mean_y**2)
    cov_xy = sample_correction * (window_mean(x * y) - mean_x * mean_y)
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # (K * data range)^2 with data range 1
    ssim_map = ((2 * mean_x * mean_y + c1) * (2 * cov_xy + c2)) / ((mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3))


def alexnet_features():
    """torchvision's AlexNet `features` up to relu5, with its module indices (the keys of its weights)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, stride=2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, stride=2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
    )


def vgg16_features():
    """torchvision's VGG16 `features` up to relu5_3, with its module indices: five stages of 3x3
    convolutions with ReLU, a 2x2 max pool between stages."""
    layers, in_channels = [], 3
    for stage, (channels, convolutions) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))):
        if stage:
            layers.append(nn.MaxPool2d(2, stride=2))
        for _ in range(convolutions):
            layers += [nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU()]
            in_channels = channels
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """LPIPS v0.1 (Zhang et al. 2018): unit-normalised backbone activations at five ReLUs, squared
    differences weighted per channel by learned 1x1 convolutions, averaged over space, summed over layers."""

    # Indices in torchvision's `features` of the ReLUs compared, and their channel counts.
    RELU_INDICES = {"alex": (1, 4, 7, 9, 11), "vgg": (3, 8, 15, 22, 29)}
    CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}

    def __init__(self, net="alex"):
        super().__init__()
        if net not in self.RELU_INDICES:
            raise ValueError(f"LPIPS backbone {net!r} not supported; use one of {', '.join(self.RELU_INDICES)}")
        self.net = net
        self.features = alexnet_features() if net == "alex" else vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(channels, 1, 1, bias=False) for channels in self.CHANNELS[net])
        # The input scaling the LPIPS weights were trained with, applied to images in [-1, 1].
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[:, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[:, None, None], persistent=False)
        self.eval().requires_grad_(False)

    @classmethod
    def from_files(cls, linear_path, backbone_path):
        """`linear_path`: the `lpips` package's weights/v0.1/alex.pth or vgg.pth (keys lin{i}.model.1.weight);
        `backbone_path`: torchvision's ImageNet AlexNet or VGG16 weights (e.g. alexnet-owt-7be5be79.pth)."""
        linear = read_weights(linear_path)
        keys = [f"lin{i}.model.1.weight" for i in range(5)]
        if any(key not in linear for key in keys):
            raise ValueError(f"{linear_path}: not an LPIPS weights file (expected keys {', '.join(keys)})")
        net = next((net for net, channels in cls.CHANNELS.items() if linear[keys[1]].shape[1] == channels[1]), None)
        if net is None:
            raise ValueError(f"{linear_path}: LPIPS weights for neither AlexNet nor VGG16")
        model = cls(net)
        # torchvision's file also holds the classifier, which LPIPS does not use.
        backbone = {key: value for key, value in read_weights(backbone_path).items() if key.startswith("features.")}
        load_into(model, {**backbone, **{f"lins.{i}.weight": linear[key] for i, key in enumerate(keys)}},
                  f"{linear_path} + {backbone_path}")
        return model

    def activations(self, images):
        """images (B, 3, H, W) in [0, 1] -> the five compared activations, each unit-normalised over channels."""
        x = (2 * images - 1 - self.shift) / self.scale
        compared = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.RELU_INDICES[self.net]:
                compared.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return compared

    @torch.no_grad()
    def forward(self, images, targets):
        """images, targets (B, 3, H, W) in [0, 1] -> per-image distance (B,)."""
        _check_pair(images, targets)
        pairs = zip(self.activations(images), self.activations(targets), self.lins)
        return sum(lin((a - b) ** 2).mean(dim=(1, 2, 3)) for a, b, lin in pairs)


# ----------------------------------------------------------------------------------------------
# `shapes` alignment: read the attributes of a shapes image back from its pixels.
# ----------------------------------------------------------------------------------------------

SHAPE_ATTRIBUTES = ("shape", "color", "size", "position", "background")
ATTRIBUTE_VALUES = {"shape": SHAPES, "color": tuple(COLORS), "size": tuple(SIZES), "position": tuple(POSITIONS),
                    "background": tuple(COLORS)}  # the values each attribute takes, in data.py's order
_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[name] for name in _PALETTE_NAMES], dtype=np.float64)


def _polygon_geometry(shape):
    """(area, centroid x, centroid y) of `shape` drawn with extent 1 centred on the origin (y down)."""
    outline = shape_outline(shape, 0.0, 0.0, 1.0)
    if outline is None:  # the circle
        return math.pi / 4, 0.0, 0.0
    x, y = np.array(outline, dtype=np.float64).T
    next_x, next_y = np.roll(x, -1), np.roll(y, -1)
    cross = x * next_y - next_x * y  # shoelace terms
    area = cross.sum() / 2
    centroid_x, centroid_y = ((x + next_x) * cross).sum() / (6 * area), ((y + next_y) * cross).sum() / (6 * area)
    return abs(area), float(centroid_x), float(centroid_y)


# The triangle's centroid sits below the centre of its bounding box; the other shapes' do not.
_SHAPE_GEOMETRY = {shape: _polygon_geometry(shape) for shape in SHAPES}


def _nearest_palette(colors, exclude=None):
    """Index in _PALETTE of the nearest palette colour to each RGB colour (..., 3)."""
    distances = np.linalg.norm(np.asarray(colors, np.float64)[..., None, :] - _PALETTE, axis=-1)
    if exclude is not None:
        distances[..., exclude] = np.inf
    return distances.argmin(axis=-1)


def _coverage(shape, cx, cy, extent, image_size):
    """Fraction of each pixel that `shape` covers (image_size, image_size), rasterised exactly as the
    dataset draws it: render_shape in white on black, rescaled to [0, 1]."""
    attrs = {"shape": shape, "color": "white", "background": "black", "cx": cx, "cy": cy, "extent": extent}
    red = render_shape(attrs, image_size)[..., 0].astype(np.float64)
    return (red - COLORS["black"][0]) / (COLORS["white"][0] - COLORS["black"][0])


# Coverage in [NOISE_FLOOR, 1 - NOISE_FLOOR] is stretched to [0, 1], clipping the rest: on its own, the
# noise of a generated image's flat background (coverage a little off 0, clipped at 0) adds up over
# thousands of pixels into a sizeable area. Measured on shapes images with Gaussian noise of std 8
# (of 255): shape accuracy 53% without this, 99.5% with; clean images stay at 100%.
NOISE_FLOOR = 0.2


def _stretch(coverage):
    return np.clip((coverage - NOISE_FLOOR) / (1 - 2 * NOISE_FLOOR), 0, 1)


def _fit_shape(alpha):
    """The shape whose rasterisation best fits the object's (stretched) coverage map alpha (S, S): for
    each shape, extent from the covered area and centre from the centroid, then the mean
    |alpha - stretched coverage of the shape drawn there|."""
    size = alpha.shape[0]
    area = alpha.sum() / size**2
    coords = (np.arange(size) + 0.5) / size
    centroid_x = alpha.sum(axis=0) @ coords / alpha.sum()
    centroid_y = alpha.sum(axis=1) @ coords / alpha.sum()
    fits = []
    for shape, (unit_area, offset_x, offset_y) in _SHAPE_GEOMETRY.items():
        extent = math.sqrt(area / unit_area)
        cx, cy = centroid_x - offset_x * extent, centroid_y - offset_y * extent
        misfit = np.abs(alpha - _stretch(_coverage(shape, cx, cy, extent, size))).mean()
        fits.append((misfit, shape, float(cx), float(cy), extent))
    return min(fits)[1:]


def detect_shape_attrs(image):
    """uint8 (S, S, 3) image -> the attributes of its object, as `data.sample_shape_attrs` names them
    ("shape", "color", "size", "position", "background"; "cx", "cy", "extent" as fractions of the side).
    When no object stands out from the background, all but "background" are None.

    Background: the palette colour most of the border pixels are nearest to. Object: the pixels at least
    half way from the background to its nearest other palette colour; its colour is the palette colour
    nearest to the median of the quarter of them farthest from the background (the edges are blends).
    Coverage: each pixel's position on the line from the background colour to the object colour, which
    is the fraction of the pixel the object covers when edges are anti-aliased. The shape is the best fit
    of that coverage (see NOISE_FLOOR), size and position the nearest SIZES and POSITIONS entries.
    """
    pixels = np.asarray(image, dtype=np.float64)
    if pixels.ndim != 3 or pixels.shape[0] != pixels.shape[1] or pixels.shape[2] != 3:
        raise ValueError(f"shapes images are square RGB (S, S, 3), got {pixels.shape}")
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    border_labels = _nearest_palette(border)
    background = np.bincount(border_labels, minlength=len(_PALETTE)).argmax()
    background_rgb = np.median(border[border_labels == background], axis=0)
    attrs = dict.fromkeys(("shape", "color", "size", "position", "cx", "cy", "extent"))
    attrs["background"] = _PALETTE_NAMES[background]

    distance = np.linalg.norm(pixels - background_rgb, axis=-1)
    others = np.delete(_PALETTE, background, axis=0)
    candidates = distance > 0.5 * np.linalg.norm(others - _PALETTE[background], axis=-1).min()
    if not candidates.any():
        return attrs
    farthest = distance[candidates] >= np.quantile(distance[candidates], 0.75)
    object_rgb = np.median(pixels[candidates][farthest], axis=0)
    attrs["color"] = _PALETTE_NAMES[_nearest_palette(object_rgb, exclude=background)]

    direction = object_rgb - background_rgb
    coverage = _stretch(np.clip((pixels - background_rgb) @ direction / (direction @ direction), 0, 1))
    if coverage.sum() == 0:  # only faint traces of an object: no shape to fit
        return attrs
    attrs["shape"], attrs["cx"], attrs["cy"], attrs["extent"] = _fit_shape(coverage)
    attrs["size"] = min(SIZES, key=lambda name: abs(SIZES[name] - attrs["extent"]))
    attrs["position"] = min(POSITIONS, key=lambda name: math.dist(POSITIONS[name], (attrs["cx"], attrs["cy"])))
    return attrs


def _alternatives(names):
    return "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))


_CAPTION_PATTERN = re.compile(
    rf"an? (?:(?P<size>{_alternatives(SIZES)}) )?(?P<color>{_alternatives(COLORS)}) (?P<shape>{_alternatives(SHAPES)})"
    rf"(?: at the (?P<position>{_alternatives(POSITIONS)}))?"
    rf"(?: on an? (?P<background>{_alternatives(COLORS)}) background)?"
)


def parse_shapes_caption(caption):
    """The attributes a shapes caption states: 'a large red triangle at the top left on a blue background'
    gives all five; size, position and background may be left out ('a red triangle')."""
    match = _CAPTION_PATTERN.fullmatch(" ".join(caption.lower().split()))
    if match is None:
        raise ValueError(f"not a shapes caption: {caption!r} (expected e.g. 'a large red triangle at the top left "
                         f"on a blue background')")
    return {name: value for name, value in match.groupdict().items() if value is not None}


def alignment_scores(detected, expected):
    """How often the detected attributes (list of dicts) match the expected ones (list of dicts, e.g.
    parsed captions; attributes they lack are not scored). Returns the accuracy per attribute, of
    colour and shape together ("object"), and of every stated attribute at once ("all")."""
    if len(detected) != len(expected):
        raise ValueError(f"{len(detected)} images but {len(expected)} captions")
    correct = collections.defaultdict(list)
    for found, wanted in zip(detected, expected):
        matches = {name: found[name] == value for name, value in wanted.items() if name in SHAPE_ATTRIBUTES}
        for name, match in matches.items():
            correct[name].append(match)
        correct["object"].append(matches.get("color", True) and matches.get("shape", True))
        correct["all"].append(all(matches.values()))
    order = (*SHAPE_ATTRIBUTES, "object", "all")
    return {name: float(np.mean(correct[name])) for name in order if correct[name]} | {"images": len(detected)}


def i2i_agreement(images, references):
    """I2I agreement: how often a generated image shows what its reference shows. Both are uint8
    (N, S, S, 3); the attributes of each are read back by detect_shape_attrs, and the reference's
    are the expected ones (alignment_scores: per attribute, "object" and "all"). 1.0 for the
    references themselves; chance (1/8 colour, 1/5 shape, ...) for references in another order."""
    expected = [{name: detect_shape_attrs(reference)[name] for name in SHAPE_ATTRIBUTES} for reference in references]
    return alignment_scores([detect_shape_attrs(image) for image in images], expected)


def attribute_distance(attrs_a, attrs_b):
    """Total variation distance, 0.5 * sum_v |p_a(v) - p_b(v)|, between the value frequencies of each
    attribute in two lists of attribute dicts (a failed detection, None, is a value of its own), and
    their mean over the attributes ("mean")."""
    distances = {}
    for name in SHAPE_ATTRIBUTES:
        counts_a = collections.Counter(attrs[name] for attrs in attrs_a)
        counts_b = collections.Counter(attrs[name] for attrs in attrs_b)
        values = set(counts_a) | set(counts_b)
        distances[name] = 0.5 * sum(abs(counts_a[v] / len(attrs_a) - counts_b[v] / len(attrs_b)) for v in values)
    return distances | {"mean": float(np.mean(list(distances.values())))}


def shapes_probe(encode, num_train=3000, num_test=1000, image_size=32, seed=0, batch_size=250):
    """How much of each shapes attribute an image feature holds: a linear probe, least squares from the
    features (plus a constant) of the first `num_train` shapes images to each attribute's one-hot
    code, scored by accuracy (argmax) on the next `num_test`. encode: images (B, 3, S, S) in [-1, 1]
    -> features (B, D). Solved in float64 with an SVD (gelsd), which copes with collinear features."""
    count = num_train + num_test
    images = torch.from_numpy(shapes_reference_images(count, image_size, seed)).permute(0, 3, 1, 2).float() / 127.5 - 1
    features = torch.cat([encode(batch).double() for batch in images.split(batch_size)])
    features = torch.cat([features, features.new_ones(count, 1)], dim=1)
    attrs, scores = [sample_shape_attrs(seed, i) for i in range(count)], {}
    for name, values in ATTRIBUTE_VALUES.items():
        labels = torch.tensor([values.index(a[name]) for a in attrs])
        targets = F.one_hot(labels, len(values)).double()
        readout = torch.linalg.lstsq(features[:num_train], targets[:num_train], driver="gelsd").solution
        scores[name] = (features[num_train:] @ readout).argmax(1).eq(labels[num_train:]).double().mean().item()
    return scores


def shapes_reference_images(num_images, image_size, seed=0):
    """The first `num_images` images of the shapes set (`data.ShapesDataset` with `seed`), uint8 (N, S, S, 3)."""
    return np.stack([render_shape(sample_shape_attrs(seed, i), image_size) for i in range(num_images)])


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _require(*paths):
    """Fail before any network loads when an input is missing."""
    for path in paths:
        if not pathlib.Path(path).exists():
            raise FileNotFoundError(f"{path}: no such folder or .npz file")


def _feature_extractor(args):
    """(features name, images -> (N, D) features) for --features inception|dinov2."""
    if args.features == "dinov2":
        encoder = load_dinov2(args.dinov2, args.device)
        return DINOV2_FEATURES, lambda images: dinov2_features(images, encoder, args.batch_size)
    inception = load_fid_inception(args.inception, args.device, download_missing=not args.no_download)
    return INCEPTION_FEATURES, lambda images: inception_features(images, inception, args.batch_size)[0]


def _load_unit_images(path):
    """A folder or .npz of same-sized images -> (N, 3, H, W) float32 in [0, 1]."""
    images = load_images(path)
    if len({images[i].shape for i in range(len(images))}) > 1:
        raise ValueError(f"{path}: images of different sizes; PSNR/SSIM/LPIPS compare images of one size")
    return torch.cat([_unit_tensor(images[i]) for i in range(len(images))])


def run_shapes_probe(args):
    encoder = load_image_encoder(args.encoder, args.image_size, torch.device(args.device))
    return shapes_probe(lambda images: encoder.encode(images.to(args.device)).cpu(), args.num_train, args.num_test,
                        args.image_size)


def run_fid(args):
    _require(args.real, args.fake)
    inception = load_fid_inception(args.inception, args.device, download_missing=not args.no_download)
    return {"fid": fid(args.real, args.fake, inception, args.batch_size)}


def run_fd_dinov2(args):
    _require(args.real, args.fake)
    return {"fd_dinov2": fd_dinov2(args.real, args.fake, load_dinov2(args.dinov2, args.device), args.batch_size)}


def run_inception_score(args):
    _require(args.images)
    inception = load_fid_inception(args.inception, args.device, download_missing=not args.no_download)
    logits = inception_features(load_images(args.images), inception, args.batch_size)[1]
    mean, std = inception_score(logits, args.splits)
    return {"inception_score": mean, "inception_score_std": std}


def run_precision_recall(args):
    _require(args.real, args.fake)
    _, extract = _feature_extractor(args)
    return precision_recall(extract(load_images(args.real)), extract(load_images(args.fake)), args.k)


def run_stats(args):
    _require(args.images)
    name, extract = _feature_extractor(args)
    mu, sigma = feature_statistics(extract(load_images(args.images)))
    save_statistics(args.out, mu, sigma, name)
    return {"out": str(args.out), "features": name, "dim": int(mu.shape[0])}


def run_nvs(args):
    _require(args.pred, args.target)
    generated, targets = _load_unit_images(args.pred), _load_unit_images(args.target)
    result = {"psnr": psnr(generated, targets).mean().item(), "ssim": ssim(generated, targets).mean().item()}
    if args.lpips_linear or args.lpips_backbone:
        if not (args.lpips_linear and args.lpips_backbone):
            raise ValueError("LPIPS needs both --lpips-linear and --lpips-backbone")
        lpips = LPIPS.from_files(args.lpips_linear, args.lpips_backbone)
        result["lpips"] = torch.cat([lpips(a, b) for a, b in zip(generated.split(16), targets.split(16))]).mean().item()
    return result


def _reference_images(spec, image_size):
    """--real: a folder or .npz of images, or shapes:N for the first N images of the shapes set."""
    match = re.fullmatch(r"shapes:(\d+)", spec)
    return shapes_reference_images(int(match.group(1)), image_size) if match else load_images(spec)


def run_shapes(args):
    if not (args.captions or args.real):
        raise ValueError("give --captions (alignment), --real (attribute distance), or both")
    if args.captions and not pathlib.Path(args.captions).is_file():
        raise FileNotFoundError(f"{args.captions}: no such captions file (one caption per line, in image order)")
    images = load_images(args.images)
    detected = [detect_shape_attrs(images[i]) for i in range(len(images))]
    result = {}
    if args.captions:
        captions = pathlib.Path(args.captions).read_text().splitlines()
        result["alignment"] = alignment_scores(detected, [parse_shapes_caption(caption) for caption in captions])
    if args.real:
        real = _reference_images(args.real, images[0].shape[0])
        real_detected = [detect_shape_attrs(real[i]) for i in range(len(real))]
        result["attribute_distance"] = attribute_distance(detected, real_detected)
    return result


def coco_captions(annotation_file, count=30000, seed=0):
    """The FID-30K draw from a COCO 2014 captions file (captions_val2014.json): `count` distinct images
    chosen with `seed`, each with one of its captions (also chosen with `seed`) -> [(file_name,
    caption)] in image-id order. The same file and seed always give the same pairs."""
    with open(annotation_file, encoding="utf-8") as f:
        coco = json.load(f)
    file_names = {image["id"]: image["file_name"] for image in coco["images"]}
    captions = collections.defaultdict(list)
    for annotation in coco["annotations"]:
        captions[annotation["image_id"]].append(" ".join(annotation["caption"].split()))
    image_ids = sorted(i for i in captions if i in file_names)
    if count > len(image_ids):
        raise ValueError(f"{annotation_file}: {len(image_ids)} captioned images, fewer than the {count} asked for")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(image_ids, size=count, replace=False).tolist())
    return [(file_names[i], captions[i][rng.integers(len(captions[i]))]) for i in chosen]


def run_coco_fid(args):
    """FID-30K: draw the captions, generate one image per caption with sample.py (under torchrun too),
    centre-crop and resize the matching real images and the samples to --size, FID between them."""
    pairs = coco_captions(args.annotations, args.num, args.seed)
    missing = [name for name, _ in pairs if not os.path.isfile(os.path.join(args.images, name))]
    if missing:
        raise FileNotFoundError(f"--images {args.images}: {len(missing)} of the drawn images are missing, e.g. {missing[0]}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "captions.txt").write_text("".join(caption + "\n" for _, caption in pairs), encoding="utf-8")
    sample.main(["t2i", "--ckpt", args.ckpt, "--prompt-file", str(out / "captions.txt"), "--per-image", "1",
                 "--num-samples", str(len(pairs)), "--seed", str(args.seed), "--out", str(out / "samples"),
                 *shlex.split(args.sample_args)])
    if int(os.environ.get("RANK", 0)) != 0:
        return {}
    real = np.stack([center_crop_arr(Image.open(os.path.join(args.images, name)), args.size) for name, _ in pairs])
    fake = np.stack([center_crop_arr(Image.fromarray(image), args.size) for image in load_images(f"{out / 'samples'}.npz")])
    inception = load_fid_inception(args.inception, args.device, download_missing=not args.no_download)
    return {"fid": fid(real, fake, inception, args.batch_size), "images": len(pairs), "size": args.size}


def build_parser():
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, run, help):
        sub = commands.add_parser(name, help=help)
        sub.set_defaults(run=run)
        sub.add_argument("--batch-size", type=int, default=50)
        sub.add_argument("--device", default=default_device())
        return sub

    def inception_options(sub):
        sub.add_argument("--inception", help="FID Inception weights (pt_inception-2015-12-05-6726825d.pth); "
                                             "default: the torch hub cache, downloaded when missing")
        sub.add_argument("--no-download", action="store_true", help="never download the Inception weights")

    def dinov2_option(sub):
        sub.add_argument("--dinov2", default=DINOV2_REPO, help="DINOv2 Hub repo id or local folder")

    sub = command("fid", run_fid, "FID between two image sets (folders, .npz images or saved statistics)")
    sub.add_argument("--real", required=True)
    sub.add_argument("--fake", required=True)
    inception_options(sub)
    sub = command("fd-dinov2", run_fd_dinov2, "Frechet distance in DINOv2 ViT-L/14 features")
    sub.add_argument("--real", required=True)
    sub.add_argument("--fake", required=True)
    dinov2_option(sub)
    sub = command("inception-score", run_inception_score, "Inception Score of an image set")
    sub.add_argument("--images", required=True)
    sub.add_argument("--splits", type=int, default=10)
    inception_options(sub)
    sub = command("precision-recall", run_precision_recall, "k-NN precision and recall (Kynkaanniemi et al.)")
    sub.add_argument("--real", required=True)
    sub.add_argument("--fake", required=True)
    sub.add_argument("--k", type=int, default=3)
    sub.add_argument("--features", choices=("inception", "dinov2"), default="inception")
    inception_options(sub)
    dinov2_option(sub)
    sub = command("stats", run_stats, "save the feature mean and covariance of an image set")
    sub.add_argument("--images", required=True)
    sub.add_argument("--out", required=True)
    sub.add_argument("--features", choices=("inception", "dinov2"), default="inception")
    inception_options(sub)
    dinov2_option(sub)
    sub = command("nvs", run_nvs, "PSNR, SSIM (and LPIPS) of generated views against the true ones, paired in order")
    sub.add_argument("--pred", required=True)
    sub.add_argument("--target", required=True)
    sub.add_argument("--lpips-linear", help="the lpips package's weights/v0.1/alex.pth or vgg.pth")
    sub.add_argument("--lpips-backbone", help="torchvision AlexNet/VGG16 ImageNet weights (.pth)")
    sub = command("coco-fid", run_coco_fid, "MS-COCO FID-30K of a T2I export: captions, generation, resizing, FID")
    sub.add_argument("--annotations", required=True, help="COCO 2014 captions_val2014.json")
    sub.add_argument("--images", required=True, help="the COCO val2014 image folder")
    sub.add_argument("--ckpt", required=True, help="a T2I ema.safetensors export")
    sub.add_argument("--num", type=int, default=30000)
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--size", type=int, default=256, help="both sides are centre-cropped and resized to this")
    sub.add_argument("--out", default="runs/coco_fid30k")
    sub.add_argument("--sample-args", default="--method dpm++ --steps 20 --cfg-scale 4.5",
                     help="sample.py options for the generation")
    inception_options(sub)
    sub = command("shapes", run_shapes, "attribute alignment and distribution distance on the shapes set")
    sub.add_argument("--images", required=True)
    sub.add_argument("--captions", help="text file, the caption of image i on line i")
    sub.add_argument("--real", help="reference images: a folder, an .npz, or shapes:N (the first N, seed 0)")
    sub = command("shapes-probe", run_shapes_probe, "linear probe of the shapes attributes in an image encoder's "
                                                     "condition feature (its L2-normalised CLS)")
    sub.add_argument("--encoder", required=True, help="DINO repo/folder/.pth, shapes-vit or random-vit")
    sub.add_argument("--image-size", type=int, default=32)
    sub.add_argument("--num-train", type=int, default=3000)
    sub.add_argument("--num-test", type=int, default=1000)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.run(args)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"{parser.prog} {args.command}: error: {err}\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
