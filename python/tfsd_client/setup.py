"""Build hook: generates the tfsd.v1 stubs from the repository's proto/ into the built package.

The stubs are not checked in: they are generated from `proto/tfsd/v1/tfsd.proto` (found at
`../../proto`, or `$TFSD_PROTO_ROOT`) into `tfsd_client/_gen/` of the build, with their
imports rewritten to live under `tfsd_client._gen`. The TensorProto they use stays
TensorFlow's own `tensorflow.core.framework.tensor_pb2`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
API_PROTO = "tfsd/v1/tfsd.proto"


def proto_root() -> Path:
    root = Path(os.environ.get("TFSD_PROTO_ROOT", HERE.parent.parent / "proto"))
    if not (root / API_PROTO).is_file():
        raise SystemExit(f"tfsd-client: {root / API_PROTO} not found; set TFSD_PROTO_ROOT")
    return root


def generate(out: Path) -> None:
    import grpc_tools

    out.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    # In a child process: grpc_tools' compiler crashes in a process that has TensorFlow loaded.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={proto_root()}",
            f"--proto_path={well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            API_PROTO,
        ],
        check=True,
    )
    for package in (out, out / "tfsd", out / "tfsd" / "v1"):
        (package / "__init__.py").touch()
    for module in (out / "tfsd" / "v1").glob("*.py"):
        text = module.read_text()
        text = re.sub(r"^from tfsd\.v1 import", "from tfsd_client._gen.tfsd.v1 import", text, flags=re.M)
        module.write_text(text)


class BuildWithStubs(build_py):
    def run(self) -> None:
        super().run()
        generate(Path(self.build_lib) / "tfsd_client" / "_gen")


setup(cmdclass={"build_py": BuildWithStubs})
