"""ClientApp: the same code runs in Ray simulation and as a networked SuperNode."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedcoe_flwr.cli import quiet_user_errors_in_flower_logs
from fedcoe_flwr.client import handlers
from fedcoe_flwr.client.onboarding import handle_onboard

quiet_user_errors_in_flower_logs()
app = ClientApp()


@app.query("profile")
def profile(msg: Message, context: Context) -> Message:
    return handlers.handle_profile(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handlers.handle_train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return handlers.handle_evaluate(msg, context)


@app.evaluate("coldstart")
def coldstart(msg: Message, context: Context) -> Message:
    return handlers.handle_coldstart(msg, context)


@app.evaluate("prior")
def prior(msg: Message, context: Context) -> Message:
    return handlers.handle_prior(msg, context)


@app.query("onboard")
def onboard(msg: Message, context: Context) -> Message:
    return handle_onboard(msg, context)
