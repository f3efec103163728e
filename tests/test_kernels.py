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
        # key and value with different strides (a transposed cache) and head dims, in the same launch
        kt = k.transpose(1, 2).contiguous().transpose(1, 2)
        ko, vo = compact_kv(kt, v[..., :9], idx[:2])
        assert torch.equal(ko, kr) and torch.equal(vo, vr[..., :9]) and vo.shape == (2, 3, K, 9)
    # bool mask, a [1, L] mask broadcast over the batch, K = 0
    h = torch.randn(3, 37, 40, generator=g)
    bm = torch.rand(3, 37, generator=g) > 0.5
    got, ref = gather_kept(h, idx, None, bm), gather_kept_torch(h, idx, None, bm)
    assert got[2].dtype == torch.bool and torch.equal(got[2], ref[2]) and torch.equal(got[0], ref[0])
    m1 = torch.randint(0, 2, (1, 37), generator=g)
    assert torch.equal(gather_kept(h, idx, None, m1)[2], m1[0, idx])
    assert gather_kept(h, idx[:, :0], torch.arange(37)[None], m1)[0].shape == (3, 0, 40)
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


def test_argument_errors_are_raised_before_any_kernel(monkeypatch):
    """A wrong shape must raise (the Triton kernels index raw pointers and would read out of bounds)."""
    h = torch.zeros(2, 5, 4)
    idx = torch.tensor([[0, 3], [1, 4]])
    for backend in ("torch", "triton"):
        monkeypatch.setenv("VTOOLKIT_KERNELS", backend)
        with pytest.raises(ValueError, match=r"keep_idx must be int64 \[B=2, K\]"):
            kernels.gather_kept(h, idx[:1])
        with pytest.raises(ValueError, match="int64"):
            kernels.gather_kept(h, idx.int())
        with pytest.raises(ValueError, match="attention_mask must be"):
            kernels.gather_kept(h, idx, None, torch.ones(3, 5))
        with pytest.raises(ValueError, match="position_ids must be"):
            kernels.gather_kept(h, idx, torch.zeros(3, 2, 6, dtype=torch.long))
        with pytest.raises(ValueError, match="same B, H, L"):
            kernels.compact_kv(torch.zeros(2, 3, 5, 4), torch.zeros(2, 3, 6, 4), idx)


def test_autograd_takes_the_torch_path(monkeypatch):
    monkeypatch.delenv("VTOOLKIT_KERNELS", raising=False)
    h = torch.randn(2, 5, 4, requires_grad=True)
    assert kernels.backend_for(h) == "torch"
    out = kernels.gather_kept(h, torch.tensor([[0, 3], [1, 4]]))[0]
    out.sum().backward()
    assert h.grad[:, :, 0].tolist() == [[1, 0, 0, 1, 0], [0, 1, 0, 0, 1]]


def test_import_without_triton_and_forced_triton_error():
    """In a process where ``import triton`` fails: the package imports, auto runs torch, forcing triton names the fix."""
    code = textwrap.dedent('''
        import sys
        sys.modules["triton"] = None          # makes `import triton` raise ImportError
        import importlib.util
        importlib.util.find_spec = (lambda f: lambda name, *a: None if name == "triton" else f(name, *a))(
            importlib.util.find_spec)
        import os, torch
        import vtoolkit.kernels as K
        h, p, m = K.gather_kept(torch.arange(6.0).view(1, 3, 2), torch.tensor([[2]]))
        assert h.tolist() == [[[4.0, 5.0]]]
        os.environ["VTOOLKIT_KERNELS"] = "triton"
        try:
            K.gather_kept(torch.zeros(1, 3, 2), torch.tensor([[2]]))
        except RuntimeError as e:
            print("ERR:", e)
    ''')
    env = {k: v for k, v in os.environ.items() if k not in ("VTOOLKIT_KERNELS", "TRITON_INTERPRET")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ERR: VTOOLKIT_KERNELS=triton but triton is not installed: pip install 'vtoolkit[triton]'" in res.stdout
