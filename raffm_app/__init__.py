"""The composition at the top: the ``raffm`` command line and ``raffm demo``, which wire the services and the agent.

Nothing below imports this package: the core (``raffm``) stands alone, the services and the agent depend on the core
and the contract, and this package puts them together for a user.
"""
