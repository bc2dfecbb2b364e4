"""``torch.compile`` through ``bi_wkv`` (the custom op ``medurwkv::bi_wkv``), on CPU.

The operator alone is compiled with Inductor and ``fullgraph=True`` (no graph break at ``bi_wkv``); a small
Med-URWKV-T (the VRWKV-T encoder, a one-block decoder, a 32x32 image) is compiled with the ``aot_eager``
backend, which runs the same capture, fake-tensor propagation and autograd as Inductor without generating
C++ for the whole network (Inductor takes minutes for it on one core).
"""

from __future__ import annotations

import pytest
import torch

from medurwkv.ops import bi_wkv


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch):
    monkeypatch.delenv("MEDURWKV_BIWKV_BACKEND", raising=False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_custom_op_is_registered_with_fake_and_autograd():
    w, u = torch.randn(8) / 5, torch.randn(8) / 5
    k, v = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    # the op's schema, fake kernel and autograd formula pass torch's own consistency checks
    torch.library.opcheck(torch.ops.medurwkv.bi_wkv.default, (w, u, k, v, None))
    torch.library.opcheck(torch.ops.medurwkv.bi_wkv.default, (w.requires_grad_(), u, k.requires_grad_(), v, "torch"))


def test_inductor_fullgraph_matches_eager():
    g = torch.Generator().manual_seed(0)
    w, u = torch.linspace(-5, 3, 16) / 9, torch.randn(16, generator=g) / 9
    k, v = torch.randn(2, 9, 16, generator=g), torch.randn(2, 9, 16, generator=g)

    def f(w, u, k, v):
        return (bi_wkv(w, u, 2 * k, v) + 1).sin()

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    eager_in = [t.clone().requires_grad_() for t in (w, u, k, v)]
    comp_in = [t.clone().requires_grad_() for t in (w, u, k, v)]
    f(*eager_in).square().sum().backward()
    y = compiled(*comp_in)
    y.square().sum().backward()
    torch.testing.assert_close(y, f(w, u, k, v), rtol=1e-6, atol=1e-6)
    for a, b in zip(comp_in, eager_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_compiled_med_urwkv_t_matches_eager():
    # inference (the backward through the compiled op is checked above and in test_biwkv_backend.py)
    from medurwkv.nets.medurwkv import MedURWKV

    torch.manual_seed(0)
    model = MedURWKV(1, 2, variant="tiny", encoder="plain", bottleneck_depth=1, decoder_depths=(1, 1, 1),
                     decoder_dims=(32, 32, 32, 32), drop_path_rate=0.0).eval()
    ops = []

    def backend(gm, example_inputs):  # aot_eager, counting the Bi-WKV ops captured in the graphs
        ops.extend(n for n in gm.graph.nodes if "medurwkv.bi_wkv" in str(n.target))
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, backend=backend)(x)
    assert (compiled - eager).abs().max() <= 1e-5 * eager.abs().max()
    assert len(ops) == 16  # 12 encoder blocks, 1 bottleneck, 3 decoder blocks: each bi_wkv is in a graph
