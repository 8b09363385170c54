"""Jinja templates of the three model cards (rendered by `huggingface_hub.ModelCard.from_template`).

Kept as Python strings (not data files) so that they travel with the package in any install. Every
template receives `card_data` (the YAML metadata block, rendered by huggingface_hub) and the sections
that `hub_cards.cards` builds from the checkpoint: `title`, `summary`, `details`, `routing_table`,
`usage`, `training`, `evaluation`, `limitations`.
"""

_HEADER = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}
"""

_FOOTER = """
## Intended use and limitations

{{ limitations }}

## Citation

The model follows the Uni-Perceiver-MoE paper; this checkpoint was produced with the `uniperceiver-moe`
package, not by the paper's authors.

```bibtex
@inproceedings{zhu2022uniperceivermoe,
  title     = {Uni-Perceiver-MoE: Learning Sparse Generalist Models with Conditional MoEs},
  author    = {Zhu, Jinguo and Zhu, Xizhou and Wang, Wenhai and Wang, Xiaohua and Li, Hongsheng and Wang, Xiaogang and Dai, Jifeng},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2022},
  note      = {arXiv:2206.04674}
}
```
"""

MODEL_TEMPLATE = _HEADER + """
## Model details

{{ details }}

### Routing configuration (from `config.json`)

{{ routing_table }}

## How to use

Install the `uniperceiver-moe` package (it provides the model code; importing `modeling_uniperceiver_moe`
registers the `uniperceiver_moe` model type with the `Auto*` classes), then:

```python
{{ usage }}
```

## Training

{{ training }}

## Evaluation

{{ evaluation }}
""" + _FOOTER

ADAPTER_TEMPLATE = _HEADER + """
## Adapter details

{{ details }}

### Routing configuration of the base model

{{ routing_table }}

## How to use

The adapter is a PEFT adapter of the project's own type `UNIPERCEIVER_DEEP_PROMPT`; importing
`prompt_tuning` (from the `uniperceiver-moe` package) registers that type with PEFT, and the base model
stays frozen and unchanged.

```python
{{ usage }}
```

## Training

{{ training }}

## Evaluation

{{ evaluation }}
""" + _FOOTER

FOLDED_TEMPLATE = _HEADER + """
## Model details

{{ details }}

### Routing configuration (from `config.json`)

{{ routing_table }}

## How to use

```python
{{ usage }}
```

## How it was made

{{ training }}

## Evaluation

{{ evaluation }}
""" + _FOOTER

TEMPLATES = {"model": MODEL_TEMPLATE, "adapter": ADAPTER_TEMPLATE, "folded": FOLDED_TEMPLATE}
