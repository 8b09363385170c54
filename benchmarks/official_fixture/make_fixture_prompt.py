"""Prompt-tuned variant of the base fixture (tiny official Uni-Perceiver-MoE, CPU, random weights).

Run (see README.md):
    PYTHONPATH=<site with the official code's dependencies>:<official clone> python benchmarks/official_fixture/make_fixture_prompt.py

Everything numeric comes from the official modules of the clone at $UPREF. Prompt tuning is switched on exactly as
configs/BERT_L12_H768_experiments/moe_prompt_tuning/in1k_prompt_tuning_0.01data_lr1e-4.yaml (case a) and
mscoco_caption_prompt_tuning_0.01data_lr1e-3.yaml (case b) do: MODEL.PROMPT, PROMPT_PARAM, FC_PROMPT(_OUT),
PROMPT_EMBED.* copied into tiny_moe_prompt_{in1k,caption}.yaml (FC_PROMPT_OUT / LABEL_SIZE 1000 -> 3).
The two configs differ (FC_PROMPT True/False), and FC_PROMPT cannot run a caption task (shape clash, see
fixture.json["cases"]["b_with_in1k_model"]), so case b uses a second official model built from the caption
config that loads the SAME state dict (minus fc_prompt.* / similarity_weight, which it does not have).

Base weights: a plain (non-prompt) model is built and perturbed bit-for-bit as make_fixture.py
does (same seeds, same code), its state dict is loaded into the prompt models, then every prompt-tuning
parameter gets random values (torch.Generator seed 11).
"""
import copy
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
UPREF = os.environ.get('UPREF', '/tmp/upref')
sys.path.insert(0, HERE)
import official_stubs  # noqa: E402
from official_common import (caption_samples, case_inputs, collate, collated_inputs, cpu_copy,  # noqa: E402
                             fixture_state, image_classification_samples, install_embedding_hooks,
                             official_attribute_table, perturb, setup_cfg, shared_target, task_info_of)

STUBS_USED = official_stubs.install()

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from uniperceiver.modeling import build_model  # noqa: E402
from uniperceiver.modeling.encoder.unified_bert_encoder import _construct_attention_masks  # noqa: E402
from uniperceiver.task_moe.layer import TaskMoE  # noqa: E402
from uniperceiver.utils import comm  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

CONFIG_BASE = os.path.join(HERE, 'tiny_moe.yaml')               # the base fixture's config
CONFIG_IN1K = os.path.join(HERE, 'tiny_moe_prompt_in1k.yaml')
CONFIG_CAP = os.path.join(HERE, 'tiny_moe_prompt_caption.yaml')
FIXTURES = os.path.join(os.path.dirname(os.path.dirname(HERE)), 'tests', 'fixtures')
OUT_ST = os.path.join(FIXTURES, 'official_tiny_moe_prompt.safetensors')
OUT_JSON = os.path.join(FIXTURES, 'official_tiny_moe_prompt.json')
ORIG_ST = os.path.join(FIXTURES, 'official_tiny_moe.safetensors')  # only for an optional check


cfg_base = setup_cfg(CONFIG_BASE, UPREF)
cfg_in1k = setup_cfg(CONFIG_IN1K, UPREF)
cfg_cap = setup_cfg(CONFIG_CAP, UPREF)
cfg = cfg_in1k
assert comm.old_checkpoint is True


def fresh(c, seed=0):
    torch.manual_seed(seed)
    np.random.seed(seed)
    m = build_model(c)
    m.eval()
    m.float()
    return m


# ----------------------------------------------------------------------------------------------
# 1. base model, perturbed exactly as make_fixture.py
# ----------------------------------------------------------------------------------------------
base = fresh(cfg_base)
tok = base.tokenizer
X = case_inputs(tok)
(SPE_ID, EOT_ID, enc, A_CLASS_NAMES, a_class_tok, a_pixels, a_labels, B_CAPTIONS, b_caption_tok, b_pixels,
 c_ids, c_labels, VOCAB_WORDS, vocab_ids, vocab_tok, USED_TOKEN_IDS) = (
    X.SPE_ID, X.EOT_ID, X.enc, X.A_CLASS_NAMES, X.a_class_tok, X.a_pixels, X.a_labels, X.B_CAPTIONS,
    X.b_caption_tok, X.b_pixels, X.c_ids, X.c_labels, X.VOCAB_WORDS, X.vocab_ids, X.vocab_tok, X.USED_TOKEN_IDS)
perturb(base, USED_TOKEN_IDS)  # (c)'s inputs only keep USED_TOKEN_IDS, hence the base weights, identical
base_sd = {k: v.clone() for k, v in base.state_dict().items()}
del base

base_vs_original = None
if os.path.exists(ORIG_ST):
    from safetensors.torch import load_file
    O = load_file(ORIG_ST)
    base_vs_original = 0.0
    for k, v in base_sd.items():
        if k == 'token_embed.embeddings.weight':
            ref = torch.zeros_like(v)
            ref[O['state_rows.token_embed.embeddings.weight.index']] = O['state_rows.token_embed.embeddings.weight.values']
        else:
            ref = O['state.' + k]
        base_vs_original = max(base_vs_original, (v - ref).abs().max().item())
    print('base weights vs the base fixture state: max |diff| =', base_vs_original)

# ----------------------------------------------------------------------------------------------
# 2. prompt-tuned official models (in1k config, caption config) sharing one state dict
# ----------------------------------------------------------------------------------------------
PROMPT_KEYS_IN1K = ['s_token_bias', 'token_embed.s_token_bias', 'similarity_weight', 'fc_prompt.weight', 'fc_prompt.bias'] + \
    [f'fused_encoder.layers.{l}.deep_prompt_embedding.embedding.weight' for l in range(cfg.MODEL.BERT.NUM_HIDDEN_LAYERS)]

model = fresh(cfg_in1k)
res = model.load_state_dict(base_sd, strict=False)
assert not res.unexpected_keys and sorted(res.missing_keys) == sorted(PROMPT_KEYS_IN1K), res
assert model.s_token_bias is model.token_embed.s_token_bias  # set_s_token_bias registers the same Parameter twice

PROMPT_INIT = {
    'generator': 'torch.Generator().manual_seed(11), drawn in this order',
    'fused_encoder.layers.{l}.deep_prompt_embedding.embedding.weight': 'randn(10,64) (std 1), l = 0..3',
    'fc_prompt.weight': '0.1*randn(3,64)', 'fc_prompt.bias': '0.1*randn(3)',
    'similarity_weight': '0.7 (official init 1.0, FC_PROMPT_WEIGHTS=learn)',
    's_token_bias': '0.5*randn(1,64) (token_embed.s_token_bias is the same Parameter)',
    'official_init_of_these': 'deep prompts N(0,0.02) by initialize_weights_as_mae (nn.Embedding); '
                              'fc_prompt weight/bias zeros (unified_transformer.py:105-107); s_token_bias zeros; '
                              'similarity_weight ones',
}
qg = torch.Generator().manual_seed(11)
with torch.no_grad():
    for l, layer in enumerate(model.fused_encoder.layers):
        w = layer.deep_prompt_embedding.embedding.weight
        w.copy_(torch.randn(w.shape, generator=qg))
    model.fc_prompt.weight.copy_(0.1 * torch.randn(model.fc_prompt.weight.shape, generator=qg))
    model.fc_prompt.bias.copy_(0.1 * torch.randn(model.fc_prompt.bias.shape, generator=qg))
    model.similarity_weight.fill_(0.7)
    model.s_token_bias.copy_(0.5 * torch.randn(model.s_token_bias.shape, generator=qg))
STATE = {k: v.clone() for k, v in model.state_dict().items()}

model_cap = fresh(cfg_cap)
res = model_cap.load_state_dict(STATE, strict=False)
CAP_UNUSED = ['fc_prompt.weight', 'fc_prompt.bias', 'similarity_weight']
assert not res.missing_keys and sorted(res.unexpected_keys) == sorted(CAP_UNUSED), res

TRAINABLE = {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}
TRAINABLE_CAP = {n: list(p.shape) for n, p in model_cap.named_parameters() if p.requires_grad}

# ----------------------------------------------------------------------------------------------
# 3. hooks
# ----------------------------------------------------------------------------------------------
REC = {}


def reset_rec():
    REC.clear()
    REC.update(encoder_calls=[], token_embed_calls=[], video_embed_calls=[], pos_calls=[],
               moe_calls=[], attn_calls=[], layer_io=[], lp_logits=[])


reset_rec()


def enc_pre(mod, args, kwargs):
    sample_info = kwargs['sample_info']
    am = _construct_attention_masks(kwargs['data'], sample_info, kwargs['task_info'])
    REC['encoder_calls'].append(dict(
        data=cpu_copy(kwargs['data']), invalid_mask=cpu_copy(kwargs.get('invalid_mask')),
        moe_embedding=cpu_copy(kwargs.get('moe_embedding')), data_type=kwargs.get('data_type'),
        data_length=list(sample_info['data_length']), data_cum_length=list(sample_info['data_cum_length']),
        text_spe_cat=bool(sample_info.get('text_spe_cat', False)), attn_mask=cpu_copy(am),
        n_moe_calls=len(REC['moe_calls']), n_attn_calls=len(REC['attn_calls']), n_layer_io=len(REC['layer_io'])))


def enc_post(mod, args, kwargs, out):
    c = REC['encoder_calls'][-1]
    c['output'] = cpu_copy(out)
    c['n_moe_calls_end'] = len(REC['moe_calls'])
    c['n_attn_calls_end'] = len(REC['attn_calls'])


def make_moe_hooks(name):
    def pre(mod, args, kwargs):
        si = kwargs.get('sample_info', {})
        REC['moe_calls'].append(dict(module=name, mode=kwargs.get('mode'), reused=kwargs.get('gate_decision') is not None,
                                     n_tokens=int(args[0].shape[1]), pe_length=si.get('pe_length', 0),
                                     data_cum_length=list(si.get('data_cum_length', []))))

    def post(mod, args, kwargs, out):
        idx, gates = out[1]
        c = REC['moe_calls'][-1]
        c.update(top_indices=[t.tolist() for t in idx], gates=[t.tolist() for t in gates])
        if len(idx[0]) == 2:  # two attribute rows: token split used by FusedExperts.top2_expert_forward
            split = c['data_cum_length'][1] + (c['pe_length'] if c['mode'] == 'kv' else 0)
            c['token_split_first_row_is_[0,split)'] = split
    return pre, post


def make_attn_hook(layer_idx):
    def pre(mod, args, kwargs):
        REC['attn_calls'].append(dict(layer=layer_idx, query_in=cpu_copy(args[0] if args else kwargs['hidden_states']),
                                      kv_in=cpu_copy(kwargs.get('history_states')), attn_mask=cpu_copy(kwargs.get('attn_mask')),
                                      key_padding_mask=cpu_copy(kwargs.get('key_padding_mask'))))
    return pre


def make_layer_hook(layer_idx):
    def post(mod, args, kwargs, out):
        REC['layer_io'].append(dict(layer=layer_idx, inp=cpu_copy(kwargs['src']), out=cpu_copy(out)))
    return post


def lp_post(mod, args, kwargs, out):
    # loss_prepare output BEFORE MultiTaskTransformerEncoder.fc_prompt_process mutates out['logits'] in place
    REC['lp_logits'].append([cpu_copy(x) for x in out.get('logits', [])])


def install_hooks(m):
    m.fused_encoder.register_forward_pre_hook(enc_pre, with_kwargs=True)
    m.fused_encoder.register_forward_hook(enc_post, with_kwargs=True)
    install_embedding_hooks(m, REC)
    m.loss_prepare.register_forward_hook(lp_post, with_kwargs=True)
    for name, mod in m.named_modules():
        if isinstance(mod, TaskMoE):
            pre, post = make_moe_hooks(name)
            mod.register_forward_pre_hook(pre, with_kwargs=True)
            mod.register_forward_hook(post, with_kwargs=True)
    for l, layer in enumerate(m.fused_encoder.layers):
        layer.self_attn.register_forward_pre_hook(make_attn_hook(l), with_kwargs=True)
        layer.register_forward_hook(make_layer_hook(l), with_kwargs=True)


install_hooks(model)
install_hooks(model_cap)


# ----------------------------------------------------------------------------------------------
# 4. official collator -> official model._forward
# ----------------------------------------------------------------------------------------------
CASE_INPUTS = {}


def run_case(m, c, task_name, samples, shared, loss_prepare_training=False):
    CASE_INPUTS[task_name] = (samples, shared, loss_prepare_training)
    batch = collate(c, task_name, samples, shared)
    collated = collated_inputs(batch)
    reset_rec()
    m.to_task(task_name)
    m.loss_prepare.train(loss_prepare_training)
    with torch.no_grad():
        out = m(batch)
    m.loss_prepare.eval()
    return out, collated, copy.copy(REC)


T = {}
J = {'tensors': {}, 'cases': {}}


def put(name, tensor, desc):
    t = tensor.detach().clone().contiguous()
    t = t.float() if t.dtype.is_floating_point else t.long()
    T[name] = t
    J['tensors'][name] = {'shape': list(t.shape), 'dtype': str(t.dtype).replace('torch.', ''), 'desc': desc}


def call_layers(rec, call):
    io = rec['layer_io'][call['n_layer_io']:call['n_layer_io'] + cfg.MODEL.BERT.NUM_HIDDEN_LAYERS]
    return torch.stack([io[0]['inp']] + [x['out'] for x in io])


def call_attn(rec, call):
    return rec['attn_calls'][call['n_attn_calls']:call['n_attn_calls_end']]


def describe_call(call, rec, segments):
    emb = call['moe_embedding']
    cum = call['data_cum_length']
    P = cfg.MODEL.PROMPT_EMBED.INPUT_DEEP_PROMPT_LENGTH
    attn = call_attn(rec, call)
    per_layer = []
    for a in attn:
        per_layer.append({
            'layer': a['layer'],
            'query_len': int(a['query_in'].shape[1]),
            'key_len': int(a['kv_in'].shape[1]),
            'keys': [{'name': 'deep_prompt_layer%d' % a['layer'], 'positions': [0, P]}] +
                    [{'name': n, 'positions': [P + s, P + s + l]} for (n, l), s in
                     zip(segments, np.cumsum([0] + [l for _, l in segments])[:-1].tolist())],
            'attn_mask_passed_to_attention(L,P+L), 1=blocked': None if a['attn_mask'] is None else a['attn_mask'].int().tolist(),
            'key_padding_mask_passed_to_attention(N,P+L), 1=pad': None if a['key_padding_mask'] is None else a['key_padding_mask'].int().tolist(),
        })
    moe = rec['moe_calls'][call['n_moe_calls']:call['n_moe_calls_end']]
    return {
        'segments_in_order(query/hidden sequence)': [{'name': n, 'length': l} for n, l in segments],
        'data_length': call['data_length'], 'data_cum_length': cum, 'data_type': call['data_type'],
        'text_spe_cat': call['text_spe_cat'],
        'moe_gate_attribute_rows': None if emb is None else emb.tolist(),
        'attention_per_layer': per_layer,
        'moe_calls_in_order': moe,
    }


# ---------------------------- (a) image classification (in1k prompt config) ----------------------------
a_samples = image_classification_samples(a_pixels, a_labels, task_info_of(cfg, 'imagenet'))
a_out, a_col, a_rec = run_case(model, cfg_in1k, 'imagenet', a_samples, shared_target('ImageNet1k', a_class_tok))
assert len(a_rec['encoder_calls']) == 2
a_in, a_cls = a_rec['encoder_calls']
a_sim = a_rec['lp_logits'][0][0]
a_fc = model.fc_prompt(a_out['feats'][0])
assert torch.allclose(a_out['logits'][0], model.similarity_weight * a_sim + a_fc, atol=0, rtol=0)
assert torch.equal(a_out['output'], a_out['logits'][0])
class_feats = model.loss_prepare.postproj(a_cls['output'][:, 0])
a_attn = call_attn(a_rec, a_in)
a_cls_attn = call_attn(a_rec, a_cls)
P = cfg.MODEL.PROMPT_EMBED.INPUT_DEEP_PROMPT_LENGTH
for a in a_attn + a_cls_attn:  # prompt keys are identical for every sample and every call of the same layer
    assert torch.equal(a['kv_in'][:, P:], a['query_in'])

put('a.pixel_values', a_pixels, '(2,3,32,32) already-normalised images fed to video_embed')
put('a.labels', torch.tensor(a_labels), 'target_idx (class index)')
put('a.class_ids', a_col['shared']['ImageNet1k']['data'], '(3,Lc) encode(name+" <|endoftext|>"), right-padded with 0')
put('a.class_invalid_mask', a_col['shared']['ImageNet1k']['invalid_mask'], '(3,Lc) 1 = padding')
put('a.prefix_spe_embedding', a_rec['token_embed_calls'][0]['out'][0, 0],
    '(64,) get_spe_token() = embeddings_norm(word_emb[49410] + s_token_bias) (no pos/type)')
put('a.video_embed_out', a_rec['video_embed_calls'][0]['out'], '(2,16,64) patch conv + pos + shared LN')
put('a.encoder_input', a_in['data'], '(2,17,64) fused_encoder input [prefix SPE, 16 patches]; NO prompt rows (prompts enter inside each layer)')
put('a.layer_states', call_layers(a_rec, a_in), '(5,2,17,64) [encoder input, output of layer 0..3] (hidden sequence; prompts never part of it)')
put('a.hidden', a_in['output'], '(2,17,64) fused_encoder output')
put('a.prompt_kv_normed', torch.stack([a['kv_in'][0, :P] for a in a_attn]),
    '(4,10,64) per layer l: norm1_l(deep_prompt_l) = the first 10 rows of the key/value input of layer l self-attention')
put('a.attn_query_in', torch.stack([a['query_in'] for a in a_attn]), '(4,2,17,64) per layer: norm1_l(layer input) (query rows = key rows 10..26)')
put('a.features', a_out['feats'][0], '(2,64) loss_prepare.postproj(hidden[:,0]) = proj(ln_post(.)); fc_prompt reads this')
put('a.class_encoder_input', a_cls['data'], '(3,1+Lc,64) [prefix SPE, class text]')
put('a.class_layer_states', call_layers(a_rec, a_cls), '(5,3,1+Lc,64) class-name encoder states per layer (targets get deep prompts too)')
put('a.class_hidden', a_cls['output'], '(3,1+Lc,64) class-name encoder output')
put('a.class_features', class_feats, '(3,64) postproj(class_hidden[:,0])')
put('a.similarity_logits', a_sim, '(2,3) loss_prepare logits: normalize(f)@normalize(cf).T*exp(logit_scale_img_cls), before fc_prompt')
put('a.fc_prompt_logits', a_fc, '(2,3) fc_prompt(features)')
put('a.logits', a_out['logits'][0], '(2,3) final = similarity_weight*similarity_logits + fc_prompt(features) (fc_prompt_process)')

# ---------------- (b) caption with placeholders (caption prompt config; model_cap, same state) ----------------
b_samples = caption_samples(b_pixels, b_caption_tok, enc('<|spe|>'), task_info_of(cfg, 'mscoco_caption'))

# does the in1k (FC_PROMPT) model run a caption batch?  (official fc_prompt_process applies to every task)
try:
    run_case(model, cfg_in1k, 'mscoco_caption', b_samples, shared_target('Vocab_Word', vocab_tok), True)
    b_with_in1k = 'ran (unexpected)'
except Exception as e:  # noqa: BLE001
    b_with_in1k = f'{type(e).__name__}: {e}'
print('caption with the in1k FC_PROMPT model:', b_with_in1k)

b_out, b_col, b_rec = run_case(model_cap, cfg_cap, 'mscoco_caption', b_samples, shared_target('Vocab_Word', vocab_tok),
                               loss_prepare_training=True)
assert len(b_rec['encoder_calls']) == 2
b_in, b_voc = b_rec['encoder_calls']
b_text_len = b_col['input_sample_list'][1]['data'].shape[1] // 2
b_attn = call_attn(b_rec, b_in)
put('b.pixel_values', b_pixels, '(2,3,32,32)')
put('b.caption_ids', torch.tensor(b_caption_tok), '(2,n+1) [words..., <|endoftext|>]')
put('b.text_input_ids', b_col['input_sample_list'][1]['data'], '(2,2(n+1)) [caption ids, <|spe|> x (n+1)]; s_token_bias is added to every 49410 here')
put('b.attn_mask', b_in['attn_mask'], '(L,L) official _construct_attention_masks (without prompt columns), 1 = blocked')
put('b.attn_mask_with_prompts', b_attn[0]['attn_mask'], '(L,10+L) mask as passed to attention in every layer: 10 zero columns prepended')
put('b.encoder_input', b_in['data'], '(2,1+16+2(n+1),64) [prefix SPE, 16 patches, caption, placeholders]')
put('b.layer_states', call_layers(b_rec, b_in), '(5,2,L,64) [encoder input, output of layer 0..3]')
put('b.hidden', b_in['output'], 'fused_encoder output')
put('b.placeholder_hidden', b_in['output'][:, -b_text_len:], '(2,n+1,64) outputs at the placeholders')
put('b.features', b_out['feats'][0], '(2(n+1),64) postproj(placeholder_hidden) flattened batch-major')
put('b.targets', b_out['targets'][0], '(2(n+1),) caption ids')
put('b.vocab_ids', b_col['shared']['Vocab_Word']['data'], '(K,2) [word id, <|endoftext|>]')
put('b.vocab_hidden', b_voc['output'], '(K,3,64) encoder output for vocab targets (with deep prompts)')
put('b.vocab_features', model_cap.loss_prepare.postproj(b_voc['output'][:, 0]), '(K,64)')
put('b.logits', b_out['logits'][0], '(2(n+1),K) cosine*exp(logit_scale_caption); no fc_prompt in the caption config')

# ----------------------------------------------------------------------------------------------
# 5. state dict (in1k model; the caption model = the same minus fc_prompt.*, similarity_weight)
# ----------------------------------------------------------------------------------------------
shared_keys = []
ptrs = {}
for k, v in model.state_dict().items():
    ptrs.setdefault(v.data_ptr(), []).append(k)
shared_keys = [ks for ks in ptrs.values() if len(ks) > 1]
W = STATE['token_embed.embeddings.weight']
rows = torch.tensor(USED_TOKEN_IDS, dtype=torch.long)
assert torch.count_nonzero(W[~torch.isin(torch.arange(W.shape[0]), rows)]) == 0
for k, v in STATE.items():
    if k == 'token_embed.embeddings.weight':
        continue
    desc = 'official state_dict entry' + (' (PROMPT-TUNING parameter)' if k in PROMPT_KEYS_IN1K else '') + \
        (' [trainable under PROMPT_PARAM]' if k in TRAINABLE else '') + (' [absent from the caption model]' if k in CAP_UNUSED else '')
    put('state.' + k, v, desc)
put('state_rows.token_embed.embeddings.weight.index', rows, 'row ids of token_embed.embeddings.weight that are non-zero')
put('state_rows.token_embed.embeddings.weight.values', W[rows], 'their values; full = zeros(49411,64) with these rows')

# ----------------------------------------------------------------------------------------------
# 6. description
# ----------------------------------------------------------------------------------------------
L_img = 16
J['cases']['a'] = {
    'model': 'tiny_moe_prompt_in1k.yaml (FC_PROMPT True, FC_PROMPT_OUT 3)', 'task': 'imagenet',
    'class_names': A_CLASS_NAMES, 'class_token_ids': a_class_tok,
    'input_call': describe_call(a_in, a_rec, [('prefix_spe', 1), ('image_patches', L_img)]),
    'class_target_call': describe_call(a_cls, a_rec, [('prefix_spe', 1), ('class_name_text', a_cls['data'].shape[1] - 1)]),
    'feature_rule': 'features = proj(ln_post(hidden[:,0])); similarity_logits = normalize(f)@normalize(cf).T*exp(logit_scale_img_cls); '
                    'logits = similarity_weight*similarity_logits + fc_prompt(features)',
}
J['cases']['b'] = {
    'model': 'tiny_moe_prompt_caption.yaml (FC_PROMPT False) loading the same state (fc_prompt.*, similarity_weight dropped)',
    'task': 'mscoco_caption', 'captions': B_CAPTIONS, 'caption_token_ids': b_caption_tok,
    'input_call': describe_call(b_in, b_rec, [('prefix_spe', 1), ('image_patches', L_img), ('caption_text', b_text_len),
                                              ('spe_placeholders', b_text_len)]),
    'vocab_target_call': describe_call(b_voc, b_rec, [('prefix_spe', 1), ('word_and_eot', 2)]),
    'note': 'loss_prepare in training mode (only) so its caption branch selects all n+1 placeholders; encoder in eval mode.',
}
J['cases']['b_with_in1k_model'] = {
    'result': b_with_in1k,
    'why': 'MultiTaskTransformerEncoder.fc_prompt_process (unified_transformer.py:303-311) adds fc_prompt(feat) (N,3) to '
           'EVERY task\'s logits whenever MODEL.FC_PROMPT; caption logits are (N,K_vocab), so FC_PROMPT configs are '
           'classification-only. The official caption prompt config sets FC_PROMPT False.'}
J['layout_summary'] = {
    'hidden_sequence': 'unchanged from the non-prompt fixture: [prefix SPE] ++ data segments; prompts are never rows of '
                       'the encoder input/output or of any layer output (encoder_input/layer_states have no prompt rows).',
    'deep_prompts': 'every layer l (0..3) has its own deep_prompt_embedding.embedding.weight P_l (10,64). In layer l, '
                    '_sa_block builds kv = cat([norm1_l(P_l) expanded over batch, norm1_l(x)], dim=1) -> keys/values '
                    'positions 0..9 are prompts, 10.. are the tokens; queries are only norm1_l(x). Prompt outputs are '
                    'never computed (no query rows), so nothing is carried to layer l+1: each layer uses a fresh P_l.',
    'qkv_projection': 'q = norm1(x) @ Wq (+bq); [k;v] = kv @ W[k,v] (+b). Non-MoE layers slice qkv_proj.weight rows '
                      '[0:64] / [64:192]; MoE layers merge experts with the QUERY gate decision (mode q, then mode kv '
                      'with gate_decision reused). With one attribute row all keys use it; with two rows (caption) '
                      'keys [0, data_cum_length[1] + 10) = prompts + SPE + image use row 0 (image), the rest row 1.',
    'masks': 'attn_mask (L,L) and key_padding_mask (N,L) each get 10 zero (=visible) columns prepended: every real '
             'token (incl. caption/placeholder rows and padding rows) attends to all 10 prompts; prompts attend to '
             'nothing (not queries). Padded class-name keys stay masked.',
    'targets': 'shared target sets (class names, vocab) are encoded with the same deep prompts (SHARE_DEEP_PROMPT True '
               '-> DeepPrompt.target_prompt False -> data_type target also uses .embedding).',
    'no_pos_type_on_prompts': 'no position/type embedding, no token LN on prompts (WITH_POS False; DeepPrompt returns '
                              'the raw weight); only layer norm1_l.',
    's_token_bias': 'added to word_emb rows of id 49410 (<|spe|>) before pos/type embedding and embeddings_norm: the '
                    'prefix SPE of every call (input and targets) and the caption placeholders (and MLM masks).',
    'fc_prompt': 'Linear(64,3) on loss_prepare feats = proj(ln_post(hidden[:,0])); logits = similarity_weight*logits + fc_prompt(feats).',
}
J['prompt_parameters'] = {k: list(STATE[k].shape) for k in PROMPT_KEYS_IN1K}
J['trainable_params_in1k_model(PROMPT_PARAM substring match)'] = TRAINABLE
J['trainable_params_caption_model'] = TRAINABLE_CAP
J['prompt_init'] = PROMPT_INIT
J['perturbation_of_rest'] = 'identical to make_fixture.py (seed-0 official build, seed-7 perturbation); ' \
                            'base weights vs the base fixture state max |diff| = %r' % (base_vs_original,)
J['attribute_vectors_official_table'] = official_attribute_table()
J['stubs'] = STUBS_USED
J['used_token_ids'] = USED_TOKEN_IDS
J['vocab_subset_words'] = VOCAB_WORDS
J['vocab_subset_ids'] = vocab_ids
J['state_dict_tied_keys'] = shared_keys
J['moe_layers'] = [i for i, l in enumerate(model.fused_encoder.layers) if l.ffn_moe or l.attn_moe]
J['config_yaml_in1k'] = open(CONFIG_IN1K).read()
J['config_yaml_caption'] = open(CONFIG_CAP).read()
J['config_effective_prompt'] = {
    'in1k': {'MODEL.PROMPT_EMBED': dict(cfg_in1k.MODEL.PROMPT_EMBED),
             **{k: cfg_in1k.MODEL[k] for k in ['PROMPT', 'PROMPT_PARAM', 'FC_PROMPT', 'FC_PROMPT_OUT', 'FC_PROMPT_WEIGHTS', 'FC_PROMPT_INDEX']}},
    'caption': {'MODEL.PROMPT_EMBED': dict(cfg_cap.MODEL.PROMPT_EMBED),
                **{k: cfg_cap.MODEL[k] for k in ['PROMPT', 'PROMPT_PARAM', 'FC_PROMPT', 'FC_PROMPT_OUT', 'FC_PROMPT_WEIGHTS', 'FC_PROMPT_INDEX']}},
    'task2tempname': model.loss_prepare.task2tempname,
}
J['versions'] = {'torch': torch.__version__, 'numpy': np.__version__,
                 'official_commit': os.popen(f'git -C {UPREF} rev-parse HEAD').read().strip()}

save_file(T, OUT_ST, metadata={'format': 'pt', 'source': 'official Uni-Perceiver code, prompt tuning; see fixture.json'})
with open(OUT_JSON, 'w') as f:
    json.dump(J, f, indent=1, default=lambda o: o.tolist() if hasattr(o, 'tolist') else str(o))
print('wrote', OUT_ST, os.path.getsize(OUT_ST), 'bytes;', OUT_JSON, os.path.getsize(OUT_JSON), 'bytes')


# ----------------------------------------------------------------------------------------------
# 7. round trip: fresh official models (other seed) loading fixture.safetensors reproduce features/logits
# ----------------------------------------------------------------------------------------------
def roundtrip_check():
    from safetensors.torch import load_file
    F_ = load_file(OUT_ST)
    state = fixture_state(F_, cfg)
    worst = 0.0
    for case, task, c, drop in [('a', 'imagenet', cfg_in1k, []), ('b', 'mscoco_caption', cfg_cap, CAP_UNUSED)]:
        m2 = fresh(c, seed=123)
        m2.load_state_dict({k: v for k, v in state.items() if k not in drop}, strict=True)
        samples, shared, lp_train = CASE_INPUTS[task]
        m2.to_task(task)
        m2.loss_prepare.train(lp_train)
        with torch.no_grad():
            o = m2(collate(c, task, samples, shared))
        for key, name in [('feats', 'features'), ('logits', 'logits')]:
            worst = max(worst, (o[key][0] - F_[f'{case}.{name}']).abs().max().item())
    return worst


if os.environ.get('FIXTURE_ROUNDTRIP', '1') == '1':
    print('round trip max |diff| (features, logits):', roundtrip_check())
