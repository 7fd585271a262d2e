"""Lumos stage 2, novel view synthesis: fine-tune the I2I prior to draw an object from another
camera, given one view of it and the relative camera pose (Zero-1-to-3's recipe on LumosDiT).

    python train_nvs.py                    # offline default: runs/i2i/ema.safetensors on `multiview`, CPU
    python train_nvs.py --init runs/i2i/checkpoints/step_0001500 --init-entry model
    torchrun --nproc_per_node=8 train_nvs.py --init Lumos_I2I.pth --vae stabilityai/sd-vae-ft-ema \\
        --encoder facebook/dino-vitb16 --image-size 256 --data /data/views_release --lr 1e-4 --out runs/nvs
    python train_nvs.py --init scratch --out runs/nvs_scratch   # the no-prior baseline, same model size
    python train_nvs.py --init runs/t2i/ema.safetensors --out runs/nvs_t2i   # from a T2I prior

The model is the I2I LumosDiT with two additions (`LumosDiT(pose_dim=4)`, see dit.py):
  - input: the source view (its latent, or its pixels in pixel space) concatenated to the noisy
    target; the output keeps the target's channels (`out_channels`);
  - condition: the source view's DINO feature joined with the relative camera pose and mapped
    back to the condition width by a new linear layer, `pose_mixer`.
Loaded from I2I weights, the new patch-embedding input channels are zero and `pose_mixer` is the
identity on the feature and zero on the pose, so at step 0 the model computes exactly the I2I
function of the target alone; every transformer block carries over. From a T2I prior the condition
embedder is new too (T5 tokens in, one image-encoder token now; --encoder, default shapes-vit).

Relative pose, as Zero-1-to-3's code: data.relative_pose, [d_polar, sin(d_azimuth),
cos(d_azimuth), d_radius] of the target camera relative to the source one.

Dropping the condition (the training dropout for classifier-free guidance and the null branch of
CFG): the DINO feature becomes the null embedding and the source view becomes zeros, so the
model sees no image of the object at all (Zero-1-to-3's unconditional branch); the pose is kept.

Data (`--data`):
    multiview, multiview:N      N procedural objects (cube, tetrahedron, octahedron, prism, sphere
                                with coloured faces), 12 views each, ray-cast by `render_view`
    /data/views_release         Zero-1-to-3 layout: one folder per object holding NNN.png views
                                and NNN.npy world-to-camera 3x4 matrices [R|T]
An item is one target view with another view of the same object as its source, drawn afresh for
every training sample from (seed, its global index), as Zero-1-to-3 draws it per sample, so that
training sees every pair of views; `ds[i]` (the held-out pairs) keeps a fixed source. A view whose
image or pose file is missing or unreadable is skipped and counted, never fatal: the pair is
replaced by the next good one and the bad file is reported in "skipped" (the loop logs it and
counts it in `skipped_files`), as data.py does for images.
Held out: the procedural objects past the training set, or the last --held-out-objects object
folders, are never trained on; their pairs make the sample grids and the PSNR/SSIM logged with
the loss.
"""
import argparse
import copy
import math
import os
import re

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

import data
from data import POSE_DIM, relative_pose, setup_distributed
from dit import DiT_models, LumosDiT
from encoders import SHAPES_VIT, encoder_config, load_image_encoder, nvs_condition
from evaluate import psnr, ssim
from train_i2i import (CONDITION_KEYS, DEFAULT_I2I_EXPORT, Task, add_train_args, check_args, exit_with_usage_error,
                       model_size, print_transfer, resolve_init, train, transfer_weights)


#################################################################################
#                                  The model                                    #
#################################################################################

def nvs_config(i2i_config, input_size):
    """The NVS LumosDiT config for an I2I one: the same blocks, the source view as extra input
    channels, the relative pose mixed into the condition."""
    channels = i2i_config["in_channels"]
    if i2i_config.get("out_channels", channels) != channels:
        raise ValueError(f"the I2I model must predict its own input channels, got in {channels}, "
                         f"out {i2i_config['out_channels']}")
    return {**i2i_config, "input_size": input_size, "in_channels": 2 * channels, "out_channels": channels,
            "pose_dim": POSE_DIM}


#################################################################################
#                      The procedural multi-view set                            #
#################################################################################

PRIMITIVES = ("cube", "tetrahedron", "octahedron", "prism", "sphere")
FACE_COLORS = np.array([(220, 40, 40), (40, 170, 60), (40, 80, 220), (240, 210, 40),
                        (245, 130, 30), (140, 60, 190), (40, 190, 200), (230, 110, 170)], dtype=np.float64)
VIEWS_PER_OBJECT = 12  # as Zero-1-to-3's Objaverse renders
ELEVATION_DEGREES = (-30.0, 60.0)
RADIUS = (1.6, 2.2)  # camera distance from the object's centre; the objects fit in a ball of 0.75
SPHERE_RADIUS = 0.55
FOV_TAN = 0.45  # tan of half the field of view
LIGHT = np.array([0.4, -0.3, 0.85]) / np.linalg.norm([0.4, -0.3, 0.85])  # fixed in the world
AMBIENT, DIFFUSE = 0.5, 0.5
RENDER_SUPERSAMPLING = 2  # rays per pixel side, box-filtered: anti-aliased edges
_MULTIVIEW_STREAM = 3  # keeps these draws apart from data.py's streams under the same seed
_PAIR_STREAM = 4  # the fixed source of `ds[i]` (held-out grids, tools)
_SAMPLE_PAIR_STREAM = 5  # the source drawn per training sample, from its global index


def convex_polyhedron(shape):
    """Outward unit face normals (F, 3) and offsets (F,) of {p : normals @ p <= offsets}."""
    if shape == "cube":
        return np.concatenate([np.eye(3), -np.eye(3)]), np.full(6, 0.42)
    if shape == "octahedron":
        signs = np.array([(a, b, c) for a in (1, -1) for b in (1, -1) for c in (1, -1)], dtype=np.float64)
        return signs / math.sqrt(3), np.full(8, 0.62 / math.sqrt(3))
    if shape == "tetrahedron":  # each face faces away from the opposite vertex; inradius 1/3 of 0.75
        vertices = np.array([(1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1)], dtype=np.float64) / math.sqrt(3)
        return -vertices, np.full(4, 0.25)
    if shape == "prism":  # a triangular prism along z
        angles = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        sides = np.stack([np.cos(angles), np.sin(angles), np.zeros(3)], axis=1)
        return np.concatenate([sides, [(0, 0, 1), (0, 0, -1)]]), np.array([0.3, 0.3, 0.3, 0.45, 0.45])
    raise ValueError(f"not a polyhedron: {shape!r}")


def intersect_polyhedron(normals, offsets, origin, directions):
    """First hits of rays origin + s * directions (N, 3) from outside a convex polyhedron:
    (hit (N,) bool, face index (N,)). A ray enters at the last entering plane and must get there
    before leaving through the first exiting one."""
    facing = directions @ normals.T  # (N, F): < 0 entering, > 0 exiting
    room = offsets - normals @ origin  # (F,): < 0 means the origin is outside that plane
    with np.errstate(divide="ignore", invalid="ignore"):
        crossing = room / facing
    enter = np.where(facing < 0, crossing, -np.inf)
    leave = np.where(facing > 0, crossing, np.inf)
    parallel_outside = ((facing == 0) & (room < 0)).any(axis=1)
    hit = (enter.max(axis=1) <= leave.min(axis=1)) & (leave.min(axis=1) > 0) & ~parallel_outside
    return hit, enter.argmax(axis=1)


def intersect_sphere(radius, origin, directions):
    """First hits of unit-direction rays on a sphere at 0: (hit (N,), hit point (N, 3))."""
    half_b = directions @ origin
    discriminant = half_b ** 2 - (origin @ origin - radius ** 2)
    distance = -half_b - np.sqrt(np.maximum(discriminant, 0))
    return (discriminant >= 0) & (distance > 0), origin + distance[:, None] * directions


def look_at(position):
    """World-to-camera (3, 4) [R|T] of a camera at `position` looking at the origin, world z up, in
    the OpenCV convention that Zero-1-to-3's matrices use: camera x right, y down, z forward."""
    position = np.asarray(position, dtype=np.float64)
    forward = -position / np.linalg.norm(position)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    if np.linalg.norm(right) < 1e-6:
        raise ValueError(f"look_at: a camera at {position} looks straight along the up axis")
    right /= np.linalg.norm(right)
    rotation = np.stack([right, np.cross(forward, right), forward])
    return np.concatenate([rotation, -rotation @ position[:, None]], axis=1)


def orbit_camera(elevation, azimuth, radius):
    """look_at from a point given by elevation above the xy plane and azimuth from +x (radians)."""
    return look_at(radius * np.array([math.cos(elevation) * math.cos(azimuth),
                                      math.cos(elevation) * math.sin(azimuth), math.sin(elevation)]))


def random_rotation(rng):
    """A uniformly random rotation matrix (3, 3): QR of a Gaussian matrix, signs fixed."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def sample_object(seed, index, views=VIEWS_PER_OBJECT):
    """Procedural object `index` under `seed`: its "shape" (PRIMITIVES), object-to-world "rotation"
    (3, 3), per-face "colors" (8, 3) (the sphere's faces are its octants), and the world-to-camera
    matrices "cameras" (views, 3, 4) it is seen from."""
    rng = np.random.default_rng([seed, _MULTIVIEW_STREAM, index])
    shape = str(rng.choice(PRIMITIVES))
    rotation = random_rotation(rng)
    colors = FACE_COLORS[rng.permutation(len(FACE_COLORS))]
    elevations = np.radians(rng.uniform(*ELEVATION_DEGREES, views))
    azimuths = rng.uniform(0, 2 * np.pi, views)
    radii = rng.uniform(*RADIUS, views)
    cameras = np.stack([orbit_camera(*view) for view in zip(elevations, azimuths, radii)])
    return {"shape": shape, "rotation": rotation, "colors": colors, "cameras": cameras}


def render_view(obj, world_to_camera, image_size):
    """uint8 (S, S, 3): the object of `sample_object` seen by `world_to_camera`, ray-cast with flat
    Lambertian shading under a fixed light, on white (as Zero-1-to-3's renders are composited)."""
    side = image_size * RENDER_SUPERSAMPLING
    rotation, translation = world_to_camera[:, :3], world_to_camera[:, 3]
    coords = ((np.arange(side) + 0.5) / side * 2 - 1) * FOV_TAN
    column, row = np.meshgrid(coords, coords)
    rays_camera = np.stack([column, row, np.ones_like(column)], axis=-1).reshape(-1, 3)
    rays = rays_camera @ rotation  # camera -> world is R^T; row vectors multiply by R
    rays /= np.linalg.norm(rays, axis=1, keepdims=True)
    # Intersect in the object's frame (world -> object is rotation^T).
    origin_obj = obj["rotation"].T @ (-rotation.T @ translation)
    rays_obj = rays @ obj["rotation"]
    if obj["shape"] == "sphere":
        hit, point = intersect_sphere(SPHERE_RADIUS, origin_obj, rays_obj)
        face = (point[:, 0] > 0) * 4 + (point[:, 1] > 0) * 2 + (point[:, 2] > 0)  # its octant
        normal_obj = point / SPHERE_RADIUS
    else:
        normals, offsets = convex_polyhedron(obj["shape"])
        hit, face = intersect_polyhedron(normals, offsets, origin_obj, rays_obj)
        normal_obj = normals[face]
    brightness = AMBIENT + DIFFUSE * np.clip(normal_obj @ obj["rotation"].T @ LIGHT, 0, None)
    color = np.where(hit[:, None], obj["colors"][face] * brightness[:, None], 255.0)
    color = color.reshape(image_size, RENDER_SUPERSAMPLING, image_size, RENDER_SUPERSAMPLING, 3).mean(axis=(1, 3))
    return np.round(color).clip(0, 255).astype(np.uint8)


def source_view(seed, target, views, key):
    """The source view paired with `target` of an object of `views` views: another of its views,
    drawn from (seed, *key)."""
    draw = int(np.random.default_rng([seed, *key]).integers(views - 1))
    return draw + (draw >= target)


def pair_key(object_index, target, global_index, attempt=0):
    """The draw key of a pair's source: per training sample (from its position in the global
    stream, data.GlobalSampler), so every pair of an object's views is seen as Zero-1-to-3 does;
    fixed by (object, target) for `ds[i]` (global_index None: held-out grids, tools). `attempt`
    counts the pairs a bad view made the item pass over."""
    if global_index is None:
        return [_PAIR_STREAM, object_index, target]
    return [_SAMPLE_PAIR_STREAM, global_index, attempt]


class MultiViewShapes(Dataset):
    """`num_objects` procedural objects (`sample_object`) from VIEWS_PER_OBJECT cameras each; item
    i is view i % V of object first_object + i // V as target, paired with another view as source,
    drawn per training sample by `item(i, global_index)` (data.WithGlobalIndex), fixed for `ds[i]`.
    Objects depend only on (seed, object index), so a set with first_object = N holds objects that
    a set of N objects never shows (the held-out ones)."""

    def __init__(self, num_objects, image_size, seed=0, first_object=0, views=VIEWS_PER_OBJECT):
        if num_objects <= 0 or image_size <= 0 or views < 2:
            raise ValueError(f"multiview needs objects > 0, image size > 0 and at least 2 views, got "
                             f"{num_objects}, {image_size}, {views}")
        self.num_objects, self.image_size, self.seed = num_objects, image_size, seed
        self.first_object, self.views = first_object, views

    def __len__(self):
        return self.num_objects * self.views

    def __repr__(self):
        return (f"MultiViewShapes({self.num_objects} objects from {self.first_object}, {self.views} views, "
                f"seed {self.seed})")

    def __getitem__(self, i):
        return self.item(i)

    def item(self, i, global_index=None):
        """Item i, its source view drawn from (seed, global_index) (see pair_key)."""
        if not 0 <= i < len(self):
            raise IndexError(f"multiview index {i} out of range [0, {len(self)})")
        object_index, target = self.first_object + i // self.views, i % self.views
        source = source_view(self.seed, target, self.views, pair_key(object_index, target, global_index))
        obj = sample_object(self.seed, object_index, self.views)
        image, source_image = (data.pixels_to_tensor(render_view(obj, obj["cameras"][v], self.image_size))
                               for v in (target, source))
        pose = relative_pose(obj["cameras"][source], obj["cameras"][target])
        return {"image": image, "source": source_image, "pose": pose, "caption": "", "index": int(i),
                "name": f"multiview/{object_index:06d}/{target:03d}<-{source:03d}", "skipped": []}


def save_zero123_layout(dataset, root, num_objects):
    """Write the first `num_objects` objects of a MultiViewShapes as Zero-1-to-3 folders under
    `root` (`{object:06d}/NNN.png` + `NNN.npy`), e.g. to look at them or to test a reader."""
    for k in range(num_objects):
        obj = sample_object(dataset.seed, dataset.first_object + k, dataset.views)
        folder = os.path.join(root, f"{dataset.first_object + k:06d}")
        os.makedirs(folder, exist_ok=True)
        for view, camera in enumerate(obj["cameras"]):
            Image.fromarray(render_view(obj, camera, dataset.image_size)).save(os.path.join(folder, f"{view:03d}.png"))
            np.save(os.path.join(folder, f"{view:03d}.npy"), camera.astype(np.float32))


#################################################################################
#                      Rendered views in the Zero-1-to-3 layout                 #
#################################################################################

VIEW_FILE = re.compile(r"\d+\.png$", re.IGNORECASE)


def list_zero123_objects(root):
    """Sorted names of the object folders under `root` that hold at least two NNN.png views."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data {root}: no such folder (expected one folder per object with NNN.png "
                                f"views and NNN.npy cameras, or multiview[:N])")
    objects = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    found = [name for name in objects if len(_view_files(os.path.join(root, name))) >= 2]
    if not found:
        raise FileNotFoundError(f"--data {root}: no object folder with two or more NNN.png views")
    return found


def _view_files(folder):
    return sorted(name for name in os.listdir(folder) if VIEW_FILE.fullmatch(name))


def read_camera(path):
    """The (3, 4) float64 world-to-camera matrix of a view's .npy; BadSampleError names the file."""
    try:
        camera = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise data.BadSampleError(f"{path}: missing pose file") from None
    except (OSError, ValueError, EOFError) as error:
        raise data.BadSampleError(f"{path}: unreadable pose file ({type(error).__name__}: {error})") from error
    if camera.shape != (3, 4) or not np.issubdtype(camera.dtype, np.number) or not np.isfinite(camera).all():
        raise data.BadSampleError(f"{path}: expected a finite 3x4 world-to-camera matrix, got "
                                  f"{camera.dtype} {camera.shape}")
    return camera.astype(np.float64)


def read_view(png_path, image_size):
    """(image (3, S, S) in [-1, 1], world-to-camera (3, 4)) of one view; BadSampleError names the bad file."""
    camera = read_camera(png_path[: -len(".png")] + ".npy")
    try:
        with open(png_path, "rb") as f:
            return data.decode_image(f.read(), image_size), camera
    except (OSError, data.BadSampleError) as error:
        raise data.BadSampleError(f"{png_path}: {error}") from error


class Zero123Folder(Dataset):
    """Views rendered in the Zero-1-to-3 layout: `root/<object>/NNN.png` with `NNN.npy` holding
    the 3x4 world-to-camera matrix [R|T] (RGBA renders are composited on white by data.to_rgb).
    Item i is view i of all objects' views, in sorted order, as target, with another view of the
    same object as source, drawn per training sample by `item(i, global_index)` (see pair_key),
    fixed by (seed, i) for `ds[i]`. `objects`: the object folders to use (default:
    `list_zero123_objects(root)`). A pair with a bad view is replaced by the next good pair."""

    def __init__(self, root, image_size, seed=0, objects=None):
        self.root, self.image_size, self.seed = os.path.abspath(root), image_size, seed
        objects = list_zero123_objects(root) if objects is None else objects
        paths, starts = [], []
        for name in objects:
            views = _view_files(os.path.join(self.root, name))
            if len(views) < 2:
                raise ValueError(f"{os.path.join(self.root, name)}: {len(views)} NNN.png view(s); an object needs two")
            starts.append(len(paths))
            paths.extend(os.path.join(name, view) for view in views)
        # Shared by DataLoader workers without copies, however many million views (see data.py).
        self.paths = data._PackedStrings(paths)
        self.starts = np.array(starts + [len(paths)], dtype=np.int64)

    def __len__(self):
        return len(self.paths)

    def __repr__(self):
        return f"Zero123Folder({self.root!r}, {len(self.starts) - 1} objects, {len(self)} views)"

    def pair(self, i, global_index=None, attempt=0):
        """(target, source) view indices of item i (see pair_key)."""
        obj = np.searchsorted(self.starts, i, side="right") - 1
        first, end = int(self.starts[obj]), int(self.starts[obj + 1])
        key = pair_key(first, i - first, global_index, attempt)
        return i, first + source_view(self.seed, i - first, end - first, key)

    def __getitem__(self, i):
        return self.item(i)

    def item(self, i, global_index=None):
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range [0, {len(self)}) of {self!r}")
        skipped = []
        for step in range(len(self)):
            target, source = self.pair((i + step) % len(self), global_index, step)
            try:
                (image, target_camera), (source_image, source_camera) = (
                    read_view(os.path.join(self.root, self.paths[v]), self.image_size) for v in (target, source))
            except data.BadSampleError as error:
                skipped.append(str(error))
                continue
            return {"image": image, "source": source_image, "pose": relative_pose(source_camera, target_camera),
                    "caption": "", "index": int(i), "name": f"{self.paths[target]}<-{self.paths[source]}",
                    "skipped": skipped}
        raise RuntimeError(f"no readable view pair in {self!r}: every pair failed, e.g. {skipped[0]}")


def open_multiview(spec, image_size, seed=0, held_out_objects=8):
    """(training set, held-out set) for a --data spec: `multiview[:N]` or a Zero-1-to-3 folder.
    Procedural: the held-out objects are the next ones after the N trained on. Folder: the last
    `held_out_objects` object folders are held out; 0 evaluates on training pairs instead."""
    if spec == "multiview" or spec.startswith("multiview:"):
        count = spec.partition(":")[2] or "2000"
        if not count.isdigit() or int(count) == 0:
            raise ValueError(f"bad --data {spec!r}: expected multiview:N with N a positive integer")
        train_set = MultiViewShapes(int(count), image_size, seed)
        return train_set, MultiViewShapes(max(1, held_out_objects), image_size, seed, first_object=int(count))
    objects = list_zero123_objects(spec)
    if held_out_objects == 0:
        dataset = Zero123Folder(spec, image_size, seed, objects)
        return dataset, dataset
    if len(objects) <= held_out_objects:
        raise ValueError(f"--data {spec}: {len(objects)} objects leave none to train on after "
                         f"--held-out-objects {held_out_objects}; lower it (0: evaluate on training pairs)")
    return (Zero123Folder(spec, image_size, seed, objects[:-held_out_objects]),
            Zero123Folder(spec, image_size, seed, objects[-held_out_objects:]))


#################################################################################
#                                  The task                                     #
#################################################################################

def nvs_task(args, prior_state, prior_info, device):
    """The NVS Task for the loop: the NVS LumosDiT from an I2I or T2I prior (or scratch), multi-view
    data, no flips. From T2I, the condition embedder is new (the reverse of I2I -> T2I): the T5 tokens
    give way to one image-encoder token; the blocks and the rest carry over."""
    if prior_info is not None and prior_info["config"].get("multi_scale"):
        raise ValueError(f"--init {args.init}: a multi-scale T2I model; NVS starts from a single-scale I2I or T2I model")
    if prior_info is not None and prior_info.get("condition", "cls") != "cls":
        raise ValueError(f"--init {args.init}: an I2I model conditioned on {prior_info['condition']} tokens "
                         f"(--condition); NVS conditions on the source view's CLS: start from a --condition cls model")
    train_set, held_out_set = open_multiview(args.data, args.image_size, args.seed, args.held_out_objects)
    from_t2i = prior_info is not None and prior_info["task"] == "t2i"
    # A random-ViT encoder is rebuilt as the I2I run built it, from that run's image size.
    encoder_size = (prior_info or {}).get("image_size") or args.image_size
    encoder = load_image_encoder(args.encoder, encoder_size, device)
    input_size = args.image_size // (8 if args.vae else 1)
    condition = {"cond_dim": encoder.norm.normalized_shape[0], "cond_tokens": 1}
    if prior_state is None:
        name, overrides = model_size(args)
        i2i_config = {**DiT_models[name].keywords, **overrides, "in_channels": 4 if args.vae else 3,
                      "learn_sigma": args.learn_sigma, **condition}
        template = LumosDiT(**nvs_config(i2i_config, input_size))
    else:
        template = LumosDiT(**nvs_config({**prior_info["config"], **condition}, input_size))
        new_keys = ("pose_mixer.weight", "pose_mixer.bias") + (CONDITION_KEYS if from_t2i else ())
        report = transfer_weights(template, prior_state, new_keys=new_keys, widened_keys=("x_embedder.proj.weight",),
                                  source=f"--init {args.init}")
        print_transfer(args.init, report, "identity on the feature, zero on the pose"
                       + ("; the image condition's embedder, initialised as LumosDiT does" if from_t2i else ""))
    count = min(args.num_samples, len(held_out_set))
    task = Task(build_model=lambda: copy.deepcopy(template), condition=nvs_condition(encoder), dataset=train_set,
                eval_items=[held_out_set[k * len(held_out_set) // count] for k in range(count)],
                metadata={"task": "nvs", "init": args.init,
                          "pose": "[d_polar, sin d_azimuth, cos d_azimuth, d_radius] of the target camera "
                                  "relative to the source (Zero-1-to-3)",
                          "encoder_config": encoder_config(args.encoder, encoder_size)},
                hflip=False)  # a flipped target would belong to a mirrored camera
    task.evaluate = held_out_metrics
    return task


def held_out_metrics(images, batch):
    """Task.evaluate: PSNR and SSIM (evaluate.py, on [0, 1] images) of the grid's generated target
    views against the true ones."""
    generated, reference = images.float() * 0.5 + 0.5, batch["image"].float() * 0.5 + 0.5
    return {"psnr": psnr(generated, reference).mean().item(), "ssim": ssim(generated, reference).mean().item()}


#################################################################################
#                               Command line                                    #
#################################################################################

# Fixed by the prior's weights: taken from --init when not given, an error when given otherwise. A
# T2I prior's condition encoder is its T5: the image encoder is --encoder (default SHAPES_VIT).
INHERITED_ARGS = {"i2i": ("model", "vae", "encoder", "learn_sigma"), "t2i": ("model", "vae", "learn_sigma")}
# Defaults of a run from scratch, and of settings the prior leaves open (no --model: the loop's
# offline model, see train_i2i.model_size; prediction, variances: train_i2i.RUN_DEFAULTS).
SCRATCH_DEFAULTS = {"image_size": 32}


def read_init(args):
    """train_i2i.resolve_init, with NVS's own rules: --init auto falls back to scratch when the
    default I2I run is missing, and the DINO of the weights must be known."""
    if args.init == "auto":
        args.init = DEFAULT_I2I_EXPORT if os.path.exists(DEFAULT_I2I_EXPORT) else "scratch"
        if args.init == "scratch" and int(os.environ.get("RANK", 0)) == 0:
            print(f"no I2I prior at {DEFAULT_I2I_EXPORT}: make it with `python train_i2i.py` (its offline "
                  f"default) or pass --init; training from scratch now", flush=True)
    state, info = resolve_init(args, INHERITED_ARGS, SCRATCH_DEFAULTS)
    if args.encoder is None:
        if info is not None and info["task"] != "t2i":
            raise ValueError(f"--init {args.init} does not say which DINO it was trained with: pass --encoder "
                             f"(facebook/dino-vitb16 for the official Lumos_I2I.pth)")
        args.encoder = SHAPES_VIT  # scratch, or a T2I prior
    return state, info


def add_nvs_args(parser):
    add_train_args(parser)
    # A short fine-tuning, a few minutes on a CPU with the offline model; the EMA decay is shortened
    # with it, so that the EMA has mostly left the I2I weights by the end.
    parser.set_defaults(out="runs/nvs", data="multiview:2000", steps=200, global_batch_size=32, lr=3e-4,
                        warmup_steps=50, ema_decay=0.99, sample_every=100, ckpt_every=100, model=None,
                        encoder=None, **{k: None for k in SCRATCH_DEFAULTS})
    a = parser.add_argument
    a("--init", default="auto", help=f"I2I weights: an ema.safetensors export, a checkpoint or run folder, the "
                                     f"official Lumos_I2I.pth, or scratch; auto: {DEFAULT_I2I_EXPORT} if it exists")
    a("--init-entry", default="ema", choices=["ema", "model"], help="which weights of a training checkpoint")
    a("--held-out-objects", type=int, default=8, help="objects never trained on, for the grids and PSNR/SSIM "
                                                       "(a folder: 0 evaluates on training pairs)")
    return parser


def main(argv=None):
    parser = add_nvs_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    args = parser.parse_args(argv)
    _, world_size, device = setup_distributed()  # train() finds it set up
    try:
        state, info = read_init(args)
        check_args(args, world_size)
        task = nvs_task(args, state, info, device)
    except (ValueError, FileNotFoundError) as error:
        exit_with_usage_error(error, "train_nvs.py")
    del state  # the weights live in the task's template model now
    train(args, task)


if __name__ == "__main__":
    main()
