"""The server process: uvicorn around the app. SIGTERM or Ctrl-C stops admitting requests (503), ends open streams with
an error event, lets them flush, and exits 0."""
from __future__ import annotations
import signal, sys
import uvicorn
from tg_llama.serve.app import create_app, shut_down

class _Server(uvicorn.Server):
  def __init__(self, config: uvicorn.Config, app):
    super().__init__(config)
    self.app = app

  def handle_exit(self, sig, frame):
    # first the engine: open streams end now instead of holding uvicorn's graceful shutdown until they finish
    shut_down(self.app)
    super().handle_exit(sig, frame)

def run(model, host: str = "127.0.0.1", port: int = 8000, model_id: str = "default", api_key: str | None = None, log_level: str = "info") -> int:
  app = create_app(model, model_id, api_key)
  server = _Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5), app)
  # uvicorn raises the signal it caught again once it has shut down; these handlers make that a no-op, so we exit 0
  for sig in (signal.SIGINT, signal.SIGTERM): signal.signal(sig, lambda *_: None)
  print(f"serving {model_id} at http://{host}:{port}/ (OpenAI API at http://{host}:{port}/v1)", file=sys.stderr, flush=True)
  server.run()
  return 0
