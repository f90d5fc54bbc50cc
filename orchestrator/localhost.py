"""What this machine has, probed without torch or Ray (for planning a topology with no nodes)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def detect_local_gpus() -> int:
    """Number of NVIDIA GPUs visible to this process (CUDA_VISIBLE_DEVICES respected); 0 when none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v for v in visible.split(",") if v.strip() and v.strip() != "-1"]
        if not ids:
            return 0
    found = 0
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        found = sum(1 for _ in proc.iterdir())
    elif shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
            found = sum(1 for line in out.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            found = 0
    return min(found, len(ids)) if visible is not None else found
