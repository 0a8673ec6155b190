"""ml_collections training configs, one module per experiment family (`get_config(arg)` each).

    python -m jax_peft.main --config jax_peft.configs.vtab1k:cifar100,rlrr --workdir DIR

`--config` takes a module path (`jax_peft.configs.<name>[:arg]`, any importable module with a
`get_config`) or a config file path (`path/to/my_config.py[:arg]`).

    smoke    tiny random ViT on generated data (CI, first runs)
    demo     the runs of `python -m jax_peft.demo`
    vtab1k   VTAB-1k cells, each method's official recipe
    fgvc     FGVC cells
    fewshot  few-shot cells
    recipes  the per-method, per-dataset tables and the papers' published numbers
"""
