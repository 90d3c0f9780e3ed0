"""An OpenAI-compatible HTTP server for any model `sparsecraft.load` opens, with continuous batching.

`settings` (what to serve), `engine` (one thread decoding every running request a token per step, rows joining
and leaving its KV cache: `kvbatch`), `app` (FastAPI routes; `protocol` request models, `prompts`, `responses`,
`errors`, `limits`), `server` (bind, uvicorn, graceful drain), `process` (a server in a child process, for the
load benchmark). Needs the `serve` extra: fastapi, uvicorn.
"""
