"""The OpenAI-compatible HTTP server: request validation and response shapes (protocol.py), stop strings over streamed
text (text.py), the routes (app.py), the chat page (page.html) and the process around them (server.py). It never runs
the model: it submits requests to the engine and reads their outputs. Needs the `serve` extra (FastAPI, uvicorn)."""
