"""Everything medx does with MLflow, in one package; nothing below it (models, data) imports it.

`runs` (one run per training job: params, paths as tags, artifacts, honest status), `store`
(tracking stores checked in seconds), `sweep` (the parent run of a `-m` sweep: best job,
leaderboard, its saved view), `reporting` (the callbacks that log the data set and the
selected checkpoint's score and epoch), `datasets` (a data module as an MLflow dataset input),
`views` (links and saved views that open MLflow's UI on the runs table), `compare` (ranking
runs for `medx.compare`), `registry` (register the selected model, open `models:/` URIs),
`pyfunc` (the registered model's code).
"""
