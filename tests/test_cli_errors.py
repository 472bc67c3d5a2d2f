"""Command-line errors are one clear line, never a traceback."""

from __future__ import annotations

import subprocess
import sys

from tests.test_cli import ROOT


def test_a_missing_optional_package_is_one_line_naming_it() -> None:
    """A command whose package is absent (an optional extra not installed) says what to install, in one line."""
    # sys.modules[name] = None makes importing it fail as if it were not installed.
    program = (
        "import sys; sys.modules['aiohttp.web'] = None; from proxy.cli import main; "
        "sys.exit(main(['emulator', '--listen', '127.0.0.1:0']))"
    )
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "ImportError" not in done.stderr, done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "'aiohttp.web'" in done.stderr and "pip install" in done.stderr, done.stderr
