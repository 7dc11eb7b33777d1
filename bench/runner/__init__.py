"""The side-by-side benchmark runner (``python -m ntk_fast bench`` or ``python -m bench.runner``).

Modules: main (options, the run, saving), case (one (n, h): every method ramped, timed and checked in float64),
problem (the net, its dimensions, flop and memory models), methods (the in-process methods), subprocess_runner
(peers in their own venvs), peer_worker / nt_worker (the scripts those venvs run), ramp (timing, peak memory and
size ramp; pure Python), machine (CPU model, load, file-name slug), report (Markdown), plot (log-log figure).
"""
