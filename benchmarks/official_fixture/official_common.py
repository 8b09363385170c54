"""What make_fixture.py and make_fixture_prompt.py share: the official config set-up, the inputs of the cases
(token ids from the official tokenizer) and the perturbation of the parameters after the official init."""
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
