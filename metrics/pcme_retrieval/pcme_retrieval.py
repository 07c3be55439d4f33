"""PCME cross-modal retrieval metrics as an `evaluate` module (a thin wrapper).

Load it from this folder, offline: ``evaluate.load("<repo>/metrics/pcme_retrieval")``. All the work
is done by :func:`hf_pcme.metrics.evaluate_retrieval` (``pip install hf_pcme``).
"""

import inspect

import datasets
import evaluate
from hf_pcme.metrics import evaluate_retrieval

_DESCRIPTION = """\
Image-text retrieval metrics of PCME (Chun et al., CVPR 2021) and PCME++ (Chun, ICLR 2024), both
directions (i2t: images as queries, t2i: captions as queries): Recall@K and RSUM, R-Precision and
MAP@R (Musgrave et al., ECCV 2020), and PMRP (plausible-match R-Precision from COCO instance labels,
class labels or an explicit plausibility matrix), on the whole set ("5K") and, with
protocol="coco", on the 1K folds (keys prefixed "1k/"). Values are percentages. Ties: items not
relevant for a metric are ranked before relevant items with the same score.
"""

_KWARGS_DESCRIPTION = """
Args:
    text_to_image (`list[int]`): the image index (row of `scores`) of each caption. This is the only
        declared feature; everything else is passed through unchanged (no Arrow encoding).
    scores (`array`, optional): (num_images, num_texts) scores, higher = better.
    image_embeds, text_embeds (`array`, optional): embeddings instead of scores, with
    scorer (`str`): "cosine" (default), "csd", "sampled" or "polysemous";
    image_log_sigma2, text_log_sigma2 (`array`, optional): log variances ("csd", "sampled").
    image_labels (`array`, optional): (num_images, C) multi-hot instance labels, for PMRP.
    image_classes (`array`, optional): (num_images,) class ids, for PMRP by class.
    plausibility (`array` or callable, optional): (num_images, num_texts) plausible matches.
    positives (optional): positives of R-Precision / MAP@R (e.g. ECCV Caption's).
    protocol (`str`, optional): "coco" adds the 1K-fold metrics ("1k/..." keys); "eccv_caption"
        adds ECCV Caption's mAP@R / R-P / R@1 and CxC's R@K ("eccv_i2t_map@r", "eccv_i2t_rp",
        "eccv_i2t_r@1", "cxc_i2t_r@1", ...), "cxc" only CxC's; both need image_ids (COCO image ids)
        and text_ids (COCO caption annotation ids) and the `eccv_caption` package's files.
    Any other keyword of `hf_pcme.metrics.evaluate_retrieval` (ks, zetas, fold_size, chunk_size,
    negative_scale, shift, num_samples, seed, image_ids, text_ids).
Returns:
    A flat dict of floats in percent: i2t_R@1, i2t_R@5, i2t_R@10, t2i_R@1, ..., rsum,
    i2t_r_precision, i2t_map_at_r, i2t_pmrp, i2t_pmrp_zeta0, ... and "1k/..." with protocol="coco".
Examples:
    >>> import evaluate
    >>> metric = evaluate.load("metrics/pcme_retrieval")
    >>> metric.compute(text_to_image=[0, 0, 1], scores=[[0.1, 0.5, 0.9], [0.3, 0.2, 0.8]], ks=[1])["i2t_R@1"]
    50.0
"""

_CITATION = """\
@inproceedings{chun2021pcme,
  title={Probabilistic Embeddings for Cross-Modal Retrieval},
  author={Chun, Sanghyuk and Oh, Seong Joon and de Rezende, Rafael Sampaio and Kalantidis, Yannis and Larlus, Diane},
  booktitle={CVPR},
  year={2021}
}
@inproceedings{chun2024pcmepp,
  title={Improved Probabilistic Image-Text Representations},
  author={Chun, Sanghyuk},
  booktitle={ICLR},
  year={2024}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PcmeRetrieval(evaluate.Metric):
    """Recall@K (1K / 5K), RSUM, R-Precision, MAP@R and PMRP of a cross-modal retrieval test set."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"text_to_image": datasets.Value("int64")}),
            reference_urls=["https://github.com/naver-ai/pcme", "https://arxiv.org/abs/2101.05068"],
        )

    def _compute(self, text_to_image, **kwargs):
        accepted = sorted(set(inspect.signature(evaluate_retrieval).parameters) - {"text_to_image"})
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ValueError(
                f"Unknown argument(s) {', '.join(unknown)} for pcme_retrieval; it accepts text_to_image and "
                f"{', '.join(accepted)}."
            )
        return evaluate_retrieval(text_to_image=text_to_image, **kwargs)
