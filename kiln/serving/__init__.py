"""`kiln serve`: an OpenAI-compatible HTTP endpoint over an HF directory or a kiln checkpoint.

protocol.py holds the request schemas and response shapes, engine.py what a request computes
(on every rank alike) and its queue, hf.py and megatron.py the two model backends, app.py the
FastAPI routes, and server.py the stage entry (validation, start-up, the ranks' roles).
"""
