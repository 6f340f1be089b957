"""TorchServe's files for one start: config.properties, a quiet log4j2.xml, and the model archive.

Everything lives in one folder under benchmarks/out, rebuilt at each start: the model store (a .mar
that torch-model-archiver builds from the same TorchScript file, its .json metadata and
benchmarks/torchserve_handler.py), the logs, and its temp dir (pid file, workers' Unix sockets).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

MODEL_NAME = "mnist"
# Server-side batching in the Java frontend, two Python workers: its users' throughput setup.
MODEL_CONFIG = "minWorkers: 2\nmaxWorkers: 2\nbatchSize: 32\nmaxBatchDelay: 5\n"
# Its default logging writes ~1.5 KB per request (access log, model log, metrics): keep warnings only.
LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT"><PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/></Console>
    <File name="ts_log" fileName="${env:LOG_LOCATION:-logs}/ts_log.log">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="warn"/>
    <Logger name="MODEL_LOG" level="warn"/>
    <Logger name="MODEL_METRICS" level="warn"/>
    <Logger name="TS_METRICS" level="warn"/>
    <Logger name="io.netty" level="error"/>
    <Logger name="org.apache" level="off"/>
    <Root level="warn"><AppenderRef ref="STDOUT"/><AppenderRef ref="ts_log"/></Root>
  </Loggers>
</Configuration>
"""


def prepare(venv: Path, model: Path, ports: dict[str, int], job_queue_size: int, workdir: Path) -> list[str]:
    """Write TorchServe's files into `workdir` (emptied first) and return its command line.

    `ports` holds the free ports for inference, management, metrics, grpc_inference,
    grpc_management and worker: two instances on one machine clash on the gRPC defaults.
    """
    shutil.rmtree(workdir, ignore_errors=True)
    store, logs, tmp = workdir / "model-store", workdir / "logs", workdir / "tmp"
    for folder in (store, logs, tmp):
        folder.mkdir(parents=True)
    (workdir / "model_config.yaml").write_text(MODEL_CONFIG)
    (workdir / "log4j2.xml").write_text(LOG4J2)
    subprocess.run(
        [
            str(venv / "bin" / "torch-model-archiver"), "--model-name", MODEL_NAME, "--version", "1.0",
            "--serialized-file", str(model), "--handler", str(Path(__file__).with_name("torchserve_handler.py")),
            "--extra-files", str(model.with_suffix(".json")), "--config-file", str(workdir / "model_config.yaml"),
            "--export-path", str(store),
        ],
        check=True, capture_output=True,
    )
    host = "http://127.0.0.1"
    (workdir / "config.properties").write_text("\n".join([
        f"inference_address={host}:{ports['inference']}",
        f"management_address={host}:{ports['management']}",
        f"metrics_address={host}:{ports['metrics']}",
        "grpc_inference_address=127.0.0.1",
        f"grpc_inference_port={ports['grpc_inference']}",
        "grpc_management_address=127.0.0.1",
        f"grpc_management_port={ports['grpc_management']}",
        f"initial_worker_port={ports['worker']}",
        "disable_token_authorization=true",
        f"job_queue_size={job_queue_size}",
        # A host-metrics script it runs every minute: monitoring, not serving, and noise in CPU per request.
        "disable_system_metrics=true",
        "",
    ]))
    return [
        str(venv / "bin" / "torchserve"), "--start", "--foreground", "--ncs", "--disable-token-auth",
        "--ts-config", str(workdir / "config.properties"), "--log-config", str(workdir / "log4j2.xml"),
        "--model-store", str(store), "--models", f"{MODEL_NAME}={MODEL_NAME}.mar",
    ]


def environment(workdir: Path) -> dict[str, str]:
    """Logs and metrics into the work folder, the pid file and workers' sockets in its tmp."""
    logs, tmp = str(workdir / "logs"), str(workdir / "tmp")
    return {"LOG_LOCATION": logs, "METRICS_LOCATION": logs, "TEMP": tmp, "TMPDIR": tmp}
