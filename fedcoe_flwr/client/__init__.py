"""The ClientApp side: ``handlers`` (train, evaluate, cold start, profile), ``node`` (who
this node is, from its node config), ``private_state`` (private parts on disk) and
``onboarding`` (a new site adapting the cold-start package)."""
