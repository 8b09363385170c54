"""Minimal stubs needed to run the official Uni-Perceiver code on a CPU-only torch 2.13.

Every stub here is listed in README.md. Nothing here changes the model's maths.
"""
import sys
import types

import torch

STUBS = []


def install():
    # 1. torchvision (imported by timm 0.4.5 and by uniperceiver.datasets) is the PyPI CUDA build (the CPU
    #    index is unreachable); its compiled ops cannot load without libc10_cuda.so, and
    #    torchvision/_meta_registrations.py then fails at import ("operator torchvision::nms does not
    #    exist"). Replace that one sub-module by an empty module; no torchvision op is used by the model.
    if 'torchvision._meta_registrations' not in sys.modules:
        sys.modules['torchvision._meta_registrations'] = types.ModuleType('torchvision._meta_registrations')
        STUBS.append('torchvision._meta_registrations -> empty module')

    # 2. The official get_spe_token() (uniperceiver/utils/transformer_util.py) does
    #    torch.tensor(tokenizer.encode('<|spe|>')).cuda(); NNEmbeddingEncoding(int) does the same.
    #    On this CPU-only torch, make Tensor.cuda() a no-op returning the tensor itself.
    if not getattr(torch.Tensor.cuda, '_official_fixture_stub', False):
        def _cuda_noop(self, *args, **kwargs):
            return self
        _cuda_noop._official_fixture_stub = True
        torch.Tensor.cuda = _cuda_noop
        STUBS.append('torch.Tensor.cuda -> identity (CPU)')
    return list(STUBS)
