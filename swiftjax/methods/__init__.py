"""The five methods, one folder each: a pure, jittable core beside a ``pipeline`` module that
does files, caches and reports. Nothing here imports the embedded world: every pipeline takes
a :class:`swiftjax.backbone.Backbone` and a :class:`swiftjax.tasks.Task`."""
