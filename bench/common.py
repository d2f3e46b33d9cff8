"""Helpers shared by the benchmarks: tables, JSON results, process memory, page cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def table(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * len(title)] + [f"{k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def drop_page_cache() -> bool:
    """Writes back and drops the page cache (needs root); returns whether it was done."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakSampler:
    """Samples a process's RssAnon (anonymous memory only: file-backed mapped pages do not count)."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid, self.interval = pid, interval
        self.peak_anon_kb = 0
        self.peak_hwm_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_anon_kb = max(self.peak_anon_kb, status_kb(self.pid, "RssAnon"))
            self.peak_hwm_kb = max(self.peak_hwm_kb, status_kb(self.pid, "VmHWM"))
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_sampled(cmd: list[str], env: dict | None = None) -> tuple[subprocess.CompletedProcess, float, PeakSampler]:
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    sampler = PeakSampler(proc.pid)
    out, err = proc.communicate()
    sampler.stop()
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(err)
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), elapsed, sampler


def mid_models(workdir: str) -> tuple[str, dict[str, str]]:
    """The `mid` preset in the release layout and converted to native int8 and int4 (made once, reused)."""
    from grok1.config import PRESETS
    from grok1.convert import convert_to_native
    from grok1.synth import write_release

    release = os.path.join(workdir, "mid-release")
    if not os.path.isfile(os.path.join(release, "config.json")):
        write_release(release, PRESETS["mid"], seed=0, force=True)
    paths = {}
    for quant in ("int8", "int4"):
        paths[quant] = os.path.join(workdir, f"mid-{quant}")
        if not os.path.isfile(os.path.join(paths[quant], "config.json")):
            convert_to_native(release, paths[quant], quant=quant, force=True, progress=False)
    return release, paths
