"""The layout holds: SimpleTuner only behind host/, core/ without it, the source tree importable from its root."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import REPO, run_python

PACKAGE = REPO / "src" / "simpletuner_longcat_video"
HOST_IMPORT = re.compile(r"^\s*(?:import simpletuner\b(?!_)|from simpletuner(?:\.\w+)* import\b)", re.M)


def test_no_module_outside_host_imports_simpletuner():
    outside = sorted(
        f"{path.relative_to(REPO)}:{text[: match.start()].count(chr(10)) + 1}"
        for path in PACKAGE.rglob("*.py")
        if "host" not in path.relative_to(PACKAGE).parts
        for text in [path.read_text()]
        for match in HOST_IMPORT.finditer(text)
    )
    assert not outside, f"SimpleTuner imported outside host/: {outside}"
    # The pattern itself finds what it must (a test that cannot fail proves nothing).
    inside = [path for path in (PACKAGE / "host").rglob("*.py") if HOST_IMPORT.search(path.read_text())]
    assert {path.name for path in inside} >= {"family.py", "datasets.py", "patches.py"}
    assert not HOST_IMPORT.search("from simpletuner_longcat_video.core import attention\nimport simpletuner_x\n")


def test_core_imports_and_runs_a_forward_without_simpletuner():
    # A None entry in sys.modules makes `import simpletuner...` raise ImportError at once.
    code = textwrap.dedent(
        """
        import json, sys
        for name in ("simpletuner", "simpletuner.helpers", "simpletuner.helpers.models"):
            sys.modules[name] = None
        import torch
        from simpletuner_longcat_video.core import (
            attention, attention_bsa, checkpoint, conditioning, context_parallel, pipeline, text, transformer,
        )
        from simpletuner_longcat_video.lora import formats
        torch.manual_seed(0)
        model = transformer.LongCatVideoTransformer3DModel(
            hidden_size=32, depth=2, num_heads=2, caption_channels=16, adaln_tembed_dim=16,
            frequency_embedding_size=16,
        )
        x = torch.randn(1, 16, 3, 4, 4)
        out = model(x, torch.full((1,), 500.0), torch.randn(1, 1, 5, 16), num_cond_latents=1, return_dict=False)[0]
        loaded = sorted(n for n, m in sys.modules.items() if m is not None and n.split(".")[0] == "simpletuner")
        # The block bites: the host family (which imports SimpleTuner) cannot import.
        try:
            import simpletuner_longcat_video.host.family  # noqa: F401
            blocked = "not blocked"
        except ImportError as error:
            blocked = str(error)
        print(json.dumps({"shape": list(out.shape), "finite": bool(torch.isfinite(out).all()),
                          "dtype": str(out.dtype), "host_modules": loaded, "blocked": blocked}))
        """
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report.pop("blocked").startswith("No module named 'simpletuner.")
    assert report == {"shape": [1, 16, 3, 4, 4], "finite": True, "dtype": "torch.float32", "host_modules": []}


def _from_repo_root(*args: str) -> subprocess.CompletedProcess:
    # The interpreter puts the current directory first on sys.path: the repository root itself.
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=_plain_env()
    )


def _plain_env() -> dict[str, str]:
    import os

    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def test_transformers_and_the_package_import_from_the_repository_root():
    result = _from_repo_root(
        "-c",
        "import kernels, transformers, simpletuner_longcat_video, json; "
        "print(json.dumps([kernels.__file__, simpletuner_longcat_video.__file__]))",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    kernels_file, package_file = json.loads(result.stdout.strip().splitlines()[-1])
    # PyPI's `kernels` (which transformers needs), not the Triton sources at the root; the installed package.
    assert kernels_file and "site-packages" in kernels_file and not Path(kernels_file).is_relative_to(REPO)
    assert "site-packages" in package_file


def test_export_command_runs_from_the_repository_root():
    result = _from_repo_root("-m", "simpletuner_longcat_video.lora.export", "--help")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--format" in result.stdout and "upstream" in result.stdout
