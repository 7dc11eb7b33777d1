"""bench/bench_any_model.py's peers of the cnn case: the ports of the CV that the peer workers build, the skip path,
and (when the peer environments are given by NTK_FAST_PEERS_PYTHON / NTK_FAST_NT_PYTHON) the workers' Grams."""
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

import ntk_fast  # noqa: E402
import bench_any_model as bam  # noqa: E402
import _peer_ntk_worker_torch as worker  # noqa: E402


def small():
    net = ntk_fast.CV(4, generator=torch.Generator().manual_seed(3))
    x = torch.randn(6, 784, generator=torch.Generator().manual_seed(4))
    return net, x


def test_torch_port_is_the_cv():
    """Same forward, same NTK: the Sequential the nngeometry / ASDL worker builds from the CV's weights."""
    net, x = small()
    ws = [c.weight.detach().numpy() for c in net.convs] + [net.readout.weight.detach().numpy()]
    port = worker.cnn(ws, [c.stride[0] for c in net.convs], 5.0, ntk_fast.activation_normaliser("softplus", 5.0),
                      20.0, 1)
    xi = x.reshape(-1, 1, 28, 28)
    torch.testing.assert_close(port(xi)[:, 0], net(x), rtol=1e-5, atol=1e-6)
    K = ntk_fast.empirical_ntk(net, x)
    K2 = ntk_fast.empirical_ntk(port, xi)
    assert ((K - K2).abs().max() / K.abs().max()).item() < 1e-5


def test_missing_interpreters_are_reported_not_fatal():
    net, x = small()
    K = ntk_fast.empirical_ntk(net, x)
    rows = bam.cnn_peers(net, x, K, 1.0, ["nngeometry", "neural-tangents"], None,
                         dict(torch="/nonexistent/python", nt="/nonexistent/python"), 60)
    assert [r["method"] for r in rows] == ["nngeometry", "nt_structured", "nt_jacobian"]
    assert all(r["error"].startswith("skipped: no interpreter") for r in rows)
    table = bam.peer_table(dict(n=6, P=1, ours_s=1.0, torch_func_jac_gram_s=2.0, rel_err_vs_torch_func=1e-7,
                                torch_func_ntk_vp_s_scaled=3.0, ntk_vp_measured_columns=4, floor_s=0.5, peers=rows))
    assert table.count("skipped") == 3


@pytest.mark.parametrize("peers,env", [(["nngeometry", "asdl"], "NTK_FAST_PEERS_PYTHON"),
                                       (["neural-tangents"], "NTK_FAST_NT_PYTHON")])
def test_peer_workers_agree(peers, env):
    py = os.environ.get(env)
    if not py or not os.path.exists(py):
        pytest.skip(f"{env} not set to an interpreter")
    net, x = small()
    K = ntk_fast.empirical_ntk(net, x)
    rows = bam.cnn_peers(net, x, K, 1.0, peers, None, dict(torch=py, nt=py), 600)
    exact = [r for r in rows if r["method"] not in ("asdl_hadamard", "asdl_direct_ntk")]
    for r in exact:
        assert "s" in r, r
        assert r["rel_err_vs_ntk_fast"] < 1e-5, r
    assert np.isfinite([r["s"] for r in exact]).all()
