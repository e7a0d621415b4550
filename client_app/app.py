"""ClientApp: the same code runs in Ray simulation and as a networked SuperNode."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedcoe_flwr import client

app = ClientApp()


@app.query("profile")
def profile(msg: Message, context: Context) -> Message:
    return client.handle_profile(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return client.handle_train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return client.handle_evaluate(msg, context)


@app.evaluate("coldstart")
def coldstart(msg: Message, context: Context) -> Message:
    return client.handle_coldstart(msg, context)


@app.query("onboard")
def onboard(msg: Message, context: Context) -> Message:
    return client.handle_onboard(msg, context)
