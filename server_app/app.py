"""ServerApp: load and validate the config once, then run the round loop."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcoe_flwr.cli import quiet_user_errors_in_flower_logs
from fedcoe_flwr.server.run import run_server

quiet_user_errors_in_flower_logs()
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, context.run_config)
