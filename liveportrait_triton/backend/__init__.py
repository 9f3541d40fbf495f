"""Logic of the Python-backend models, testable without a Triton server; the repository's `model.py` files are
thin adapters over it. One module per job: `tensors` (DLPack interop), `model_config` (config checks), `requests`
(request parsing and validation), `sequences` (per-sequence state and eviction), `pipeline_model` (the
`liveportrait` sequence model), `bls` (the pipeline's runner over BLS), `subnetwork` (a served sub-network),
`outcomes` (what a request gets back).
"""
