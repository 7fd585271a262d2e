"""Frozen encoders, re-implemented in plain PyTorch and loaded from Hugging Face Hub weights.

A ViT gives the image condition (DINO v1 and v2, Lumos's; the CLIP image tower and MoCo v3, the
paper's ablations), T5 the text condition, the SD-VAE the latent space.
In order: the Lumos conditions built on them, the networks, then the loading from the Hub.
Each network is written out here and loads the published checkpoints as they are on the Hub
(or in a local folder with the same files); the tests prove each computes the same function as
the reference library. transformers/diffusers are never imported at run time.
"""

import hashlib
import html
import html.entities
import json
import math
import pathlib
import pickle
import re
import struct
import unicodedata
import urllib.parse
import zipfile
from dataclasses import asdict, dataclass, fields
from html.parser import HTMLParser

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError, safe_open
from torch import nn

# ----------------------------------------------------------------------------------------------
# The Lumos conditions: what the DiT's cross-attention sees in each task (the frozen networks
# that compute them follow), and the space the diffusion runs in.
# ----------------------------------------------------------------------------------------------

# The offline default's image encoder: a small DINO-class ViT trained on unlabeled `shapes` images
# (`python data.py shapes-encoder`, which wrote the committed file), frozen as DINO is.
SHAPES_VIT = "shapes-vit"
SHAPES_VIT_FILE = pathlib.Path(__file__).resolve().parent / "assets" / "shapes_vit.safetensors"
RANDOM_VIT = "random-vit"  # a small DINO-class ViT with frozen random weights
RANDOM_T5 = "random-t5"  # the offline default's text encoder: a tiny T5 v1.1, frozen random weights
RANDOM_T5_SEED = 0
MAX_TEXT_TOKENS = 120  # Lumos pads / truncates every caption to 120 T5 tokens


class ImageSpace:
    """Where the diffusion runs: pixels in [-1, 1] (no VAE), or SD-VAE latents times its scale."""

    def __init__(self, vae=None):
        self.vae = vae
        self.channels = vae.post_quant_conv.in_channels if vae else 3
        self.downsampling = 8 if vae else 1

    def encode(self, images, posterior_noise=None):
        """images (B, 3, S, S) in [-1, 1] -> (B, C, S/f, S/f); a posterior sample given its noise."""
        if self.vae is None:
            return images
        return self.from_posterior(*self.vae.encode(images), posterior_noise)

    def from_posterior(self, mean, std, posterior_noise=None):
        """VAE posterior mean, std (B, C, h, w) in raw units -> the diffusion's latent: the sample
        given by the noise (or the mean without one), times the VAE's scale."""
        latent = mean if posterior_noise is None else mean + std * posterior_noise.to(mean)
        return latent.float() * self.vae.scaling_factor

    def decode(self, x):
        """(B, C, S/f, S/f) -> images (B, 3, S, S) in [-1, 1]."""
        images = x if self.vae is None else self.vae.decode(x / self.vae.scaling_factor)
        return images.float().clamp(-1, 1)


def load_image_encoder(spec, image_size, device, config=None):
    """The frozen DINO condition encoder: Hub repo / folder / .pth; SHAPES_VIT, the offline default;
    or a small random ViT of the same class (seeded). `config` is what an export recorded
    (`encoder_config`): the random ViT's sizes (default random_vit_config), or the SHAPES_VIT file's
    SHA-256, checked so that sample.py never conditions on another encoder than training did."""
    if spec == RANDOM_VIT:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            encoder = ViTEncoder(**(config or random_vit_config(image_size)))
    elif spec == SHAPES_VIT:
        expected, found = (config or {}).get("sha256"), encoder_config(SHAPES_VIT, image_size)
        if found is None:
            raise FileNotFoundError(f"{SHAPES_VIT_FILE} is missing: restore it from git, or make it anew with "
                                    f"`python data.py shapes-encoder`")
        if expected and expected != found["sha256"]:
            raise ValueError(f"{SHAPES_VIT_FILE} (SHA-256 {found['sha256'][:12]}...) is not the {SHAPES_VIT} this "
                             f"model was trained with ({expected[:12]}...); check out the commit whose file made it")
        encoder = ViTEncoder.from_pretrained(SHAPES_VIT_FILE)
    else:
        encoder = ViTEncoder.from_pretrained(spec)
    return encoder.to(device)


def random_vit_config(image_size):
    return dict(image_size=image_size, patch_size=max(4, image_size // 4), width=128, depth=2, heads=2)


def encoder_config(spec, image_size):
    """What an export records of its image encoder beyond `spec`: the random ViT's sizes, the SHA-256
    of the SHAPES_VIT file (None when it is missing); None for a Hub repo or a file."""
    if spec == RANDOM_VIT:
        return random_vit_config(image_size)
    if spec == SHAPES_VIT and SHAPES_VIT_FILE.is_file():
        return {"sha256": hashlib.sha256(SHAPES_VIT_FILE.read_bytes()).hexdigest()}
    return None


# --condition: which of the frozen image encoder's final tokens the DiT's cross-attention sees (the
# paper's ablation): its global CLS (Lumos's choice), its N local patch tokens, or all 1 + N. Every
# token, CLS or patch, is L2-normalised to unit length on its own (ViTEncoder.tokens).
CONDITIONS = ("cls", "patch", "all")


def condition_token_count(condition, patches):
    """L, the condition tokens of `condition` for an encoder of `patches` patch tokens."""
    return {"cls": 1, "patch": patches, "all": 1 + patches}[condition]


@torch.no_grad()
def image_features(encoder, images, patch_tokens=False):
    """What a feature cache holds of images (B, 3, S, S) in [-1, 1] (data.py): {"cond": (B, D) the
    CLS, and with `patch_tokens` "patch_tokens" (B, N, D)}, float32, each token L2-normalised."""
    tokens = encoder.tokens(images)
    return {"cond": tokens[:, 0], **({"patch_tokens": tokens[:, 1:]} if patch_tokens else {})}


def condition_tokens(features, condition):
    """(B, L, D) condition tokens of `condition` from image_features or a cache's batch, which hold the
    CLS "cond" (B, D) and, when needed, "patch_tokens" (B, N, D)."""
    cls = features["cond"][:, None].float()
    if condition == "cls":
        return cls
    patches = features["patch_tokens"].float()
    return patches if condition == "patch" else torch.cat([cls, patches], dim=1)


def image_condition(condition):
    """I2I: condition tokens (condition_tokens) of the image itself, from its batch's features (the
    loop adds image_features to a batch of images; a feature cache's batch holds them)."""
    def condition_fn(batch, space):
        return {"y": condition_tokens(batch, condition), "mask": None}
    return condition_fn


def nvs_condition(encoder):
    """NVS: the source view's DINO CLS token, the source itself in the diffusion space (a VAE
    latent is its posterior mean, as Zero-1-to-3's), and the relative camera pose."""
    def condition(batch, space):
        return {"y": encoder.encode(batch["source"])[:, None], "mask": None,
                "source": space.encode(batch["source"]), "pose": batch["pose"].float()}
    return condition


def text_condition(encode, device):
    """T2I: the batch's captions through `encode` (a TextEncoder, or train_t2i's TextFeatureCache)."""
    def condition(batch, space):
        y, mask = encode(batch["caption"])
        return {"y": y.to(device), "mask": mask.to(device)}
    return condition


class TextEncoder:
    """A frozen T5 tokenizer and encoder: captions -> the T2I condition.

        features, mask = TextEncoder(tokenizer, t5)(captions)   # (B, L, C) float32, (B, L) bool

    L is the longest caption of the batch in tokens (at most max_length); the features of padding
    positions are zero. The valid tokens' features do not depend on the padding: T5 masks padded keys.
    Captions are preprocessed as the official model's were (preprocess_prompt): cleaned twice by
    the release's caption cleaner, or with clean=False only lowercased and stripped. This is the one
    place where captions reach the tokenizer (training, cache-text and sampling).
    """

    def __init__(self, tokenizer, t5, max_length=MAX_TEXT_TOKENS, clean=True):
        self.tokenizer, self.t5, self.max_length, self.clean = tokenizer, t5, max_length, clean
        self.width = t5.config.d_model
        self.dtype = next(t5.parameters()).dtype

    @torch.no_grad()
    def encode(self, captions):
        """-> features (B, L, C) in the T5's dtype, padding zero; mask (B, L) bool."""
        ids, mask = self.tokenizer([preprocess_prompt(c, self.clean) for c in captions], self.max_length)
        length = int(mask.sum(1).max())
        device = next(self.t5.parameters()).device
        ids, mask = ids[:, :length].to(device), mask[:, :length].to(device)
        return self.t5(ids, mask) * mask[..., None].to(self.dtype), mask.bool()

    def __call__(self, captions):
        features, mask = self.encode(captions)
        return features.float(), mask

    def token_features(self, captions):
        """-> [(n_i, C)]: each caption's valid tokens, in the T5's dtype, on the CPU."""
        features, mask = self.encode(captions)
        return [row[:n].cpu() for row, n in zip(features, mask.sum(1).tolist())]


def random_t5_description(words):
    """What rebuilds the offline default's text encoder exactly (stored in the export's metadata):
    the tokenizer's pieces, one per word of `words` (the shapes captions' vocabulary), equally likely
    (any other word reads as <unk>); a tiny T5 v1.1 config of that vocabulary; the seed of its weights."""
    pieces = [(SPACE_SYMBOL + word, -math.log(len(words))) for word in words]
    vocab_size = T5Tokenizer.from_pieces(pieces).vocab_size
    config = T5Config(vocab_size=vocab_size, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2)
    return {"tokenizer_pieces": pieces, "t5_config": asdict(config), "t5_seed": RANDOM_T5_SEED}


def text_encoder_dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def random_text_encoder(description, device, clean=True):
    """The tiny random T5 of `description` (random_t5_description), frozen, on `device`."""
    tokenizer = T5Tokenizer.from_pieces(description["tokenizer_pieces"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(description["t5_seed"])
        t5 = T5Encoder(T5Config(**description["t5_config"]))
    return TextEncoder(tokenizer, freeze(t5).to(device, text_encoder_dtype(device)), clean=clean)


def load_text_encoder(spec, device, max_length=MAX_TEXT_TOKENS, clean=True, vocabulary=()):
    """The frozen text encoder `spec` names: a Hub repo or folder holding a T5 v1.1 encoder and its
    spiece.model (e.g. DeepFloyd/t5-v1_1-xxl), or random-t5 over the words of `vocabulary`."""
    if spec == RANDOM_T5:
        return random_text_encoder(random_t5_description(vocabulary), device, clean)
    t5 = T5Encoder.from_pretrained(spec, dtype=text_encoder_dtype(device)).to(device)
    return TextEncoder(T5Tokenizer.from_pretrained(spec), t5, max_length, clean)


def text_encoder_from_metadata(info, device):
    """The text encoder a T2I model was trained with; `info` is its export's metadata["lumos"] (or
    the release's set-up for Lumos_T2I.pth, see sample.py)."""
    if info.get("task") != "t2i":
        raise ValueError(f"text prompts need a T2I model (a train_t2i.py export or Lumos_T2I.pth); this is a "
                         f"{info.get('task', 'i2i')!r} model")
    clean = info.get("clean_captions", False)  # exports made before the cleaning was added: as trained
    if info["encoder"] == RANDOM_T5:
        return random_text_encoder(info, device, clean)
    return load_text_encoder(info["encoder"], device, info["max_text_tokens"], clean)


def pad_token_features(features):
    """[(n_i, C)] -> (B, max n_i, C) float32 with zero padding, and its mask (B, max n_i) bool."""
    length = max(len(f) for f in features)
    padded = torch.zeros(len(features), length, features[0].shape[1])
    mask = torch.zeros(len(features), length, dtype=torch.bool)
    for row, feature in enumerate(features):
        padded[row, :len(feature)] = feature.float()
        mask[row, :len(feature)] = True
    return padded, mask


# ----------------------------------------------------------------------------------------------
# The frozen image encoder, one ViT class for the checkpoints Lumos compares: DINO v1
# (facebook/dino-vitb16 or the original dino_vitbase16_pretrain.pth), DINOv2 (facebook/dinov2-*),
# the CLIP image tower (openai/clip-vit-base-patch16) and MoCo v3 (the released vit-b-300ep.pth.tar).
# Our module names follow the original DINO code.
# ----------------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's preprocessing constants
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ViTAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, tokens):
        """tokens (B, T, D) -> (B, T, D)."""
        q, k, v = self.qkv(tokens).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, D / heads)
        return self.proj(attended.transpose(1, 2).flatten(2))


def quick_gelu(x):
    """OpenAI CLIP's GELU approximation, x * sigmoid(1.702 x): its weights were trained with it."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu}


class ViTMLP(nn.Module):
    def __init__(self, width, hidden_width, act="gelu"):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden_width)
        self.fc2 = nn.Linear(hidden_width, width)
        self.act = ACTIVATIONS[act]

    def forward(self, tokens):
        """tokens (B, T, D) -> (B, T, D)."""
        return self.fc2(self.act(self.fc1(tokens)))


class LayerScale(nn.Module):
    """DINOv2's learned per-channel gain on each residual branch."""

    def __init__(self, width):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(width))

    def forward(self, tokens):
        """tokens (B, T, D) -> (B, T, D)."""
        return tokens * self.gamma


class ViTBlock(nn.Module):
    def __init__(self, width, heads, mlp_width, norm_eps, layer_scale, act="gelu"):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=norm_eps)
        self.attn = ViTAttention(width, heads)
        self.ls1 = LayerScale(width) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = ViTMLP(width, mlp_width, act)
        self.ls2 = LayerScale(width) if layer_scale else nn.Identity()

    def forward(self, tokens):
        """tokens (B, T, D) -> (B, T, D), pre-norm residual attention then MLP."""
        tokens = tokens + self.ls1(self.attn(self.norm1(tokens)))
        return tokens + self.ls2(self.mlp(self.norm2(tokens)))


# Hub (transformers ViTModel / Dinov2Model) parameter and module names -> ours. DINOv2's Hub names norm1, norm2,
# mlp.fc1 and mlp.fc2 already match; q, k and v are fused into qkv separately.
_HUB_TOP_LEVEL_NAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection": "patch_embed",
    "layernorm": "norm",
}
_HUB_BLOCK_NAMES = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "layer_scale1": "ls1",
    "layer_scale2": "ls2",
}


def _rename_hub_vit_key(key):
    """e.g. encoder.layer.3.layernorm_before.weight -> blocks.3.norm1.weight, layernorm.bias -> norm.bias."""
    if key in _HUB_TOP_LEVEL_NAMES:
        return _HUB_TOP_LEVEL_NAMES[key]
    module, _, param = key.rpartition(".")
    block = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", module)
    if block is None:
        return f"{_HUB_TOP_LEVEL_NAMES.get(module, module)}.{param}"
    index, name = block.groups()
    return f"blocks.{index}.{_HUB_BLOCK_NAMES.get(name, name)}.{'gamma' if param == 'lambda1' else param}"


def _fuse_qkv(state, attention, names):
    """`state` with each block's separate q, k, v projections (`{attention}.{name}.` for the three
    `names`) concatenated into our fused `attn.qkv.`, in place."""
    for query_key in [key for key in state if f"{attention}.{names[0]}." in key]:
        parts = [query_key.replace(f".{names[0]}.", f".{name}.") for name in names]
        if all(part in state for part in parts):  # otherwise load_into reports what is missing
            fused_key = query_key.replace(f"{attention}.{names[0]}.", ".attn.qkv.")
            state[fused_key] = torch.cat([state.pop(part) for part in parts])
    return state


def _vit_state_from_hub(hub_state):
    state = {_rename_hub_vit_key(key): tensor for key, tensor in hub_state.items()}
    return _fuse_qkv(state, ".attention.attention", ("query", "key", "value"))


def _vit_state_from_original(original_state):
    # `module.`: saved from DistributedDataParallel; `backbone.`: DINO's backbone/head wrapper;
    # `base_encoder.`: MoCo v3's online ViT (its momentum twin and heads are dropped on reading).
    state = {key.removeprefix("module.").removeprefix("backbone.").removeprefix("base_encoder."): t
             for key, t in original_state.items()}
    return {key.replace("patch_embed.proj.", "patch_embed."): t for key, t in state.items()}


# CLIP's image tower (transformers CLIPVisionModel; `vision_model.` in a CLIPModel's file) -> ours.
_CLIP_TOP_LEVEL_NAMES = {
    "embeddings.patch_embedding": "patch_embed",
    "pre_layrnorm": "norm_pre",  # sic: the Hub's spelling
    "post_layernorm": "norm",
}
_CLIP_BLOCK_NAMES = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj"}


def _vit_state_from_clip(clip_state):
    """vision_model.* -> ours: CLIP's class embedding (D,) and position table (1 + N, D) gain the
    leading dims of ours, q/k/v are fused into qkv, the final LayerNorm becomes `norm`."""
    state = {}
    for key, tensor in clip_state.items():
        key = key.removeprefix("vision_model.")
        module, _, param = key.rpartition(".")
        block = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", module)
        if key == "embeddings.class_embedding":
            state["cls_token"] = tensor.reshape(1, 1, -1)
        elif key == "embeddings.position_embedding.weight":
            state["pos_embed"] = tensor[None]
        elif block:
            index, name = block.groups()
            state[f"blocks.{index}.{_CLIP_BLOCK_NAMES.get(name, name)}.{param}"] = tensor
        else:
            state[f"{_CLIP_TOP_LEVEL_NAMES.get(module, module)}.{param}"] = tensor
    return _fuse_qkv(state, ".self_attn", ("q_proj", "k_proj", "v_proj"))


def _keep_encoder_key(key):
    # Not the image backbone: the pooler (an untrained head), DINOv2's mask token (masked-image
    # training only), CLIP's text tower, projections and position ids, MoCo v3's momentum encoder,
    # predictor and projection head.
    dropped_prefixes = ("pooler.", "text_model.", "visual_projection.", "text_projection.", "logit_scale",
                        "module.momentum_encoder.", "module.predictor.", "module.base_encoder.head.")
    return not key.startswith(dropped_prefixes) and not key.endswith(("mask_token", "position_ids"))


class ViTEncoder(nn.Module):
    """A frozen ViT: patch conv, CLS token, learned positions, pre-norm blocks, final LayerNorm.

    `layer_scale=True` gives the DINOv2 block; `pre_norm`, `act="quick_gelu"`, `patch_bias=False`
    and CLIP's mean/std give CLIP's image tower. Build with random weights from sizes, or load
    published weights with `from_pretrained`. `tokens` gives the Lumos image condition.
    """

    HUB_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
    ORIGINAL_FILES = ("dino_vitbase16_pretrain.pth", "vit-b-300ep.pth.tar")

    def __init__(
        self, image_size=224, patch_size=16, width=768, depth=12, heads=12, mlp_width=None, norm_eps=1e-6,
        layer_scale=False, pre_norm=False, act="gelu", patch_bias=True, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    ):
        super().__init__()
        if image_size % patch_size or width % heads:
            raise ValueError(f"image_size {image_size} must divide by patch_size {patch_size}, width {width} by heads {heads}")
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.grid = image_size // patch_size
        self.patch_embed = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=patch_bias)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, width))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + self.grid**2, width))
        # CLIP normalises the embedded tokens once before the first block.
        self.norm_pre = nn.LayerNorm(width, eps=norm_eps) if pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(
            ViTBlock(width, heads, mlp_width or 4 * width, norm_eps, layer_scale, act) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        freeze(self)

    @classmethod
    def from_pretrained(cls, repo_or_dir, revision=None, subfolder=None):
        """Load a Hub repo id or local folder (Hub layout: config.json + model.safetensors / pytorch_model.bin,
        e.g. facebook/dino-vitb16, facebook/dinov2-base, openai/clip-vit-base-patch16; or an original
        layout: dino_vitbase16_pretrain.pth, MoCo v3's vit-b-300ep.pth.tar), or a path to one checkpoint
        file, such as an original-layout .pth. Sizes are read off the tensors; the layout is told by
        the key names."""
        path = pathlib.Path(repo_or_dir)
        if path.is_file():  # one checkpoint file; its folder is where a config.json would be
            repo_or_dir, candidates, subfolder = path.parent, [path.name], None
        else:
            candidates = cls.HUB_FILES + cls.ORIGINAL_FILES
        state = load_state_dict(repo_or_dir, candidates, revision, subfolder, keep=_keep_encoder_key)
        # CLIP: a CLIPModel's tower is under vision_model.; transformers 5 saves a CLIPVisionModel without it.
        config, clip = {}, bool({"vision_model.embeddings.class_embedding", "embeddings.class_embedding"} & state.keys())
        if "embeddings.cls_token" in state or clip:
            config = read_config(repo_or_dir, revision, subfolder)
            config = config.get("vision_config", config)  # a whole CLIPModel's config.json nests the tower's
            if config.get("use_swiglu_ffn") or config.get("hidden_act", "gelu") not in ACTIVATIONS:
                raise ValueError(f"{repo_or_dir}: only (quick-)GELU-MLP ViTs are supported, not "
                                 f"{'SwiGLU' if config.get('use_swiglu_ffn') else config['hidden_act']}")
            state = _vit_state_from_clip(state) if clip else _vit_state_from_hub(state)
        else:
            state = _vit_state_from_original(state)
        model = cls._sized_for(state, config, repo_or_dir, clip)
        load_into(model, state, repo_or_dir)
        return model

    @classmethod
    def _sized_for(cls, state, config, source, clip=False):
        """An empty model with the sizes of `state`; heads and LayerNorm eps come from config.json when
        there is one (the Hub's says eps 1e-12 for DINO, 1e-5 for CLIP), else 64-wide heads and eps 1e-6
        (DINO's and MoCo v3's)."""
        needed = ("cls_token", "pos_embed", "patch_embed.weight", "blocks.0.mlp.fc1.weight")
        if any(key not in state for key in needed):
            raise ValueError(f"{source}: not a ViT checkpoint of DINO, CLIP or MoCo v3 (it lacks one of "
                             f"{', '.join(needed)})")
        width = state["cls_token"].shape[-1]
        patch_size = state["patch_embed.weight"].shape[-1]
        return cls(
            image_size=patch_size * math.isqrt(state["pos_embed"].shape[1] - 1),
            patch_size=patch_size,
            width=width,
            depth=1 + max(int(key.split(".")[1]) for key in state if key.startswith("blocks.")),
            heads=config.get("num_attention_heads", width // 64),
            mlp_width=state["blocks.0.mlp.fc1.weight"].shape[0],
            norm_eps=config.get("layer_norm_eps", 1e-6),
            layer_scale="blocks.0.ls1.gamma" in state,
            pre_norm="norm_pre.weight" in state,
            act=config.get("hidden_act", "gelu"),
            patch_bias="patch_embed.bias" in state,
            **(dict(mean=CLIP_MEAN, std=CLIP_STD) if clip else {}),
        )

    def _position_embedding(self, grid_h, grid_w):
        """(1, 1 + grid_h * grid_w, D); the patch part bicubic-resized when the grid is not the native one."""
        if (grid_h, grid_w) == (self.grid, self.grid):
            return self.pos_embed
        cls_position, patch_positions = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_positions = patch_positions.unflatten(1, (self.grid, self.grid)).permute(0, 3, 1, 2)
        # float32: bicubic resampling in half precision shifts the embeddings.
        resized = F.interpolate(patch_positions.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        resized = resized.to(self.pos_embed.dtype).flatten(2).transpose(1, 2)
        return torch.cat([cls_position, resized], dim=1)

    def forward(self, pixel_values):
        """pixel_values (B, 3, H, W), normalised with self.mean / self.std -> tokens after the final norm
        (B, 1 + N, D), CLS first, then the N = (H / patch) * (W / patch) patches in row-major order."""
        patches = self.patch_embed(pixel_values)  # (B, D, H / patch, W / patch)
        grid_h, grid_w = patches.shape[-2:]
        tokens = torch.cat([self.cls_token.expand(len(patches), -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
        tokens = self.norm_pre(tokens + self._position_embedding(grid_h, grid_w))
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    @torch.no_grad()
    def encode(self, images, size=None):
        """images (B, 3, H, W) in [-1, 1], any size -> the L2-normalised CLS (B, D), float32 (`tokens`)."""
        return self.tokens(images, size)[:, 0]

    def tokens(self, images, size=None):
        """images (B, 3, H, W) in [-1, 1], any size -> every final-norm token, each L2-normalised to unit
        length, (B, 1 + N, D) float32, CLS first; with gradients (data.py's shapes-encoder trains it).

        Preprocessing as DINO's demo: shorter side resized to `size` (default: the native image size,
        224 for DINO v1) with antialiased bilinear, center crop to size x size, the encoder's mean/std
        (ImageNet's; CLIP's own for CLIP). DINOv2's Hub config says 518 px; FD-DINOv2 conventionally
        uses size=224.
        """
        size = size or self.image_size
        pixels = (images.float() + 1) / 2
        pixels = TF.resize(pixels, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        pixels = TF.center_crop(pixels, [size, size])
        # TF.normalize's arithmetic, without its check of std on the host (a GPU sync every step):
        # the constants are filled in on the device, not copied from the host.
        mean, std = (torch.stack([pixels.new_full((1, 1), v) for v in values]) for values in (self.mean, self.std))
        pixels = (pixels - mean) / std
        return F.normalize(self(pixels.to(self.pos_embed.dtype)).float(), dim=-1)


# ----------------------------------------------------------------------------------------------
# SD VAE (diffusers AutoencoderKL layout, e.g. stabilityai/sd-vae-ft-mse). Module names follow
# diffusers so that its checkpoints load unchanged (bar the old attention spelling).
# ----------------------------------------------------------------------------------------------


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x):
        """x (B, C_in, H, W) -> (B, C_out, H, W)."""
        residual = self.conv1(F.silu(self.norm1(x)))
        residual = self.conv2(F.silu(self.norm2(residual)))
        return self.conv_shortcut(x) + residual


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all positions of a feature map, added back to its input."""

    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # a list only to match the key `to_out.0`

    def forward(self, x):
        """x (B, C, H, W) -> (B, C, H, W)."""
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H * W, C)
        q, k, v = (project(tokens)[:, None] for project in (self.to_q, self.to_k, self.to_v))  # one head
        attended = self.to_out[0](F.scaled_dot_product_attention(q, k, v)[:, 0])
        return x + attended.transpose(1, 2).reshape(x.shape)


class MidBlock(nn.Module):
    def __init__(self, channels, groups):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)])

    def forward(self, x):
        """x (B, C, H, W) -> (B, C, H, W)."""
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        """x (B, C, H, W) -> (B, C, H / 2, W / 2)."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # right/bottom padding only, as the SD VAE was trained


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        """x (B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _resnet_stack(in_channels, out_channels, count, groups):
    return nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(count))


class DownLevel(nn.Module):
    """One encoder resolution: ResNet blocks, then a 2x downsampling except at the last level."""

    def __init__(self, in_channels, out_channels, num_resnets, groups, downsample):
        super().__init__()
        self.resnets = _resnet_stack(in_channels, out_channels, num_resnets, groups)
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, x):
        """x (B, C_in, H, W) -> (B, C_out, H or H / 2, W or W / 2)."""
        for layer in (*self.resnets, *self.downsamplers):
            x = layer(x)
        return x


class UpLevel(nn.Module):
    """One decoder resolution: ResNet blocks, then a 2x upsampling except at the last level."""

    def __init__(self, in_channels, out_channels, num_resnets, groups, upsample):
        super().__init__()
        self.resnets = _resnet_stack(in_channels, out_channels, num_resnets, groups)
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x):
        """x (B, C_in, H, W) -> (B, C_out, H or 2H, W or 2W)."""
        for layer in (*self.resnets, *self.upsamplers):
            x = layer(x)
        return x


class VAEEncoder(nn.Module):
    def __init__(self, in_channels, latent_channels, channels, layers_per_block, groups):
        super().__init__()
        inputs = (channels[0], *channels[:-1])
        last = len(channels) - 1
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownLevel(c_in, c_out, layers_per_block, groups, downsample=level < last)
            for level, (c_in, c_out) in enumerate(zip(inputs, channels))
        )
        self.mid_block = MidBlock(channels[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(channels[-1], 2 * latent_channels, 3, padding=1)

    def forward(self, images):
        """images (B, C_in, H, W) -> posterior mean and log-variance, stacked (B, 2 * latent_channels, H / f, W / f)."""
        x = self.conv_in(images)
        for level in self.down_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class VAEDecoder(nn.Module):
    def __init__(self, latent_channels, out_channels, channels, layers_per_block, groups):
        super().__init__()
        channels = channels[::-1]  # the decoder climbs from the deepest level
        inputs = (channels[0], *channels[:-1])
        last = len(channels) - 1
        self.conv_in = nn.Conv2d(latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], groups)
        self.up_blocks = nn.ModuleList(
            UpLevel(c_in, c_out, layers_per_block + 1, groups, upsample=level < last)
            for level, (c_in, c_out) in enumerate(zip(inputs, channels))
        )
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)

    def forward(self, latents):
        """latents (B, latent_channels, h, w) -> images (B, C_out, h * f, w * f)."""
        x = self.mid_block(self.conv_in(latents))
        for level in self.up_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# Older diffusers checkpoints (e.g. the first upload of sd-vae-ft-mse) use these attention names.
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

# config.json values of AutoencoderKL variants this VAE does not implement.
_VAE_REQUIRED_CONFIG = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True}


def _modern_attention_names(state):
    renamed = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        parent, _, name = module.rpartition(".")
        if ".attentions." in key and name in _OLD_ATTENTION_NAMES:
            key = f"{parent}.{_OLD_ATTENTION_NAMES[name]}.{param}"
        renamed[key] = tensor
    return renamed


class VAE(nn.Module):
    """The frozen Stable Diffusion VAE (diffusers AutoencoderKL): images <-> latents, f = 8 for SD.

    `encode`/`decode` work in raw latent units; the diffusion model sees `latent * scaling_factor`.
    """

    WEIGHT_FILES = (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.safetensors.index.json",
    )

    def __init__(
        self, in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        layers_per_block=2, norm_num_groups=32, scaling_factor=0.18215,
    ):
        super().__init__()
        channels = tuple(block_out_channels)
        self.encoder = VAEEncoder(in_channels, latent_channels, channels, layers_per_block, norm_num_groups)
        self.decoder = VAEDecoder(latent_channels, out_channels, channels, layers_per_block, norm_num_groups)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.scaling_factor = scaling_factor
        freeze(self)

    @classmethod
    def from_config(cls, config, source="config"):
        """A randomly initialised VAE from a diffusers AutoencoderKL config.json dict."""
        unsupported = [f"{key}={config[key]!r}" for key, value in _VAE_REQUIRED_CONFIG.items() if config.get(key, value) != value]
        unsupported += [name for name in config.get("down_block_types", []) if name != "DownEncoderBlock2D"]
        unsupported += [name for name in config.get("up_block_types", []) if name != "UpDecoderBlock2D"]
        if unsupported:
            raise ValueError(f"{source}: unsupported AutoencoderKL config: {', '.join(unsupported)}")
        sizes = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block", "norm_num_groups")
        kwargs = {key: config[key] for key in sizes if key in config}
        return cls(**kwargs, scaling_factor=config.get("scaling_factor") or 0.18215)

    @classmethod
    def from_pretrained(cls, repo_or_dir, revision=None, subfolder=None):
        """Load a Hub repo id or local folder in the diffusers layout (config.json + diffusion_pytorch_model.*)."""
        config = read_config(repo_or_dir, revision, subfolder)
        if not config:
            raise FileNotFoundError(f"{repo_or_dir}: no config.json, expected a diffusers AutoencoderKL folder")
        model = cls.from_config(config, source=repo_or_dir)
        state = load_state_dict(repo_or_dir, cls.WEIGHT_FILES, revision, subfolder)
        load_into(model, _modern_attention_names(state), repo_or_dir)
        return model

    @property
    def dtype(self):
        """Parameter dtype; inputs are cast to it."""
        return self.quant_conv.weight.dtype

    @torch.no_grad()
    def encode(self, images, chunk_size=8):
        """images (B, 3, H, W) in [-1, 1] -> posterior (mean, std), each (B, latent_channels, H / f, W / f),
        in raw latent units. Runs `chunk_size` images at a time to bound activation memory."""
        moments = torch.cat([self.quant_conv(self.encoder(chunk.to(self.dtype))) for chunk in images.split(chunk_size)])
        mean, log_variance = moments.chunk(2, dim=1)
        return mean, torch.exp(0.5 * log_variance.clamp(-30.0, 20.0))

    @torch.no_grad()
    def decode(self, latents, chunk_size=8):
        """latents (B, latent_channels, h, w) in raw units -> images (B, 3, h * f, w * f), about [-1, 1].
        Decodes `chunk_size` samples at a time: at 256 px the default 8 peaks near 2 GiB of fp32
        activations (measured), whatever the batch size."""
        return torch.cat([self.decoder(self.post_quant_conv(chunk.to(self.dtype))) for chunk in latents.split(chunk_size)])


# ----------------------------------------------------------------------------------------------
# T5 v1.1 encoder: the text condition for T2I (SPEC section 4).
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class T5Config:
    """Sizes of a T5 v1.1 encoder, named as in the Hub's config.json; the defaults are XXL."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    num_heads: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    @classmethod
    def from_hub_config(cls, config, source="config.json"):
        """Read the sizes from a Hub config.json dict; keys it lacks keep the XXL defaults."""
        feed_forward = config.get("feed_forward_proj", "gated-gelu")
        if feed_forward != "gated-gelu":
            raise ValueError(
                f"{source}: feed_forward_proj={feed_forward!r}, but T5Encoder implements T5 v1.1 "
                f"('gated-gelu'); use a t5-v1_1 checkpoint such as DeepFloyd/t5-v1_1-xxl"
            )
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})


# Most preferred first: safetensors never unpickles; the index forms fetch only the shards needed.
T5_WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def is_t5_encoder_key(key):
    """Keys the encoder needs: everything else (decoder.*, lm_head.*) is never read from disk."""
    return key == "shared.weight" or key.startswith("encoder.")


def relative_position_bucket(relative_position, num_buckets, max_distance):
    """T5's bidirectional bucketing of key-minus-query offsets (any shape, long) -> bucket ids.

    Half the buckets are for keys after the query, half for keys before. Within a half, offsets
    below a quarter of num_buckets get a bucket each; longer ones share log-spaced buckets, and
    everything from max_distance on lands in the last one.
    """
    half = num_buckets // 2
    bucket = (relative_position > 0).long() * half
    distance = relative_position.abs()
    exact = half // 2
    # clamp: log(0) would be -inf; those offsets take the exact branch anyway.
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    log_spaced = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return bucket + torch.where(distance < exact, distance, log_spaced)


class T5RMSNorm(nn.Module):
    """T5's layer norm: scale only (no mean subtraction, no bias), statistics in fp32."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        """x (..., D) -> (..., D) in the weight's dtype."""
        # In bf16 the mean of squares of 4096 activations loses too many bits: do it in fp32.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(self.weight.dtype)


class T5SelfAttention(nn.Module):
    """Multi-head self-attention without the 1/sqrt(d) scale (T5 folds it into the init).

    Block 0's instance also owns the relative position bias table that every block uses.
    """

    def __init__(self, config, has_position_bias):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.d_kv
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_position_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def forward(self, x, attn_bias):
        """x (B, L, D), attn_bias (B, H, L, L) added to the scores -> (B, L, D)."""
        batch, length, _ = x.shape

        def heads(proj):
            return proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q), heads(self.k), heads(self.v),
                                             attn_mask=attn_bias, scale=1.0)
        return self.o(out.transpose(1, 2).reshape(batch, length, -1))


class T5GatedFeedForward(nn.Module):
    """T5 v1.1 FFN: wo(gelu_tanh(wi_0 x) * wi_1 x)."""

    def __init__(self, d_model, d_ff):
        super().__init__()
        self.wi_0 = nn.Linear(d_model, d_ff, bias=False)
        self.wi_1 = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        """x (B, L, D) -> (B, L, D)."""
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class T5Block(nn.Module):
    """Pre-norm residual block; `layer.0` (attention) and `layer.1` (FFN) are the checkpoint's names."""

    def __init__(self, config, has_position_bias):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.layer = nn.ModuleList([
            nn.ModuleDict({"SelfAttention": T5SelfAttention(config, has_position_bias),
                           "layer_norm": T5RMSNorm(config.d_model, eps)}),
            nn.ModuleDict({"DenseReluDense": T5GatedFeedForward(config.d_model, config.d_ff),
                           "layer_norm": T5RMSNorm(config.d_model, eps)}),
        ])

    def forward(self, x, attn_bias):
        """x (B, L, D), attn_bias (B, H, L, L) -> (B, L, D)."""
        attention, feed_forward = self.layer
        x = x + attention["SelfAttention"](attention["layer_norm"](x), attn_bias)
        return x + feed_forward["DenseReluDense"](feed_forward["layer_norm"](x))


class T5Encoder(nn.Module):
    """The encoder half of T5 v1.1; parameter names match the Hub checkpoints.

        encoder = T5Encoder.from_pretrained("DeepFloyd/t5-v1_1-xxl", dtype=torch.bfloat16)
        input_ids, mask = T5Tokenizer.from_pretrained("DeepFloyd/t5-v1_1-xxl")(captions)
        cond_tokens = encoder(input_ids, mask)              # (B, 120, 4096)

    Runs in fp32 or bf16, not fp16: T5 activations overflow fp16's range.
    """

    def __init__(self, config=None):
        super().__init__()
        self.config = config or T5Config()
        self.shared = nn.Embedding(self.config.vocab_size, self.config.d_model)
        self.encoder = nn.ModuleDict({
            "block": nn.ModuleList([T5Block(self.config, has_position_bias=i == 0)
                                    for i in range(self.config.num_layers)]),
            "final_layer_norm": T5RMSNorm(self.config.d_model, self.config.layer_norm_epsilon),
        })

    def attention_bias(self, attention_mask):
        """(B, L) mask, 1 = token, 0 = padding -> (B, H, L, L) additive bias for every block's scores.

        The learned relative-position bias of block 0, plus the dtype's most negative value on
        padded keys: finite, so a row with no valid key stays a uniform softmax instead of NaN.
        """
        length = attention_mask.shape[1]
        position = torch.arange(length, device=attention_mask.device)
        buckets = relative_position_bucket(position[None, :] - position[:, None],  # (L_query, L_key)
                                           self.config.relative_attention_num_buckets,
                                           self.config.relative_attention_max_distance)
        table = self.encoder["block"][0].layer[0]["SelfAttention"].relative_attention_bias
        position_bias = table(buckets).permute(2, 0, 1)[None]  # (1, H, L, L)
        padded_key = (attention_mask == 0)[:, None, None, :]  # (B, 1, 1, L)
        return position_bias.masked_fill(padded_key, torch.finfo(position_bias.dtype).min)

    def forward(self, input_ids, attention_mask=None):
        """input_ids (B, L) long, attention_mask (B, L) 1/0 or None (no padding) -> (B, L, d_model).

        Every position gets a feature, padding included; the mask only keeps padding out of the
        keys. The features are those after the final norm, as T5EncoderModel returns them.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have the shape "
                             f"of input_ids {tuple(input_ids.shape)}")
        if input_ids.numel() and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < self.config.vocab_size:
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}), the T5 vocabulary")
        x = self.shared(input_ids)
        attn_bias = self.attention_bias(attention_mask)
        for block in self.encoder["block"]:
            x = block(x, attn_bias)
        return self.encoder["final_layer_norm"](x)

    @classmethod
    def from_pretrained(cls, repo_or_dir, revision=None, subfolder=None, dtype=torch.float32):
        """Load the encoder of a T5 v1.1 Hub repo (or a local folder of the same files), frozen:
        eval mode, no gradients, parameters in `dtype` (float32 or bfloat16).

        `DeepFloyd/t5-v1_1-xxl` holds only the encoder (two .bin shards and an index);
        `google/t5-v1_1-xxl` holds encoder and decoder in one .bin, of which only `shared.weight`
        and `encoder.*` are read: the .bin is memory-mapped, so decoder bytes never enter memory.
        """
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype={dtype}: T5Encoder runs in torch.float32 or torch.bfloat16 (fp16 overflows)")
        config = T5Config.from_hub_config(read_config(repo_or_dir, revision, subfolder), f"{repo_or_dir}/config.json")
        state = load_state_dict(repo_or_dir, T5_WEIGHT_FILES, revision, subfolder, keep=is_t5_encoder_key)
        # Some exports store the tied input embedding (also) under the encoder's own name.
        alias = state.pop("encoder.embed_tokens.weight", None)
        if alias is not None:
            state.setdefault("shared.weight", alias)
        # Built on the meta device and given the loaded tensors themselves (assign): no random init
        # of XXL's 4.7B parameters, and no second copy; fp32 weights stay memory-mapped.
        with torch.device("meta"):
            model = cls(config)
        load_into(model, state, f"T5 encoder weights of {repo_or_dir}", assign=True)
        return freeze(model.to(dtype))


# ----------------------------------------------------------------------------------------------
# Prompt preprocessing: what the official T2I model's T5 saw (SPEC section 4).
# ----------------------------------------------------------------------------------------------
# The release's T5Embedder (Lumos / PixArt-alpha diffusion/model/t5.py, from DeepFloyd IF) cleans
# every prompt before its tokenizer; the tokens depend on each pattern and on their order, so the
# rules below are the release's, one for one, written with the standard library only.

_URL_DOMAIN = r"[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)"
_URL_RES = [re.compile(rf"\b((?:{scheme}:(?:\/{{1,3}}|[a-zA-Z0-9%])|{_URL_DOMAIN}))") for scheme in ("https?", "www")]
# 31C0-31EF CJK strokes, 31F0-31FF Katakana phonetic extensions, 3200-32FF enclosed CJK letters and
# months, 3300-33FF CJK compatibility, 3400-4DBF CJK ideographs ext. A, 4DC0-4DFF Yijing hexagrams,
# 4E00-9FFF CJK unified ideographs: removed, one range after the other, as the release does.
_CJK_RES = [re.compile(f"[{a}-{b}]+") for a, b in (
    ("\u31c0", "\u31ef"), ("\u31f0", "\u31ff"), ("\u3200", "\u32ff"), ("\u3300", "\u33ff"),
    ("\u3400", "\u4dbf"), ("\u4dc0", "\u4dff"), ("\u4e00", "\u9fff"))]
_DASHES_RE = re.compile(r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C"
                        r"\u3030\u30A0\uFE31\uFE32\uFE58\uFE63\uFF0D]+")
_BAD_PUNCT_RE = re.compile(r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\\/\*]{1,}")
_FILE_EXTENSIONS = "png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4"
# (pattern, replacement) in the release's order, after the HTML step, up to its `basic_clean`.
_RULES_BEFORE_BASIC_CLEAN = [
    (r"@[\w\d]+\b", ""),                                   # @nickname
    *[(cjk, "") for cjk in _CJK_RES],
    (_DASHES_RE, "-"),                                     # every kind of dash -> "-"
    (r"[`´«»“”¨]", '"'),                                   # quotes to one standard
    (r"[‘’]", "'"),
    (r"&quot;?", ""),                                      # entities left over by the HTML step
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),          # IP addresses
    (r"\d:\d\d\s+$", ""),                                  # article ids
    (r"\\n", " "),                                         # a literal backslash-n
    (r"#\d{1,3}\b", ""),                                   # "#123"
    (r"#\d{5,}\b", ""),                                    # "#12345..."
    (r"\b\d{6,}\b", ""),                                   # "123456..."
    (rf"[\S]+\.(?:{_FILE_EXTENSIONS})", ""),               # file names
    (r"[\"\']{2,}", '"'),                                  # """AUSVERKAUFT"""
    (r"[\.]{2,}", " "),                                    # "..."
    (_BAD_PUNCT_RE, " "),                                  # ***AUSVERKAUFT***, #AUSVERKAUFT
    (r"\s+\.\s+", " "),                                    # " . "
]
_RULES_AFTER_BASIC_CLEAN = [
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),                    # jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),                    # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),                          # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),            # shop phrases
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (rf"\b(?:{_FILE_EXTENSIONS})(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a...
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),                  # sizes: 1920x1080 (Latin x, Cyrillic х, ×)
    (r"\b\s+\:\s+", ": "),
    (r"(\D[,\./])\b", r"\1 "),                             # a space after , . / before a word
    (r"\s+", " "),
    # (the release calls caption.strip() here and drops the result: nothing is stripped yet)
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"),                   # one pair of enclosing quotes
    (r"^[\'\_,\-\:;]", ""),
    (r"[\'\_,\-\:\-\+]$", ""),
    (r"^\.\S+$", ""),
]
# A stand-in for ftfy.fix_text: its table-driven fixes (ftfy's chardata tables), not its mojibake repair.
# C1 controls read as Windows-1252 (bytes it leaves undefined stay as they are).
_FTFY_C1 = {i: bytes([i]).decode("cp1252", errors="ignore") or chr(i) for i in range(0x80, 0xA0)}
_FTFY_LIGATURES = {ord(k): v for k, v in zip("ĲĳŉǱǲǳǄǅǆǇǈǉǊǋǌﬀﬁﬂﬃﬄﬅﬆ", (
    "IJ", "ij", "ʼn", "DZ", "Dz", "dz", "DŽ", "Dž", "dž", "LJ", "Lj", "lj", "NJ", "Nj", "nj",
    "ff", "fi", "fl", "ffi", "ffl", "ſt", "st"))}
_FTFY_WIDTH = {0x3000: " ", **{i: unicodedata.normalize("NFKC", chr(i)) for i in range(0xFF01, 0xFFF0)
                               if unicodedata.normalize("NFKC", chr(i)) != chr(i)}}
_FTFY_QUOTES = {**dict.fromkeys([0x2BC, *range(0x2018, 0x201C)], "'"), **dict.fromkeys(range(0x201C, 0x2020), '"')}
_FTFY_CONTROL = dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
                               *range(0xFFF9, 0xFFFD)])


def _fix_text(text):
    """ftfy.fix_text without its encoding repair: C1 controls, ligatures, full/half width, curly
    quotes, control characters removed, NFC; in ftfy's order, repeated until nothing changes."""
    while True:
        fixed = text
        for table in (_FTFY_C1, _FTFY_LIGATURES, _FTFY_WIDTH, _FTFY_QUOTES, _FTFY_CONTROL):
            fixed = fixed.translate(table)
        fixed = unicodedata.normalize("NFC", fixed)
        if fixed == text:
            return text
        text = fixed


# Named references as bs4 reads them: every HTML5 name, with or without its semicolon.
_HTML_ENTITIES = {name.removesuffix(";"): char for name, char in sorted(html.entities.html5.items())}


class _HTMLText(HTMLParser):
    """The text of an HTML fragment as BeautifulSoup(text, "html.parser").text gives it: the same
    standard-library tokenizer, references resolved as bs4 resolves them, CDATA kept; comments,
    declarations and what is inside <script>, <style>, <template>, <rt>, <rp> left out (bs4 >= 4.11)."""
    HIDDEN = ("script", "style", "template", "rt", "rp")

    def __init__(self):
        super().__init__(convert_charrefs=False)
        self.parts, self.hidden = [], 0

    def handle_starttag(self, tag, attrs):
        self.hidden += tag in self.HIDDEN

    def handle_endtag(self, tag):
        self.hidden = max(self.hidden - (tag in self.HIDDEN), 0)

    def handle_data(self, data):
        if not self.hidden:
            self.parts.append(data)

    def handle_entityref(self, name):  # an unknown name stays literal, without its semicolon
        self.handle_data(_HTML_ENTITIES.get(name, "&" + name))

    def handle_charref(self, name):
        self.handle_data(html.unescape(f"&#{name};"))

    def unknown_decl(self, data):
        if data.upper().startswith("CDATA["):
            self.handle_data(data[len("CDATA["):])

    @classmethod
    def text(cls, markup):
        parser = cls()
        parser.feed(markup)
        parser.close()
        return "".join(parser.parts)


def clean_caption(text):
    """One pass of the release's caption cleaner (T5Embedder.clean_caption of Lumos / PixArt-alpha,
    from DeepFloyd IF): URL-unquote (`+` is a space), strip, lowercase; remove URLs, HTML markup,
    @names, CJK ranges, IP addresses, ids, file names, runs of bad punctuation and shop phrases;
    unify dashes and quotes; split words_joined_by_more_than_3 -/_; collapse whitespace.

    Same patterns in the same order, except two third-party calls, so these inputs can differ:
    - ftfy.fix_text: only its table fixes are reproduced (_fix_text), not its repair of mojibake
      (text decoded with the wrong codec, "cafÃ©" -> "café"; it runs first, so it also decides
      what the C1 and other table fixes then see), of terminal escape sequences ("\x1b[31m": we drop
      only the ESC) and of lone surrogates. (Its HTML unescaping needs a "&", and bad punctuation
      has replaced every "&" by then, except one a fullwidth "＆" becomes in its second round.)
    - BeautifulSoup(text, "html.parser").text (_HTMLText): the same tokenizer and reference rules;
      bs4 also shortens a whitespace-only text between two tags to one space or newline (which
      only the single-space rules "free download" and "click for" can notice), resolves numeric
      references to noncharacters and undefined C1 codes (&#xFFFE;, &#x81;) where html.unescape
      drops them, and before 4.9 kept the text of <script>, <style>, <template> (<rt>, <rp>: 4.11).
    """
    caption = urllib.parse.unquote_plus(str(text)).strip().lower()
    caption = caption.replace("<person>", "person")
    for url in _URL_RES:
        caption = url.sub("", caption)
    caption = _HTMLText.text(caption)
    for pattern, replacement in _RULES_BEFORE_BASIC_CLEAN:
        caption = re.sub(pattern, replacement, caption)
    if len(re.findall(r"(?:\-|\_)", caption)) > 3:        # this-is-my-cute-cat / this_is_my_cute_cat
        caption = re.sub(r"(?:\-|\_)", " ", caption)
    caption = html.unescape(html.unescape(_fix_text(caption))).strip()   # the release's basic_clean
    for pattern, replacement in _RULES_AFTER_BASIC_CLEAN:
        caption = re.sub(pattern, replacement, caption)
    return caption.strip()


def preprocess_prompt(text, clean=True):
    """A prompt as the release's T5Embedder.text_preprocessing hands it to the tokenizer: with
    cleaning (its default, use_text_preprocessing=True) clean_caption applied twice, the second
    pass catching what the first one exposed; without, text.lower().strip()."""
    return clean_caption(clean_caption(text)) if clean else text.lower().strip()


# ----------------------------------------------------------------------------------------------
# T5 tokenizer: SentencePiece unigram, read and run without the sentencepiece library.
# ----------------------------------------------------------------------------------------------

# ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
FLT_MIN, FLT_MAX = 1.1754943508222875e-38, 3.4028234663852886e38
SPACE_SYMBOL = "\u2581"  # "▁", SentencePiece's visible stand-in for a space


def _varint(data, pos):
    """Decode a protobuf varint at data[pos:] -> (value, position after it)."""
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _proto_fields(data):
    """Yield (field number, value) of a serialized protobuf message, in order.

    Values are ints for varints, bytes for length-delimited fields (strings, sub-messages) and
    raw little-endian bytes for the fixed 32/64-bit wire types.
    """
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, pos = _varint(data, pos)
        elif wire_type == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value, pos = data[pos:pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        if pos > len(data):
            raise ValueError("truncated protobuf message")
        yield number, value


@dataclass
class SentencePieceModel:
    """The parts of a SentencePiece ModelProto (`spiece.model`) that encoding needs."""

    pieces: list  # (piece, score, type) in id order
    precompiled_charsmap: bytes = b""
    normalizer_name: str = ""  # without a charsmap: "" or "identity" leave text as is, else NFKC
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    treat_whitespace_as_suffix: bool = False
    byte_fallback: bool = False
    model_type: int = 1  # TrainerSpec.ModelType: 1 unigram, 2 BPE, 3 word, 4 char

    @classmethod
    def from_bytes(cls, data):
        """Parse a serialized ModelProto; unset fields keep the proto's defaults."""
        model = cls(pieces=[])
        for number, value in _proto_fields(data):
            if number == 1:  # repeated SentencePiece {1: piece, 2: score, 3: type}
                piece = dict(_proto_fields(value))
                model.pieces.append((piece.get(1, b"").decode("utf-8"),
                                     struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0,
                                     piece.get(3, NORMAL)))
            elif number == 2:  # TrainerSpec
                trainer = dict(_proto_fields(value))
                model.model_type = trainer.get(3, 1)
                model.treat_whitespace_as_suffix = bool(trainer.get(24, 0))
                model.byte_fallback = bool(trainer.get(35, 0))
            elif number == 3:  # NormalizerSpec
                spec = dict(_proto_fields(value))
                model.normalizer_name = spec.get(1, b"").decode("utf-8")
                model.precompiled_charsmap = bytes(spec.get(2, b""))
                model.add_dummy_prefix = bool(spec.get(3, 1))
                model.remove_extra_whitespaces = bool(spec.get(4, 1))
                model.escape_whitespaces = bool(spec.get(5, 1))
        return model


def _f32(x):
    """Round to float32. SentencePiece adds path scores in float32; equal-scoring segmentations
    (e.g. "9"+"99" vs "99"+"9") are then decided by its rounding, which we must reproduce."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _utf8_char_length(lead_byte):
    return 1 if lead_byte < 0x80 else 2 if lead_byte < 0xE0 else 3 if lead_byte < 0xF0 else 4


class CharsMap:
    """SentencePiece's precompiled normalisation rules: a Darts-clone double-array trie over UTF-8
    byte strings whose values are offsets of NUL-terminated replacements in a string blob.

    Blob layout: uint32 trie size in bytes, the trie's uint32 units, then the replacement strings.
    """

    def __init__(self, blob):
        if len(blob) <= 4:
            raise ValueError("precompiled_charsmap is broken (no room for its trie)")
        (trie_bytes,) = struct.unpack_from("<I", blob)
        if trie_bytes % 4 or 4 + trie_bytes >= len(blob):
            raise ValueError("precompiled_charsmap is broken (its trie size does not fit the blob)")
        self.units = struct.unpack_from(f"<{trie_bytes // 4}I", blob, 4)
        self.replacements = blob[4 + trie_bytes:]

    @staticmethod
    def _offset(unit):
        return (unit >> 10) << ((unit & (1 << 9)) >> 6)

    def longest_match(self, data, start):
        """Longest rule matching a prefix of data[start:] -> (its length in bytes, replacement), or None."""
        units, best = self.units, None
        node = self._offset(units[0])
        for end in range(start, len(data)):
            node ^= data[end]
            unit = units[node]
            if unit & 0x800000FF != data[end]:  # the unit's label is not this byte: no deeper rule
                break
            node ^= self._offset(unit)
            if unit >> 8 & 1:  # a rule ends here; its value sits in the leaf unit
                value = units[node] & 0x7FFFFFFF
                best = (end + 1 - start, self.replacements[value:self.replacements.index(b"\0", value)])
        return best


class SentencePieceNormalizer:
    """Text -> the string SentencePiece segments: character rules, then whitespace handling.

    Mirrors sentencepiece's normalizer.cc: each step rewrites the longest matching prefix
    (user-defined pieces are left as they are); leading, trailing and repeated spaces are
    dropped; a space is prepended (the "dummy prefix") and spaces become "▁".
    """

    def __init__(self, model):
        self.model = model
        self.charsmap = CharsMap(model.precompiled_charsmap) if model.precompiled_charsmap else None
        # SentencePiece itself treats an empty charsmap as identity; that only happens for
        # vocabularies built in memory, where "nmt_nfkc" means we apply NFKC up front.
        self.nfkc_up_front = self.charsmap is None and model.normalizer_name not in ("", "identity")
        user_defined = [piece for piece, _, kind in model.pieces if kind == USER_DEFINED]
        self.user_defined = sorted((piece.encode("utf-8") for piece in user_defined), key=len, reverse=True)

    def _rewrite_prefix(self, data, start):
        """The replacement of the longest rule at data[start:] and how many input bytes it consumes."""
        for piece in self.user_defined:
            if data.startswith(piece, start):
                return piece, len(piece)
        match = self.charsmap.longest_match(data, start) if self.charsmap else None
        if match:
            length, replacement = match
            return replacement, length
        length = _utf8_char_length(data[start])
        return data[start:start + length], length

    def __call__(self, text):
        """str -> normalized str (e.g. "  Héllo   wörld " -> "▁Héllo▁wörld")."""
        model = self.model
        if self.nfkc_up_front:
            text = unicodedata.normalize("NFKC", text)
        data, pos = text.encode("utf-8"), 0
        if model.remove_extra_whitespaces:
            while pos < len(data):
                replacement, consumed = self._rewrite_prefix(data, pos)
                if replacement != b" ":
                    break
                pos += consumed
        if pos == len(data):
            return ""
        space = SPACE_SYMBOL.encode("utf-8") if model.escape_whitespaces else b" "
        out = bytearray()
        dummy_space = model.add_dummy_prefix
        if dummy_space and not model.treat_whitespace_as_suffix:
            out += space
        prev_is_space = model.remove_extra_whitespaces
        while pos < len(data):
            replacement, consumed = self._rewrite_prefix(data, pos)
            pos += consumed
            if prev_is_space:
                replacement = replacement.lstrip(b" ")
            if replacement:
                out += replacement.replace(b" ", space)
                prev_is_space = replacement.endswith(b" ")
            if not model.remove_extra_whitespaces:
                prev_is_space = False
        if model.remove_extra_whitespaces:
            while out.endswith(space):
                del out[-len(space):]
        if dummy_space and model.treat_whitespace_as_suffix:
            out += space
        return out.decode("utf-8")


class UnigramSegmenter:
    """Best-scoring segmentation of a normalized string into vocabulary pieces (Viterbi).

    Follows sentencepiece's optimised unigram encoder, so that ties and float rounding break the
    same way: a character with no one-character piece also gets an unknown edge scored
    min(piece scores) - 10, and user-defined pieces always win where they match.
    """

    def __init__(self, model):
        self.unk_id = next((i for i, (_, _, kind) in enumerate(model.pieces) if kind == UNKNOWN), None)
        if self.unk_id is None:
            raise ValueError("the vocabulary has no unknown piece (type UNKNOWN, e.g. <unk>)")
        self.piece_ids = {piece: i for i, (piece, _, kind) in enumerate(model.pieces)
                          if kind in (NORMAL, USER_DEFINED)}
        self.byte_ids = {piece: i for i, (piece, _, kind) in enumerate(model.pieces) if kind == BYTE}
        normal_scores = [score for _, score, kind in model.pieces if kind == NORMAL]
        self.min_score = min([FLT_MAX, *normal_scores])  # sentencepiece's initial values
        self.max_score = max([FLT_MIN, *normal_scores])
        self.unk_score = _f32(self.min_score - 10.0)
        self.scores = [self._score(piece, score, kind) for piece, score, kind in model.pieces]
        self.max_piece_chars = max((len(piece) for piece in self.piece_ids), default=1)
        self.byte_fallback = model.byte_fallback

    def _score(self, piece, score, kind):
        if kind == USER_DEFINED:  # its byte length times the best piece score, minus 0.1
            return _f32(_f32(len(piece.encode("utf-8")) * self.max_score) - 0.1)
        return score

    def segment(self, text):
        """Normalized str -> [(piece text, id)] of the best path; unknown characters get unk_id."""
        size = len(text)
        # For each end position: score of the best path ending there, where its last piece starts, its id.
        best_score, best_start, best_id = [0.0] * (size + 1), [-1] * (size + 1), [-1] * (size + 1)
        for start in range(size):
            score_so_far = best_score[start]
            has_one_char_piece = False
            for end in range(start + 1, min(size, start + self.max_piece_chars) + 1):
                piece_id = self.piece_ids.get(text[start:end])
                if piece_id is None:
                    continue
                candidate = _f32(self.scores[piece_id] + score_so_far)
                if best_start[end] == -1 or candidate > best_score[end]:
                    best_score[end], best_start[end], best_id[end] = candidate, start, piece_id
                has_one_char_piece |= end == start + 1
            if not has_one_char_piece:
                candidate = _f32(self.unk_score + score_so_far)
                if best_start[start + 1] == -1 or candidate > best_score[start + 1]:
                    best_score[start + 1], best_start[start + 1], best_id[start + 1] = candidate, start, self.unk_id
        path, end = [], size
        while end > 0:
            path.append((text[best_start[end]:end], best_id[end]))
            end = best_start[end]
        return path[::-1]

    def encode(self, text):
        """Normalized str -> ids, with runs of unknowns merged into one (or spelled as bytes)."""
        ids, prev_is_unk = [], False
        for piece, piece_id in self.segment(text):
            is_unk = piece_id == self.unk_id
            if is_unk and self.byte_fallback:
                ids += [self.byte_ids.get(f"<0x{byte:02X}>", self.unk_id) for byte in piece.encode("utf-8")]
            elif not (is_unk and prev_is_unk):
                ids.append(piece_id)
            prev_is_unk = is_unk
        return ids


class T5Tokenizer:
    """T5's tokenizer: SentencePiece unigram ids, `</s>` appended, 100 sentinel ids after the pieces.

        tokenizer = T5Tokenizer.from_pretrained("DeepFloyd/t5-v1_1-xxl")
        tokenizer.encode("a cat")                    # unpadded ids, the last one </s> (1)
        input_ids, mask = tokenizer(captions)        # (B, 120) each, padded with <pad> = 0

    `<extra_id_N>` is id len(pieces) + 99 - N (32099 - N for T5); it, `</s>`, `<pad>` and `<unk>`
    written in a text are read as those tokens, as Hugging Face's T5 tokenizer reads them.
    """

    def __init__(self, model, num_extra_ids=100):
        if model.model_type != 1:
            raise ValueError(f"SentencePiece model_type {model.model_type}: only unigram models (1) are supported")
        piece_ids = {piece: i for i, (piece, _, _) in enumerate(model.pieces)}
        missing = [name for name in ("<pad>", "</s>") if name not in piece_ids]
        if missing:
            raise ValueError(f"the vocabulary lacks {', '.join(missing)}, which T5 needs for padding and end of text")
        self.normalizer = SentencePieceNormalizer(model)
        self.segmenter = UnigramSegmenter(model)
        self.pad_id, self.eos_id, self.unk_id = piece_ids["<pad>"], piece_ids["</s>"], self.segmenter.unk_id
        self.vocab_size = len(model.pieces) + num_extra_ids
        self.special_ids = {"<pad>": self.pad_id, "</s>": self.eos_id, model.pieces[self.unk_id][0]: self.unk_id}
        self.special_ids.update({f"<extra_id_{n}>": self.vocab_size - 1 - n for n in range(num_extra_ids)})
        # Longest first, so that <extra_id_10> is not read as <extra_id_1> followed by "0>".
        names = sorted(self.special_ids, key=len, reverse=True)
        self._special_pattern = re.compile("(" + "|".join(map(re.escape, names)) + ")")

    @classmethod
    def from_pretrained(cls, repo_or_dir, revision=None, subfolder=None, num_extra_ids=100):
        """From a Hub repo or folder holding `spiece.model`, or the path of such a file."""
        path = pathlib.Path(repo_or_dir)
        if not path.is_file():
            path = locate(repo_or_dir, "spiece.model", revision, subfolder)
            if path is None:
                raise FileNotFoundError(f"{repo_or_dir}: no spiece.model (T5's SentencePiece vocabulary) there")
        try:
            model = SentencePieceModel.from_bytes(path.read_bytes())
        except (ValueError, IndexError, KeyError, struct.error, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a readable SentencePiece model ({err})") from None
        try:
            return cls(model, num_extra_ids)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    @classmethod
    def from_pieces(cls, pieces, num_extra_ids=100, normalizer_name="nmt_nfkc"):
        """A tokenizer from an in-memory vocabulary: `pieces` is [(piece, log-probability score)].

        As in T5, ids 0, 1, 2 are <pad>, </s>, <unk> and pieces[i] gets id i + 3. Text is
        NFKC-normalised ("identity": left as is) and spaces become "▁", so a word piece reads
        "▁cat".
        """
        reserved = {"<pad>", "</s>", "<unk>"}
        for piece, _ in pieces:
            if not piece or piece in reserved:
                raise ValueError(f"pieces: {piece!r} is not allowed (empty, or one of {sorted(reserved)}, "
                                 f"which are added for you)")
        specials = [("<pad>", 0.0, CONTROL), ("</s>", 0.0, CONTROL), ("<unk>", 0.0, UNKNOWN)]
        model = SentencePieceModel(pieces=specials + [(piece, float(score), NORMAL) for piece, score in pieces],
                                   normalizer_name=normalizer_name)
        return cls(model, num_extra_ids)

    def encode(self, text):
        """One text -> its token ids, ending with </s>, unpadded and untruncated."""
        ids = []
        # Splitting on a capturing group alternates plain text (even) and special tokens (odd).
        for i, chunk in enumerate(self._special_pattern.split(text)):
            if i % 2:
                ids.append(self.special_ids[chunk])
            else:
                ids += self.segmenter.encode(self.normalizer(chunk))
        return ids + [self.eos_id]

    def __call__(self, texts, max_length=120):
        """A text or list of texts -> (input_ids, attention_mask), both (B, max_length) long.

        Padded with <pad> (0) to max_length, mask 1 on tokens and 0 on padding; a longer text is
        cut to its first max_length - 1 tokens plus </s> (Hugging Face's truncation for T5).
        """
        if isinstance(texts, str):
            texts = [texts]
        if max_length < 1:
            raise ValueError(f"max_length={max_length}: must be at least 1 (room for </s>)")
        input_ids = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > max_length:
                ids = ids[:max_length - 1] + [self.eos_id]
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention_mask[row, :len(ids)] = 1
        return input_ids, attention_mask





# ----------------------------------------------------------------------------------------------
# Loading: one file of a Hub repo or local folder -> path; checkpoint files -> state dict.
# ----------------------------------------------------------------------------------------------


class HubFileUnavailable(FileNotFoundError):
    """The Hub could not be asked (offline or unreachable) and the file is not in the local cache."""


def _unavailable_message(repo, filenames, subfolder):
    names = [f"{subfolder}/{name}" if subfolder else name for name in filenames]
    return (
        f"{repo}: no {' / '.join(names)} in the local Hugging Face cache and the Hub cannot be reached; "
        f"unset HF_HUB_OFFLINE and connect, or run `hf download {repo} {names[0]}`, "
        f"or pass a local folder that holds the file"
    )


def locate(repo_or_dir, filename, revision=None, subfolder=None):
    """Local path of `filename` in a Hub repo id or a local folder (same layout); None if it has no such file.

    An existing path is a local folder; anything else is a Hub repo id, fetched through
    huggingface_hub (so its cache, HF_HUB_OFFLINE and revisions apply).
    """
    folder = pathlib.Path(repo_or_dir)
    if folder.is_dir():
        path = folder / (subfolder or "") / filename
        return path if path.is_file() else None
    repo = str(repo_or_dir)
    try:
        return pathlib.Path(hf_hub_download(repo, filename, subfolder=subfolder, revision=revision))
    # LocalEntryNotFoundError subclasses EntryNotFoundError: it must be caught first.
    except LocalEntryNotFoundError:
        raise HubFileUnavailable(_unavailable_message(repo, [filename], subfolder)) from None
    except EntryNotFoundError:
        return None
    except HFValidationError:
        raise FileNotFoundError(f"{repo}: not a local folder, nor a valid Hub repo id") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{repo}: the Hub repo has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{repo}: no such Hub repo, or it is gated/private (log in with `hf auth login`)"
        ) from None


def read_config(repo_or_dir, revision=None, subfolder=None):
    """The repo's config.json as a dict; {} when it has none."""
    path = locate(repo_or_dir, "config.json", revision, subfolder)
    return json.loads(path.read_text()) if path else {}


def _locate_first(repo_or_dir, filenames, revision, subfolder):
    """Path of the first of `filenames` the repo has. Offline, a file missing from the cache is
    skipped in favour of a later cached one; the error comes only when none can be found."""
    unavailable = False
    for filename in filenames:
        try:
            path = locate(repo_or_dir, filename, revision, subfolder)
        except HubFileUnavailable:
            unavailable = True
            continue
        if path is not None:
            return path
    if unavailable:
        raise HubFileUnavailable(_unavailable_message(repo_or_dir, filenames, subfolder))
    where = f"{repo_or_dir}/{subfolder}" if subfolder else str(repo_or_dir)
    raise FileNotFoundError(f"{where}: none of {', '.join(filenames)} found")


def open_safetensors(path):
    """safe_open(path); a truncated or damaged file is a one-line ValueError naming it."""
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err}); it is truncated or damaged: "
                         f"copy, download or export it again") from None


def load_weights_only(path):
    """torch.load(weights_only=True, mmap=True) of a pickled checkpoint (.pth/.pt/.bin). A file that is not
    one, is damaged, or holds code rather than tensors is a one-line ValueError naming it: torch's own
    messages run to paragraphs (and suggest weights_only=False, which would run that code)."""
    if not zipfile.is_zipfile(path):  # mmap reads only torch.save's zip format; a truncated one has no directory
        raise ValueError(f"{path}: not a torch.save checkpoint (no zip archive: truncated, damaged or another "
                         f"format); copy or download it again, or re-save it with torch.save or as safetensors")
    try:
        # mmap: tensors stay on disk until used, so dropping a key never reads its bytes.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        # weights_only stopped at a global (a function or class), which it never calls: name it.
        reason = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else type(err).__name__)
        raise ValueError(f"{path}: refused, not a plain tensor checkpoint that torch.load(weights_only=True) "
                         f"accepts ({reason}); re-save it as a dict of tensors or as safetensors") from None


def _read_tensor_file(path, keep):
    """The tensors of one checkpoint file whose key passes `keep`; the others are never read."""
    if path.suffix == ".safetensors":
        with open_safetensors(path) as file:
            return {key: file.get_tensor(key) for key in file.keys() if keep(key)}
    payload = load_weights_only(path)
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]  # a training checkpoint (MoCo v3's): its weights, not its optimizer
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: holds a {type(payload).__name__}, expected a dict of tensors")
    kept = {key: value for key, value in payload.items() if keep(key)}
    not_tensors = [key for key, value in kept.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{path}: entries that are not tensors: {', '.join(not_tensors[:5])}")
    return kept


def load_state_dict(repo_or_dir, filenames, revision=None, subfolder=None, keep=None):
    """Tensors of the first checkpoint in `filenames` (candidates, most preferred first) the repo has.

    An `*.index.json` names shards; only those holding a kept key are fetched and opened.
    `keep(key) -> bool` filters keys before any tensor is read into memory.
    """
    keep = keep or (lambda key: True)
    path = _locate_first(repo_or_dir, filenames, revision, subfolder)
    if not path.name.endswith(".index.json"):
        return _read_tensor_file(path, keep)
    weight_map = json.loads(path.read_text())["weight_map"]
    state = {}
    for shard in sorted({shard for key, shard in weight_map.items() if keep(key)}):
        shard_path = locate(repo_or_dir, shard, revision, subfolder)
        if shard_path is None:
            raise FileNotFoundError(f"{repo_or_dir}: shard {shard} named in {path.name} is missing")
        state.update(_read_tensor_file(shard_path, keep))
    return state


def _summary(kind, keys):
    shown = ", ".join(keys[:5])
    return f"{len(keys)} {kind} ({shown}{', ...' if len(keys) > 5 else ''})"


def load_into(module, state_dict, source, assign=False):
    """Copy `state_dict` into `module`, strictly: any missing, unexpected or wrong-shape key is an error."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    wrong_shape = [
        f"{key} {tuple(state_dict[key].shape)} vs model {tuple(param.shape)}"
        for key, param in expected.items()
        if key in state_dict and state_dict[key].shape != param.shape
    ]
    problems = [
        _summary(kind, keys)
        for kind, keys in (("missing", missing), ("unexpected", unexpected), ("wrong-shape", wrong_shape))
        if keys
    ]
    if problems:
        raise ValueError(f"{source}: checkpoint does not fit {type(module).__name__}: {'; '.join(problems)}")
    module.load_state_dict(state_dict, strict=True, assign=assign)


def freeze(module):
    """Eval mode and no gradients: the encoders are fixed feature extractors. Returns `module`."""
    return module.eval().requires_grad_(False)
