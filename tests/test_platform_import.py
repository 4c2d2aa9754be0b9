"""The repo root holds a `platform/` folder (our `openllama` package); `import platform` must still be the stdlib's."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from openllama import ray_jobs

REPO = Path(__file__).resolve().parents[1]
STDLIB_PLATFORM = str(Path(sysconfig.get_path("stdlib")) / "platform.py")
PROBE = "import platform; print(platform.__file__); print(platform.python_version())"


def test_import_platform_under_pytest_is_the_stdlib():
    import platform

    assert platform.__file__ == STDLIB_PLATFORM
    assert platform.python_version().startswith("3.")


def test_import_platform_from_python_c_in_the_repo_root_is_the_stdlib():
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[0] == STDLIB_PLATFORM


def test_import_platform_from_python_m_in_the_repo_root_is_the_stdlib():
    """`python -m` puts the current folder first on sys.path, like `-c`; timeit runs the probe there."""
    result = subprocess.run(
        [sys.executable, "-m", "timeit", "-n", "1", "-r", "1",
         f"import platform; assert platform.__file__ == {STDLIB_PLATFORM!r}, platform.__file__"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr


def test_import_platform_in_a_ray_job_with_the_repo_as_working_dir_is_the_stdlib(ray_head, tmp_path):
    log = tmp_path / "job.log"
    ray_jobs.submit(["python", "-c", PROBE], api_url=ray_head.dashboard_url, env={**os.environ, **ray_head.env},
                    working_dir=REPO, submission_id="probe-import-platform", log_path=log,
                    echo=open(os.devnull, "w"))
    assert STDLIB_PLATFORM in log.read_text().splitlines()
