"""Diagnostics of the installation (``python -m ntk_fast doctor``)."""
