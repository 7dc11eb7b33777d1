"""What the peer workers (bench/_peer_ntk_worker_*.py) share: run one method, record its result or its error.

Imports only the standard library, so that it loads in every peer's venv (torch-based or JAX-based).
"""
from __future__ import annotations

import json
import traceback
from typing import Any, Callable, Dict


def record(res: Dict[str, Any], method: str, out: str, run: Callable[[], Dict[str, Any]]) -> None:
    """res[method] = run(), or the error it raised (kept in the table instead of a number); print the entry and
    rewrite ``out``.json with everything recorded so far (a later crash keeps the finished methods)."""
    try:
        res[method] = run()
    except Exception as e:  # noqa: BLE001 - recorded in the table instead of a number
        res[method] = {"error": f"{type(e).__name__}: {e}"[:500], "trace": traceback.format_exc()[-1500:]}
    print(method, res[method], flush=True)
    with open(out + ".json", "w") as f:
        json.dump(res, f)
