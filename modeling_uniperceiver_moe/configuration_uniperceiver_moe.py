"""Configuration of the Uni-Perceiver-MoE model."""

from __future__ import annotations

from transformers import PretrainedConfig

# Encoder sizes of the paper (patch 16, MLP ratio 4): layers, hidden width, heads.
SIZE_PRESETS: dict[str, dict[str, int]] = {
    "ti": {"num_hidden_layers": 12, "hidden_size": 192, "num_attention_heads": 3},
    "s": {"num_hidden_layers": 12, "hidden_size": 384, "num_attention_heads": 6},
    "b": {"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12},
    "l": {"num_hidden_layers": 24, "hidden_size": 1024, "num_attention_heads": 16},
}
# Stochastic depth of the reference per size.
DROP_PATH_PRESETS = {"ti": 0.0, "s": 0.05, "b": 0.1, "l": 0.2}

MOE_ROUTINGS = ("none", "token", "context", "modality", "task", "attribute")
DATA_INDEPENDENT_ROUTINGS = ("modality", "task", "attribute")
MOE_PROJECTIONS = ("attn_qkv", "attn_out", "ffn_fc1", "ffn_fc2")
MODALITIES = ("text", "image", "video")
INITIALIZER_SCHEMES = ("fan_in", "fixed")
TEXT_POSITION_INITS = ("normal", "sincos")
TEXT_DISTANCE_BIASES = ("none", "alibi")
DROP_PATH_SCHEDULES = ("linear", "fixed")
# The reference's initialisation (BERT init, LayerScale 1e-3), made for its huge-batch, long schedule
# (`training/configs/reference_b.yaml`); the defaults learn from scratch at small scale.
REFERENCE_INIT = {"layer_scale_init": 1e-3, "initializer_scheme": "fixed", "initializer_range": 0.02,
                  "text_position_init": "normal"}
DEFAULT_TASK_FAMILIES = (
    "image_classification",
    "video_classification",
    "mlm",
    "captioning",
    "retrieval",
    "text_classification",
)
# The reference's label smoothing per task family: its configs train video classification, retrieval and
# text classification (GLUE) with a label-smoothed cross-entropy of 0.1, image classification on mixup
# targets smoothed by 0.1, and MLM and captioning with a plain cross-entropy. A family not listed gets 0.
REFERENCE_LABEL_SMOOTHING = {
    "image_classification": 0.1,
    "video_classification": 0.1,
    "mlm": 0.0,
    "captioning": 0.0,
    "retrieval": 0.1,
    "text_classification": 0.1,
}


class UniPerceiverMoEConfig(PretrainedConfig):
    r"""
    Configuration of [`UniPerceiverMoEModel`]: one shared pre-norm Transformer encoder for text, images
    and video whose linear projections may be conditional mixtures of experts.

    Sizes
        model_size (`str`, *optional*, defaults to `"ti"`): a preset among `"ti"`, `"s"`, `"b"`, `"l"`
            (paper sizes). It fills `num_hidden_layers`, `hidden_size`, `num_attention_heads`,
            `intermediate_size` and `drop_path_rate` where those are left as `None`; explicit values win.
        hidden_size (`int`): width of the residual stream.
        num_hidden_layers (`int`): number of encoder layers.
        num_attention_heads (`int`): attention heads; must divide `hidden_size`.
        intermediate_size (`int`): FFN width (defaults to `4 * hidden_size`).
        hidden_act (`str`, defaults to `"gelu"`): FFN activation.
        layer_norm_eps (`float`, defaults to 1e-5).
        layer_scale_init (`float`, defaults to 1.0): LayerScale init on both residual branches; 0 disables it.
            The reference's 1e-3 (`REFERENCE_INIT`) suits its huge-batch, long schedule; from scratch at small
            scale it leaves the SPE output input-independent for hundreds of steps (docs/results.md).
        drop_path_rate (`float`): stochastic depth: the rate of the last layer under the `"linear"` schedule,
            of every layer under `"fixed"`.
        drop_path_schedule (`str`, defaults to `"linear"`): `"linear"`, rates growing linearly from 0 at the
            first layer to `drop_path_rate` at the last; `"fixed"`, `drop_path_rate` at every layer (the
            reference's MoE configs, `DROP_PATH_PROB_FIXED`).
        hidden_dropout_prob / attention_dropout (`float`, default 0).
        initializer_scheme (`str`, defaults to `"fan_in"`): how the weights of the encoder's and heads' linear
            projections (and the patch embedding) are drawn: `"fan_in"`, truncated normal with std
            `1 / sqrt(fan_in)` (each projection keeps the scale of its input, so every token's input reaches
            the SPE output at init); `"fixed"`, std `initializer_range` for every weight (the reference's
            BERT init). Embeddings and router weights always use `initializer_range`.
        initializer_range (`float`, defaults to 0.02): std of the truncated-normal init of embeddings and
            routers (and of every weight under `initializer_scheme="fixed"`).

    Inputs
        vocab_size (`int`, defaults to 49411): CLIP BPE (49,408) plus `[MASK]`, `[GEN]`, `[SPE]`.
        mask_token_id / gen_token_id / spe_token_id / eos_token_id / pad_token_id (`int`).
        bos_token_id (`int` or `None`, defaults to 49406, CLIP's `<|startoftext|>`): the token every text starts
            with (captions, class names, MLM sentences; caption generation starts from it). `None`: texts start
            with their first word, as in the reference, and the first caption placeholder predicts the first
            word from the image alone; converted official checkpoints get it.
        max_position_embeddings (`int`, defaults to 512): learned text positions.
        text_position_init (`str`, defaults to `"sincos"`): how the learned text position table starts:
            `"sincos"`, 1-D sin-cos positions scaled to the word embeddings' RMS `initializer_range`, so that
            neighbouring positions start out similar (masked-language modelling leaves its most-frequent-word
            plateau sooner, docs/results.md); `"normal"`, std `initializer_range` like every embedding (the
            reference, `REFERENCE_INIT`).
        text_distance_bias (`str`, defaults to `"alibi"`): `"alibi"` adds `-slope_h * |p_i - p_j|` to the
            attention logits of head h between two text tokens at text positions p_i and p_j (ALiBi, Press et
            al. 2022), 0 between any other pair. The first ceil(H/2) heads are local, slopes 1, 1/2, 1/4, ...;
            the others get slope 0 and stay global. Word-level text attention so starts out local, and
            masked-language modelling leaves its most-frequent-word plateau several times sooner from
            scratch (docs/results.md). `"none"`: no bias, as in the reference (converted checkpoints get it).
        random_temporal_offset (`bool`, defaults to `False`): in training, the frames of a batch take the
            temporal slots from a random first slot on (one draw per batch, within `num_frames`), so an image
            or a short clip trains every slot; evaluation starts at slot 0. The reference does this
            (`VIDEO_EMBED.POS_RANDOM`, on in its configs; converted checkpoints get True).
        vision_position_scale (`float`, defaults to 1.0): the patch grid coordinates are multiplied by it
            before the fixed 2-D sin-cos encoding (the reference's `POSEMBED_SCALE`: its 224 px stage-2,
            zero-shot and prompt-tuning configs use 160/224, the positions of the 160 px stage 1).
        image_size (`int`, defaults to 224): the image side the processor produces; other sides that are a
            multiple of `patch_size` are accepted by the model (sin-cos positions are computed on the fly).
        patch_size (`int`, defaults to 16). num_channels (`int`, defaults to 3).
        num_frames (`int`, defaults to 8): learned temporal slots; a video may have at most that many frames.

    Conditional MoE
        moe_routing (`str`, defaults to `"none"`): one of `"none"` (dense), `"token"`, `"context"`,
            `"modality"`, `"task"`, `"attribute"`.
        moe_num_experts (`int`, defaults to 8). moe_top_k (`int`, defaults to 2): experts per token (or
            route key). With 2 or more the chosen weights are renormalised to sum to 1 (the reference); with 1
            the weight is the chosen expert's softmax probability (Switch), so the router still learns.
        moe_layers (`str` or `list[int]`, defaults to `"every_other"`): `"all"`, `"every_other"` (layers
            1, 3, 5, ... counted from 0) or an explicit list of layer indices. The reference's "odd" location is
            layers 0, 2, 4, ... counted from 0 (odd counted from 1): pass that list to match it exactly (the
            reference-checkpoint converter writes the explicit list).
        moe_projections (`list[str]`): which linears are experts, among `"attn_qkv"`, `"attn_out"`,
            `"ffn_fc1"`, `"ffn_fc2"` (default all four). The attention projections share one gate decision
            and the FFN projections another, as in the reference.
        moe_router_noise_std (`float`, *optional*): std of the Gaussian noise added to gate logits in
            training; `None` means `1 / moe_num_experts` (reference), 0 disables it.
        moe_capacity_factor (`float`, defaults to 1.25): token/context routing, training: each expert
            takes at most `ceil(factor * tokens * top_k / experts)` tokens; the rest are dropped.
        moe_eval_capacity_factor (`float`, *optional*): the same at evaluation; `None` drops nothing.
        moe_aux_loss_coef (`float`, defaults to 0.01): Switch/GShard load-balancing loss weight (token/context).
        moe_z_loss_coef (`float`, defaults to 1e-3): router z-loss weight (token/context).
        moe_route_balance_coef (`float`, defaults to 0.0): the same Switch/GShard load-balancing loss for the
            data-independent routings (attribute, task, modality), each route key's decision weighted by its
            real tokens in training; 0 (the reference) adds none. It pushes route keys onto different experts.
        output_router_logits (`bool`, defaults to `False`): the default of `forward(output_router_logits=...)`.
        The standard MoE names `num_experts` / `num_local_experts`, `num_experts_per_tok` and
        `router_aux_loss_coef` read and set `moe_num_experts`, `moe_top_k` and `moe_aux_loss_coef`.
        attribute_dim (`int`, defaults to 8): width of the per-token attribute vector (attribute routing).
        num_tasks (`int`, defaults to 16): task ids available to task routing.
        num_modalities (`int`, defaults to 3): modality ids (0 text, 1 image, 2 video).
        folded_routes (`list`, *optional*): set by re-parameterisation; the route keys (attribute vectors,
            task ids or modality ids) whose merged weights the checkpoint holds. A folded model has no gates.

    Head
        task_families (`list[str]`): one learnable temperature per family.
        share_projection_head (`bool`, defaults to `False`): one LayerNorm + projection for the inputs and the
            candidates, as the reference (`loss_prepare.ln_post` and `.proj`; converted checkpoints get
            True); False gives the candidates a head of their own.
        logit_scale_init (`float`, defaults to ln(1/0.07)). logit_scale_max (`float`, defaults to 100).
        word_logit_bias (`bool`, defaults to `True`): a learned bias per (task family, vocabulary token), added to
            the logit of a candidate that is one vocabulary word (MLM and captioning: the forward's
            `candidate_token_ids`), as BERT's output bias. How often each word is the answer then need not be
            encoded in the candidates' features: the trainer starts it at the training answers' log-frequencies
            (`data.word_prior`) and masked-language modelling and captioning learn sooner (docs/results.md).
            Zero at initialisation, so without that start it changes nothing until trained. The reference has
            none (converted checkpoints get False).
        label_smoothing (`float` or `dict[str, float]`, *optional*): the loss's label smoothing. None (the
            default): the reference's value per task family (`REFERENCE_LABEL_SMOOTHING`: 0.1 for
            classification and retrieval, 0 for MLM and captioning); a float: that value for every family; a
            dict: those families' values, the reference's for the others. `label_smoothing_for(family)` reads it.

    Example:
    ```python
    >>> import modeling_uniperceiver_moe
    >>> from transformers import AutoConfig, AutoModel
    >>> cfg = AutoConfig.for_model("uniperceiver_moe", model_size="ti", moe_routing="attribute")
    >>> model = AutoModel.from_config(cfg)
    ```"""

    model_type = "uniperceiver_moe"
    # the names transformers' MoE models (Mixtral, Qwen3-MoE) use, read and written through to ours
    attribute_map = {"num_experts": "moe_num_experts", "num_local_experts": "moe_num_experts",
                     "num_experts_per_tok": "moe_top_k", "router_aux_loss_coef": "moe_aux_loss_coef"}

    def __init__(
        self,
        model_size: str | None = "ti",
        hidden_size: int | None = None,
        num_hidden_layers: int | None = None,
        num_attention_heads: int | None = None,
        intermediate_size: int | None = None,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-5,
        layer_scale_init: float = 1.0,
        drop_path_rate: float | None = None,
        drop_path_schedule: str = "linear",
        hidden_dropout_prob: float = 0.0,
        attention_dropout: float = 0.0,
        initializer_scheme: str = "fan_in",
        initializer_range: float = 0.02,
        vocab_size: int = 49411,
        mask_token_id: int = 49408,
        gen_token_id: int = 49409,
        spe_token_id: int = 49410,
        bos_token_id: int | None = 49406,
        eos_token_id: int = 49407,
        pad_token_id: int = 49407,
        max_position_embeddings: int = 512,
        text_position_init: str = "sincos",
        text_distance_bias: str = "alibi",
        vision_position_scale: float = 1.0,
        random_temporal_offset: bool = False,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        num_frames: int = 8,
        moe_routing: str = "none",
        moe_num_experts: int = 8,
        moe_top_k: int = 2,
        moe_layers: str | list[int] = "every_other",
        moe_projections: list[str] | tuple[str, ...] = MOE_PROJECTIONS,
        moe_router_noise_std: float | None = None,
        moe_capacity_factor: float = 1.25,
        moe_eval_capacity_factor: float | None = None,
        moe_aux_loss_coef: float = 0.01,
        moe_z_loss_coef: float = 1e-3,
        moe_route_balance_coef: float = 0.0,
        attribute_dim: int = 8,
        num_tasks: int = 16,
        num_modalities: int = len(MODALITIES),
        folded_routes: list | None = None,
        task_families: list[str] | tuple[str, ...] = DEFAULT_TASK_FAMILIES,
        share_projection_head: bool = False,
        logit_scale_init: float = 2.6592600369644043,
        logit_scale_max: float = 100.0,
        word_logit_bias: bool = True,
        label_smoothing: float | dict[str, float] | None = None,
        output_router_logits: bool = False,
        **kwargs,
    ):
        if model_size is not None:
            if model_size.lower() not in SIZE_PRESETS:
                raise ValueError(f"model_size must be one of {sorted(SIZE_PRESETS)} or None, got {model_size!r}")
            model_size = model_size.lower()
            preset = SIZE_PRESETS[model_size]
            hidden_size = preset["hidden_size"] if hidden_size is None else hidden_size
            num_hidden_layers = preset["num_hidden_layers"] if num_hidden_layers is None else num_hidden_layers
            num_attention_heads = preset["num_attention_heads"] if num_attention_heads is None else num_attention_heads
            drop_path_rate = DROP_PATH_PRESETS[model_size] if drop_path_rate is None else drop_path_rate
        for name, value in (
            ("hidden_size", hidden_size),
            ("num_hidden_layers", num_hidden_layers),
            ("num_attention_heads", num_attention_heads),
        ):
            if value is None:
                raise ValueError(f"{name} must be given when model_size is None")
        self.model_size = model_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = 4 * hidden_size if intermediate_size is None else intermediate_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.layer_scale_init = layer_scale_init
        self.drop_path_rate = 0.0 if drop_path_rate is None else drop_path_rate
        self.drop_path_schedule = drop_path_schedule
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_dropout = attention_dropout
        self.initializer_scheme = initializer_scheme
        self.initializer_range = initializer_range
        self.vocab_size = vocab_size
        self.mask_token_id = mask_token_id
        self.gen_token_id = gen_token_id
        self.spe_token_id = spe_token_id
        self.max_position_embeddings = max_position_embeddings
        self.text_position_init = text_position_init
        self.text_distance_bias = text_distance_bias
        self.vision_position_scale = vision_position_scale
        self.random_temporal_offset = random_temporal_offset
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.num_frames = num_frames
        self.moe_routing = moe_routing
        self.moe_num_experts = moe_num_experts
        self.moe_top_k = moe_top_k
        self.moe_layers = list(moe_layers) if isinstance(moe_layers, (list, tuple)) else moe_layers
        self.moe_projections = list(moe_projections)
        self.moe_router_noise_std = moe_router_noise_std
        self.moe_capacity_factor = moe_capacity_factor
        self.moe_eval_capacity_factor = moe_eval_capacity_factor
        self.moe_aux_loss_coef = moe_aux_loss_coef
        self.moe_z_loss_coef = moe_z_loss_coef
        self.moe_route_balance_coef = moe_route_balance_coef
        self.attribute_dim = attribute_dim
        self.num_tasks = num_tasks
        self.num_modalities = num_modalities
        self.folded_routes = folded_routes
        self.task_families = list(task_families)
        self.share_projection_head = share_projection_head
        self.logit_scale_init = logit_scale_init
        self.logit_scale_max = logit_scale_max
        self.word_logit_bias = word_logit_bias
        self.label_smoothing = label_smoothing
        self.output_router_logits = output_router_logits
        super().__init__(
            bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs
        )
        self.validate_moe()

    # ------------------------------------------------------------------ derived views
    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "UniPerceiverMoEConfig":
        """As `PretrainedConfig.from_dict`; a saved config without `text_distance_bias` describes attention
        without that bias, so it loads as `"none"` (the weights it holds were trained so), not as the default;
        one without `word_logit_bias` a model without the word bias."""
        missing = {"text_distance_bias": "none", "word_logit_bias": False}
        config_dict = {**{k: v for k, v in missing.items() if k not in config_dict}, **config_dict}
        return super().from_dict(config_dict, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def router_noise_std(self) -> float:
        """Training-time gate noise std (`1 / moe_num_experts` when unset, as in the reference)."""
        if self.moe_router_noise_std is None:
            return 1.0 / self.moe_num_experts
        return self.moe_router_noise_std

    @property
    def is_data_independent_routing(self) -> bool:
        return self.moe_routing in DATA_INDEPENDENT_ROUTINGS

    def label_smoothing_for(self, task_family: str | int) -> float:
        """The label smoothing of a task family (a name or an index into `task_families`)."""
        if isinstance(self.label_smoothing, (int, float)):
            return float(self.label_smoothing)
        family = self.task_families[task_family] if isinstance(task_family, int) else task_family
        values = {**REFERENCE_LABEL_SMOOTHING, **(self.label_smoothing or {})}
        return float(values.get(family, 0.0))

    def moe_layer_indices(self) -> list[int]:
        """Indices of the encoder layers whose projections are MoE (empty for a dense model)."""
        if self.moe_routing == "none":
            return []
        if self.moe_layers == "all":
            return list(range(self.num_hidden_layers))
        if self.moe_layers == "every_other":
            return list(range(1, self.num_hidden_layers, 2))
        return sorted(self.moe_layers)

    def uses_moe(self, layer_idx: int, projection: str) -> bool:
        return projection in self.moe_projections and layer_idx in self.moe_layer_indices()

    # ------------------------------------------------------------------ validation
    def validate_moe(self) -> None:
        """Raise a ValueError naming the offending field for every invalid combination."""

        def fail(field: str, message: str):
            raise ValueError(f"UniPerceiverMoEConfig.{field}: {message}")

        for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                      "max_position_embeddings", "image_size", "patch_size", "num_channels", "num_frames"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                fail(field, f"must be a positive int, got {value!r}")
        from transformers.activations import ACT2FN

        if self.hidden_act not in ACT2FN:
            fail("hidden_act", f"unknown activation {self.hidden_act!r}; known: {sorted(ACT2FN)}")
        if self.hidden_size % self.num_attention_heads:
            fail("num_attention_heads", f"{self.num_attention_heads} does not divide hidden_size={self.hidden_size}")
        if self.hidden_size % 4:
            fail("hidden_size", f"must be a multiple of 4 (2-D sin-cos positions), got {self.hidden_size}")
        if self.image_size % self.patch_size:
            fail("image_size", f"{self.image_size} is not a multiple of patch_size={self.patch_size}")
        if isinstance(self.vision_position_scale, bool) or not isinstance(self.vision_position_scale, (int, float)) \
                or not self.vision_position_scale > 0:
            fail("vision_position_scale", f"must be a positive number, got {self.vision_position_scale!r}")
        if self.text_position_init not in TEXT_POSITION_INITS:
            fail("text_position_init", f"must be one of {TEXT_POSITION_INITS}, got {self.text_position_init!r}")
        if self.text_distance_bias not in TEXT_DISTANCE_BIASES:
            fail("text_distance_bias", f"must be one of {TEXT_DISTANCE_BIASES}, got {self.text_distance_bias!r}")
        if self.initializer_scheme not in INITIALIZER_SCHEMES:
            fail("initializer_scheme", f"must be one of {INITIALIZER_SCHEMES}, got {self.initializer_scheme!r}")
        if self.layer_scale_init < 0:
            fail("layer_scale_init", f"must be >= 0 (0 disables LayerScale), got {self.layer_scale_init}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            fail("drop_path_rate", f"must be in [0, 1), got {self.drop_path_rate}")
        if self.drop_path_schedule not in DROP_PATH_SCHEDULES:
            fail("drop_path_schedule", f"must be one of {DROP_PATH_SCHEDULES}, got {self.drop_path_schedule!r}")
        smoothing = self.label_smoothing
        if smoothing is not None and not isinstance(smoothing, dict):
            smoothing = {family: smoothing for family in self.task_families}
        for family, value in (smoothing or {}).items():
            if family not in self.task_families:
                fail("label_smoothing", f"unknown task family {family!r}; the families are {self.task_families}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                fail("label_smoothing", f"{family}: must be a number in [0, 1), got {value!r}")
        if self.moe_routing not in MOE_ROUTINGS:
            fail("moe_routing", f"must be one of {MOE_ROUTINGS}, got {self.moe_routing!r}")
        if self.moe_routing == "none":
            return
        if self.moe_num_experts < 2:
            fail("moe_num_experts", f"an MoE needs at least 2 experts, got {self.moe_num_experts}")
        if not 1 <= self.moe_top_k <= self.moe_num_experts:
            fail("moe_top_k", f"must be in [1, moe_num_experts={self.moe_num_experts}], got {self.moe_top_k}")
        if isinstance(self.moe_layers, str):
            if self.moe_layers not in ("all", "every_other"):
                fail("moe_layers", f"must be 'all', 'every_other' or a list of layer indices, got {self.moe_layers!r}")
        else:
            bad = [i for i in self.moe_layers if not isinstance(i, int) or not 0 <= i < self.num_hidden_layers]
            if bad or not self.moe_layers:
                fail("moe_layers", f"indices must lie in [0, {self.num_hidden_layers}), got {self.moe_layers}")
        unknown = sorted(set(self.moe_projections) - set(MOE_PROJECTIONS))
        if unknown or not self.moe_projections:
            fail("moe_projections", f"must be a non-empty subset of {MOE_PROJECTIONS}, got {self.moe_projections}")
        if self.moe_router_noise_std is not None and self.moe_router_noise_std < 0:
            fail("moe_router_noise_std", f"must be >= 0, got {self.moe_router_noise_std}")
        for field in ("moe_capacity_factor", "moe_eval_capacity_factor"):
            value = getattr(self, field)
            if value is not None and value <= 0:
                fail(field, f"must be > 0, got {value}")
        for field in ("moe_aux_loss_coef", "moe_z_loss_coef", "moe_route_balance_coef"):
            if getattr(self, field) < 0:
                fail(field, f"must be >= 0, got {getattr(self, field)}")
        if self.moe_routing == "attribute" and self.attribute_dim < 1:
            fail("attribute_dim", f"must be >= 1, got {self.attribute_dim}")
        if self.moe_routing == "task" and self.num_tasks < 1:
            fail("num_tasks", f"must be >= 1, got {self.num_tasks}")
        if self.folded_routes is not None:
            if self.moe_routing not in DATA_INDEPENDENT_ROUTINGS:
                fail("folded_routes", f"only data-independent routings can be folded, not {self.moe_routing!r}")
            if not self.folded_routes:
                fail("folded_routes", "must list at least one route")


__all__ = ["UniPerceiverMoEConfig", "SIZE_PRESETS", "MOE_ROUTINGS", "MODALITIES", "REFERENCE_INIT"]
