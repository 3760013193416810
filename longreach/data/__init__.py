"""Text -> tokens -> packed sequences (``Batch``): corpus loading, splitting, packing, the batch iterator."""

from .batch import Batch
from .corpus import load_documents, split_documents
from .packing import (DataSplits, PackedDataset, batch_rows, batches, build_datasets, pack, steps_per_epoch,
                      tokenize_documents, unpack)

__all__ = ["Batch", "DataSplits", "PackedDataset", "batch_rows", "batches", "build_datasets", "load_documents",
           "pack", "split_documents", "steps_per_epoch", "tokenize_documents", "unpack"]
