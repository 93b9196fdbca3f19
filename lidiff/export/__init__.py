"""Export a lidiff run directory as a diffusers-format folder: ``python -m lidiff.export --workdir DIR --out DIR``.

``run_export.export_run`` does the work (what is read and written is in its docstring); ``pipelines`` decides which
diffusers pipeline, if any, reproduces the run's sampling; ``lidiff.convert.to_diffusers`` and
``lidiff.convert.diffusers_configs`` convert the weights and configs.
"""
