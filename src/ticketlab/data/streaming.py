"""Data read while training: map-style datasets through DataLoader worker processes.

For data that does not fit in memory. The batch order stays a pure function of
(data-order seed, step): a resumable batch sampler yields, for each step of a phase, the
indices :func:`~ticketlab.data.batching.batch_indices` gives (the order an in-memory run of
the same examples sees), each with its own augmentation seed drawn from (augmentation
seed, step, position in the batch). A phase resumed at step k starts the loader at k, so
it sees exactly the batches an uninterrupted run would have, whatever the number of
workers. Random transforms of a user's dataset are made deterministic the same way: the
item's seed is set as the global RNG seed in the worker before ``dataset[i]`` (in the
main process, inside a forked RNG state).
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.utils.data as tud

from ticketlab.errors import DataError

from . import structure
from .batching import BatchSampler

_MASK63 = (1 << 63) - 1


def item_seed(aug_seed: int, step: int, position: int) -> int:
    """The augmentation seed of one example of one step's batch."""
    return (aug_seed * 6364136223846793005 + step * 1442695040888963407 + position * 97 + 1) & (
        _MASK63
    )


class StepBatches(tud.Sampler):
    """For steps ``[start, end)``: the batch of ``(index, seed)`` pairs of each step."""

    def __init__(self, n: int, batch_size: int, data_seed: int, aug_seed: int, start, end):
        self.sampler = BatchSampler(n, batch_size, data_seed)
        self.aug_seed, self.start, self.end = aug_seed, start, end

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self):
        for step in range(self.start, self.end):
            idx = self.sampler.indices(step).tolist()
            yield [(i, item_seed(self.aug_seed, step, j)) for j, i in enumerate(idx)]


class Seeded(tud.Dataset):
    """``dataset[i]`` with the item's seed as the RNG seed, and bad items caught.

    A dataset with its own seeded transforms (``get(i, seed, train)``, as
    :class:`~ticketlab.data.folder.ImageFolder` has) gets the seed; any other has the
    global torch, NumPy and ``random`` seeds set to it. An item that raises
    :class:`~ticketlab.errors.DataError` (a bad file) is refused, or with ``skip`` left out
    of its batch and named.
    """

    def __init__(self, dataset, train: bool, skip: bool, in_main: bool):
        self.dataset, self.train, self.skip, self.in_main = dataset, train, skip, in_main

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        try:
            if hasattr(self.dataset, "get"):
                return self.dataset.get(i, seed, self.train)
            if seed is None:
                return self.dataset[i]
            if self.in_main:  # keep the training process's RNG as it was
                state = (random.getstate(), np.random.get_state())
                with torch.random.fork_rng(devices=[]):
                    _seed_all(seed)
                    out = self.dataset[i]
                random.setstate(state[0])
                np.random.set_state(state[1])
                return out
            _seed_all(seed)
            return self.dataset[i]
        except DataError as exc:
            if not self.skip:
                raise
            return _Skipped(str(exc))


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)


@dataclass
class _Skipped:
    reason: str


def collate(items):
    """Stack the items' inputs and targets; skipped items are left out and reported."""
    kept = [it for it in items if not isinstance(it, _Skipped)]
    skipped = [it.reason for it in items if isinstance(it, _Skipped)]
    if not kept:
        return None, None, skipped
    x, y = tud.default_collate(kept)
    if isinstance(x, list):
        x = tuple(x)
    return x, y, skipped


def one_line(exc: BaseException) -> str:
    """A worker's error as one line: DataLoader re-raises it wrapped in its traceback."""
    text = str(exc)
    for key in ("DataError: ", "Error: "):
        if "Original Traceback" in text and key in text:
            return text.rsplit(key, 1)[1].strip().splitlines()[0]
    return text.strip().splitlines()[-1] if text.strip() else type(exc).__name__


@dataclass
class StreamingData:
    """Train/val/test map-style datasets read through DataLoader workers while training.

    Each dataset's item is ``(input, target)`` (an input may be a tuple or dict of
    tensors). ``workers`` processes decode and transform; ``bad_files`` ``fail`` refuses a
    bad item (its path named), ``skip`` leaves it out of its batch and names it on stderr.
    The training loop recognises this class by :meth:`train_stream`.
    """

    name: str
    train: tud.Dataset
    val: tud.Dataset
    test: tud.Dataset
    num_classes: int
    workers: int = 0
    bad_files: str = "fail"
    augment: str | None = None  # augmentation happens in the datasets, not on batches
    fingerprint: str = ""  # what identifies the data in a run's hash
    skipped: set = field(default_factory=set)

    def __post_init__(self):
        if self.bad_files not in ("fail", "skip"):
            raise DataError(f"unknown bad-files '{self.bad_files}'; choose from: fail, skip")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise DataError(f"workers must be an integer >= 0; got {self.workers}")
        if len(self.train) == 0:
            raise DataError(f"dataset '{self.name}' has no training examples")

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def input_shape(self):
        x, _ = self._first()
        return structure.shapes(structure.map_leaves(lambda t: t[None], x))

    def _first(self):
        item = Seeded(self.train, False, False, True)[0]
        return item

    def probe_input(self):
        x, _ = self._first()
        x = structure.map_leaves(lambda t: t[None], x)
        return structure.shapes(x) if structure.is_plain_float(x) else x

    def train_examples(self, idx: torch.Tensor):
        """The examples ``idx`` of the training set, untransformed (for scoring criteria)."""
        x, y, _ = collate([Seeded(self.train, False, False, True)[int(i)] for i in idx])
        return x, y

    def _loader(self, dataset, sampler, batch_size=None, train=False):
        workers = self.workers
        if batch_size is not None:  # no more workers than batches; kept for every evaluation
            workers = min(workers, -(-len(dataset) // batch_size))
        kwargs = dict(num_workers=workers, collate_fn=collate)
        if workers:
            kwargs.update(prefetch_factor=4, persistent_workers=batch_size is not None)
        seeded = Seeded(dataset, train, self.bad_files == "skip", workers == 0)
        if batch_size is None:
            return tud.DataLoader(seeded, batch_sampler=sampler, **kwargs)
        return tud.DataLoader(seeded, batch_size=batch_size, shuffle=False, **kwargs)

    def _eval_loader(self, split: str, batch_size: int):
        key = (split, batch_size)
        cache = self.__dict__.setdefault("_eval_loaders", {})
        if key not in cache:
            cache[key] = self._loader(self.val if split == "val" else self.test, None, batch_size)
        return cache[key]

    def _note(self, skipped) -> None:
        for reason in skipped:
            if reason not in self.skipped:
                self.skipped.add(reason)
                print(f"skipped: {reason}", file=sys.stderr)

    def train_stream(self, batch_size, data_seed, aug_seed, start, end, device) -> TrainStream:
        sampler = StepBatches(len(self.train), batch_size, data_seed, aug_seed, start, end)
        return TrainStream(self, self._loader(self.train, sampler, train=True), start, device)

    def eval_batches(self, split: str, batch_size: int, device):
        """The batches of ``split`` (val or test) in order, untransformed, on ``device``."""
        dataset = self.val if split == "val" else self.test
        if len(dataset) == 0:
            return
        try:
            for x, y, skipped in self._eval_loader(split, batch_size):
                self._note(skipped)
                if x is not None:
                    yield structure.to_device(x, device), structure.to_device(y, device)
        except DataError as exc:
            raise DataError(one_line(exc)) from None


class TrainStream:
    """The batches of one training phase, step by step, with throughput accounting."""

    def __init__(self, data: StreamingData, loader, start: int, device):
        self.data, self.device = data, device
        self.iterator = iter(loader)
        self.next_step = start
        self.wait = 0.0  # seconds blocked on the loader since the last report
        self.examples = 0
        self._peeked = None

    def _next(self):
        t0 = time.perf_counter()
        try:
            x, y, skipped = next(self.iterator)
        except DataError as exc:
            self.close()
            raise DataError(one_line(exc)) from None
        except StopIteration:
            raise DataError("the data loader ended before the phase") from None
        self.wait += time.perf_counter() - t0
        self.data._note(skipped)
        if x is None:
            raise DataError(f"step {self.next_step}: every example of the batch was skipped")
        return x, y

    def peek(self):
        """The first batch's inputs (kept for :meth:`batch`): a sample for kernel timing."""
        if self._peeked is None:
            self._peeked = self._next()
        return structure.to_device(self._peeked[0], self.device)

    def batch(self, step: int):
        if step != self.next_step:
            raise DataError(
                f"streamed batches are sequential: asked for {step}, at {self.next_step}"
            )
        if self._peeked is not None:
            (x, y), self._peeked = self._peeked, None
        else:
            x, y = self._next()
        self.next_step += 1
        self.examples += structure.length(y)
        return structure.to_device(x, self.device), structure.to_device(y, self.device)

    def throughput(self, steps: int, seconds: float) -> dict:
        """Examples per second and seconds waiting for data since the last call."""
        out = {
            "examples_per_second": self.examples / seconds if seconds > 0 else float("nan"),
            "data_wait_seconds": self.wait,
            "train_steps": steps,
        }
        self.wait, self.examples = 0.0, 0
        return out

    def close(self) -> None:
        shutdown = getattr(self.iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


class Subset(tud.Dataset):
    """Examples ``indices`` of ``dataset``, its seeded ``get`` passed through."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)
        if hasattr(dataset, "get"):
            self.get = self._get

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]

    def _get(self, i, seed, train):
        return self.dataset.get(self.indices[i], seed, train)


def from_datasets(
    train: tud.Dataset,
    test: tud.Dataset,
    val: tud.Dataset | None = None,
    *,
    val_size: int = 0,
    split_seed: int = 0,
    num_classes: int = 0,
    name: str = "custom",
    workers: int = 0,
    bad_files: str = "fail",
) -> StreamingData:
    """Any map-style ``torch.utils.data.Dataset`` of ``(input, target)`` items, read while
    training by ``workers`` DataLoader processes (0: in this process).

    Either pass ``val`` or hold ``val_size`` training examples out by ``split_seed``.
    Random transforms inside ``dataset[i]`` are reproducible: each item's seed (a function
    of the augmentation seed, the step and its position in the batch) seeds the RNGs
    first, so a resumed run sees the batches an uninterrupted one would. Validation and
    test items are read with a fixed seed (``None``) too. A dataset's ``get(i, seed,
    train)`` method, if it has one, is called instead (its own seeded transforms).
    """
    if val is not None and val_size:
        raise DataError("give either val or val_size, not both")
    if val is None:
        if val_size:
            if val_size >= len(train):
                raise DataError(f"val_size {val_size} leaves no training data")
            perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(split_seed))
            val = Subset(train, perm[:val_size].sort().values.tolist())
            train = Subset(train, perm[val_size:].sort().values.tolist())
        else:
            val = Subset(train, [])
    return StreamingData(
        name,
        train,
        val,
        test,
        num_classes,
        workers=workers,
        bad_files=bad_files,
        fingerprint=f"{name}:{len(train)}:{len(val)}:{len(test)}",
    )
