"""Everything medx does with MLflow, in one package; nothing below it (models, data) imports it.

`runs` (one run per training job: params, artifacts, honest status), `store` (tracking stores
checked in seconds), `sweep` (the parent run of a `-m` sweep and its leaderboard), `registry`
(register the selected model, open `models:/` URIs), `pyfunc` (the registered model's code).
"""
