"""The ``omnipose`` command line: one home that both the service and the training code hang from.

Neither ``service/`` nor ``training/`` imports this package or each other; each subcommand's
module is imported only when that subcommand runs (see :mod:`omnipose.cli.main`).
"""
