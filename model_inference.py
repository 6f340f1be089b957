"""Serve the MNIST model over HTTP: `python model_inference.py --help`.

Every flag defaults from the environment (MODEL_PATH, HOST, PORT, ...) through one Settings object.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from mnist_service.logconfig import configure_logging
from mnist_service.process.server import serve
from mnist_service.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", dest="model_path", type=Path, help="TorchScript file (env MODEL_PATH)")
    parser.add_argument("--host", help="interface to bind (env HOST, default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port (env PORT, default 8000)")
    parser.add_argument("--log-level", help="debug, info, warning, error (env LOG_LEVEL)")
    parser.add_argument(
        "--runtime", choices=["torchscript", "onnxruntime"],
        help="what runs the model (env RUNTIME; default torchscript where torch is installed, else onnxruntime)",
    )
    args = parser.parse_args()
    try:
        settings = Settings(**{k: v for k, v in vars(args).items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        sys.exit(f"error: invalid settings: {problems}")
    configure_logging(settings.log_level, settings.log_format)
    sys.exit(serve(settings))


if __name__ == "__main__":
    main()
