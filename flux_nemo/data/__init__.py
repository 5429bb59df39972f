"""Data layer: the official preprocessed flux1 records (Arrow / webdataset), loaders and synthetic data.

Public API (the batch contract is in docs/DESIGN.md; raw images + encoders live in ``raw``/``encoders``/``dali``):

=========================================================  =====================================================
``RecordShapes(t5_len, t5_dim, clip_dim, latent_channels,    per-sample shapes (defaults official); ``.fields()``
latent_size)`` / ``FIELDS``                                  column -> shape; ``RecordShapes.for_model(...)``
``encode_tensor(t) -> bytes``                                bf16 tensor -> npy bytes of its uint16 view
``decode_tensor(b, shape, *, where) -> Tensor``              npy bytes -> bf16; ValueError naming ``where``
``write_arrow_dataset(out_dir, rows, shapes)``               HF ``save_to_disk`` Arrow dataset (streaming)
``write_webdataset(out_dir, rows, shapes, samples_per_shard)``  tar shards: .json .t5/.clip/.mean/.logvar.bytes
``save_empty_encodings(dir, t5, clip)``                      ``t5_empty.npy`` / ``clip_empty.npy`` (float16)
``load_empty_encodings(dir, shapes=None)``                   -> (t5 [1,L,D], clip [1,D]) bf16
``open_source(path, shapes, fmt="auto")``                    random-access reader (ArrowSource / WebDatasetSource)
``contiguous_chunk(n, rank, world) -> (start, stop)``        HF ``shard(contiguous=True)`` chunk of a dp rank
``build_train_loader(path, *, dp_rank, dp_world,             infinite in-order ``TrainLoader`` with
micro_batch_size, num_workers=2, shapes, fmt, pin_memory,    ``state_dict()`` / ``load_state_dict()``
prefetch_factor=2)``
``build_eval_loader(path, *, dp_rank, dp_world,              one-pass ``EvalLoader``; ``len()`` equal on every
micro_batch_size, num_workers=2, shapes, fmt, pin_memory,    rank, padding rows ``valid=False``
prefetch_factor=2)``
``eval_num_batches(n, dp_world, micro_batch_size)``          eval batches per rank
``write_synthetic(out, n_train, n_eval, shapes, seed,        synthetic learnable data: ``out/train``,
fmt)``                                                       ``out/eval``, ``out/empty_encodings``
=========================================================  =====================================================

Errors: any bad record (corrupt file or shard, missing column or member, null cell, wrong dtype or shape, data
that do not match the model's ``RecordShapes``) raises ``ValueError`` naming the file and the row or key. Nothing
is ever skipped, so there is no skip counter to report. The loaders check the first record at build time.

Hydra mapping: ``data.train_path`` -> ``build_train_loader(path)``, ``data.eval_path`` -> ``build_eval_loader(path)``,
``data.empty_encodings_path`` -> ``load_empty_encodings(dir)``. CLI: ``python -m flux_nemo.data.synthetic``.
"""

from .format import (
    FIELDS,
    OFFICIAL_SHAPES,
    RecordShapes,
    decode_tensor,
    encode_tensor,
    load_empty_encodings,
    save_empty_encodings,
    write_arrow_dataset,
    write_webdataset,
)
from .loader import (
    EvalLoader,
    TrainLoader,
    build_eval_loader,
    build_train_loader,
    contiguous_chunk,
    eval_num_batches,
)
from .readers import ArrowSource, WebDatasetSource, open_source


def __getattr__(name: str):
    # lazy, so that ``python -m flux_nemo.data.synthetic`` does not import the module twice
    if name == "write_synthetic":
        from .synthetic import write_synthetic

        return write_synthetic
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FIELDS",
    "OFFICIAL_SHAPES",
    "ArrowSource",
    "EvalLoader",
    "RecordShapes",
    "TrainLoader",
    "WebDatasetSource",
    "build_eval_loader",
    "build_train_loader",
    "contiguous_chunk",
    "decode_tensor",
    "encode_tensor",
    "eval_num_batches",
    "load_empty_encodings",
    "open_source",
    "save_empty_encodings",
    "write_arrow_dataset",
    "write_synthetic",
    "write_webdataset",
]
