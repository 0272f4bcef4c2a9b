"""`python -m medx.serve MODEL`: a medx model as an HTTP service (FastAPI + uvicorn).

`settings` (flags and `MEDX_SERVE_*` variables), `limits` (what is refused, and how early),
`uploads` (request → pixels), `model` (the loaded model and its backends), `app` (routes).
"""
