"""Peers in their own Python environments: one subprocess per peer and size ramp, talking through files.

The runner saves the problem (x and the weights, torch orientation) as problem.npz, writes spec.json and runs
``PYTHON worker.py spec.json``; the worker writes result.json and the kernel at the measured size as K_<n>.npy
(protocol in peer_worker.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from typing import Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PEER_WORKER = os.path.join(HERE, "peer_worker.py")
NT_WORKER = os.path.join(HERE, "nt_worker.py")


def default_python(env_var: str, names: Sequence[str]) -> Optional[str]:
    """$env_var, else the first <root>/<name>/bin/python found in the repository or its parent folder."""
    if os.environ.get(env_var):
        return os.environ[env_var]
    for name in names:
        for root in (REPO, os.path.dirname(REPO)):
            p = os.path.join(root, name, "bin", "python")
            if os.path.exists(p):
                return p
    return None


class SubprocessRunner:
    """Runs one peer in another Python (its own venv) on the problem saved in a temporary folder."""

    def __init__(self, method: str, python: str, script: str, problem_npz: str, spec_base: dict, tmp: str,
                 timeout: float):
        self.method, self.python, self.script = method, python, script
        self.npz, self.spec_base, self.tmp, self.timeout = problem_npz, spec_base, tmp, timeout
        self.versions: dict = {}

    def run(self, ramp: dict) -> dict:
        """Run the worker over the size ramp; returns its result.json (raises RuntimeError when it fails)."""
        out = tempfile.mkdtemp(dir=self.tmp, prefix=self.method + "-")
        spec = dict(self.spec_base, method=self.method, data=self.npz, out=out, ramp=ramp, save=True)
        path = os.path.join(out, "spec.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        r = subprocess.run([self.python, self.script, path], capture_output=True, text=True, env=env,
                           timeout=self.timeout)
        res_path = os.path.join(out, "result.json")
        if r.returncode != 0 or not os.path.exists(res_path):
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"{self.method} worker failed (rc {r.returncode}): " + " | ".join(tail))
        with open(res_path) as f:
            res = json.load(f)
        self.versions = res.get("versions", {})
        return res
