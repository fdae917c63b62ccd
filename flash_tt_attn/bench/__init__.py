"""Reproducible benchmark pipeline: YAML specs -> raw JSONL logs -> tables and figures.

Run ``python -m flash_tt_attn.bench --help``. Nothing here is imported by ``import flash_tt_attn``;
pandas, seaborn, matplotlib, yaml and tqdm are imported only inside the functions that need them.

Files, one job each:

    spec.py       load and validate ``experiments/*.yaml``; expand sweeps into points
    providers.py  the implementations compared (our kernel, naive PyTorch, SDPA, flex, trifast, cuEquivariance)
    measure.py    time one call (do_bench / perf_counter), its peak memory, its error against fp64
    env.py        provenance of a row (GPU, driver, versions, git sha) and the GPU slug of the log folder
    logs.py       append-only JSONL logs: read (skipping broken lines), repair a torn tail, append+fsync
    runner.py     the ``run`` command: measure the points a log does not hold yet
    tables.py     tidy CSV and Markdown tables from the newest row of each point
    figures.py    latency / memory vs L figures with deterministic bytes
    build.py      the ``figures`` command: logs -> paper_figures/ (tables, figures, README index)
"""
