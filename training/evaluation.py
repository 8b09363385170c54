"""Per-task evaluation on held-out rows (one process, no gradients, deterministic).

Metrics: classification accuracy (image, video, text); masked-token accuracy (MLM) and teacher-forced
next-word accuracy (captioning) over the candidate vocabulary, with the perplexity over that vocabulary
(and for captioning whose candidates hold the end token, `word_accuracy` on the answers that are words);
retrieval recall@1/5 in both directions over the evaluated pool. Every task also reports its mean candidate
cross-entropy (no label smoothing). `caption_generation_scores` generates captions with beam search and
scores them with BLEU-4 and CIDEr-D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.nn import functional as F

from .tasks import Task, TaskContext, build_batch

BASELINE_TRAIN_ROWS = 1000  # training rows whose most frequent answer is the trivial baseline


def _chunks(rows: list[dict], size: int):
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def model_answers(model, task: Task):
    """The default `answers` of `candidate_answers`: the model's own candidate logits `[N, K]` and the labels
    `[N]` of a task batch (any model whose output has `"logits"`: this package's head, a PEFT wrapper of it,
    a linear probe)."""

    def answers(batch):
        logits = model(**batch.inputs, task_family=task.family)["logits"]
        return logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1)

    return answers


@torch.no_grad()
def candidate_answers(model, task: Task, rows: list[dict], ctx: TaskContext, device, batch_size: int = 64,
                      answers=None):
    """Yields, per batch of `rows` (raw rows of a test split), the float logits `[n, K]` over the batch's K
    candidates and the labels `[n]` of its n answers (positions without a label left out).

    answers: `(TaskBatch on device) -> (logits [N, K], labels [N])`; by default `model_answers(model, task)`.
    Another module scored on the same candidates (the plain baselines of `training.baselines`) passes its own."""
    answers = answers or model_answers(model, task)
    for part in _chunks(rows, batch_size):
        batch = build_batch(task, part, ctx, epoch=0).to(device)
        if batch.num_samples == 0:
            continue
        logits, labels = answers(batch)
        keep = labels != -100
        yield logits.float()[keep], labels[keep]


@torch.no_grad()
def retrieval_scores(model, task: Task, rows: list[dict], ctx: TaskContext, device, batch_size: int = 64
                     ) -> torch.Tensor:
    """`[N, N]` similarity of every evaluated image (rows) to every evaluated caption (columns); the caption
    of image i is column i."""
    images, texts = [], []
    for part in _chunks(rows, batch_size):
        batch = build_batch(task, part, ctx, epoch=0).to(device)
        if batch.num_samples == 0:
            continue
        out = model(**batch.inputs, task_family=task.family)
        images.append(out.input_features.float())
        texts.append(out.target_features.float())
    return torch.cat(images) @ torch.cat(texts).t()


def recall_at_k(scores: torch.Tensor, truth: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """scores `[Q, C]` of Q queries over C candidates, truth `[Q]` the index of each query's right candidate ->
    {k: the share of queries whose right candidate ranks in the top k}. A candidate that scores as high as
    the right one counts as ranked above it, so collapsed (constant) scores give chance-level recall, not a
    perfect one."""
    rank = (scores >= scores.gather(1, truth[:, None])).sum(1) - 1
    return {k: float((rank < k).float().mean()) for k in ks}


@torch.no_grad()
def evaluate_task(model, task: Task, rows: list[dict], ctx: TaskContext, device, batch_size: int = 64,
                  autocast_dtype=None, answers=None) -> dict:
    """Metrics of one task on `rows` (raw rows of its test split). `model` is the unwrapped model; `answers`
    as in `candidate_answers`. An MoE model also reports `expert_entropy`, how evenly the first batch's
    input tokens spread their gate weight over the experts (`task_expert_shares`)."""
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype,
                            enabled=autocast_dtype is not None):
            metrics = _task_metrics(model, task, rows, ctx, device, batch_size, answers)
            if answers is None and routes_experts(model) and rows:
                batch = build_batch(task, rows[:batch_size], ctx, epoch=0)
                if batch.num_samples:
                    metrics["expert_entropy"] = expert_entropy(task_expert_shares(model, batch.to(device)))
            return metrics
    finally:
        model.train(was_training)


def _task_metrics(model, task: Task, rows: list[dict], ctx: TaskContext, device, batch_size: int, answers) -> dict:
    """`evaluate_task`'s metrics of the task's family, the model already in eval mode under its autocast."""
    if task.family == "retrieval":
        return _evaluate_retrieval(model, task, rows, ctx, device, batch_size)
    end = end_answer(task, ctx)
    correct = total = word_correct = words = 0
    loss_sum = 0.0
    predicted = set()
    for logits, labels in candidate_answers(model, task, rows, ctx, device, batch_size, answers):
        guesses = logits.argmax(-1)
        predicted.update(guesses.tolist())
        hits = guesses == labels
        correct += int(hits.sum())
        total += len(labels)
        if end is not None:  # the answers that are words, each the top candidate other than the end
            is_word = labels != end
            word_guesses = logits[is_word].index_fill(1, torch.tensor([end], device=logits.device),
                                                      float("-inf")).argmax(-1)
            word_correct += int((word_guesses == labels[is_word]).sum())
            words += int(is_word.sum())
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
    key = "accuracy" if "classification" in task.family else "token_accuracy"
    metrics = {key: correct / max(total, 1), "loss": loss_sum / max(total, 1), "evaluated": total,
               "distinct_predictions": len(predicted)}
    if task.family in ("mlm", "captioning"):
        metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))  # over the candidate words
    if end is not None:
        metrics["word_accuracy"] = word_correct / max(words, 1)
    return metrics


def end_answer(task: Task, ctx: TaskContext) -> int | None:
    """The candidate index of the end token for a captioning task whose candidates hold it (every caption's
    last answer), else None. Captioning's `word_accuracy` scores the other answers, each by the top candidate
    other than the end: which word, given that the caption goes on (as without the end among the candidates)."""
    if task.family != "captioning" or ctx.vocabulary is None:
        return None
    eos = ctx.model_config.eos_token_id
    where = (ctx.vocabulary == eos).nonzero()
    return int(where[0, 0]) if len(where) else None


def _evaluate_retrieval(model, task, rows, ctx, device, batch_size) -> dict:
    similarity = retrieval_scores(model, task, rows, ctx, device, batch_size)
    truth = torch.arange(len(similarity), device=similarity.device)
    metrics = {"evaluated": len(similarity)}
    for name, scores in (("i2t", similarity), ("t2i", similarity.t())):
        metrics.update({f"{name}_R@{k}": value for k, value in recall_at_k(scores, truth, (1, 5)).items()})
    metrics["distinct_predictions"] = len(set(similarity.argmax(1).tolist()))  # distinct top-1 texts (i2t)
    metrics["loss"] = float(F.cross_entropy(similarity * model.logit_scales(task.family).float(), truth))
    return metrics


@torch.no_grad()
def caption_generation_scores(model, task: Task, rows: list[dict], ctx: TaskContext, device, beam_size: int = 2,
                              batch_size: int = 32) -> dict:
    """Captions generated with beam search (`beam_size` beams, over `ctx.vocabulary`) for the images of
    `rows` (raw rows of a captioning task's test split), scored against each row's caption with BLEU-4 and
    CIDEr-D (the offline `evaluate` modules). A vocabulary without the end token gets it as one more
    candidate, so that a caption can end; a model pre-trained without it (`data.end_token_candidate: false`)
    never had the end token as an answer, so its captions run to the length limit and score accordingly.
    Returns `{"bleu4", "cider", "examples"}`, the examples being the first five `(generated, [reference])`
    pairs."""
    from prompt_tuning.generation import generate_captions, generic_model
    from prompt_tuning.metrics import load_metric

    if task.family != "captioning":
        raise ValueError(f"task {task.name!r} is {task.family!r}, not captioning: it generates no captions")
    vocabulary = ctx.vocabulary
    eos = generic_model(model).config.eos_token_id
    if not bool((vocabulary == eos).any()):
        vocabulary = torch.cat([vocabulary, torch.tensor([eos], dtype=vocabulary.dtype)])
    was_training = model.training
    model.eval()
    predictions, references = [], []
    try:
        for part in _chunks(rows, batch_size):
            batch = build_batch(task, part, ctx, epoch=0)
            ids = generate_captions(model, batch.inputs["pixel_values"].to(device), vocabulary,
                                    task_id=task.task_id, beam_size=beam_size)
            predictions += [ctx.tokenizer.decode(i, skip_special_tokens=True).strip() or "<empty>" for i in ids]
            references += [[row[task.text_column]] for row in part]
    finally:
        model.train(was_training)
    bleu = load_metric("bleu").compute(predictions=predictions, references=references)
    cider = load_metric("cider").compute(predictions=predictions, references=references)
    return {"bleu4": bleu["bleu"], "cider": cider["cider"], "examples": list(zip(predictions[:5], references[:5]))}


def evaluate_all(model, tasks: dict[str, Task], eval_rows: dict[str, list[dict]], ctx: TaskContext, device,
                 autocast_dtype=None) -> dict[str, dict]:
    return {name: evaluate_task(model, task, eval_rows[name], ctx, device, autocast_dtype=autocast_dtype)
            for name, task in tasks.items() if eval_rows.get(name)}


def trivial_baseline(task: Task, train_counts: torch.Tensor | None, eval_rows: list[dict], ctx: TaskContext,
                     batch_size: int = 256) -> dict:
    """What a model that ignores its input scores on the headline metric of `task`.

    Classification, MLM and captioning: always answer the candidate that is most frequent among the
    training answers (`train_counts` `[K]`, from `answer_counts`: majority class; most frequent masked or
    next word); its score is that candidate's share of the evaluated answers. Retrieval (`train_counts`
    unused): chance recall@1, 1 / the evaluated pool. Returns `{"metric", "value", "answer"}` (answer: the
    candidate index, None for retrieval); captioning with the end token among its candidates also gets
    `"word_value"`, the same for `word_accuracy`: the most frequent other answer's share of the other answers.
    """
    if task.family == "retrieval":
        pool = sum(build_batch(task, part, ctx, epoch=0).num_samples for part in _chunks(eval_rows, batch_size))
        return {"metric": "i2t_R@1", "value": 1.0 / max(pool, 1), "answer": None}
    answer = int(train_counts.argmax())
    evaluated = answer_counts(task, eval_rows, ctx, batch_size)
    hits = int(evaluated[answer])
    metric = "accuracy" if "classification" in task.family else "token_accuracy"
    baseline = {"metric": metric, "value": hits / max(int(evaluated.sum()), 1), "answer": answer}
    end = end_answer(task, ctx)
    if end is not None:
        words_train, words_evaluated = train_counts.clone(), evaluated.clone()
        words_train[end] = words_evaluated[end] = 0
        word = int(words_train.argmax())
        baseline["word_value"] = int(words_evaluated[word]) / max(int(words_evaluated.sum()), 1)
    return baseline


def answer_counts(task: Task, rows: list[dict], ctx: TaskContext, batch_size: int = 256) -> torch.Tensor:
    """`[K]` how often each candidate of `task` (class, or vocabulary word for MLM and captioning) is the right
    answer in `rows` (raw rows; as the batch builders label them, evaluation's hiding for MLM)."""
    num_candidates = len(ctx.vocabulary) if task.family in ("mlm", "captioning") else len(ctx.label_names[task.name])
    counts = torch.zeros(num_candidates, dtype=torch.long)
    for part in _chunks(rows, batch_size):
        labels = build_batch(task, part, ctx, epoch=0).labels.reshape(-1)
        counts += torch.bincount(labels[labels != -100], minlength=num_candidates)
    return counts


# the held-out metrics beside the headline one: retrieval the other way, MLM and captioning perplexity over the
# candidate words, captioning's accuracy on its words alone (the end answers left out), and the BLEU-4 / CIDEr-D
# of generated captions (where the evaluation generates them)
# --------------------------------------------------------------------------------------------- expert usage
ROUTED_INPUTS = ("input_ids", "pixel_values", "attention_mask", "position_ids", "caption_mode", "attribute_vectors",
                 "task_ids")  # the inputs of a batch's input pass (`UniPerceiverMoEModel.forward`)


def gate_names(model) -> list[str]:
    """The MoE gates in the order the model reports their decisions (`router_indices`): layer by layer,
    the attention's gate before the FFN's."""
    return [gate.name for layer in model.base_model.encoder.layers for gate in (layer.attn_gate, layer.ffn_gate)
            if gate is not None]


def expert_shares(router_indices: tuple[torch.Tensor, ...], router_weights: tuple[torch.Tensor, ...],
                  sequence_mask: torch.Tensor, num_experts: int) -> torch.Tensor:
    """`[G, E]` float64: for each gate, the share of the real tokens' gate weight that each of the E experts
    receives (two tasks sending their tokens to the same two experts with other weights get other shares).
    router_indices / router_weights: per gate `[B, L, k]` chosen experts and their gate weights (the model's
    outputs with `output_router_logits`); sequence_mask: `[B, L]`, nonzero for real tokens."""
    real = sequence_mask.bool()
    shares = []
    for chosen, weight in zip(router_indices, router_weights):
        totals = torch.bincount(chosen[real].reshape(-1).cpu(), weights=weight[real].detach().reshape(-1).double().cpu(),
                                minlength=num_experts)
        shares.append(totals / totals.sum().clamp(min=1e-12))
    return torch.stack(shares)


def expert_entropy(shares: torch.Tensor) -> float:
    """The mean over gates of the entropy of `[G, E]` shares over log E (1 = every expert alike, 0 = one)."""
    entropy = -(shares * shares.clamp(min=1e-12).log()).sum(1) / torch.log(torch.tensor(float(shares.shape[1])))
    return float(entropy.mean())


def expert_overlap(shares: list[torch.Tensor]) -> torch.Tensor:
    """`[T, T]` from T tasks' `[G, E]` shares: the mean over gates of sum_e min(p_i(e), p_j(e))."""
    return torch.stack([torch.stack([torch.minimum(a, b).sum(1).mean() for b in shares]) for a in shares])


def routes_experts(model) -> bool:
    """Whether `model` is one of ours (not wrapped) with expert layers, whose router outputs can be read."""
    from modeling_uniperceiver_moe.modeling_uniperceiver_moe import UniPerceiverMoEPreTrainedModel

    return isinstance(model, UniPerceiverMoEPreTrainedModel) and model.config.moe_routing != "none"


def encoder_expert_shares(model, encoder_output) -> torch.Tensor:
    """`expert_shares` of one encoder pass of `model`, run with `output_router_logits=True` (a
    `UniPerceiverMoEModelOutput`, e.g. a `GenericPerceptionOutput`'s `input_outputs`)."""
    config = model.config
    num_experts = config.moe_num_experts if config.folded_routes is None else len(config.folded_routes)
    return expert_shares(encoder_output.router_indices, encoder_output.router_weights, encoder_output.sequence_mask,
                         num_experts)


@torch.no_grad()
def task_expert_shares(model, batch) -> torch.Tensor:
    """`expert_shares` of a batch's input pass through `model`'s encoder alone (its candidates are not
    encoded; eval mode: no router noise)."""
    inputs = {key: value for key, value in batch.inputs.items() if key in ROUTED_INPUTS}
    return encoder_expert_shares(model, model.base_model(**inputs, output_router_logits=True, return_dict=True))


SECONDARY_METRICS = ("t2i_R@1", "perplexity", "word_accuracy", "bleu4", "cider", "expert_entropy")


def headline(task: Task, metrics: dict) -> tuple[str, float]:
    """The one number a report shows per task."""
    if task.family == "retrieval":
        return "i2t_R@1", metrics["i2t_R@1"]
    key = "accuracy" if "accuracy" in metrics else "token_accuracy"
    return key, metrics[key]


@dataclass
class SavedModelTasksArguments:
    """The options every command that reads a saved model and task rows shares (`training.evaluate`,
    `training.interference`); each adds its own."""

    model: str = field(metadata={"help": "a trained model folder (a run's final/, or a converted checkpoint)"})
    tasks: str = field(metadata={"help": "registered tasks, comma-separated"})
    out: str = field(metadata={"help": "the folder to write to"})
    data_cache: str = field(default="data_cache", metadata={"help": "the data slices' folder"})
    slice: str = field(default="small", metadata={"help": "the data slice (built if missing)"})
    vocabulary_size: int = field(default=1024, metadata={
        "help": "candidate words of MLM and captioning: the data.vocabulary_size the model trained with"})
    end_token_candidate: bool = field(default=True, metadata={
        "help": "the end token is one of those candidates: the data.end_token_candidate the model trained with"})
    device: Optional[str] = field(default=None, metadata={"help": "default: cuda when available, else cpu"})


def task_context(model_dir: str, model_config, task_names: list[str], slice_name: str, data_cache: str,
                 vocabulary_size: int, seed: int = 0, end_token_candidate: bool = True):
    """What evaluating a saved model on registered tasks needs outside the trainer: a `TaskContext` (the
    model folder's processor, each task's label names, the trainer's `vocabulary_size` MLM and caption
    candidates from the slice's most frequent tokens, `frequent_candidates`, `seed` drawing the words MLM rows
    hide), the tasks, and `read(task, split, count)` giving the first `count` rows of a task's split. Builds
    the data slice when missing."""
    import json
    import os

    from modeling_uniperceiver_moe.processing_uniperceiver_moe import checkpoint_processor

    from .build_data import MANIFEST, build_slice
    from .data import read_split
    from .tasks import frequent_candidates, get_task, stored_token_id_tasks, task_label_names

    tasks = [get_task(name) for name in task_names]
    data_dir = build_slice(slice_name, data_cache, sorted({task.source for task in tasks}), progress=True)
    with open(os.path.join(data_dir, MANIFEST), encoding="utf-8") as handle:
        manifest = json.load(handle)
    try:
        vocabulary = frequent_candidates(manifest["vocabulary"], vocabulary_size,
                                         model_config.eos_token_id if end_token_candidate else None)
    except ValueError as error:
        raise SystemExit(f"error: --vocabulary_size {vocabulary_size}: {error}") from None
    processor = checkpoint_processor(model_dir, model_config.image_size, model_config.bos_token_id is not None)
    labels = {task.name: task_label_names(task, manifest["sources"]) for task in tasks}
    ctx = TaskContext(processor.tokenizer, processor.image_processor, model_config,
                      label_names={name: names for name, names in labels.items() if names},
                      vocabulary=vocabulary, seed=seed,
                      token_id_tasks=stored_token_id_tasks(task_names, manifest, processor.tokenizer))

    def read(task: Task, split: str, count: int) -> list[dict]:
        return read_split(data_dir, manifest, task.source, split, count)

    return ctx, tasks, read


def model_for_tasks(model_dir: str, task_names: list[str]):
    """The commands' common start: every name in `task_names` must be a registered task, then the model of
    `model_dir` is loaded. Either failure exits naming it (`SystemExit`), before anything is written."""
    from modeling_uniperceiver_moe import UniPerceiverMoEForGenericPerception

    from .tasks import UnknownTask, get_task

    try:
        for name in task_names:
            get_task(name)
    except UnknownTask as error:
        raise SystemExit(f"error: {error.args[0]}") from None
    try:
        return UniPerceiverMoEForGenericPerception.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: cannot load the model from {model_dir!r}: {error}") from None
