"""The serving node of the conformance suite's subprocess path.

argv: name max_message_size.  Prints "READY <port>" once it listens with
every conformance service started; runs until killed or stdin closes.
"""

from __future__ import annotations

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conf_services import Ctl

import malla


async def main() -> None:
    name, max_message_size = sys.argv[1], int(sys.argv[2])
    node = malla.Node(name, port=0, max_message_size=max_message_size)
    await node.start()
    ctl = Ctl(node)
    await ctl.install()
    await node.start_service(ctl)
    print("READY", node.address[1], flush=True)
    # stdin closing (the test process died) ends this one too
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await node.stop()


malla.run(main())
