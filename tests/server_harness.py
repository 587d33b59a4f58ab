"""Start the real server (uvicorn with blockdiff's HTTP protocol, in a thread) on a free 127.0.0.1 port."""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import uvicorn

from blockdiff.engine.engine import LLM
from blockdiff.server.app import ServerConfig, create_app
from blockdiff.server.http_server import Protocol, Server

MODEL = "tiny"
KEY = "test-key"


@dataclass
class Running:
    url: str
    app: object
    llm: LLM

    @property
    def engine(self):
        return self.app.state.engine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model_dir, max_num_seqs=4, max_queue=8, max_model_len=512, api_key=KEY, header_timeout=10.0,
                   **config):
    llm = LLM(model_dir, max_num_seqs=max_num_seqs, max_model_len=max_model_len)
    app = create_app(llm, ServerConfig(MODEL, api_key=api_key, max_queue=max_queue, **config))
    port = free_port()
    protocol = type("Protocol", (Protocol,), {"header_timeout": header_timeout})
    server = Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", http=protocol,
                                   timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield Running(f"http://127.0.0.1:{port}", app, llm)
    finally:
        server.should_exit = True
        thread.join(30)


def metric(text: str, name: str) -> float:
    """The value of one sample line of a Prometheus exposition (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0
