"""Generic training stack shared by every method.

- :mod:`swiftjax.train.loop`: ``TrainState``, ``OptimizerConfig``/``make_optimizer``,
  ``make_train_step`` (jitted, donated), ``fit`` (eval, early stopping, checkpoints, resume),
  NNX adapters ``nnx_split``/``nnx_loss``.
- :mod:`swiftjax.train.mesh`: ``make_mesh``, ``ShardingRules`` (``HEAD_RULES``,
  ``BASE_MODEL_RULES``), ``shard_params``/``shard_batch``/``shard_state``, the pmap path.
- :mod:`swiftjax.train.ckpt`: ``Checkpointer`` over orbax's CheckpointManager.
- :mod:`swiftjax.train.metrics`: ``JsonlWriter`` (jsonl metrics, process 0 only).
- :mod:`swiftjax.train.distributed`: ``maybe_initialize``, ``host_shard``, ``is_main_process``.

Submodules are imported explicitly (``from swiftjax.train import loop``) so that
``distributed.maybe_initialize`` can run before anything else touches JAX.
"""
