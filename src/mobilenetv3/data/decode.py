"""The image folder's training pipeline: file -> augmented uint8 pixels, and the step that makes them model input.

Per image (in a DataLoader worker, its torch RNG seeded from (seed, epoch, index) by `SeededSamples`):

1. the file is read and its size taken from the JPEG frame header (`jpeg_header`; other formats: PIL's header);
2. the crop is drawn on that full size by torchvision's own `RandomResizedCrop.get_params`, then the flip, and
   (with auto-augment or random erasing) one seed for those two: `CropPlan`.  So the augmentation does not depend
   on how the file is decoded;
3. the pixels (`FolderTrainTransform.pixels`): a JPEG whose crop is at least twice the output size on both sides
   is decoded by PIL at reduced size (`Image.draft`: libjpeg's DCT scaling, 2x/4x/8x fewer pixels per side)
   and crop-resized there; any other JPEG by libjpeg-turbo through `torchvision.io.decode_jpeg` (straight into
   uint8 tensors), cropped as a view and resized; every other file (PNG, 16-bit, palette, CMYK, or a JPEG
   decode_jpeg refuses) through PIL with its mode converted as the rest of the package converts it;
4. flip, auto-augment and random erasing on the uint8 crop (erasing fills with the mean pixel, what normalising
   maps to ~0, as torchvision's erasing after normalisation writes 0).

Items are uint8 [C, S, S]: a quarter of float32's bytes through worker queues and pinned memory.
`finish_batch` (the train loader's last step, `DeviceBatches`) moves a collated batch to the device and
converts and normalises it there.

`data.decode: gpu` keeps steps 1-2 in the worker but hands over the file's bytes and plan (`EncodedImage`)
instead of pixels: `finish_batch` decodes the batch's JPEGs with `decode_jpeg(device=...)` and applies the same
plan there (`apply_plan`, the code step 3-4 run on CPU tensors); a file the device cannot decode takes the CPU
path instead, and a file that fails there too is skipped and named like any unreadable file.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as v1
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from ..preprocessing import ConvertMode

#: start-of-frame markers (baseline, extended, progressive, lossless; Huffman and arithmetic): the frame header
#: holds the height, width and component count
_START_OF_FRAME = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
#: markers without a length field: TEM and the restart markers (SOI is consumed before the loop)
_NO_LENGTH = frozenset({0x01, *range(0xD0, 0xD8)})
#: JPEG reduction factors PIL's `draft` (libjpeg's DCT scaling) offers, largest first
_DRAFT_FACTORS = (8, 4, 2)
#: torchvision's RandomResizedCrop defaults, which every recipe uses
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
#: the image folders' training pipeline, as checkpoints record it (`sampler.folder_pipeline`): a run resumed from
#: a checkpoint of another (none: the PIL pipeline before issue 27) draws other crops and augmentations
FOLDER_PIPELINE_VERSION = 2
_PIL_FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                "bicubic": Image.Resampling.BICUBIC}


def jpeg_header(data: bytes | bytearray | memoryview) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG's frame header, reading only the markers before it; None when
    `data` does not start like a JPEG or ends before its frame header (the decoder then says why)."""
    if data[:2] != b"\xff\xd8":
        return None
    position, end = 2, len(data)
    while position + 4 <= end:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _NO_LENGTH:
            position += 2
            continue
        if marker in _START_OF_FRAME:
            if position + 10 > end:
                return None
            height = (data[position + 5] << 8) | data[position + 6]
            width = (data[position + 7] << 8) | data[position + 8]
            return (width, height, data[position + 9]) if width and height else None
        if marker == 0xDA:  # a scan before any frame header: not a JPEG a decoder takes
            return None
        position += 2 + ((data[position + 2] << 8) | data[position + 3])
    return None


class CropPlan(NamedTuple):
    """One image's augmentation, drawn before its pixels are decoded: the crop (top, left, height, width) in
    the file's full-size pixels, the horizontal flip, and the seed of its auto-augment and erasing draws (None
    when the pipeline has neither)."""

    top: int
    left: int
    height: int
    width: int
    flip: bool
    seed: int | None


class Cropped(NamedTuple):
    """A decoded file's crop resized to the output size (uint8 [C, S, S]), before its flip and augmentation."""

    pixels: torch.Tensor
    plan: CropPlan


class EncodedImage(NamedTuple):
    """`data.decode: gpu`'s item: a JPEG's bytes (uint8 [N]) with its plan, decoded by `finish_batch`; `path`
    names the file if it cannot be decoded."""

    path: str
    data: torch.Tensor
    plan: CropPlan


def _size_only(width: int, height: int) -> torch.Tensor:
    """A [1, height, width] tensor of no memory (stride 0): what `get_params` needs to read the size from."""
    return torch.empty(()).expand(1, height, width)


def draft_factor(plan: CropPlan, size: int) -> int:
    """The largest JPEG DCT reduction (8, 4, 2; else 1) that leaves the crop at least `size` pixels on each side:
    decoding at that reduction loses nothing the resize to `size` would keep."""
    for factor in _DRAFT_FACTORS:
        if plan.width >= factor * size and plan.height >= factor * size:
            return factor
    return 1


class FolderTrainTransform:
    """The image folder's training transform: file path -> augmented uint8 [C, S, S] (see the module docstring).

    RandomResizedCrop(S, scale=(scale_min, 1), ratio=(3/4, 4/3)) with torchvision's parameter draws, horizontal
    flip, optional AutoAugment / RandAugment / TrivialAugmentWide, optional RandomErasing.  `encoded=True`
    (`data.decode: gpu`): a JPEG becomes an `EncodedImage` for `finish_batch` to decode on the device; other
    files are decoded here as on the CPU path.  PIL's decode errors propagate, for the folder to name the file.
    """

    #: TolerantImageFolder passes the file's path, not a decoded image
    reads_files = True

    def __init__(self, size: int, *, mean: Sequence[float], std: Sequence[float], scale: tuple[float, float],
                 interpolation: str, hflip: float, augment: Callable | None, erasing: float,
                 mode: str = "RGB", encoded: bool = False) -> None:
        self.size, self.scale, self.hflip = size, scale, hflip
        self.interpolation = InterpolationMode(interpolation)
        self.pil_filter = _PIL_FILTERS[interpolation]
        self.augment = augment
        self.mean, self.std = tuple(mean), tuple(std)
        # the uint8 pixel that normalises to ~0: erasing after normalisation writes 0 (torchvision's references)
        fill = [float(round(255 * value)) for value in self.mean]
        self.erasing = v2.RandomErasing(p=erasing, value=fill) if erasing > 0 else None
        self.convert = ConvertMode(mode)
        self.read_mode = ImageReadMode.GRAY if mode == "L" else ImageReadMode.RGB
        self.encoded = encoded

    # --- the plan ---------------------------------------------------------------------------------------------

    def plan(self, width: int, height: int) -> CropPlan:
        """The image's crop, flip and augmentation seed, drawn from torch's RNG in that order."""
        top, left, crop_h, crop_w = v1.RandomResizedCrop.get_params(_size_only(width, height), self.scale, CROP_RATIO)
        flip = self.hflip > 0 and bool(torch.rand(1) < self.hflip)
        seed = None
        if self.augment is not None or self.erasing is not None:
            seed = int(torch.randint(0, 2**62, (1,)))
        return CropPlan(top, left, crop_h, crop_w, flip, seed)

    # --- CPU ----------------------------------------------------------------------------------------------------

    def __call__(self, path: str):
        """The file's augmented uint8 pixels (or `EncodedImage`): `augment(load(path))`."""
        return self.augment_loaded(self.load(path))

    def load(self, path: str) -> Cropped | EncodedImage:
        """The file's plan and its crop resized to S, not yet flipped or augmented; with `encoded`, a JPEG's bytes
        and plan.  Only decoding happens here: a PIL decode error from it means a broken file (the folder names
        it), while an error of the augmentation that follows (`augment_loaded`) is a bug to show."""
        data = read_bytes(path)
        header = jpeg_header(memoryview(data.numpy()))
        if header is None:
            return self.from_pil(Image.open(path))
        plan = self.plan(header[0], header[1])
        if self.encoded and header[2] in (1, 3):  # grey or YCbCr: what the device decoders take
            return EncodedImage(path, data, plan)
        return Cropped(self.resized_jpeg(path, data, plan), plan)

    def augment_loaded(self, loaded: Cropped | EncodedImage):
        """`load`'s result flipped and augmented as planned (an `EncodedImage` passes: the device does it)."""
        return loaded if isinstance(loaded, EncodedImage) else self.augmented(loaded.pixels, loaded.plan)

    def resized_jpeg(self, path: str, data: torch.Tensor, plan: CropPlan) -> torch.Tensor:
        """The plan's crop of the JPEG at `path` (its bytes, uint8 [N]: `data`), resized to S, decoded on the CPU
        by the cheapest route (module docstring, step 3).  PIL reads the file itself (its errors name the problem
        as for every other file)."""
        if draft_factor(plan, self.size) == 1:
            try:
                decoded = decode_jpeg(data, mode=self.read_mode)
            except RuntimeError:  # corrupt, or something libjpeg-turbo refuses: PIL decodes it or says why
                pass
            else:
                return self.crop_resized(decoded, plan)
        return self.from_pil(Image.open(path), plan).pixels

    def from_pil(self, image: Image.Image, plan: CropPlan | None = None) -> Cropped:
        """Any image PIL opens (not yet decoded): the plan drawn on its size unless given, a JPEG decoded at the
        largest DCT reduction the crop allows, the mode converted, cropped and resized by PIL."""
        if plan is None:
            plan = self.plan(*image.size)
        factor, wanted = 1.0, draft_factor(plan, self.size)
        if wanted > 1 and image.format == "JPEG":
            width, height = image.size
            chosen = image.draft(image.mode, (max(1, width // wanted), max(1, height // wanted)))
            if chosen is not None:  # (mode, the full image's box in reduced pixels): width / scale
                factor = width / chosen[1][2]
        image.load()  # decode now: a broken file raises here
        image = self.convert(image)
        box = (plan.left / factor, plan.top / factor, (plan.left + plan.width) / factor,
               (plan.top + plan.height) / factor)
        resized = image.resize((self.size, self.size), self.pil_filter, box=box)
        pixels = torch.from_numpy(_array(resized))
        return Cropped(pixels[None] if pixels.dim() == 2 else pixels.permute(2, 0, 1), plan)

    # --- any device ---------------------------------------------------------------------------------------------

    def apply_plan(self, decoded: torch.Tensor, plan: CropPlan) -> torch.Tensor:
        """Full-size decoded uint8 [C, H, W] (on any device) -> the plan's crop, resized to S, flipped, augmented."""
        return self.augmented(self.crop_resized(decoded, plan), plan)

    def crop_resized(self, decoded: torch.Tensor, plan: CropPlan) -> torch.Tensor:
        """Full-size decoded uint8 [C, H, W] -> the plan's crop resized to S (antialiased)."""
        crop = decoded[:, plan.top:plan.top + plan.height, plan.left:plan.left + plan.width]
        # one small copy into channels-last memory: uint8 antialiased resizes have a fast kernel for that layout,
        # and the result keeps it ([C, S, S] over [S, S, C] memory, as `collate_skipping` stacks uint8 images)
        crop = crop[None].contiguous(memory_format=torch.channels_last)
        return F.resize(crop, [self.size, self.size], interpolation=self.interpolation, antialias=True)[0]

    def augmented(self, pixels: torch.Tensor, plan: CropPlan) -> torch.Tensor:
        """The resized uint8 crop flipped as planned, then auto-augmented and erased with the plan's seed."""
        if plan.flip:
            pixels = pixels.flip(-1)
        if plan.seed is not None and (self.augment is not None or self.erasing is not None):
            # auto-augment and erasing draw from torch's CPU RNG: seeded by the plan, the caller's state kept
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(plan.seed)
                if self.augment is not None:
                    pixels = self.augment(pixels)
                if self.erasing is not None:
                    pixels = self.erasing(pixels)
        return pixels

    # --- the batch ------------------------------------------------------------------------------------------------

    def finish_batch(self, images, targets: torch.Tensor, device: torch.device,
                     tolerant: Callable[[str, Callable[[str], torch.Tensor]], torch.Tensor | None],
                     ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A collated batch as the model takes it: (float32 [B, C, S, S] normalised on `device`, targets, the
        number of files dropped here).

        uint8 pixels (the CPU path) are moved (non-blocking: the loader pins them) and normalised on the device.
        A list (`data.decode: gpu`) holds `EncodedImage`s, decoded on the device in one call and augmented there
        by their plans, and pixels the worker decoded (files that are no JPEG the device takes); a file the device
        cannot decode takes the CPU path through `tolerant(path, load)`, which names and drops (None) a file that
        fails there too.
        """
        if len(images) == 0:
            return images, targets, 0
        if isinstance(images, torch.Tensor):
            return self.normalize(images.to(device, non_blocking=True)), targets, 0
        pixels = self._decode_on(images, device, tolerant)
        kept = [k for k, image in enumerate(pixels) if image is not None]
        dropped = len(pixels) - len(kept)
        if not kept:
            return torch.empty(0, device=device), targets[:0], dropped
        batch = torch.stack([pixels[k] for k in kept])
        return self.normalize(batch), targets[kept] if dropped else targets, dropped

    def _decode_on(self, items: list, device: torch.device, tolerant) -> list[torch.Tensor | None]:
        """Each item's augmented uint8 pixels on `device` (None: unreadable, already named)."""
        out: list[torch.Tensor | None] = [None] * len(items)
        encoded = [k for k, item in enumerate(items) if isinstance(item, EncodedImage)]
        for k, item in enumerate(items):
            if not isinstance(item, EncodedImage):
                out[k] = item.to(device, non_blocking=True)
        decoded = _decode_jpegs([items[k].data for k in encoded], self.read_mode, device)
        # the plans reseed torch's CPU RNG (auto-augment and erasing draw from it): keep the caller's
        with torch.random.fork_rng(devices=[]):
            for k, pixels in zip(encoded, decoded):
                item = items[k]
                if pixels is not None:
                    out[k] = self.apply_plan(pixels, item.plan)
                    continue
                resized = tolerant(item.path, lambda path: self.resized_jpeg(path, item.data, item.plan))
                out[k] = None if resized is None else self.augmented(resized, item.plan).to(device)
        return out

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 pixels [B, C, H, W] -> float32 (x / 255 - mean) / std, on the batch's device."""
        return normalize_pixels(batch, self.mean, self.std)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, interpolation={self.interpolation.value}"
                f", hflip={self.hflip}, augment={self.augment}, erasing={self.erasing}, encoded={self.encoded})")


def read_bytes(path: str) -> torch.Tensor:
    """The file's bytes as uint8 [N], read by torchvision's C++ reader; through Python's `open` when that fails
    (an empty or missing file, a folder), so the error is the OSError the folder names, or PIL's "empty file"."""
    try:
        return read_file(path)
    except RuntimeError:
        with open(path, "rb") as handle:
            return torch.from_numpy(np.frombuffer(bytearray(handle.read()), dtype=np.uint8))


def _array(image: Image.Image) -> np.ndarray:
    return np.array(image, dtype=np.uint8, copy=True)  # writable: torch.from_numpy shares it


def _decode_jpegs(datas: list[torch.Tensor], mode: ImageReadMode, device: torch.device) -> list[torch.Tensor | None]:
    """`decode_jpeg` of many files on `device` in one call; when that call fails, file by file, None for a file
    that fails alone."""
    if not datas:
        return []
    if device.type == "cuda":
        # nvJPEG's hardware decoder can write into memory that kernels still queued on the current stream read
        # (pytorch/vision#9606): let the previous step's work finish first
        torch.cuda.current_stream(device).synchronize()
    try:
        return list(decode_jpeg(datas, mode=mode, device=device))
    except torch.OutOfMemoryError:
        raise
    except RuntimeError:
        pass
    decoded: list[torch.Tensor | None] = []
    for data in datas:
        try:
            decoded.append(decode_jpeg(data, mode=mode, device=device))
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            decoded.append(None)
    return decoded


def normalize_pixels(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 pixels [B, C, H, W] -> float32 x * (1 / (255 std)) - mean / std per channel (torchvision's
    (x / 255 - mean) / std up to rounding), on the batch's device, in its memory format.

    A channels-last batch is scaled as rows of W * C values against the per-channel factors repeated W times:
    broadcasting [C] over an innermost dimension of C would leave the CPU's vector units 3 values at a time."""
    channels, width = batch.shape[1], batch.shape[3]
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=batch.device)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=batch.device)
    out = batch.float()
    if out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous():
        rows = out.permute(0, 2, 3, 1).view(-1, width * channels)  # the memory as it lies: [B * H, W * C]
        torch.addcmul(shift.repeat(width), rows, scale.repeat(width), out=rows)
        return out
    out = out.contiguous()
    return torch.addcmul(shift.view(1, channels, 1, 1), out, scale.view(1, channels, 1, 1), out=out)


class DeviceBatches:
    """A training loader's batches as the model takes them: `finish(images, targets, device)` applied to each
    (moves, decodes and normalises; data/decode.py), the files it drops added to the batch's skipped count.
    `len` is the loader's."""

    def __init__(self, loader, finish: Callable, device: torch.device) -> None:
        self.loader, self.finish, self.device = loader, finish, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, targets, skipped in self.loader:
            images, targets, dropped = self.finish(images, targets, self.device)
            yield images, targets, skipped + dropped
