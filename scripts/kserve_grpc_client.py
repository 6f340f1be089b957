"""One inference through KServe's InferenceGRPCClient, run in the venv `ensure_kserve_venv` makes.

    .venv-kserve/bin/python scripts/kserve_grpc_client.py HOST:PORT DIGITS.npy [API_KEY]

Sends the uint8 digits (N, 28, 28) twice, as typed contents and as raw bytes, and prints one JSON line per
call: {"mode", "model_version", "prediction"}. KServe pins its own grpcio, protobuf and FastAPI, and ships
its own copy of the protocol's modules, so it lives apart from the service's venv (and process).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

KSERVE = "kserve==0.21.0"
VENV = Path(__file__).resolve().parent.parent / ".venv-kserve"


def ensure_kserve_venv() -> Path:
    """Create .venv-kserve with KServe unless it already imports; return its python."""
    python = VENV / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import kserve"], capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", KSERVE], check=True)
    return python


async def main(target: str, digits_path: str, api_key: str | None) -> None:
    import numpy as np
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    digits = np.load(digits_path).astype(np.uint8)
    headers = [("x-api-key", api_key)] if api_key else None
    async with InferenceGRPCClient(target, retries=0, timeout=30) as client:
        for mode in ("typed", "raw"):
            tensor = InferInput(name="input", shape=list(digits.shape), datatype="UINT8")
            tensor.set_data_from_numpy(digits, binary_data=mode == "raw")
            request = InferRequest(model_name="mnist", infer_inputs=[tensor], request_id=f"kserve-{mode}")
            response = await client.infer(request, headers=headers)
            outputs = {output.name: output.as_numpy() for output in response.outputs}
            print(json.dumps({"mode": mode, "model_version": response.model_version,
                              "prediction": outputs["prediction"].tolist()}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None))
