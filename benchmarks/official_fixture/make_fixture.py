"""Build a tiny numeric fixture from the OFFICIAL Uni-Perceiver(-MoE) code (CPU, random weights).

Run (see README.md):
    PYTHONPATH=<site with the official code's dependencies>:<official clone> python benchmarks/official_fixture/make_fixture.py

Everything numeric comes from the official modules of the clone at $UPREF (config system, build_model,
MultiTaskTransformerEncoder._forward, the official batch collator, tokenizer, loss_prepare).
This script only: builds the config, perturbs some parameters after the official init (documented),
builds dataset-style samples, records what the official code does through forward hooks, and saves.
"""
import copy
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
UPREF = os.environ.get('UPREF', '/tmp/upref')
sys.path.insert(0, HERE)
import official_stubs  # noqa: E402
from official_common import (PERTURBATION, caption_samples, case_inputs, collate, collated_inputs, cpu_copy,  # noqa: E402
                             fixture_state, image_classification_samples, install_embedding_hooks,
                             official_attribute_table, perturb, setup_cfg, shared_target, task_info_of)

STUBS_USED = official_stubs.install()

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from uniperceiver.config import CfgNode  # noqa: E402
from uniperceiver.modeling import build_model  # noqa: E402
from uniperceiver.modeling.encoder.unified_bert_encoder import _construct_attention_masks  # noqa: E402
from uniperceiver.task_moe.layer import TaskMoE  # noqa: E402
from uniperceiver.utils import comm  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

CONFIG = os.path.join(HERE, 'tiny_moe.yaml')
FIXTURES = os.path.join(os.path.dirname(os.path.dirname(HERE)), 'tests', 'fixtures')
OUT_ST = os.path.join(FIXTURES, 'official_tiny_moe.safetensors')
OUT_JSON = os.path.join(FIXTURES, 'official_tiny_moe.json')


# ----------------------------------------------------------------------------------------------
# 1-3. the official config, the case inputs, the parameter perturbation (official_common.py)
# ----------------------------------------------------------------------------------------------
cfg = setup_cfg(CONFIG, UPREF)
assert comm.old_checkpoint is True

torch.manual_seed(0)
np.random.seed(0)
model = build_model(cfg)
model.eval()
model.float()

tok = model.tokenizer  # official ClipTokenizer
X = case_inputs(tok)
(SPE_ID, EOT_ID, enc, A_CLASS_NAMES, a_class_tok, a_pixels, a_labels, B_CAPTIONS, b_caption_tok, b_pixels,
 C_SENTENCES, C_MASK_POS, c_ids, c_labels, VOCAB_WORDS, vocab_ids, vocab_tok, USED_TOKEN_IDS) = (
    X.SPE_ID, X.EOT_ID, X.enc, X.A_CLASS_NAMES, X.a_class_tok, X.a_pixels, X.a_labels, X.B_CAPTIONS,
    X.b_caption_tok, X.b_pixels, X.C_SENTENCES, X.C_MASK_POS, X.c_ids, X.c_labels, X.VOCAB_WORDS, X.vocab_ids,
    X.vocab_tok, X.USED_TOKEN_IDS)
perturb(model, USED_TOKEN_IDS)

# ----------------------------------------------------------------------------------------------
# 4. hooks that record exactly what the official code feeds / computes
# ----------------------------------------------------------------------------------------------
REC = {}


def reset_rec():
    REC.clear()
    REC.update(encoder_calls=[], token_embed_calls=[], video_embed_calls=[], pos_calls=[],
               moe_calls=[], wg_logits=[], attn_calls=[])


reset_rec()


def enc_pre(mod, args, kwargs):
    sample_info = kwargs['sample_info']
    task_info = kwargs['task_info']
    am = _construct_attention_masks(kwargs['data'], sample_info, task_info)
    REC['encoder_calls'].append(dict(
        data=cpu_copy(kwargs['data']), invalid_mask=cpu_copy(kwargs.get('invalid_mask')),
        moe_embedding=cpu_copy(kwargs.get('moe_embedding')), data_type=kwargs.get('data_type'),
        data_length=list(sample_info['data_length']), data_cum_length=list(sample_info['data_cum_length']),
        text_spe_cat=bool(sample_info.get('text_spe_cat', False)), attn_mask=cpu_copy(am),
        n_token_embed_calls=len(REC['token_embed_calls']), n_moe_calls=len(REC['moe_calls'])))


def enc_post(mod, args, kwargs, out):
    REC['encoder_calls'][-1]['output'] = cpu_copy(out)


def make_moe_hooks(name):
    def pre(mod, args, kwargs):
        REC['moe_calls'].append(dict(module=name, reused=kwargs.get('gate_decision') is not None))

    def post(mod, args, kwargs, out):
        idx, gates = out[1]
        REC['moe_calls'][-1].update(top_indices=[t.tolist() for t in idx], gates=[t.tolist() for t in gates])
    return pre, post


def make_wg_hook(name):
    def post(mod, args, out):
        REC['wg_logits'].append(dict(module=name, logits=out.detach().tolist()))
    return post


def make_attn_hook(name):
    def pre(mod, args, kwargs):
        REC['attn_calls'].append(dict(module=name, attn_mask=cpu_copy(kwargs.get('attn_mask')),
                                      key_padding_mask=cpu_copy(kwargs.get('key_padding_mask'))))
    return pre


model.fused_encoder.register_forward_pre_hook(enc_pre, with_kwargs=True)
model.fused_encoder.register_forward_hook(enc_post, with_kwargs=True)
install_embedding_hooks(model, REC)
for name, m in model.named_modules():
    if isinstance(m, TaskMoE):
        pre, post = make_moe_hooks(name)
        m.register_forward_pre_hook(pre, with_kwargs=True)
        m.register_forward_hook(post, with_kwargs=True)
        m.gate.wg.register_forward_hook(make_wg_hook(name))
model.fused_encoder.layers[0].self_attn.register_forward_pre_hook(make_attn_hook('layers.0.self_attn'),
                                                                    with_kwargs=True)


# ----------------------------------------------------------------------------------------------
# 5. dataset-style samples -> official collator -> official model._forward
# ----------------------------------------------------------------------------------------------
CASE_INPUTS = {}


def run_case(task_name, samples, shared, loss_prepare_training=False):
    CASE_INPUTS[task_name] = (samples, shared, loss_prepare_training)
    batch = collate(cfg, task_name, samples, shared)
    collated = {**collated_inputs(batch), 'target_idx_list': [cpu_copy(t) for t in batch['target_idx_list']]}
    reset_rec()
    model.to_task(task_name)
    model.loss_prepare.train(loss_prepare_training)
    with torch.no_grad():
        out = model(batch)
    model.loss_prepare.eval()
    rec = copy.copy(REC)
    return out, collated, rec


T = {}   # tensors to save
J = {'tensors': {}, 'cases': {}}


def put(name, tensor, desc):
    t = tensor.detach().clone().contiguous()
    if t.dtype.is_floating_point:
        t = t.float()
    elif t.dtype != torch.bool:
        t = t.long()
    else:
        t = t.long()
    T[name] = t
    J['tensors'][name] = {'shape': list(t.shape), 'dtype': str(t.dtype).replace('torch.', ''), 'desc': desc}


def bool_or_none(x):
    return None if x is None else x.bool()


def describe_call(call, rec, segments):
    """segments: list of (name, length) in the order the official preprocess concatenated them."""
    emb = call['moe_embedding']
    cum = call['data_cum_length']
    if emb is None:
        seg_attr = None
    elif emb.shape[0] == 1:
        seg_attr = [{'tokens': [0, cum[-1]], 'attribute': emb[0].tolist()}]
    else:
        seg_attr = [{'tokens': [0, cum[1]], 'attribute': emb[0].tolist()},
                    {'tokens': [cum[1], cum[-1]], 'attribute': emb[1].tolist()}]
    moe = rec['moe_calls'][call['n_moe_calls']:call.get('n_moe_calls_end', len(rec['moe_calls']))]
    return {
        'segments_in_order': [{'name': n, 'length': l} for n, l in segments],
        'data_length': call['data_length'], 'data_cum_length': cum,
        'data_type': call['data_type'], 'text_spe_cat': call['text_spe_cat'],
        'moe_gate_attribute_rows': None if emb is None else emb.tolist(),
        'attribute_per_token_range': seg_attr,
        'gate_decisions': moe,
    }


# ---------------------------- (a) image classification ----------------------------
a_samples = image_classification_samples(a_pixels, a_labels, task_info_of(cfg, 'imagenet'))
a_out, a_col, a_rec = run_case('imagenet', a_samples, shared_target('ImageNet1k', a_class_tok))
assert len(a_rec['encoder_calls']) == 2
a_in, a_cls = a_rec['encoder_calls']
for k, c in enumerate(a_rec['encoder_calls']):
    c['n_moe_calls_end'] = a_rec['encoder_calls'][k + 1]['n_moe_calls'] if k + 1 < 2 else len(a_rec['moe_calls'])
class_feats = model.loss_prepare.postproj(a_cls['output'][:, 0])   # official postproj (ln_post + proj)

put('a.pixel_values', a_pixels, '(2,3,32,32) already-normalised images fed to video_embed')
put('a.labels', torch.tensor(a_labels), 'target_idx (class index into a.class_ids)')
put('a.class_ids', a_col['shared']['ImageNet1k']['data'], '(3,Lc) class-name token ids encode(name+" <|endoftext|>"), right-padded with 0 by the official collator')
put('a.class_invalid_mask', a_col['shared']['ImageNet1k']['invalid_mask'], '(3,Lc) 1 = padding (key-padding mask), from collator')
put('a.encoder_input', a_in['data'], '(2,17,64) fused_encoder input: [prefix SPE, 16 patch tokens]')
put('a.hidden', a_in['output'], '(2,17,64) fused_encoder output')
put('a.spe_hidden', a_in['output'][:, 0], '(2,64) encoder output at the leading SPE position')
put('a.features', a_out['feats'][0], '(2,64) loss_prepare.postproj(spe_hidden) = proj(ln_post(.))')
put('a.class_encoder_input', a_cls['data'], '(3,1+Lc,64) fused_encoder input for class names: [prefix SPE, text]')
put('a.class_hidden', a_cls['output'], '(3,1+Lc,64) fused_encoder output for class names')
put('a.class_features', class_feats, '(3,64) postproj(class_hidden[:,0])')
put('a.logits', a_out['logits'][0], '(2,3) normalised cosine * exp(logit_scale_img_cls)')
put('a.video_embed_out', a_rec['video_embed_calls'][0]['out'], '(2,16,64) video_embed output (patch conv + pos + shared LN)')
put('a.prefix_spe_embedding', a_rec['token_embed_calls'][0]['out'][0, 0], '(64,) get_spe_token(): LN(word_emb[49410]) only')

# ---------------------------- (b) caption with placeholders ----------------------------
b_samples = caption_samples(b_pixels, b_caption_tok, enc('<|spe|>'), task_info_of(cfg, 'mscoco_caption'))
b_out, b_col, b_rec = run_case('mscoco_caption', b_samples, shared_target('Vocab_Word', vocab_tok),
                               loss_prepare_training=True)
assert len(b_rec['encoder_calls']) == 2
b_in, b_voc = b_rec['encoder_calls']
b_in['n_moe_calls_end'] = b_voc['n_moe_calls']
n1 = len(b_caption_tok[0])
b_text_len = b_col['input_sample_list'][1]['data'].shape[1] // 2
put('b.pixel_values', b_pixels, '(2,3,32,32)')
put('b.caption_ids', torch.tensor(b_caption_tok), '(2,n+1) caption ids [words..., <|endoftext|>]')
put('b.text_input_ids', b_col['input_sample_list'][1]['data'], '(2,2(n+1)) text segment fed: [caption ids, <|spe|> x (n+1)]')
put('b.attn_mask', b_in['attn_mask'], '(L,L) official _construct_attention_masks, True/1 = blocked (query row, key col)')
put('b.encoder_input', b_in['data'], '(2,1+16+2(n+1),64) fused_encoder input: [prefix SPE, 16 patches, caption, placeholders]')
put('b.hidden', b_in['output'], 'fused_encoder output, same layout')
put('b.placeholder_hidden', b_in['output'][:, -b_text_len:], '(2,n+1,64) outputs at the SPE placeholders (last n+1 positions)')
put('b.features', b_out['feats'][0], '(2(n+1),64) postproj(placeholder_hidden) flattened batch-major (loss_prepare caption training branch)')
put('b.targets', b_out['targets'][0], '(2(n+1),) target word ids for the placeholders (= caption ids)')
put('b.vocab_ids', b_col['shared']['Vocab_Word']['data'], '(K,2) Vocab_Word subset: [word id, <|endoftext|>]')
put('b.vocab_hidden', b_voc['output'], '(K,3,64) encoder output for vocab targets [prefix SPE, word, EOT]')
put('b.vocab_features', model.loss_prepare.postproj(b_voc['output'][:, 0]), '(K,64) postproj(vocab_hidden[:,0])')
put('b.logits', b_out['logits'][0], '(2(n+1),K) cosine * exp(logit_scale_caption) vs Vocab_Word subset')

# ---------------------------- (c) MLM ----------------------------
c_samples = []
for i in range(2):
    c_samples.append({
        'input_sample': [{'data': [np.array(c_ids[i], dtype=np.int64)], 'invalid_mask': None, 'modality': 'text',
                          'data_type': 'input', 'sample_info': {'seq_length': len(c_ids[i])}}],
        'target_sample': [], 'target_idx': [np.array(c_labels[i], dtype=np.int64)], 'target_set': ['Vocab_Word'],
        'task_info': task_info_of(cfg, 'bookswiki_pretrain')})
c_out, c_col, c_rec = run_case('bookswiki_pretrain', c_samples, shared_target('Vocab_Word', vocab_tok))
c_in, c_voc = c_rec['encoder_calls']
c_in['n_moe_calls_end'] = c_voc['n_moe_calls']
c_labels_t = torch.tensor(c_labels)
c_mask = c_labels_t.ne(-1)
put('c.input_ids', torch.tensor(c_ids), '(2,9) 8 words + <|endoftext|>, 2 words replaced by <|spe|> (49410)')
put('c.mlm_labels', c_labels_t, '(2,9) original id at masked positions, -1 elsewhere')
put('c.masked_positions', torch.nonzero(c_mask), '(4,2) (batch, text position) of masked tokens; encoder position = text position + 1')
put('c.encoder_input', c_in['data'], '(2,10,64) fused_encoder input: [prefix SPE, 9 text tokens]')
put('c.hidden', c_in['output'], '(2,10,64) fused_encoder output')
put('c.masked_hidden', c_in['output'][:, 1:][c_mask], '(4,64) encoder outputs at the masked positions (batch-major)')
put('c.features', c_out['feats'][0], '(4,64) postproj(masked_hidden)')
put('c.targets', c_out['targets'][0], '(4,) label ids of the masked positions')
put('c.vocab_hidden', c_voc['output'], '(K,3,64) encoder output for the Vocab_Word subset under the MLM task')
put('c.vocab_features', model.loss_prepare.postproj(c_voc['output'][:, 0]), '(K,64)')
put('c.logits', c_out['logits'][0], '(4,K) cosine * exp(logit_scale_text_mlm)')

# ----------------------------------------------------------------------------------------------
# 6. state dict (own key names, prefixed "state."), token embedding stored sparsely
# ----------------------------------------------------------------------------------------------
sd = model.state_dict()
shared_keys = []
ptrs = {}
for k, v in sd.items():
    ptrs.setdefault(v.data_ptr(), []).append(k)
for p, ks in ptrs.items():
    if len(ks) > 1:
        shared_keys.append(ks)
W = sd['token_embed.embeddings.weight']
rows = torch.tensor(USED_TOKEN_IDS, dtype=torch.long)
assert torch.count_nonzero(W[~torch.isin(torch.arange(W.shape[0]), rows)]) == 0
for k, v in sd.items():
    if k == 'token_embed.embeddings.weight':
        continue
    put('state.' + k, v, 'official state_dict entry')
put('state_rows.token_embed.embeddings.weight.index', rows, 'row ids of token_embed.embeddings.weight that are non-zero')
put('state_rows.token_embed.embeddings.weight.values', W[rows], 'their values; full tensor = zeros(49411,64) with these rows')

for k in list(T):
    J['tensors'][k]['dtype'] = str(T[k].dtype).replace('torch.', '')

# ----------------------------------------------------------------------------------------------
# 7. layout descriptions
# ----------------------------------------------------------------------------------------------
def tok_calls_summary(rec):
    out = []
    for c in rec['token_embed_calls']:
        ids = c['ids']
        out.append({'ids_shape': list(ids.shape), 'ids_first_row': ids[0].tolist(), 'type_embed': c['type_embed'],
                    'pos_embed': c['pos_embed'], 'position_ids': c['position_ids']})
    return out


def mask_desc(call):
    am = call['attn_mask']
    kpm = call['invalid_mask']
    return {'attn_mask_from__construct_attention_masks': None if am is None else am.int().tolist(),
            'key_padding_mask(invalid_mask, 1=pad)': None if kpm is None else kpm.int().tolist(),
            'combined_in_MoEAttentionBlock': 'attention_mask = logical_or(attn_mask[None], key_padding_mask[:,None,:]) '
                                             '(whichever exist); scores += mask * -10000.0 (not -inf), then softmax'}


L_img = 16
J['cases']['a'] = {
    'task': 'imagenet', 'task_type': 'image_classification',
    'input_call': describe_call(a_in, a_rec, [('prefix_spe', 1), ('image_patches', L_img)]),
    'class_target_call': describe_call(a_cls, a_rec, [('prefix_spe', 1), ('class_name_text', a_cls['data'].shape[1] - 1)]),
    'class_names': A_CLASS_NAMES, 'class_token_ids': a_class_tok,
    'token_embed_calls_in_order': tok_calls_summary(a_rec),
    'masks_input': mask_desc(a_in), 'masks_class_target': mask_desc(a_cls),
    'feature_rule': 'features = ln_post+proj of encoder output[:,0]; class features = same on class encoder output[:,0]; '
                    'logits = normalize(f) @ normalize(cf).T * exp(logit_scale_img_cls)',
}
J['cases']['b'] = {
    'task': 'mscoco_caption', 'task_type': 'image_caption',
    'captions': B_CAPTIONS, 'caption_token_ids': b_caption_tok,
    'input_call': describe_call(b_in, b_rec, [('prefix_spe', 1), ('image_patches', L_img),
                                              ('caption_text', b_text_len), ('spe_placeholders', b_text_len)]),
    'vocab_target_call': describe_call(b_voc, b_rec, [('prefix_spe', 1), ('word_and_eot', 2)]),
    'token_embed_calls_in_order': tok_calls_summary(b_rec),
    'masks_input': mask_desc(b_in), 'masks_vocab_target': mask_desc(b_voc),
    'note': 'loss_prepare was put in training mode (only) for this case so that its official caption branch '
            'selects all n+1 placeholders (in eval mode it returns only position -1); the encoder ran in eval mode.',
}
J['cases']['c'] = {
    'task': 'bookswiki_pretrain', 'task_type': 'text_mlm', 'sentences': C_SENTENCES,
    'masked_word_positions': C_MASK_POS,
    'input_call': describe_call(c_in, c_rec, [('prefix_spe', 1), ('text', len(c_ids[0]))]),
    'vocab_target_call': describe_call(c_voc, c_rec, [('prefix_spe', 1), ('word_and_eot', 2)]),
    'token_embed_calls_in_order': tok_calls_summary(c_rec),
    'masks_input': mask_desc(c_in),
    'feature_rule': 'loss_prepare text_mlm: hidden[:, -L_text:][labels != -1] (masked positions chosen by labels, '
                    'not by id==49410), then ln_post+proj',
}
J['layout_summary'] = {
    'sequence': 'every fused_encoder call = [prefix SPE (1 token)] ++ data segments in data_list order '
                '(preprocess(), prefix_spe_before_fuse default True). Inputs and shared targets are separate calls.',
    'prefix_spe': 'get_spe_token() with comm.old_checkpoint=True: token_embed(ids=[[49410]], type_embed=False, '
                  'pos_embed=False) = embeddings_norm(word_emb[49410]); NO position and NO type embedding; the same '
                  'vector for every sample and every call',
    'text_tokens': 'embeddings_norm(word_emb[id] + pos_emb[p] + token_type_emb[0]); p = 0..L-1 (arange over the '
                   'text segment, restarting at 0 after the prefix); caption text_spe_cat: p = [0..n, 0..n]',
    'image_tokens': 'Conv2d(3,64,k=8,s=8) patches in row-major order + spatial_pos_embed[0..15] (fixed 2D sin-cos) + '
                    'temporal_pos_embed[0] (eval; random offset in training since VIDEO_EMBED.POS_RANDOM=True), then '
                    'the SAME LayerNorm as text (SHARE_LAYERNORM); no type embedding (VIDEO_EMBED.ADD_TYPE_EMBED=False, '
                    'video_embed.embeddings_type is unused)',
    'encoder_layer': 'pre-LN: x += gamma_1 * Attn(norm1(x)); x += gamma_2 * FFN(norm2(x)); FFN = linear2(gelu_erf(linear1)); '
                     'attention: fused qkv_proj, chunk q,k,v; scores = q k^T / sqrt(32) + mask*(-10000); softmax; dense. '
                     'No final encoder LayerNorm (ln_post lives in loss_prepare).',
    'moe': 'layers with layer_idx % 2 == 0 (0 and 2; "odd" = 1st/3rd) have TaskMoE on qkv_proj, dense, linear1, linear2. '
           'Gate input is ONLY the attribute row: logits = wg(LayerNorm(Linear(8->64)(attr))); top-2 of logits, '
           'gates = softmax(logits) at those 2 experts renormalised to sum 1 (eval: no noise). Experts are merged in '
           'weight space: W = g1*W[i1] + g2*W[i2], b = g1*b[i1] + g2*b[i2]. dense reuses qkv_proj\'s decision, linear2 '
           'reuses linear1\'s (FFN_SHARE_GATE_DECISION) -> the gates of dense and linear2 are in the state dict but '
           'never used. One decision per segment, shared by all tokens and all batch rows of that segment.',
    'segments_for_attribute': '1 attribute row -> all tokens incl. prefix SPE; 2 rows (caption) -> tokens '
                              '[0, data_cum_length[1]) = prefix SPE + image use row 0, the rest (caption + placeholders) row 1',
    'attention_mask': 'True/1 = blocked. Non-caption: only key padding (collator invalid_mask, 1 = pad). Caption '
                      '(text_spe_cat): prefix+image rows see prefix+image only; caption token i sees prefix+image+caption[0..i]; '
                      'placeholder i sees prefix+image+caption[0..i-1] and itself (placeholder i), not other placeholders.',
    'loss_prepare': 'image cls: q1 = hidden[:,0]; targets: q2 = hidden[:,0] of each class/word sequence; caption (training '
                    'branch): hidden[:, -(n+1):][targets != -1]; mlm: hidden[:, -L_text:][labels != -1]; then '
                    'proj(ln_post(.)); logits = normalize(q1) @ normalize(q2).T * exp(logit_scale_<task TEMP_NAME>)',
}
J['attribute_vectors_official_table'] = official_attribute_table()
J['wg_logits_first_case_a'] = a_rec['wg_logits']
J['stubs'] = STUBS_USED
J['perturbation'] = PERTURBATION
J['used_token_ids'] = USED_TOKEN_IDS
J['vocab_subset_words'] = VOCAB_WORDS
J['vocab_subset_ids'] = vocab_ids
J['state_dict_tied_keys'] = shared_keys
J['moe_layers'] = [i for i, l in enumerate(model.fused_encoder.layers) if l.ffn_moe or l.attn_moe]
J['config_yaml'] = open(CONFIG).read()
J['config_effective'] = {
    'MODEL.BERT': dict(cfg.MODEL.BERT), 'MOE': dict(cfg.MOE),
    'MODEL.TOKEN_EMBED': dict(cfg.MODEL.TOKEN_EMBED), 'MODEL.VIDEO_EMBED': dict(cfg.MODEL.VIDEO_EMBED),
    'MODEL': {k: v for k, v in cfg.MODEL.items() if not isinstance(v, CfgNode)},
    'SOLVER.AMP_FP16': cfg.SOLVER.AMP_FP16, 'comm.old_checkpoint': comm.old_checkpoint,
    'task2tempname': model.loss_prepare.task2tempname,
}
J['versions'] = {'torch': torch.__version__, 'numpy': np.__version__,
                 'official_commit': os.popen(f'git -C {UPREF} rev-parse HEAD').read().strip()}

save_file(T, OUT_ST, metadata={'format': 'pt', 'source': 'official Uni-Perceiver code, see fixture.json'})
with open(OUT_JSON, 'w') as f:
    json.dump(J, f, indent=1, default=lambda o: o.tolist() if hasattr(o, 'tolist') else str(o))
print('wrote', OUT_ST, os.path.getsize(OUT_ST), 'bytes;', OUT_JSON, os.path.getsize(OUT_JSON), 'bytes')
print('stubs:', STUBS_USED)


# ----------------------------------------------------------------------------------------------
# 8. round trip: a freshly built official model (other seed) loading the saved tensors reproduces
#    the saved outputs bit for bit
# ----------------------------------------------------------------------------------------------
def roundtrip_check():
    from safetensors.torch import load_file
    F_ = load_file(OUT_ST)
    state = fixture_state(F_, cfg)
    torch.manual_seed(123)
    m2 = build_model(cfg)
    m2.load_state_dict(state, strict=True)
    m2.eval()
    worst = 0.0
    for case, task in [('a', 'imagenet'), ('b', 'mscoco_caption'), ('c', 'bookswiki_pretrain')]:
        samples, shared, lp_train = CASE_INPUTS[task]
        m2.to_task(task)
        m2.loss_prepare.train(lp_train)
        with torch.no_grad():
            o = m2(collate(cfg, task, samples, shared))
        m2.loss_prepare.eval()
        for key, name in [('feats', 'features'), ('logits', 'logits')]:
            d = (o[key][0] - F_[f'{case}.{name}']).abs().max().item()
            worst = max(worst, d)
    return worst


if os.environ.get('FIXTURE_ROUNDTRIP', '1') == '1':
    print('round trip max |diff| (features, logits; fresh official model loading fixture.safetensors):',
          roundtrip_check())
