"""What make_fixture.py and make_fixture_prompt.py share: the official config set-up, the inputs of the cases
(token ids from the official tokenizer), the perturbation of the parameters after the official init, the
dataset-style samples and the official collation, the embedding hooks, and the state dict a fixture stores."""
import ast
import copy
import math
import os
from types import SimpleNamespace

import torch
from torch import nn

PERTURBATION = {
    'official_init': 'MODEL.MAEParamsInit=True (initialize_weights_as_mae: xavier Linear, qkv uniform, '
                     'N(0,0.02) embeddings, LN=1/0, fixed 2D sin-cos spatial_pos_embed, xavier patch conv) '
                     'after torch.manual_seed(0)',
    'then_with_torch.Generator_seed_7': [
        'every nn.LayerNorm: weight = 1 + 0.1*randn, bias = 0.1*randn (embeddings_norm shared by token/video)',
        'every nn.Linear / patch Conv2d bias: 0.02*randn',
        'gamma_1 / gamma_2 (LayerScale, init 1e-3): uniform(0.5, 1.0)',
        'loss_prepare.logit_scale_*: log(1/0.07) + 0.1*i (i = order in state_dict) so each is distinct',
        'token_embed.embeddings.weight rows NOT in used_token_ids set to exactly 0 (the fixture stores '
        'only the used rows; the rest of the (49411, 64) table is zero)',
        'spatial_pos_embed (fixed sin-cos) and all other weights left as the official init made them',
    ],
}


def official_multitask_helper(upref):
    """main.add_default_setting_for_multitask_config, loaded from the official main.py's source without
    importing main.py (whose imports pull the whole evaluation stack: sklearn, pycocoevalcap, ...)."""
    from uniperceiver.config import CfgNode

    path = os.path.join(upref, 'main.py')
    tree = ast.parse(open(path).read())
    fn = [n for n in tree.body if isinstance(n, ast.FunctionDef)
          and n.name == 'add_default_setting_for_multitask_config'][0]
    ns = {'copy': copy, 'CfgNode': CfgNode}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), path, 'exec'), ns)
    return ns['add_default_setting_for_multitask_config']


def setup_cfg(path, upref):
    """The config exactly as the official main.py's setup() makes it (minus logging / distributed set-up)."""
    from uniperceiver.config import get_cfg
    from uniperceiver.modeling import add_config

    cfg = get_cfg()
    tmp_cfg = cfg.load_from_file_tmp(path)
    add_config(cfg, tmp_cfg)
    cfg.merge_from_file(path)
    official_multitask_helper(upref)(cfg)
    cfg.freeze()
    return cfg


def case_inputs(tok):
    """The inputs of the three cases, from the official tokenizer and a seeded generator:
    (a) image classification with class names as the official target sets encode them
        (`encode(x + " <|endoftext|>")`); (b) caption training samples (`caption + " <|endoftext|>"`);
    (c) MLM sentences (basic_tokenize, '<|endoftext|>' appended, chosen words replaced by <|spe|>, labels the
        original ids or -1); the Vocab_Word subset `[v, <|endoftext|>]` used by (b) and (c)."""
    spe, eot = int(tok.encoder['<|spe|>']), int(tok.encoder['<|endoftext|>'])
    assert spe == 49410 and eot == 49407

    def enc(text):
        return [int(x) for x in tok.encode(text)]

    g = torch.Generator().manual_seed(1234)
    x = SimpleNamespace(SPE_ID=spe, EOT_ID=eot, enc=enc)
    x.A_CLASS_NAMES = ['tench', 'goldfish', 'great white shark']
    x.a_class_tok = [enc(n + ' <|endoftext|>') for n in x.A_CLASS_NAMES]
    x.a_pixels = torch.randn(2, 3, 32, 32, generator=g)
    x.a_labels = [0, 2]
    x.B_CAPTIONS = ['a dog on grass', 'two cats near water']
    x.b_caption_tok = [enc(c + ' <|endoftext|>') for c in x.B_CAPTIONS]
    x.b_pixels = torch.randn(2, 3, 32, 32, generator=g)
    x.C_SENTENCES = ['the quick brown fox jumps over the dog', 'a man is riding his old red bike']
    x.C_MASK_POS = [[1, 5], [1, 6]]
    x.c_ids, x.c_labels = [], []
    for sentence, chosen in zip(x.C_SENTENCES, x.C_MASK_POS):
        words = tok.basic_tokenize(sentence) + ['<|endoftext|>']
        ids, labels = [], []
        for i, word in enumerate(words):
            pieces = [int(p) for p in tok.encode_basic_tokenized_token(word)] if word != '<|endoftext|>' else [eot]
            assert len(pieces) == 1
            ids.append(spe if i in chosen else pieces[0])
            labels.append(pieces[0] if i in chosen else -1)
        x.c_ids.append(ids)
        x.c_labels.append(labels)
    assert len(set(len(ids) for ids in x.c_ids)) == 1  # no padding (the dataset fills to MAX_SEQ_LEN)
    x.VOCAB_WORDS = ['a', 'dog', 'on', 'grass', 'two', 'cats', 'near', 'water', 'quick', 'over', 'man', 'red']
    x.vocab_ids = [int(tok.encoder[w + '</w>']) for w in x.VOCAB_WORDS]
    x.vocab_tok = [[v, eot] for v in x.vocab_ids]
    x.USED_TOKEN_IDS = sorted(set([0, spe, eot, 49406, 49408, 49409]
                                  + sum(x.a_class_tok, []) + sum(x.b_caption_tok, []) + sum(x.c_ids, [])
                                  + [t for row in x.c_labels for t in row if t >= 0] + sum(x.vocab_tok, [])))
    return x


def perturb(model, used_token_ids):
    """Move the parameters the official init leaves at trivial values (see PERTURBATION), in place."""
    pg = torch.Generator().manual_seed(7)
    with torch.no_grad():
        seen = set()
        for _, m in model.named_modules():
            if id(m) in seen:
                continue
            seen.add(id(m))
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=pg))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=pg))
            elif isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                m.bias.copy_(0.02 * torch.randn(m.bias.shape, generator=pg))
        for name, p in model.named_parameters():
            if name.endswith('gamma_1') or name.endswith('gamma_2'):
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=pg))
        i = 0
        for name, p in model.loss_prepare.named_parameters():
            if name.startswith('logit_scale_'):
                p.fill_(math.log(1 / 0.07) + 0.1 * i)
                i += 1
        table = model.token_embed.embeddings.weight
        keep = torch.zeros(table.shape[0], dtype=torch.bool)
        keep[used_token_ids] = True
        table[~keep] = 0.0


def cpu_copy(x):
    """A detached copy of a tensor (anything else as it is): what a hook records."""
    return x.detach().clone() if isinstance(x, torch.Tensor) else x


def task_info_of(cfg, name):
    """The `task_info` the official dataset of task `name` attaches to its samples."""
    task = [t for t in cfg.TASKS if t['NAME'] == name][0]
    return {'task_type': task['DATASETS']['TASK_TYPE'], 'dataset_name': task['DATASETS']['DATASET_NAME'],
            'batch_size': task['DATALOADER']['TRAIN_BATCH_SIZE'],
            'sampling_weight': task['DATALOADER']['SAMPLING_WEIGHT']}


def shared_target(name, token_lists):
    """A shared text target set (class names, vocabulary words) as the official datasets hand it over."""
    data = [torch.tensor(t, dtype=torch.long) for t in token_lists]
    return {name: {'data': data, 'modality': 'text',
                   'sample_info': {'distributed': False, 'max_len': max(len(t) for t in token_lists)}}}


def image_classification_samples(pixels, labels, task_info):
    """Dataset-style samples of case (a): one image each, the class index into the shared target set."""
    return [{'input_sample': [{'data': pixels[i], 'invalid_mask': None, 'modality': 'image', 'data_type': 'input',
                               'sample_info': {'id': i, 'path': ''}}],
             'target_sample': [], 'target_idx': [labels[i]], 'target_set': ['ImageNet1k'], 'task_info': task_info}
            for i in range(len(labels))]


def caption_samples(pixels, caption_tok, spe_ids, task_info):
    """Dataset-style samples of case (b): the image, then the caption with one <|spe|> placeholder per
    token (`text_spe_cat`); each caption token is a target word of the Vocab_Word set."""
    import numpy as np

    samples = []
    for i, text in enumerate(caption_tok):
        samples.append({
            'input_sample': [
                {'data': pixels[i], 'invalid_mask': None, 'modality': 'image', 'data_type': 'input',
                 'sample_info': {'id': i}},
                {'data': [np.array(text, dtype=np.int64), np.array(spe_ids * len(text), dtype=np.int64)],
                 'invalid_mask': None, 'modality': 'text', 'data_type': 'input', 'sample_info': {'text_spe_cat': True}}],
            'target_sample': [], 'target_idx': [np.array(text, dtype=np.int64)], 'target_set': ['Vocab_Word'],
            'task_info': task_info})
    return samples


def collate(cfg, task_name, samples, shared):
    """The official collator's batch of `samples` of `task_name` with the shared target sets `shared`."""
    from uniperceiver.datasets.build import preprocess_batch_collator
    from uniperceiver.functional import dict_as_tensor

    samples = copy.deepcopy(samples)
    for s in samples:
        s['task_name'] = task_name
    return preprocess_batch_collator([dict_as_tensor(s) for s in samples], cfg=cfg,
                                     shared_targets=copy.deepcopy(shared))


def collated_inputs(batch):
    """What the collator made of the inputs and of the shared target sets (data, masks, attribute rows)."""
    def fields(d):
        return dict(data=cpu_copy(d['data']), invalid_mask=cpu_copy(d['invalid_mask']),
                    moe_embedding=cpu_copy(d['moe_embedding']))

    return {'input_sample_list': [fields(d) for d in batch['input_sample_list']],
            'shared': {k: fields(v[0]) for k, v in batch['shared_target_sets'].items()}}


def install_embedding_hooks(model, rec):
    """Record into `rec` each token-embedding call (ids, flags, output, the position ids it used) and each
    video-embedding output (`rec` has the lists `token_embed_calls`, `pos_calls`, `video_embed_calls`)."""
    def tok_pre(mod, args, kwargs):
        data = args[0] if args else kwargs['data']
        rec['token_embed_calls'].append(dict(ids=cpu_copy(data), type_embed=kwargs.get('type_embed', True),
                                             pos_embed=kwargs.get('pos_embed', True), n_pos_calls=len(rec['pos_calls'])))

    def tok_post(mod, args, kwargs, out):
        call = rec['token_embed_calls'][-1]
        call['out'] = cpu_copy(out)
        call['position_ids'] = rec['pos_calls'][-1] if len(rec['pos_calls']) > call['n_pos_calls'] else None

    def pos_pre(mod, args, kwargs):
        x = args[0]
        start = kwargs.get('start_time', 0)
        rec['pos_calls'].append(x.tolist() if (isinstance(x, torch.Tensor) and x.dim() == 1)
                                else (torch.arange(x.size(1)) + start).tolist())

    def vid_post(mod, args, kwargs, out):
        rec['video_embed_calls'].append(dict(out=cpu_copy(out)))

    model.token_embed.register_forward_pre_hook(tok_pre, with_kwargs=True)
    model.token_embed.register_forward_hook(tok_post, with_kwargs=True)
    model.token_embed.embeddings_pos.register_forward_pre_hook(pos_pre, with_kwargs=True)
    model.video_embed.register_forward_hook(vid_post, with_kwargs=True)


def fixture_state(tensors, cfg):
    """The official state dict stored in a fixture's tensors, the token table rebuilt at full size (the rows
    the fixture does not store are zero)."""
    state = {k[len('state.'):]: v for k, v in tensors.items() if k.startswith('state.')}
    full = torch.zeros(cfg.MODEL.VOCAB_SIZE, cfg.MODEL.TOKEN_EMBED.DIM)
    full[tensors['state_rows.token_embed.embeddings.weight.index']] = \
        tensors['state_rows.token_embed.embeddings.weight.values']
    state['token_embed.embeddings.weight'] = full
    return state


def official_attribute_table():
    """The official attribute vectors (`get_moe_embedding('attribute')`) as lists."""
    from uniperceiver.datasets.moe_embeddings import get_moe_embedding

    return {k: (v.tolist() if isinstance(v, torch.Tensor) else {kk: vv.tolist() for kk, vv in v.items()})
            for k, v in get_moe_embedding('attribute').items()}
