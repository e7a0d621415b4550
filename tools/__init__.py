"""Tools that run beside the app, on the operator's or developer's machine: not installed by
pip (pyproject's ``packages.find`` lists only the app's packages) and not shipped in the FAB
that ``flwr run``/``flwr build`` makes (``fab-exclude`` in ``[tool.flwr.app]``), so no SuperNode
ever receives them. Run them from the repository root, e.g. ``python -m tools.deploy.local``."""
