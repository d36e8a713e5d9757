"""A script that uses asyncio as scripts with async clients do: asyncio.get_event_loop() in init() and in run(),
which Azure ML's server calls on its main thread (where the default policy makes a loop on first use): the same loop
in both."""
import asyncio


def init():
    global loop_at_init
    loop_at_init = asyncio.get_event_loop()


async def double(data):
    await asyncio.sleep(0)
    return data * 2


def run(data):
    loop = asyncio.get_event_loop()
    return {"doubled": loop.run_until_complete(double(data)), "init_loop": loop is loop_at_init}
