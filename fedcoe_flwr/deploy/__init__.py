"""Deployment helpers: export per-site image folders from a configured data set
(``sites``) and run a real SuperLink + SuperNodes on 127.0.0.1 (``local``).

    python -m fedcoe_flwr.deploy.local --nodes 3 --tls --rounds 2
    python -m fedcoe_flwr.deploy.sites --config configs/deploy.yaml --out deploy-data

See docs/DEPLOYMENT.md."""
