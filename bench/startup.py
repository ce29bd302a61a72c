"""How fast ``ckptctl`` starts, against typer's own import (the floor for a typer app).

Shell completion runs ``ckptctl`` on every TAB, so ``--help`` and the completion call must stay close to
``python -c "import typer"``. Prints medians of N runs and the ratios. Usage: python bench/startup.py [N]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time


def median_seconds(argv: list[str], runs: int, env: dict[str, str] | None = None) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    py = sys.executable
    bare = median_seconds([py, "-c", "pass"], runs)
    floor = median_seconds([py, "-c", "import typer"], runs)
    help_time = median_seconds([py, "-m", "ckptctl", "--help"], runs)
    list_help = median_seconds([py, "-m", "ckptctl", "list", "--help"], runs)
    tab_env = dict(os.environ, _CKPTCTL_COMPLETE="complete_bash", COMP_WORDS="ckptctl li", COMP_CWORD="1")
    tab = median_seconds([py, "-m", "ckptctl"], runs, env=tab_env)
    print(f"runs per figure: {runs}")
    print(f"python -c pass              {bare * 1000:7.1f} ms")
    print(f"python -c 'import typer'    {floor * 1000:7.1f} ms   (floor)")
    print(
        f"ckptctl --help              {help_time * 1000:7.1f} ms   ratio {help_time / floor:.2f}x  (goal <= 1.25x)"
    )
    print(f"ckptctl list --help         {list_help * 1000:7.1f} ms   ratio {list_help / floor:.2f}x")
    print(f"completion (TAB)            {tab * 1000:7.1f} ms   ratio {tab / floor:.2f}x")


if __name__ == "__main__":
    main()
