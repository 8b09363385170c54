"""Deep prompt tuning of Uni-Perceiver-MoE as a PEFT method.

The recipe (notes section 4) freezes the pre-trained model, experts and gates included, and learns only:

* deep prompts: `num_prompts` key and value vectors per layer, prepended to every sequence's keys and
  values (all layers; separate input / target sets when `separate_target_prompts`, for retrieval);
* all LayerNorms of the encoder and of both heads (not the routers' norms: gates stay frozen);
* a bias on the SPE embedding;
* for classification, the reference's "label prompt": the logits become `w * logits + W f + b`, with `f` the
  query's projected feature before its L2 normalisation, `W`, `b` a zero-initialised linear layer to the
  classes and `w` a learnable similarity weight (init 1), by a forward hook on the model;
* optionally (`prompt_gate`), a zero-initialised gate per layer on what the prompts change.

PEFT integration: `DeepPromptConfig` / `DeepPromptModel` are a `PeftConfig` / `BaseTuner` pair registered
under the PEFT type `UNIPERCEIVER_DEEP_PROMPT` (see `register_with_peft`), so `get_peft_model`,
`PeftModel.save_pretrained` / `PeftModel.from_pretrained`, `print_trainable_parameters`, `disable_adapter`
and the Trainer work. PEFT's `register_peft_method` only accepts names of its own `PeftType` enum, so we
add our entries to PEFT's type -> config / tuner / prefix tables directly; that relies on PEFT internals
(tested on peft 0.21) and is why `setup.py` pins `peft<0.22`.

Design choice: the prompts are learned directly in key/value space (the prefix-tuning form) instead of as
hidden-state vectors sent through each layer's qkv projection. The projection of an MoE layer is a
routed mixture whose route for a prompt token is undefined (and a folded model has no experts left); a
free key/value pair per prompt can express everything a projected prompt can. The reference's prompts enter
each layer only as keys and values of a frozen projection, so its prompt-tuned checkpoints convert exactly
(`hub_cards.convert_reference.convert_prompt_tuned`).
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

PEFT_TYPE = "UNIPERCEIVER_DEEP_PROMPT"
PREFIX = "deep_prompt_"
LAYER_NORM_MODULES = ["layer_norm", "norm1", "norm2", "input_head.norm", "target_head.norm"]
CLASSIFICATION_FAMILIES = ("image_classification", "video_classification", "text_classification")
ENCODING_TARGETS = contextvars.ContextVar("uniperceiver_encoding_targets", default=False)


@dataclass
class DeepPromptConfig(PeftConfig):
    """Configuration of the deep-prompt adapter.

    num_prompts: key/value prompt vectors per layer (reference: 10).
    separate_target_prompts: a second prompt set used while encoding candidate targets (retrieval).
    num_labels: classes of the label prompt (None: no label prompt, e.g. captioning or retrieval).
    train_layer_norms: learn copies of every encoder/head LayerNorm (PEFT `modules_to_save`).
    spe_bias: learn a bias on the SPE token embedding.
    prompt_init_std: std of the prompts' normal init.
    prompt_gate: learn a per-layer gate g `[d]`, zero at init, on what the prompts change: the attention
        output becomes A(without prompts) + g * (A(with prompts) - A(without prompts)). The adapter then
        starts as the frozen model exactly (fresh prompts otherwise take attention away from the real
        tokens) and can grow into the plain prompt form (g = 1). Costs a second attention pass per layer.
    """

    num_prompts: int = field(default=10, metadata={"help": "key/value prompts per layer"})
    separate_target_prompts: bool = field(default=False, metadata={"help": "own prompts for target encoding"})
    num_labels: int | None = field(default=None, metadata={"help": "classes of the label prompt"})
    train_layer_norms: bool = field(default=True, metadata={"help": "learn the LayerNorms"})
    spe_bias: bool = field(default=True, metadata={"help": "learn a bias on the SPE embedding"})
    prompt_init_std: float = field(default=0.02, metadata={"help": "init std of the prompts"})
    prompt_gate: bool = field(default=False, metadata={"help": "zero-initialised gate on the prompts' effect"})
    target_modules: str | list[str] | None = field(default=None, metadata={"help": "set by the tuner"})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "set from train_layer_norms"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if self.num_prompts < 0:
            raise ValueError(f"DeepPromptConfig.num_prompts must be >= 0, got {self.num_prompts}")
        if self.num_labels is not None and self.num_labels < 1:
            raise ValueError(f"DeepPromptConfig.num_labels must be >= 1 or None, got {self.num_labels}")
        if self.train_layer_norms:
            self.modules_to_save = sorted(set(self.modules_to_save or []) | set(LAYER_NORM_MODULES))


class DeepPromptAttention(nn.Module, BaseTunerLayer):
    """Wraps an attention module; feeds it the active adapter's key/value prompts."""

    adapter_layer_names = ("deep_prompt_keys", "deep_prompt_values", "deep_prompt_target_keys",
                           "deep_prompt_target_values", "deep_prompt_gates")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: DeepPromptConfig):
        super().__init__()
        self.base_layer = base_layer
        self.deep_prompt_keys = nn.ParameterDict()
        self.deep_prompt_values = nn.ParameterDict()
        self.deep_prompt_target_keys = nn.ParameterDict()
        self.deep_prompt_target_values = nn.ParameterDict()
        self.deep_prompt_gates = nn.ParameterDict()
        self._disable_adapters = False
        self.merged_adapters = []
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: DeepPromptConfig) -> None:
        weight = self.base_layer.out_proj.weight
        width = weight.shape[-2]  # hidden size ([E, out, in] or [out, in])

        def prompts():
            return nn.Parameter(torch.randn(config.num_prompts, width, device=weight.device) * config.prompt_init_std)

        self.deep_prompt_keys[adapter_name] = prompts()
        self.deep_prompt_values[adapter_name] = prompts()
        if config.separate_target_prompts:
            self.deep_prompt_target_keys[adapter_name] = prompts()
            self.deep_prompt_target_values[adapter_name] = prompts()
        if config.prompt_gate:
            self.deep_prompt_gates[adapter_name] = nn.Parameter(torch.zeros(width, device=weight.device))
        self.set_adapter(adapter_name)

    def forward(self, hidden, attention_mask, dispatch, output_attentions: bool = False, key_value_prompts=None,
                record_key_values=None, sorted_rows=None):
        own, gate = None, None  # this adapter's (keys, values), and its gate when `prompt_gate`
        if not self.disable_adapters:
            name = self.active_adapters[0]
            if ENCODING_TARGETS.get() and name in self.deep_prompt_target_keys:
                own = (self.deep_prompt_target_keys[name], self.deep_prompt_target_values[name])
            elif name in self.deep_prompt_keys and self.deep_prompt_keys[name].shape[0] > 0:
                own = (self.deep_prompt_keys[name], self.deep_prompt_values[name])
            if own is not None:
                gate = self.deep_prompt_gates.get(name)
        prompts = ([own] if own is not None else []) + list(key_value_prompts or [])
        out, weights = self.base_layer(hidden, attention_mask, dispatch, output_attentions,
                                       key_value_prompts=prompts or None, record_key_values=record_key_values,
                                       sorted_rows=sorted_rows)
        if gate is None:
            return out, weights
        # the gated form: the frozen layer's output plus the gated change the prompts make to it
        frozen, _ = self.base_layer(hidden, attention_mask, dispatch, False, key_value_prompts=key_value_prompts,
                                    sorted_rows=sorted_rows)
        return frozen + gate.to(out.dtype) * (out - frozen), weights


class DeepPromptModel(BaseTuner):
    """The tuner: wraps attention modules (prompts) and the embeddings (SPE bias); holds the label prompt."""

    prefix = PREFIX
    tuner_layer_cls = DeepPromptAttention
    target_module_mapping = {"uniperceiver_moe": [r".*encoder\.layers\.\d+\.attention"]}

    def _pre_injection_hook(self, model, config, adapter_name: str) -> None:
        # model-level adapter tensors (BaseTuner.__init__ re-initialises nn.Module first, so not in __init__)
        if "deep_prompt_spe_bias" not in self._modules:
            self.deep_prompt_spe_bias = nn.ParameterDict()
            self.deep_prompt_label_weight = nn.ParameterDict()
            self.deep_prompt_label_bias = nn.ParameterDict()
            self.deep_prompt_similarity_weight = nn.ParameterDict()
            self._label_prompt_disabled = False

    # -------------------------------------------------------------------------------------- injection
    def _prepare_adapter_config(self, peft_config: DeepPromptConfig, model_config: dict) -> DeepPromptConfig:
        if model_config.get("model_type") != "uniperceiver_moe":
            raise ValueError(f"the deep-prompt adapter needs a uniperceiver_moe model, got {model_config.get('model_type')!r}")
        peft_config.target_modules = r".*encoder\.layers\.\d+\.attention"
        return peft_config

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, DeepPromptAttention):
            target.update_layer(adapter_name, peft_config)
        else:
            setattr(parent, target_name, DeepPromptAttention(target, adapter_name, peft_config))

    def _post_injection_hook(self, model, config: DeepPromptConfig, adapter_name: str) -> None:
        width = model.config.hidden_size
        device = next(model.parameters()).device
        if config.spe_bias:
            self.deep_prompt_spe_bias[adapter_name] = nn.Parameter(torch.zeros(width, device=device))
            if not getattr(model, "_deep_prompt_spe_hooked", False):
                # Every [SPE] token is looked up in the word embeddings (the leading SPE, the caption
                # placeholders, a text-classification query), so the bias goes where that lookup returns
                # the SPE id, as in the reference, whatever the token's position.
                self._spe_token_id = model.config.spe_token_id
                model.uniperceiver.embeddings.word_embeddings.register_forward_hook(self._add_spe_bias)
                model._deep_prompt_spe_hooked = True
        if config.num_labels is not None:
            self.deep_prompt_label_weight[adapter_name] = nn.Parameter(torch.zeros(config.num_labels, width, device=device))
            self.deep_prompt_label_bias[adapter_name] = nn.Parameter(torch.zeros(config.num_labels, device=device))
            self.deep_prompt_similarity_weight[adapter_name] = nn.Parameter(torch.ones((), device=device))
        if config.num_labels is not None and not getattr(model, "_deep_prompt_label_hooked", False):
            model.register_forward_hook(self._apply_label_prompt, with_kwargs=True)
            model._deep_prompt_label_hooked = True
        if not getattr(model, "_deep_prompt_targets_wrapped", False):
            original = model.encode_targets

            def encode_targets(*args, **kwargs):
                with encoding_targets():
                    return original(*args, **kwargs)

            model.encode_targets = encode_targets
            model._deep_prompt_targets_wrapped = True

    def _add_spe_bias(self, module, args, embeddings):
        """Forward hook on the word embeddings: ids `[...]` -> embeddings `[..., d]` plus the bias where the id
        is [SPE]."""
        name = self.active_adapters[0]
        if self._label_prompt_disabled or name not in self.deep_prompt_spe_bias:
            return None
        is_spe = (args[0] == self._spe_token_id)[..., None].to(embeddings.dtype)
        return embeddings + is_spe * self.deep_prompt_spe_bias[name].to(embeddings.dtype)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._label_prompt_disabled = not enabled  # also switches the SPE bias off

    def _check_new_adapter_config(self, config) -> None:
        pass

    # -------------------------------------------------------------------------------------- label prompt
    def _apply_label_prompt(self, module, args, kwargs, out):
        """Forward hook on the wrapped model (PeftModel.forward calls it directly, not this tuner): classification
        logits `[B, C]` -> `w * logits + W f + b` (f: `out.input_projections` `[B, d]`); the loss is recomputed
        when labels were given."""
        name = self.active_adapters[0]
        if self._label_prompt_disabled or name not in self.deep_prompt_label_weight:
            return out
        family = kwargs.get("task_family", 0)
        if module.logit_scales.families[module.logit_scales.family_index(family)] not in CLASSIFICATION_FAMILIES:
            return out
        weight = self.deep_prompt_label_weight[name]
        if out.logits.shape[-1] != weight.shape[0]:
            raise ValueError(f"the label prompt has {weight.shape[0]} classes, the task has {out.logits.shape[-1]} candidates")
        label_logits = F.linear(out.input_projections, weight.float(), self.deep_prompt_label_bias[name].float())
        out.logits = self.deep_prompt_similarity_weight[name] * out.logits + label_logits
        if kwargs.get("labels") is not None:
            loss = module.candidate_loss(out.logits, kwargs["labels"], None, kwargs.get("symmetric_loss", False), family)
            out.loss = loss if out.aux_loss is None else loss + out.aux_loss
        return out


@contextmanager
def encoding_targets():
    token = ENCODING_TARGETS.set(True)
    try:
        yield
    finally:
        ENCODING_TARGETS.reset(token)


def register_with_peft() -> None:
    """Add the method to PEFT's type tables (idempotent)."""
    from peft import mapping as peft_mapping
    from peft.utils import peft_types

    tables = [(getattr(peft_mapping, "PEFT_TYPE_TO_CONFIG_MAPPING", None), DeepPromptConfig),
              (getattr(peft_mapping, "PEFT_TYPE_TO_TUNER_MAPPING", None), DeepPromptModel),
              (getattr(peft_mapping, "PEFT_TYPE_TO_PREFIX_MAPPING", None), PREFIX)]
    for table, value in tables:
        if table is None:
            raise RuntimeError("this PEFT version has no PEFT_TYPE_TO_*_MAPPING tables; use peft 0.21.x")
        table[PEFT_TYPE] = value
    del peft_types


register_with_peft()
