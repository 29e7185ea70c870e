"""AnnData -> validated, preprocessed, split and embedded cell tables (Arrow), one set per map."""

from engine.data.embed import AutoencoderEmbedding, Embedding, PCAEmbedding
from engine.data.io import read_h5ad
from engine.data.prepared import PreparedData, prepare
from engine.data.spec import DataError, DataSpec, MapKey
from engine.data.synthetic import make_combinations, make_dose_response, make_synthetic, synthetic_map

__all__ = [
    "DataError",
    "DataSpec",
    "AutoencoderEmbedding",
    "Embedding",
    "PCAEmbedding",
    "MapKey",
    "PreparedData",
    "make_combinations",
    "make_dose_response",
    "make_synthetic",
    "prepare",
    "read_h5ad",
    "synthetic_map",
]
