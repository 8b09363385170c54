import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer

from modeling_uniperceiver_moe import UniPerceiverMoEConfig, UniPerceiverMoEProcessor, build_uniperceiver_tokenizer


@pytest.fixture(scope="module")
def processor():
    return UniPerceiverMoEProcessor.build(image_size=32)


def test_tokenizer_ids_match_open_clip_and_specials_follow_the_clip_vocabulary():
    tokenizer = build_uniperceiver_tokenizer()
    # open_clip's tokenizer gives 320 1125 539 320 2368 269 for this sentence, framed by 49406/49407
    assert tokenizer("a photo of a cat.")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    config = UniPerceiverMoEConfig()
    assert tokenizer.convert_tokens_to_ids(["[MASK]", "[GEN]", "[SPE]"]) == [
        config.mask_token_id, config.gen_token_id, config.spe_token_id]
    assert len(tokenizer) == config.vocab_size
    assert tokenizer.eos_token_id == config.eos_token_id and tokenizer.bos_token_id == config.bos_token_id


def test_a_processor_without_the_start_token_keeps_that_choice_through_save_and_load(tmp_path):
    """`add_bos_token=False` (a converted checkpoint's processor): the reference's `text + " <|endoftext|>"`,
    `max_length` counting the same tokens kept, padded with the end token, and the choice saved with it."""
    reference = UniPerceiverMoEProcessor.build(image_size=32, add_bos_token=False)
    UniPerceiverMoEConfig(image_size=32, patch_size=16, bos_token_id=None).save_pretrained(tmp_path)
    reference.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert loaded.add_bos_token is False
    ids = loaded(text=["a photo of a cat.", "dog"])["input_ids"].tolist()
    assert ids == [[320, 1125, 539, 320, 2368, 269, 49407], [1929, 49407, 49407, 49407, 49407, 49407, 49407]]
    assert loaded(text=["a photo of a cat."], max_length=4)["input_ids"].tolist() == [[320, 1125, 539, 49407]]
    assert UniPerceiverMoEProcessor.build(image_size=32)(text=["a photo of a cat."], max_length=4)[
        "input_ids"].tolist() == [[49406, 320, 1125, 49407]]


def test_processor_round_trip_with_auto_processor(processor, tmp_path):
    UniPerceiverMoEConfig(image_size=32, patch_size=16).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, UniPerceiverMoEProcessor)
    assert AutoTokenizer.from_pretrained(tmp_path)("a [SPE]")["input_ids"] == [49406, 320, 49410, 49407]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    a = processor(text=["a red shoe", "a dog"], images=[image, image])
    b = loaded(text=["a red shoe", "a dog"], images=[image, image])
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert a["pixel_values"].shape == (2, 3, 32, 32)
    assert a["attention_mask"].tolist()[1][-1] == 0  # padded
    assert loaded.decode(a["input_ids"][1], skip_special_tokens=True).strip() == "a dog"
    assert loaded.batch_decode(a["input_ids"], skip_special_tokens=True)[0].strip() == "a red shoe"


def test_reference_image_preprocessing_is_the_reference_s_evaluation_transform():
    """Short side to 256/224 of the crop, centre crop, ImageNet statistics; the default keeps a square image
    whole and uses CLIP statistics."""
    reference = UniPerceiverMoEProcessor.build(image_size=224, image_preprocessing="reference")
    grey = Image.new("RGB", (300, 400), (128, 128, 128))
    pixels = reference(images=[grey])["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    expected = [(128 / 255 - m) / s for m, s in zip([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    torch.testing.assert_close(pixels[0, :, 100, 100], torch.tensor(expected), atol=1e-3, rtol=0)
    # a square with a 12-pixel border: the reference's 256/224 resize then crop cuts 14 pixels a side, ours none
    framed = Image.new("RGB", (224, 224), (0, 0, 0))
    framed.paste((255, 255, 255), (12, 12, 212, 212))
    corner_reference = reference(images=[framed])["pixel_values"][0, 0, 0, 0]
    corner_default = UniPerceiverMoEProcessor.build(image_size=224)(images=[framed])["pixel_values"][0, 0, 0, 0]
    assert corner_reference > 0 > corner_default
    with pytest.raises(ValueError, match="image preprocessing must be one of"):
        UniPerceiverMoEProcessor.build(image_preprocessing="imagenet")


def test_processor_carries_no_transformers_4_leftovers():
    """transformers 5 finds the sub-processors from `__init__` and forwards decode / batch_decode itself:
    an `attributes` list would be ignored and a second decode is dead code."""
    assert not {"attributes", "decode", "batch_decode"} & set(vars(UniPerceiverMoEProcessor))
    assert UniPerceiverMoEProcessor.get_attributes() == ["image_processor", "tokenizer"]


def test_processor_video_and_html_cleaning(processor):
    frames = [Image.new("RGB", (32, 32), (i * 40, 0, 0)) for i in range(3)]
    out = processor(videos=[frames, frames])
    assert out["pixel_values"].shape == (2, 3, 3, 32, 32)
    assert processor(text="fish &amp; chips")["input_ids"].tolist() == processor(text="fish & chips")["input_ids"].tolist()


@pytest.mark.parametrize("kwargs,message", [
    ({}, "give text"),
    ({"text": ["ok", "  "]}, "non-empty"),
    ({"videos": [[Image.new("RGB", (8, 8))] * 2, [Image.new("RGB", (8, 8))] * 3]}, "same number of frames"),
])
def test_processor_errors(processor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        processor(**kwargs)


def test_a_prompt_cuts_its_sentences_never_itself_and_names_a_budget_too_small():
    """`render_template` shortens the longest sentence a token at a time and keeps every prompt token;
    a prompt longer than the budget is an error naming it."""
    from training.tasks import TextTemplate, render_template

    template = TextTemplate("{0} ? [SPE] , {1} !", ("a", "b"), ("no", "yes"), drop_final_period=True)
    pieces = {" ? [SPE] , ": [7, 99, 8], " !": [9]}
    encode = lambda text: pieces[text]  # noqa: E731
    assert render_template(template, [[1, 2, 5], [3, 4]], encode, 5, budget=20) == [1, 2, 7, 99, 8, 3, 4, 9]
    assert render_template(template, [[1, 2, 3, 4, 5, 6], [10, 11]], encode, 0, budget=8) == [1, 2, 7, 99, 8, 10, 11, 9]
    with pytest.raises(ValueError, match="no room for its sentences"):
        render_template(template, [[1], [2]], encode, 0, budget=5)
    with pytest.raises(ValueError, match="exactly one"):
        TextTemplate("{0} [SPE] [SPE]", ("a",), ("x",))
    with pytest.raises(ValueError, match="do not match the columns"):
        TextTemplate("{1} [SPE]", ("a",), ("x",))
