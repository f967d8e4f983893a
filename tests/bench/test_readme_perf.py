"""The README's performance section is what bench/readme_perf.py generates from the committed JSON."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_perf_section_is_generated():
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "readme_perf.py"), "--check"], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0, "README perf section is stale: run `python bench/readme_perf.py`\n" + p.stderr
