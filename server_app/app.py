"""ServerApp: load and validate the config once, then run the round loop."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcoe_flwr.server.run import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, context.run_config)
