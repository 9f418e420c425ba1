"""`mobilenetv3 bench-loader`: the training input pipeline timed as `train` runs it, to tensors ready for the model.

The same datasets, sampler, DataLoader (workers, pinned memory) and finishing step (`build_loaders`; for image
folders the device's normalisation, or its JPEG decode with `data.decode: gpu`) as a training run, without the
network: what the loader alone can feed.  The first batches (worker start-up) are not timed.
"""

from __future__ import annotations

import time
from typing import Any

from ..data import build_datasets
from ..errors import UserError
from ..timing import synchronize
from .config import TrainConfig
from .distributed import DistEnv, resolve_device
from .run import build_loaders, setup_runtime

#: batches fetched before the clock starts: worker start-up and the first files' page-cache misses
WARMUP_BATCHES = 2


def bench_loader(config: TrainConfig, *, batches: int, warmup: int = WARMUP_BATCHES) -> dict[str, Any]:
    """Images per second of `batches` training batches after `warmup` untimed ones, in one process (rank 0 of 1),
    the last batch's device work waited for.  Epochs follow each other when one has too few batches."""
    if batches < 1:
        raise UserError(f"--batches must be >= 1, got {batches}")
    env = DistEnv(device=resolve_device(config.device, 0))
    setup_runtime(config, env)
    bundle = build_datasets(config.data)
    loader, sampler, _ = build_loaders(config, bundle, env)
    if len(loader) < 1:
        raise UserError(f"the training set ({len(bundle.train)} samples) gives no full batch of {config.batch_size}")

    def forever():
        epoch = 0
        while True:
            sampler.set_position(epoch)
            yield from loader
            epoch += 1

    stream = forever()
    # every worker's first batches start together (prefetch_factor each): let them all arrive before the clock
    prefetched = config.data.workers * 2 if config.data.workers > 0 else 0
    for _ in range(max(warmup, prefetched)):
        next(stream)
    synchronize(env.device)
    images = skipped = 0
    started = time.perf_counter()
    for _ in range(batches):
        batch, _, dropped = next(stream)
        images += len(batch)
        skipped += dropped
    synchronize(env.device)
    seconds = time.perf_counter() - started
    return {"images_per_s": images / seconds, "workers": config.data.workers, "batch_size": config.batch_size,
            "batches": batches, "images": images, "skipped": skipped, "seconds": seconds,
            "device": str(env.device), "decode": config.data.decode, "input_size": bundle.preprocessing.input_size,
            "dataset": config.data.dataset}
