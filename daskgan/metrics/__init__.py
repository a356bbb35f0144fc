"""FID, KID and IS over all workers, with a pluggable feature extractor (see ``extractors`` for the choice)."""

from daskgan.config.schema import METRICS
from daskgan.metrics.distances import (
    compute,
    feature_statistics,
    fid,
    frechet_distance,
    inception_score,
    kid,
    sqrtm_psd,
)
from daskgan.metrics.embedding import dataset_statistics, embed_share
from daskgan.metrics.extractors import RandomCnnFeatures, TorchScriptInception, load_extractor

__all__ = ["METRICS", "RandomCnnFeatures", "TorchScriptInception", "compute", "dataset_statistics", "embed_share",
           "feature_statistics", "fid", "frechet_distance", "inception_score", "kid", "load_extractor", "sqrtm_psd"]
