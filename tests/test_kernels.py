"""Triton kernels == torch reference, run in the Triton interpreter (a subprocess with TRITON_INTERPRET=1 set before
triton is imported); dispatch picks torch on CPU."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vtoolkit import kernels

pytest.importorskip("triton")

CHECK = textwrap.dedent('''
    import os, torch
    assert os.environ["TRITON_INTERPRET"] == "1"
    from vtoolkit.kernels import gather_kept, compact_kv, backend_for, gather_kept_torch, compact_kv_torch
    x = torch.zeros(1)
    assert backend_for(x) == "triton"
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        B, L, D, K = 3, 37, 301, 13
        h = torch.randn(B, L, D, generator=g).to(dtype)
        idx = torch.stack([torch.randperm(L, generator=g)[:K].sort().values for _ in range(B)])
        mask = (torch.rand(B, L, generator=g) > 0.3).long()
        for pos in (torch.arange(L).expand(B, L), torch.arange(L)[None], torch.randint(0, 99, (3, B, L), generator=g),
                    torch.randint(0, 99, (4, B, L), generator=g), None):
            got = gather_kept(h, idx, pos, mask)
            ref = gather_kept_torch(h, idx, pos, mask)
            for a, b in zip(got, ref):
                assert (a is None and b is None) or torch.equal(a, b), (dtype, None if pos is None else pos.shape)
        hn = h.transpose(0, 1).contiguous().transpose(0, 1)      # non-contiguous input
        assert torch.equal(gather_kept(hn, idx)[0], gather_kept_torch(hn, idx)[0])
        k = torch.randn(2, 3, L, 17, generator=g).to(dtype)
        v = torch.randn(2, 3, L, 17, generator=g).to(dtype)
        ko, vo = compact_kv(k, v, idx[:2])
        kr, vr = compact_kv_torch(k, v, idx[:2])
        assert torch.equal(ko, kr) and torch.equal(vo, vr)
    # end to end: FasterVLM's pruning gather through the Triton kernel gives the torch path's tokens
    import vtoolkit as vt
    model, proc = vt.models.tiny.build("llava")
    ad = vt.models.get_adapter(model)
    batch = ad.prepare_inputs(proc, [vt.models.tiny.demo_image(i) for i in range(2)], ["Is there a dog?", "Cat?"])
    outs = {}
    with torch.no_grad(), vt.apply_method(model, "fastervlm", keep_tokens=9):
        for backend in ("triton", "torch"):
            os.environ["VTOOLKIT_KERNELS"] = backend
            outs[backend] = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert torch.equal(outs["triton"], outs["torch"])
    print("KERNELS-OK")
''')


def test_triton_kernels_match_torch_reference_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", VTOOLKIT_KERNELS="triton")
    res = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "KERNELS-OK" in res.stdout, res.stdout + res.stderr


def test_dispatch_uses_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("VTOOLKIT_KERNELS", raising=False)
    x = torch.zeros(2, 3, 4)
    assert kernels.backend_for(x) == "torch"
    idx = torch.tensor([[0, 2], [1, 2]])
    h, p, m = kernels.gather_kept(x + torch.arange(3.0)[None, :, None], idx, torch.arange(3)[None], torch.ones(2, 3))
    assert h[:, :, 0].tolist() == [[0.0, 2.0], [1.0, 2.0]] and p.tolist() == [[0, 2], [1, 2]]
    monkeypatch.setenv("VTOOLKIT_KERNELS", "torch")
    assert kernels.backend_for(x) == "torch"


def test_dispatch_errors(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setenv("VTOOLKIT_KERNELS", "cuda")
    with pytest.raises(ValueError, match="VTOOLKIT_KERNELS"):
        kernels.backend_for(x)
    monkeypatch.setenv("VTOOLKIT_KERNELS", "triton")
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"pip install 'vtoolkit\[triton\]'"):
        kernels.backend_for(x)
