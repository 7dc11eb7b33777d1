"""Issue 18, faults during long work: SIGKILL the trainer and the solver at seeded random moments, resume, and
end with exactly (bit for bit) the result of an uninterrupted run; no checkpoint or result is left unreadable."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from ntk_fast.dynamics.results import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r'''
import os, sys
import torch
torch.set_num_threads(1)
from ntk_fast import FCNet, kernel_flow, train
from ntk_fast.dynamics.solver import KernelFlowResult
out = globals().get("OUT") or sys.argv[1]
g = torch.Generator().manual_seed(0)
x = torch.randn(40, 5, generator=g, dtype=torch.float64)
y = torch.sign(x[:, 0] + 0.3 * x[:, 1]); y[y == 0] = 1
net = FCNet(5, 32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
ck = os.path.join(out, "train_ckpt.pt")
res = train(net, x, y, 3.0, max_steps=250, checkpoint=ck, checkpoint_every=0.0,
            resume=ck if os.path.exists(ck) else None, progress=False, kernel_points=0)
res.save(os.path.join(out, "train_result"))
A = torch.randn(80, 200, generator=g, dtype=torch.float64)
K = A @ A.t() / 200
yk = torch.sign(A[:, 0]); yk[yk == 0] = 1
ck2 = os.path.join(out, "flow_ckpt.pt")
r2 = kernel_flow(K, yk, max_steps=1500, checkpoint=ck2, checkpoint_every_steps=3,
                 resume=ck2 if os.path.exists(ck2) else None, progress=False)
r2.save(os.path.join(out, "flow_result"))
'''


def _run(folder, kill_after=None, wait_for="train_ckpt.pt"):
    """Run the worker in ``folder``; with kill_after, SIGKILL it that many seconds after ``wait_for`` appears.
    Returns True when the process was killed while still running."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-c", WORKER, str(folder)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kill_after is None:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
        return False
    deadline = time.time() + 120
    while not os.path.exists(folder / wait_for) and p.poll() is None:
        assert time.time() < deadline, "the worker wrote no checkpoint"
        time.sleep(0.02)
    time.sleep(kill_after)
    alive = p.poll() is None
    if alive:
        p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    return alive


def _check_readable(folder):
    """Every checkpoint or result present loads (atomic writes: a kill leaves the old file or the new one)."""
    for f, keys in (("train_ckpt.pt", ("engine", "nets")), ("flow_ckpt.pt", ("F", "c")),
                    ("train_result.pt", ("F_train",)), ("flow_result.pt", ("F_train",))):
        if os.path.exists(folder / f):
            load_checkpoint(folder / f, "test", keys)


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_exact(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir()
    run.mkdir()
    threads = torch.get_num_threads()
    try:                        # the uninterrupted reference, in this process (one thread, like the worker)
        exec(compile(WORKER, "worker", "exec"), {"OUT": str(ref)})
    finally:
        torch.set_num_threads(threads)
    rng = random.Random(18)
    killed = 0
    for phase in ("train_ckpt.pt", "flow_ckpt.pt"):   # once in the trainer, once in the solver
        killed += _run(run, kill_after=rng.uniform(0.0, 0.5), wait_for=phase)
        _check_readable(run)
    assert killed >= 1, "no kill landed while the worker was running"
    assert not os.path.exists(run / "flow_result.pt")  # the solver was interrupted before its result
    _run(run)
    _check_readable(run)
    from ntk_fast import FlowResult, KernelFlowResult
    for cls, stem in ((FlowResult, "train_result"), (KernelFlowResult, "flow_result")):
        a, b = cls.load(ref / stem), cls.load(run / stem)
        assert a.statuses == b.statuses
        assert a.status == "max_steps" or cls is KernelFlowResult
        for k in ("F_train", "t", "steps", "attempts"):
            assert torch.equal(getattr(a, k), getattr(b, k)), (stem, k)
        for ha, hb in zip(a.history, b.history):
            assert [r["step"] for r in ha] == [r["step"] for r in hb]
            assert [r["t"] for r in ha] == [r["t"] for r in hb]
    wa, wb = FlowResult.load(ref / "train_result"), FlowResult.load(run / "train_result")
    for pa, pb in zip(wa.nets[0].parameters(), wb.nets[0].parameters()):
        assert torch.equal(pa, pb)


GENERIC_WORKER = r'''
import os, sys
import torch
torch.set_num_threads(1)
from torch import nn
from ntk_fast.dynamics.generic import train_any
out = globals().get("OUT") or sys.argv[1]
g = torch.Generator().manual_seed(0)
x = torch.randn(37, 6, generator=g, dtype=torch.float64)
y = torch.sign(x[:, 0] - 0.4 * x[:, 2]); y[y == 0] = 1
torch.manual_seed(5)
models = [nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 1)).double() for _ in range(2)]
ck = os.path.join(out, "generic_ckpt.pt")
res = train_any(models, x, y, 2.0, dynamics="adam", loss="mse", lr=1e-2, batch_size=5, seed=3, max_steps=400,
                checkpoint=ck, checkpoint_every=0.0, resume=ck if os.path.exists(ck) else None, progress=False)
flat = [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in res.nets]
torch.save({"params": flat, "statuses": res.statuses,
            "steps": [[r["step"] for r in h] for h in res.history]}, os.path.join(out, "generic_result.pt"))
'''


@pytest.mark.slow
def test_sigkill_generic_adam_and_resume_is_bit_exact(tmp_path):
    """The generic trainer (ADAM on minibatches, optimizer state and minibatch RNG in the checkpoint), killed at
    a seeded random moment after its first checkpoint and run again, ends with exactly the uninterrupted run."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir()
    run.mkdir()
    threads = torch.get_num_threads()
    try:
        exec(compile(GENERIC_WORKER, "worker", "exec"), {"OUT": str(ref)})
    finally:
        torch.set_num_threads(threads)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    rng, killed = random.Random(14), 0
    for _ in range(2):
        p = subprocess.Popen([sys.executable, "-c", GENERIC_WORKER, str(run)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while not os.path.exists(run / "generic_ckpt.pt") and p.poll() is None:
            assert time.time() < deadline, "the worker wrote no checkpoint"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.1, 0.5))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            killed += 1
        p.wait(timeout=60)
    assert killed >= 1, "no kill landed while the worker was running"
    saved = load_checkpoint(run / "generic_ckpt.pt", "test", ("host",))["host"]["step"]
    assert 0 < max(saved) < 400, saved           # the last run resumes from the middle
    p = subprocess.run([sys.executable, "-c", GENERIC_WORKER, str(run)], env=env, capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    a, b = torch.load(ref / "generic_result.pt"), torch.load(run / "generic_result.pt")
    assert a["statuses"] == b["statuses"] and a["steps"] == b["steps"]
    for pa, pb in zip(a["params"], b["params"]):
        assert torch.equal(pa, pb)
