"""Thin adapters that put pyperf's DDP comm hooks into training frameworks (docs/integrations.md):

    from pyperf.integrations.lightning import CommHook               # a Lightning Callback
    from pyperf.integrations.transformers import CommHookCallback    # a transformers TrainerCallback

Accelerate needs no adapter: hooks.register(accelerator.prepare(model), kind), then
accelerator.register_for_checkpointing(state.all_ranks()).

Importing pyperf or this package imports no framework; each module imports its own when it is imported, and none of
them is a dependency of pyperf.
"""
