"""SIGKILL a writer process part-way through its work (crash-consistency tests)."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


async def sigkill_after(script: Path, *args: str, progress: int) -> int:
    """Run ``python script args...``, which prints ``<word> <count>`` after each step, and SIGKILL
    it once ``count`` reaches ``progress``; returns the last count it printed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO
    )
    try:
        assert proc.stdout is not None
        done = -1
        while done < progress:
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if not line:
                _, err = await proc.communicate()
                raise AssertionError(f"writer exited early with {proc.returncode}: {err.decode()}")
            done = int(line.split()[1])
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return done
