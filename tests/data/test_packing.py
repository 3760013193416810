"""Packing invariants (labels, positions, cu_seqlens, round trip), the token cache, and the resumable,
data-parallel batch iterator."""

import random

import pytest
import torch

from longreach.data.packing import (IGNORE, batch_rows, batches, build_datasets, pack, steps_per_epoch,
                                    tokenize_documents, tokenizer_fingerprint, unpack)
from longreach.launch.config import DataConfig


class CharTokenizer:
    """ASCII code points as ids, 0 = eos: enough of the HF tokenizer interface for the pipeline."""

    eos_token_id = 0

    def __init__(self):
        self.calls = 0

    def _enc(self, text):
        return [ord(c) if 0 < ord(c) < 128 else ord("?") for c in text]

    def __call__(self, text, add_special_tokens=False, **kwargs):
        assert add_special_tokens is False
        self.calls += 1
        return {"input_ids": self._enc(text) if isinstance(text, str) else [self._enc(t) for t in text]}

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i > 0)

    def get_vocab(self):
        return {chr(i): i for i in range(1, 128)}


def tiny_hf_tokenizer():
    """A real HF fast tokenizer (byte-level BPE trained in ~1 s on a few sentences)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>", "<unk>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["In the beginning God created the heaven and the earth. The sky is blue."] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def random_docs(n, seed, max_len=60, vocab=50):
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        length = int(torch.randint(1, max_len, (1,), generator=g))
        d = torch.randint(1, vocab, (length,), generator=g)
        d[-1] = 0  # eos, as tokenize_documents appends
        docs.append(d)
    return docs


def reference_layout(docs, seq_len, packed):
    """Per flat token: (label, position, segment id) computed by plain loops."""
    stream = [int(t) for d in docs for t in d]
    doc_of = [i for i, d in enumerate(docs) for _ in range(len(d))]
    n = len(stream)
    total = -(-n // seq_len) * seq_len
    labels, pos, seg = [], [], []
    s, p = -1, 0
    for i in range(total):
        if i >= n:
            lab = IGNORE
        elif i == n - 1:
            lab = IGNORE
        elif packed:
            lab = stream[i + 1] if doc_of[i + 1] == doc_of[i] else IGNORE
        else:
            lab = stream[i + 1]
        row_start = i % seq_len == 0
        if packed:
            new = row_start or i == n or (0 < i < n and doc_of[i] != doc_of[i - 1])
        else:
            new = row_start
        if new:
            s, p = s + 1, 0
        labels.append(lab)
        pos.append(p)
        seg.append(s)
        p += 1
    return stream, labels, pos, seg


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("seq_len", [7, 16, 64])
def test_pack_invariants_random_docs(packed, seq_len):
    docs = random_docs(25, seed=seq_len)  # lengths 1..59: many docs longer than seq_len=7/16
    ds = pack(docs, seq_len, pack_documents=packed, pad_id=0)
    stream, labels, pos, seg = reference_layout(docs, seq_len, packed)
    assert ds.input_ids.shape == ds.labels.shape == ds.position_ids.shape == (len(ds), seq_len)
    assert torch.equal(unpack(ds), torch.cat(docs))
    assert ds.labels.flatten().tolist() == labels
    assert ds.position_ids.flatten().tolist() == pos
    # -100 exactly at document ends (packed) / only the stream end (stream), plus padding
    ends = set(torch.cumsum(torch.tensor([len(d) for d in docs]), 0).sub(1).tolist())
    flat = ds.labels.flatten()
    ignored = set(torch.nonzero(flat[: ds.num_tokens] == IGNORE).flatten().tolist())
    assert ignored == (ends if packed else {ds.num_tokens - 1})
    assert (flat[ds.num_tokens:] == IGNORE).all()
    batch = ds.batch(torch.arange(len(ds)))
    if packed:
        expected = [0] + [i for i in range(1, len(seg)) if seg[i] != seg[i - 1]] + [len(seg)]
        assert batch.cu_seqlens.dtype == torch.int32
        assert batch.cu_seqlens.tolist() == expected
        ctx = batch.attn_context()
        assert ctx.doc_ids(len(ds), seq_len, torch.device("cpu")).flatten().tolist() == seg
    else:
        assert batch.cu_seqlens is None


def test_pack_rows_subset_cu_seqlens_are_local():
    docs = random_docs(10, seed=3)
    ds = pack(docs, 8)
    b = ds.batch([3, 1])
    assert b.input_ids.shape == (2, 8)
    assert int(b.cu_seqlens[0]) == 0 and int(b.cu_seqlens[-1]) == 16
    assert set(range(0, 17, 8)) <= set(b.cu_seqlens.tolist())  # row starts are boundaries


def test_pack_max_tokens_and_errors():
    docs = random_docs(10, seed=4)
    ds = pack(docs, 8, max_tokens=20)
    assert ds.num_tokens == 20 and torch.equal(unpack(ds), torch.cat(docs)[:20])
    assert int(ds.labels.flatten()[19]) == IGNORE
    with pytest.raises(ValueError, match="data.seq_len"):
        pack(docs, 0)
    with pytest.raises(ValueError, match="empty"):
        pack([torch.zeros(0, dtype=torch.long)], 8)


def test_tokenize_appends_eos_and_caches(tmp_path):
    tok = CharTokenizer()
    docs = ["hello world", "second\ndocument", "x"]
    first = tokenize_documents(docs, tok, cache_dir=tmp_path)
    assert [t.tolist() for t in first] == [[ord(c) for c in d] + [0] for d in docs]
    assert tok.calls == 1 and len(list(tmp_path.glob("*.npz"))) == 1
    again = tokenize_documents(docs, tok, cache_dir=tmp_path)
    assert tok.calls == 1  # served from the cache
    assert all(torch.equal(a, b) and b.dtype == torch.long for a, b in zip(first, again))
    tokenize_documents(docs[:2], tok, cache_dir=tmp_path)  # different text: a different key
    assert tok.calls == 2 and len(list(tmp_path.glob("*.npz"))) == 2
    assert not list(tmp_path.glob("*.tmp*"))


def test_real_hf_tokenizer_round_trip(tmp_path):
    tok = tiny_hf_tokenizer()
    docs = ["In the beginning God created the heaven.", "The sky is blue, 71432 times.", "and the earth"]
    toks = tokenize_documents(docs, tok, cache_dir=tmp_path)
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(tiny_hf_tokenizer())
    for d, t in zip(docs, toks):
        assert int(t[-1]) == tok.eos_token_id
        assert tok.decode(t[:-1].tolist()) == d
    ds = pack(toks, 8, pad_id=tok.eos_token_id)
    assert torch.equal(unpack(ds), torch.cat(toks))
    stream, labels, pos, _ = reference_layout(toks, 8, True)
    assert ds.labels.flatten().tolist() == labels and ds.position_ids.flatten().tolist() == pos


def _rows(it, n):
    return [next(it) for _ in range(n)]


def test_iterator_resumes_exactly_and_reshuffles_epochs():
    ds = pack(random_docs(40, seed=5), 8)
    spe = steps_per_epoch(ds, 3)
    full = _rows(batches(ds, 3, seed=11), 2 * spe + 3)  # crosses two epoch boundaries
    for k in (0, 1, spe - 1, spe, 2 * spe + 1):
        resumed = _rows(batches(ds, 3, seed=11, start_step=k), len(full) - k)
        for a, b in zip(full[k:], resumed):
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
            assert torch.equal(a.position_ids, b.position_ids) and torch.equal(a.cu_seqlens, b.cu_seqlens)
    # an epoch visits each row at most once; the next epoch uses a different order
    e0 = torch.cat([batch_rows(ds, s, 3, seed=11) for s in range(spe)])
    e1 = torch.cat([batch_rows(ds, s, 3, seed=11) for s in range(spe, 2 * spe)])
    assert len(set(e0.tolist())) == len(e0) == spe * 3
    assert not torch.equal(e0, e1)
    assert not torch.equal(e0, torch.cat([batch_rows(ds, s, 3, seed=12) for s in range(spe)]))


@pytest.mark.parametrize("world", [2, 3])
def test_dp_ranks_are_disjoint(world):
    ds = pack(random_docs(60, seed=6), 8)
    spe = steps_per_epoch(ds, 2, world)
    seen = []
    for step in range(spe):
        per_rank = [batch_rows(ds, step, 2, seed=0, dp_rank=r, dp_world=world) for r in range(world)]
        flat = torch.cat(per_rank).tolist()
        assert len(set(flat)) == 2 * world  # disjoint within the step
        seen += flat
        its = [next(batches(ds, 2, seed=0, start_step=step, dp_rank=r, dp_world=world)) for r in range(world)]
        for r in range(world):
            assert torch.equal(its[r].input_ids, ds.input_ids[per_rank[r]])
    assert len(set(seen)) == len(seen)  # and across the epoch


def test_iterator_errors():
    ds = pack(random_docs(3, seed=7), 64)
    with pytest.raises(ValueError, match="data.batch_size"):
        next(batches(ds, len(ds) + 1, seed=0))
    with pytest.raises(ValueError, match="dp_rank"):
        batch_rows(ds, 0, 1, seed=0, dp_rank=2, dp_world=2)


def test_build_datasets_from_folder(tmp_path):
    rng = random.Random(0)
    for i in range(12):
        (tmp_path / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(["alpha", "beta", "gamma"]) for _ in range(40 + 10 * i)))
    cfg = DataConfig(source=str(tmp_path), seq_len=32, heldout_fraction=0.2, seed=3)
    tok = CharTokenizer()
    splits = build_datasets(cfg, tok, cache_dir=tmp_path / "cache")
    assert splits.num_train_docs + splits.num_heldout_docs == 12 and splits.num_heldout_docs >= 1
    assert splits.train.seq_len == 32 and splits.train.packed
    n_eos_train = int((unpack(splits.train) == 0).sum())
    assert n_eos_train == splits.num_train_docs
    assert int((splits.heldout_tokens == 0).sum()) == splits.num_heldout_docs
    # the held-out text is the same on a second build, served from the cache
    again = build_datasets(cfg, tok, cache_dir=tmp_path / "cache")
    assert torch.equal(again.heldout_tokens, splits.heldout_tokens)
    assert tok.calls == 2
