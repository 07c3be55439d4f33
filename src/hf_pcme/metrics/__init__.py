"""Retrieval metrics as pure, chunked functions: Recall@K (1K / 5K), RSUM, R-Precision, MAP@R, PMRP,
and ECCV Caption / CxC (``protocol="eccv_caption"`` / ``"cxc"``).

``evaluate_retrieval`` is the entry point (its protocol options also as one ``RetrievalOptions``);
``SCORERS`` lists the scorers it can rank by; :mod:`hf_pcme.metrics.definitions` holds the plain
per-query definitions that the fast paths are tested against.
"""

from .eccv_caption import evaluate_eccv_caption, load_positives, pcmepp_table
from .options import RetrievalOptions
from .ranking import rank_block
from .retrieval import coco_folds, evaluate_retrieval
from .scorers import SCORERS, MatrixScores, ScoreSource, build_scorer

__all__ = [
    "SCORERS", "MatrixScores", "RetrievalOptions", "ScoreSource", "build_scorer", "coco_folds",
    "evaluate_eccv_caption", "evaluate_retrieval", "load_positives", "pcmepp_table", "rank_block",
]  # fmt: skip
