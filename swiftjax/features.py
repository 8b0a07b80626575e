"""Public name of SWIFT's features and fused scoring: :mod:`swiftjax.methods.swift.features`."""
from swiftjax.methods.swift.features import *  # noqa: F401,F403
from swiftjax.methods.swift.features import __all__  # noqa: F401
