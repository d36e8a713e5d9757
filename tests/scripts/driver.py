"""A generated-proxy style script: Azure ML calls driver_module.run directly."""
import driver_target as driver_module  # noqa: F401 - found on AML_APP_ROOT, as in Azure ML


def init():
    driver_module.init()


def run(data):
    return {"from": "driver proxy"}
