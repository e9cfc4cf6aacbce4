"""Peer gateways installed on demand (only with ``--peers``): LiteLLM's proxy in its own venv."""
from __future__ import annotations

import subprocess
import sys

from bench.procs import Skip

# 1.106.12: the newest release whose [proxy] extra resolves from PyPI here (1.108+ pin
# litellm-proxy-extras / litellm-proxy builds that are not published); 1.107.0 was a compromised release.
LITELLM_SPEC = "litellm[proxy]==1.106.12"


def install_litellm(venv: str, timeout_s: float = 900) -> None:
    """Create ``venv`` and pip-install LiteLLM's proxy into it; raise Skip on failure."""
    print(f"installing {LITELLM_SPEC} into {venv} (once; a few minutes)...", file=sys.stderr, flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
        r = subprocess.run([f"{venv}/bin/pip", "install", "-q", LITELLM_SPEC], capture_output=True, text=True,
                           timeout=timeout_s)
    except (OSError, subprocess.SubprocessError) as e:
        raise Skip(f"could not install {LITELLM_SPEC}: {e}") from e
    if r.returncode != 0:
        tail = [ln for ln in r.stderr.splitlines() if "WARNING" not in ln][-3:]
        raise Skip(f"could not install {LITELLM_SPEC}: " + " | ".join(tail))
