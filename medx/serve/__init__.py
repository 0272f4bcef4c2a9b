"""`python -m medx.serve MODEL`: a medx model as an HTTP service (FastAPI + uvicorn).

`settings` (flags and `MEDX_SERVE_*` variables), `limits` (what is refused, and how early),
`uploads` (request → a file on disk, reading errors → refusals), `model` (the loaded model
around `medx.inference`, which does all the work: the answers are `medx.predict`'s), `app`
(routes and the answers' pydantic models).
"""
