"""Batch-level training augmentations that give the uncertainty a direct training signal.

- :func:`drop_words`: word-dropped ("partial") captions for ProLIP's inclusion loss (Chun et al.,
  "Probabilistic Language-Image Pre-Training", ICLR 2025): a caption with words removed says less,
  so its Gaussian must include the full caption's.
- :func:`mix_images`: PCME++'s mixed-sample augmentation (Chun, ICLR 2024): a fraction of the
  batch's images are mixed (mixup or cutmix) with another image of the batch, and their match
  targets become soft (``lambda`` for the captions of the first image, ``1 - lambda`` for the
  second's).
- :func:`caption_keys` / :func:`duplicate_caption_mask`: captions whose token sequences are identical
  (the word-level tokenizer lower-cases and splits punctuation, so identical normalised text) are
  positives of each other's images. Training captions only; no plausibility label is used.

All randomness comes from an explicit ``torch.Generator`` (or the global RNG when ``None``, which
the trainer checkpoints, so a resumed run draws the same augmentations).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def drop_words(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    drop_prob: float,
    protected_ids: Iterable[int] = (),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove each attended, non-protected token with probability ``drop_prob``; keep at least one.

    Kept tokens are packed to the left in their original order; freed positions become padding
    (the id of the row's first padding position, or 0) with attention 0. Protected ids (special
    tokens such as [CLS] / [SEP]) are always kept and do not count as the kept word.

    Returns:
        ``(input_ids, attention_mask)`` of the partial captions, same shapes as the inputs.
    """
    if not 0.0 <= drop_prob < 1.0:
        raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}.")
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         "must both be (batch, length).")
    attended = attention_mask.bool()
    protected = torch.zeros_like(attended)
    for token in protected_ids:
        protected |= input_ids == int(token)
    words = attended & ~protected
    draws = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    keep_word = words & (draws >= drop_prob)
    # Rows that would lose every word keep their word with the largest draw.
    lost_all = words.any(dim=1) & ~keep_word.any(dim=1)
    if bool(lost_all.any()):
        best = torch.where(words, draws, torch.full_like(draws, -1.0)).argmax(dim=1)
        keep_word[lost_all, best[lost_all]] = True
    keep = keep_word | (attended & protected)
    # Stable left-packing: kept positions first, in order.
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    packed_ids = torch.gather(input_ids, 1, order)
    packed_keep = torch.gather(keep, 1, order)
    pad_value = torch.where(~attended, input_ids, torch.zeros_like(input_ids)).amax(dim=1, keepdim=True)
    pad_value = torch.where((~attended).any(dim=1, keepdim=True), pad_value, torch.zeros_like(pad_value))
    packed_ids = torch.where(packed_keep, packed_ids, pad_value.expand_as(packed_ids))
    return packed_ids, packed_keep.to(attention_mask.dtype)


def caption_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` int64 keys, equal for rows with identical attended token sequences (a polynomial hash).

    Padding does not count. Two different sequences collide with probability about ``B^2 / 2^40``.
    """
    attended = attention_mask.bool()
    modulus, base = (1 << 40) - 87, 1_000_003  # key * base stays below 2^63
    key = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    for column, present in zip(input_ids.long().unbind(dim=1), attended.unbind(dim=1)):
        key = torch.where(present, (key * base + column % modulus + 1) % modulus, key)
    return key


def duplicate_caption_mask(
    image_ids: torch.Tensor, text_keys: torch.Tensor, text_image_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """``(N, M)`` positives: caption j matches image i if it describes it or has the same text as row i's caption.

    Row i of the batch is the pair (image i, caption i); ``text_keys`` are the :func:`caption_keys`
    of the captions (rows and columns are the same pairs).
    """
    text_image_ids = image_ids if text_image_ids is None else text_image_ids
    same_image = image_ids.reshape(-1, 1) == text_image_ids.reshape(1, -1)
    same_text = text_keys.reshape(-1, 1) == text_keys.reshape(1, -1)
    return same_image | same_text


def mix_images(
    pixel_values: torch.Tensor,
    positive_mask: torch.Tensor,
    mix_batch_ratio: float,
    alpha: float = 1.0,
    cutmix_prob: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PCME++'s mixed-sample augmentation: mix the first ``round(ratio * B)`` images with a shuffled partner.

    For a mixed row ``i`` with partner ``p(i)`` (a random other row) and ``lambda ~ Beta(alpha, alpha)``:
    mixup ``x_i <- lambda x_i + (1 - lambda) x_p(i)``, or (with probability ``cutmix_prob``) cutmix:
    a box of area ``1 - lambda`` is pasted from ``x_p(i)`` and ``lambda`` is set to the area actually
    kept. The soft target of image i and caption j is ``lambda [j matches i] + (1 - lambda) [j matches p(i)]``
    (clipped to 1 when both hold); other rows keep their 0/1 targets.

    Returns:
        ``(mixed pixel_values, soft targets (N, M) float)``.
    """
    if not 0.0 <= mix_batch_ratio <= 1.0:
        raise ValueError(f"mix_batch_ratio must be in [0, 1], got {mix_batch_ratio}.")
    num_rows = pixel_values.shape[0]
    if positive_mask.shape[0] != num_rows:
        raise ValueError(f"positive_mask has {positive_mask.shape[0]} rows for {num_rows} images.")
    targets = positive_mask.to(pixel_values.dtype if pixel_values.is_floating_point() else torch.float32).clone()
    num_mixed = int(round(mix_batch_ratio * num_rows))
    if num_mixed == 0 or num_rows < 2:
        return pixel_values, targets
    mixed = pixel_values.clone()
    height, width = pixel_values.shape[-2:]
    for row in range(num_mixed):
        offset = int(torch.randint(1, num_rows, (1,), generator=generator))
        partner = (row + offset) % num_rows
        lam = float(_beta_sample(alpha, generator))
        use_cutmix = float(torch.rand((), generator=generator)) < cutmix_prob
        if use_cutmix:
            cut_h, cut_w = int(round(height * (1 - lam) ** 0.5)), int(round(width * (1 - lam) ** 0.5))
            top = int(torch.randint(0, height - cut_h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - cut_w + 1, (1,), generator=generator))
            mixed[row, ..., top : top + cut_h, left : left + cut_w] = pixel_values[
                partner, ..., top : top + cut_h, left : left + cut_w
            ]
            lam = 1.0 - cut_h * cut_w / (height * width)
        else:
            mixed[row] = lam * pixel_values[row] + (1 - lam) * pixel_values[partner]
        soft = lam * positive_mask[row].to(targets.dtype) + (1 - lam) * positive_mask[partner].to(targets.dtype)
        targets[row] = soft.clamp(max=1.0)
    return mixed, targets


def _beta_sample(alpha: float, generator: torch.Generator | None) -> torch.Tensor:
    """One ``Beta(alpha, alpha)`` draw from ``generator`` (torch.distributions.Beta takes no generator)."""
    if alpha == 1.0:
        return torch.rand((), generator=generator)
    x = torch._standard_gamma(torch.full((2,), float(alpha)), generator=generator)
    return x[0] / x.sum()


__all__ = ["caption_keys", "drop_words", "duplicate_caption_mask", "mix_images"]
