"""Caption generation: beam search over the candidate vocabulary with the image states cached.

The SPE + image tokens are encoded once per image (`PrefixCache(recording=True)` stores every layer's
keys and values); each step runs only the words so far plus one placeholder query through the encoder,
attending to the cached prefix (exactly what the full caption forward computes, see
`tests/test_prompt_tuning.py`). The query's feature is scored against the vocabulary targets, which are
also encoded once, plus the model's word bias of each candidate word.
"""

from __future__ import annotations

import torch

from modeling_uniperceiver_moe.modeling_uniperceiver_moe import PrefixCache
from training.tasks import ATTRIBUTES


def generic_model(model):
    """The `UniPerceiverMoEForGenericPerception` inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def generate_captions(model, pixel_values: torch.Tensor, vocabulary: torch.Tensor, task_id: int = 0,
                      beam_size: int = 2, max_length: int = 20) -> list[list[int]]:
    """pixel_values `[B, C, H, W]` -> B token-id lists (without start/end tokens).

    vocabulary: `[K]` candidate token ids; it must contain the end token (generation stops there).
    """
    net = generic_model(model)
    config = net.config
    bos, eos = config.bos_token_id, config.eos_token_id
    if not bool((vocabulary == eos).any()):
        raise ValueError("the candidate vocabulary must contain the end token to stop generation")
    device = pixel_values.device
    batch, vocab = pixel_values.shape[0], vocabulary.shape[0]
    vocabulary = vocabulary.to(device)

    def route(attributes, rows):
        return {"attribute_vectors": attributes.to_tensor(device).expand(rows, -1),
                "task_ids": torch.full((rows,), task_id, dtype=torch.long, device=device)}

    targets, _ = net.encode_targets(
        input_ids=torch.stack([vocabulary, torch.full_like(vocabulary, eos)], 1),
        attention_mask=torch.ones(vocab, 2, dtype=torch.long, device=device), **route(ATTRIBUTES["word_target"], vocab))
    scale = net.logit_scales("captioning")
    # the captioning family's learned word bias (config.word_logit_bias), as the caption forward adds it
    word_bias = 0.0 if net.word_bias is None else net.word_bias("captioning", vocabulary).float()
    cache = PrefixCache(recording=True)
    net.uniperceiver(pixel_values=pixel_values, prefix_cache=cache, **route(ATTRIBUTES["caption_image"], batch))

    # the words so far: the start token, or none (the reference's texts: the first placeholder reads the image only)
    sequences = torch.full((batch * beam_size, 0 if bos is None else 1), 0 if bos is None else bos, dtype=torch.long,
                           device=device)
    scores = torch.full((batch, beam_size), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep one
    finished = torch.zeros(batch * beam_size, dtype=torch.bool, device=device)
    source = torch.arange(batch, device=device).repeat_interleave(beam_size)
    for _ in range(max_length):
        step_cache = cache.select(source)
        slot = torch.full((sequences.shape[0], 1), config.mask_token_id, dtype=torch.long, device=device)
        words = torch.cat([sequences, slot], 1)  # + the slot to predict
        length = words.shape[1]
        out = net.uniperceiver(input_ids=words, caption_mode=True, prefix_cache=step_cache,
                               **route(ATTRIBUTES["caption_text"], words.shape[0]))
        query = out.last_hidden_state[:, length + length - 1]  # the last placeholder predicts the next word
        logits = scale * net.input_head(query) @ targets.float().t() + word_bias
        log_probs = logits.log_softmax(-1)
        eos_index = int((vocabulary == eos).nonzero()[0])
        done = torch.full_like(log_probs, float("-inf"))
        done[:, eos_index] = 0.0  # a finished beam only "continues" with the end token, at no cost
        log_probs = torch.where(finished[:, None], done, log_probs)
        total = (scores.reshape(-1, 1) + log_probs).reshape(batch, beam_size * vocab)
        scores, flat = total.topk(beam_size, dim=-1)
        beam = flat // vocab
        token = vocabulary[flat % vocab]
        parent = (torch.arange(batch, device=device)[:, None] * beam_size + beam).reshape(-1)
        sequences = torch.cat([sequences[parent], token.reshape(-1, 1)], 1)
        finished = finished[parent] | (token.reshape(-1) == eos)
        source = source[parent]
        if bool(finished.all()):
            break
    best = scores.argmax(-1)
    chosen = sequences.reshape(batch, beam_size, -1)[torch.arange(batch, device=device), best]
    captions = []
    for row in chosen.tolist():
        words = row[0 if bos is None else 1:]
        captions.append(words[: words.index(eos)] if eos in words else words)
    return captions
