"""`AutoProcessor` for Uni-Perceiver-MoE: images / videos / text -> model inputs."""

from __future__ import annotations

import importlib.util
import os

from transformers import BatchFeature, ProcessorMixin

if importlib.util.find_spec("torchvision") is None:  # the PIL backend, without torchvision's warning
    try:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:  # older transformers: one class only
        from transformers import CLIPImageProcessor
else:
    from transformers import CLIPImageProcessor

from .tokenization_uniperceiver_moe import build_uniperceiver_tokenizer, encode_texts

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
IMAGE_PREPROCESSING = ("clip", "reference")


def build_image_processor(image_size: int = 224, preprocessing: str = "clip") -> CLIPImageProcessor:
    """Images -> `[B, 3, image_size, image_size]`: resize the short side, centre-crop, scale to [0, 1], normalise.

    Bicubic resampling (the image processor's default). "clip": short side to `image_size` (a square image is
    not cropped), CLIP statistics: what this package trains with. "reference": the reference's evaluation
    transform, short side to `256 / 224 * image_size` then the centre crop, ImageNet statistics: what a
    converted official checkpoint expects.
    """
    if preprocessing not in IMAGE_PREPROCESSING:
        raise ValueError(f"image preprocessing must be one of {IMAGE_PREPROCESSING}, got {preprocessing!r}")
    reference = preprocessing == "reference"
    return CLIPImageProcessor(
        size={"shortest_edge": int(256 / 224 * image_size) if reference else image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=IMAGENET_MEAN if reference else CLIP_MEAN,
        image_std=IMAGENET_STD if reference else CLIP_STD,
        do_convert_rgb=True,
    )


class UniPerceiverMoEProcessor(ProcessorMixin):
    """Wraps a CLIP image processor and the Uni-Perceiver CLIP-BPE tokenizer.

    `processor(text=..., images=..., videos=...)` returns a `BatchFeature` with `input_ids`,
    `attention_mask` (text), and `pixel_values`: `[B, C, H, W]` for images, `[B, F, C, H, W]` for videos
    (each video a list of F frames; all videos of a batch must have the same F). `decode` / `batch_decode`
    are `ProcessorMixin`'s (the tokenizer's); the sub-processors are the `__init__` arguments.
    `add_bos_token` (saved with the processor): texts start with `<|startoftext|>` (this package's training) or,
    when False, with their first word (the reference; a converted checkpoint's processor), matching the
    model config's `bos_token_id` (None for the latter).
    """

    def __init__(self, image_processor=None, tokenizer=None, add_bos_token: bool = True, **kwargs):
        self.add_bos_token = add_bos_token
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def build(cls, image_size: int = 224, model_max_length: int = 512, image_preprocessing: str = "clip",
              add_bos_token: bool = True) -> "UniPerceiverMoEProcessor":
        """A processor made offline from the vocabulary open-clip-torch ships; `image_preprocessing` is
        "clip" (this package's training) or "reference" (a converted official checkpoint), see
        `build_image_processor`; `add_bos_token` False for the reference's texts."""
        return cls(build_image_processor(image_size, image_preprocessing),
                   build_uniperceiver_tokenizer(model_max_length=model_max_length), add_bos_token=add_bos_token)

    def __call__(self, text=None, images=None, videos=None, padding=True, truncation=True, max_length=None,
                 return_tensors="pt", **kwargs) -> BatchFeature:
        if text is None and images is None and videos is None:
            raise ValueError("give text, images or videos")
        if images is not None and videos is not None:
            raise ValueError("give images or videos, not both")
        data = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if any(not isinstance(t, str) or not t.strip() for t in texts):
                raise ValueError("every text must be a non-empty string")
            encoded = encode_texts(self.tokenizer, texts, self.add_bos_token, max_length=max_length, padding=padding,
                                   truncation=truncation, return_tensors=return_tensors, **kwargs)
            data.update(encoded)
        if images is not None:
            data["pixel_values"] = self.image_processor(images, return_tensors="pt")["pixel_values"]
        if videos is not None:
            lengths = {len(frames) for frames in videos}
            if len(lengths) != 1:
                raise ValueError(f"all videos of a batch must have the same number of frames, got {sorted(lengths)}")
            frames = [frame for video in videos for frame in video]
            pixels = self.image_processor(frames, return_tensors="pt")["pixel_values"]
            data["pixel_values"] = pixels.reshape(len(videos), lengths.pop(), *pixels.shape[1:])
        return BatchFeature(data=data, tensor_type=None)


__all__ = ["UniPerceiverMoEProcessor", "build_image_processor", "IMAGE_PREPROCESSING"]


def checkpoint_processor(folder: str, image_size: int, add_bos_token: bool = True) -> UniPerceiverMoEProcessor:
    """The processor saved with a checkpoint folder (a converted official one brings the reference's image
    preprocessing and texts without the start token), else this package's for the model's image size.
    add_bos_token: whether the model's texts start with the start token (its config's `bos_token_id`); a saved
    processor that disagrees is refused."""
    if not os.path.exists(os.path.join(folder, "processor_config.json")):
        return UniPerceiverMoEProcessor.build(image_size=image_size, add_bos_token=add_bos_token)
    processor = UniPerceiverMoEProcessor.from_pretrained(folder)
    if processor.add_bos_token != add_bos_token:
        raise ValueError(f"{folder}: the saved processor {'adds' if processor.add_bos_token else 'does not add'} the "
                         f"start token to texts, but the model config's bos_token_id says the opposite")
    return processor
