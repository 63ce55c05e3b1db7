"""A script or notebook that only submits and watches jobs imports httpx and websockets, not
the server: no FastAPI, no torch."""

from __future__ import annotations

import subprocess
import sys

HEAVY = (
    "torch",
    "fastapi",
    "starlette",
    "uvicorn",
    "sklearn",
    "trainbus.worker",
    "trainbus.subscribers",
)

CHECK = """
import sys
{imports}
heavy = sorted(name for name in {heavy!r} if name in sys.modules)
print(",".join(heavy))
"""


def _heavy_after(imports: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", CHECK.format(imports=imports, heavy=HEAVY)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout.strip()


def test_the_client_imports_neither_torch_nor_fastapi() -> None:
    assert _heavy_after("from api import TrainbusClient, AsyncTrainbusClient") == ""
    assert _heavy_after("import api.client") == ""


def test_the_clis_client_commands_import_neither_torch_nor_fastapi() -> None:
    imports = (
        "import contextlib, io\n"
        "from api.cli import build_parser, main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['jobs', '--url', 'http://127.0.0.1:9', '--token', 'not-a-real-token'])"
    )
    assert _heavy_after(imports) == ""


def test_the_server_names_still_load_on_first_use() -> None:
    assert _heavy_after("from api import create_app, Settings") != ""
