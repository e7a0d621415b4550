"""A local deployment for trials and tests: per-site image folders cut from a configured data
set (``sites``) and a real SuperLink + SuperNodes on 127.0.0.1 (``deployment``, run from the
command line by ``local``).

    python -m tools.deploy.local --nodes 3 --tls --rounds 2
    python -m tools.deploy.sites --config configs/deploy.yaml --out deploy-data

See docs/DEPLOYMENT.md."""
