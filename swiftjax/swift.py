"""Public name of the SWIFT head and its losses: :mod:`swiftjax.methods.swift.head`."""
from swiftjax.methods.swift.head import *  # noqa: F401,F403
from swiftjax.methods.swift.head import __all__  # noqa: F401
