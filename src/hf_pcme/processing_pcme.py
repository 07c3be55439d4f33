"""PCMEProcessor: the image processor and the tokenizer of a PCME model, saved and loaded together."""

from __future__ import annotations

from transformers import BatchFeature, ProcessorMixin


class PCMEProcessor(ProcessorMixin):
    """Wraps an image processor (any transformers one, e.g. ``ViTImageProcessorPil``) and a tokenizer
    (any transformers one, e.g. the word-level tokenizer of the bi-GRU tower).

    ``processor(images=..., text=..., return_tensors="pt")`` returns ``pixel_values``,
    ``input_ids`` and ``attention_mask`` (text is padded to the longest caption by default).
    """

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer)

    def __call__(self, images=None, text=None, return_tensors="pt", padding=True, truncation=True, **kwargs):
        if images is None and text is None:
            raise ValueError("PCMEProcessor needs `images`, `text`, or both.")
        encoding = {}
        if text is not None:
            if isinstance(text, str):
                text = [text]
            encoding.update(
                self.tokenizer(text, return_tensors=return_tensors, padding=padding, truncation=truncation, **kwargs)
            )
        if images is not None:
            encoding.update(self.image_processor(images, return_tensors=return_tensors))
        return BatchFeature(data=dict(encoding), tensor_type=return_tensors)


__all__ = ["PCMEProcessor"]
