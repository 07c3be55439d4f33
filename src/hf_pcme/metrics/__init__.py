"""Retrieval metrics as pure, chunked functions: Recall@K (1K / 5K), RSUM, R-Precision, MAP@R, PMRP.

``evaluate_retrieval`` is the entry point; ``SCORERS`` lists the scorers it can rank by.
"""

from .ranking import rank_block
from .retrieval import coco_folds, evaluate_retrieval
from .scorers import SCORERS, MatrixScores, ScoreSource, build_scorer

__all__ = ["SCORERS", "MatrixScores", "ScoreSource", "build_scorer", "coco_folds", "evaluate_retrieval", "rank_block"]
