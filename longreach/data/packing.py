"""Documents -> tokens (cached) -> packed rows of ``seq_len`` -> a deterministic, resumable, data-parallel
batch iterator yielding :class:`~longreach.data.batch.Batch`.

Packing model (``pack_documents=True``): every document is tokenized, an eos token is appended, and the
documents are concatenated in order into one token stream that is cut every ``seq_len`` tokens. A document
that crosses a row boundary (any document longer than ``seq_len`` does) is split into chunks; each chunk
restarts its positions at 0 and is its own segment in ``cu_seqlens``, so attention never crosses a document
or a row. Labels are the true next token of the same document, so the last token of a chunk that is not
the end of its document still carries a label (the first token of the next chunk); only a document's last
token (its eos) and padding get -100. Nothing is dropped: the last row is padded (its own segment, -100).

``pack_documents=False`` treats the stream as one contiguous text: each row is one "document" with
positions 0..S-1 and no ``cu_seqlens``, and labels cross document boundaries (eos -> next document).
"""

from __future__ import annotations

from ..errors import ConfigError
import hashlib
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from ..attention.context import cu_seqlens_from_position_ids
from .batch import Batch

logger = logging.getLogger(__name__)

IGNORE = -100
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "longreach" / "tokens"
_CACHE_VERSION = "1"  # bump when the on-disk format or the tokenization recipe changes


# ----------------------------------------------------------------------------------------------- tokenize
def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A stable hash of what the tokenizer does (its serialized fast tokenizer, else its vocabulary)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    elif hasattr(tokenizer, "get_vocab"):
        for tok, idx in sorted(tokenizer.get_vocab().items()):
            h.update(f"{tok}\x00{idx}\x01".encode())
    else:
        raise TypeError(f"cannot fingerprint tokenizer of type {type(tokenizer).__name__} for the token cache; "
                        "pass cache_dir=None to tokenize without a cache")
    h.update(f"eos={tokenizer.eos_token_id}".encode())
    return h.hexdigest()


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ConfigError("the tokenizer has no eos_token_id; the data pipeline appends eos after every document")
    return int(eos)


def tokenize_documents(docs: Sequence[str], tokenizer: Any, *, cache_dir: Optional[str | Path]) -> list[torch.Tensor]:
    """Token ids of each document with the tokenizer's eos appended: a list of int64 [n_i + 1] tensors.

    Uses ``tokenizer(texts, add_special_tokens=False)`` (no bos: documents are plain continuous text).
    With ``cache_dir`` set, results are stored in ``cache_dir/<hash>.npz`` keyed by the tokenizer fingerprint
    and the text, written atomically so several ranks may race on it. SmolLM2's tokenizer takes ~4 s for the
    4.2 MB Bible on 2 cores; a cache hit takes milliseconds.
    """
    eos = _eos_id(tokenizer)
    path = None
    if cache_dir is not None:
        h = hashlib.sha256(f"v{_CACHE_VERSION}\x00{tokenizer_fingerprint(tokenizer)}\x00".encode())
        for d in docs:
            b = d.encode("utf-8")
            h.update(len(b).to_bytes(8, "little") + b)
        path = Path(cache_dir) / f"{h.hexdigest()[:32]}.npz"
        if path.is_file():
            with np.load(path) as z:
                flat, lengths = torch.from_numpy(z["tokens"].astype(np.int64)), z["lengths"].tolist()
            logger.info("token cache hit: %s (%d tokens)", path, flat.numel())
            return list(torch.split(flat, lengths))
    t0 = time.perf_counter()
    ids = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    out = [torch.tensor(list(x) + [eos], dtype=torch.long) for x in ids]
    logger.info("tokenized %d documents into %d tokens in %.1f s", len(out), sum(t.numel() for t in out),
                time.perf_counter() - t0)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        flat = torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, tokens=flat.numpy().astype(np.int32), lengths=np.array([t.numel() for t in out], dtype=np.int64))
        os.replace(tmp, path)  # atomic: a reader never sees a half-written file
        logger.info("token cache written: %s", path)
    return out


# -------------------------------------------------------------------------------------------------- pack
@dataclass
class PackedDataset:
    """Packed rows, all of length ``seq_len``; row ``i`` is ``(input_ids[i], labels[i], position_ids[i])``."""

    input_ids: torch.Tensor
    """int64 [N, S]"""
    labels: torch.Tensor
    """int64 [N, S], already shifted, -100 at document ends and padding"""
    position_ids: torch.Tensor
    """int64 [N, S]; packed: restart at 0 at every document/chunk (and padding) start; stream: 0..S-1 per row"""
    packed: bool
    """True: documents packed with segments (``cu_seqlens``); False: one contiguous stream, one row = one document."""
    num_tokens: int
    """Real tokens in the stream (the rest of the last row is padding)."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def batch(self, rows: torch.Tensor | Sequence[int]) -> Batch:
        """The rows ``rows`` as one Batch (``cu_seqlens`` over the flattened [B*S] tokens when packed)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        pos = self.position_ids[idx]
        return Batch(
            input_ids=self.input_ids[idx],
            labels=self.labels[idx],
            position_ids=pos,
            cu_seqlens=cu_seqlens_from_position_ids(pos) if self.packed else None,
        )


def pack(docs_tokens: Sequence[torch.Tensor], seq_len: int, *, pack_documents: bool = True, pad_id: int = 0,
         max_tokens: int = 0) -> PackedDataset:
    """Pack tokenized documents (each 1-D, eos already appended) into rows of ``seq_len``.

    See the module docstring for the layout. Documents longer than ``seq_len`` are split into chunks at row
    boundaries and every chunk restarts its positions at 0. ``max_tokens > 0`` truncates the stream first
    (``data.max_train_tokens``); the truncated document's last kept token then counts as its end.
    """
    if seq_len <= 0:
        raise ConfigError(f"data.seq_len={seq_len} must be > 0")
    docs = [d for d in docs_tokens if d.numel() > 0]
    if not docs:
        raise ConfigError("no tokens to pack: every document is empty (check data.source)")
    stream = torch.cat(docs).long()  # [T]
    doc_end = torch.zeros(stream.numel(), dtype=torch.bool)
    doc_end[torch.cumsum(torch.tensor([d.numel() for d in docs]), 0) - 1] = True
    if max_tokens > 0 and stream.numel() > max_tokens:
        stream, doc_end = stream[:max_tokens], doc_end[:max_tokens]
        doc_end[-1] = True
    n = stream.numel()
    rows = -(-n // seq_len)
    total = rows * seq_len

    ids = torch.full((total,), pad_id, dtype=torch.long)
    ids[:n] = stream
    labels = torch.full((total,), IGNORE, dtype=torch.long)
    labels[: n - 1] = stream[1:]
    labels[n - 1] = IGNORE  # the stream's last token has no next token in either mode
    idx = torch.arange(total)
    if pack_documents:
        labels[:n][doc_end] = IGNORE
        start = idx % seq_len == 0  # row starts
        start[1:n] |= doc_end[: n - 1]  # the token after a document's end starts the next document
        if n < total:
            start[n] = True  # padding is its own segment
        seg_start = torch.cummax(torch.where(start, idx, torch.zeros_like(idx)), 0).values
        pos = idx - seg_start
    else:
        pos = idx % seq_len
    return PackedDataset(ids.view(rows, seq_len), labels.view(rows, seq_len), pos.view(rows, seq_len),
                         packed=pack_documents, num_tokens=n)


def unpack(dataset: PackedDataset) -> torch.Tensor:
    """The token stream a dataset was packed from (padding removed): int64 [num_tokens]."""
    return dataset.input_ids.flatten()[: dataset.num_tokens].clone()


# ---------------------------------------------------------------------------------------------- iterate
def steps_per_epoch(dataset: PackedDataset, batch_size: int, dp_world: int = 1) -> int:
    """Optimizer micro-steps per pass over the rows (the incomplete tail of an epoch is dropped)."""
    per_step = batch_size * dp_world
    n = len(dataset) // per_step
    if n == 0:
        raise ValueError(
            f"the training text packs into {len(dataset)} rows of data.seq_len={dataset.seq_len}, fewer than "
            f"data.batch_size={batch_size} x {dp_world} data-parallel ranks; lower data.batch_size or data.seq_len, "
            "or use more text (data.source)"
        )
    return n


def _epoch_permutation(num_rows: int, seed: int, epoch: int) -> torch.Tensor:
    # one independent permutation per (seed, epoch); string seeding of random.Random is stable across runs
    g = torch.Generator().manual_seed(random.Random(f"longreach-data-{seed}-{epoch}").getrandbits(63))
    return torch.randperm(num_rows, generator=g)


def batch_rows(dataset: PackedDataset, step: int, batch_size: int, *, seed: int, dp_rank: int = 0,
               dp_world: int = 1) -> torch.Tensor:
    """Row indices of ``step`` for one data-parallel rank: int64 [batch_size].

    Step ``s`` takes the ``s % steps_per_epoch``-th block of ``batch_size * dp_world`` rows of epoch
    ``s // steps_per_epoch``'s seeded permutation; rank ``r`` takes the ``r``-th slice of the block, so ranks
    are disjoint within a step and the result depends only on (seed, step, rank, world).
    """
    if not 0 <= dp_rank < dp_world:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_world={dp_world})")
    spe = steps_per_epoch(dataset, batch_size, dp_world)
    epoch, i = divmod(step, spe)
    perm = _epoch_permutation(len(dataset), seed, epoch)
    a = (i * dp_world + dp_rank) * batch_size
    return perm[a:a + batch_size]


def batches(dataset: PackedDataset, batch_size: int, *, seed: int, start_step: int = 0, dp_rank: int = 0,
            dp_world: int = 1) -> Iterator[Batch]:
    """Endless stream of Batches [batch_size, seq_len] for one data-parallel rank, starting at ``start_step``.

    A run resumed at step k passes ``start_step=k`` and sees exactly the batches an uninterrupted run sees
    from step k on (see :func:`batch_rows`). Epochs reshuffle; the caller stops after ``train.steps``.
    """
    if start_step < 0:
        raise ValueError(f"start_step={start_step} must be >= 0")
    spe = steps_per_epoch(dataset, batch_size, dp_world)
    step, epoch, perm = start_step, -1, None
    while True:
        e, i = divmod(step, spe)
        if e != epoch:  # one permutation per epoch, not per step
            epoch, perm = e, _epoch_permutation(len(dataset), seed, e)
        a = (i * dp_world + dp_rank) * batch_size
        yield dataset.batch(perm[a:a + batch_size])
        step += 1


# ------------------------------------------------------------------------------------------ whole pipeline
@dataclass
class DataSplits:
    """What a run needs from its text: packed training rows and the held-out token stream."""

    train: PackedDataset
    heldout_tokens: torch.Tensor
    """int64 [T], the held-out documents (eos after each) concatenated, for perplexity."""
    num_train_docs: int
    num_heldout_docs: int
    tokenize_seconds: float


def build_datasets(data: Any, tokenizer: Any, *, cache_dir: Optional[str | Path] = DEFAULT_CACHE_DIR) -> DataSplits:
    """``data.source`` -> documents -> split -> tokens -> packed training rows, from a ``DataConfig``
    (fields used: source, heldout_fraction, seed, seq_len, pack_documents, max_train_tokens).

    The split uses ``data.seed`` so that the held-out text is fixed for a given config. ``cache_dir=None``
    disables the token cache.
    """
    from .corpus import load_documents, split_documents  # local: corpus is only needed for the whole pipeline

    docs = load_documents(data.source)
    train_docs, held_docs = split_documents(docs, data.heldout_fraction, data.seed)
    if cache_dir is not None:
        logger.info("token cache directory: %s", cache_dir)
    t0 = time.perf_counter()
    train_tok = tokenize_documents(train_docs, tokenizer, cache_dir=cache_dir)
    held_tok = tokenize_documents(held_docs, tokenizer, cache_dir=cache_dir)
    seconds = time.perf_counter() - t0
    train = pack(train_tok, data.seq_len, pack_documents=data.pack_documents, pad_id=_eos_id(tokenizer),
                 max_tokens=data.max_train_tokens)
    held = torch.cat(held_tok)
    logger.info("data: %d train docs -> %d tokens in %d rows of %d (pack_documents=%s); %d held-out docs -> %d tokens",
                len(train_docs), train.num_tokens, len(train), data.seq_len, data.pack_documents, len(held_docs),
                held.numel())
    return DataSplits(train, held, len(train_docs), len(held_docs), seconds)
