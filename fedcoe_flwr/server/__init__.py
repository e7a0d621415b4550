"""The ServerApp side, as small Flower glue plus callbacks:

- ``run``: config and data checks before round 1, then the round loop or serving mode;
- ``loop``: the round loop (sample, send, validate, aggregate, evaluate);
- ``nodes``: which SuperNode is which client (discovery, nodes that join later);
- ``messages``: building messages and counting their bytes;
- ``validation``: the generic checks of a reply (the method adds its own);
- ``evaluation``: the three metrics (global, personalised, cold-start);
- ``onboarding``: the cold-start package for new sites, its registry, serving mode;
- ``callbacks/``: results files, checkpoints, summary and plots, one concern per file."""
