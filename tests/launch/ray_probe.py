"""A Ray driver for tests of kiln.launch.ray_slurm: joins the cluster at $RAY_ADDRESS, runs a task,
and prints what it saw as one JSON line prefixed `probe: `.

    --stubborn   also leave what Ray's own shutdown would not end: an actor that ignores SIGTERM, and
                 an orphan (`sleep`, daemonized by a task), as NeMo Curator's workers did (field notes)
    --hold FILE  then wait (at most 120 s) until FILE exists, so a test can look at the live cluster
    --exit N     then exit with N (a failing driver)
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import ray


@ray.remote
def where() -> dict:
    import kiln

    return {"host": socket.gethostname(), "pid": os.getpid(), "kiln": kiln.__file__,
            "auth": os.environ.get("RAY_AUTH_MODE")}


@ray.remote
def orphan() -> None:
    subprocess.run(["bash", "-c", "setsid sleep 600 </dev/null >/dev/null 2>&1 &"], check=True)


@ray.remote
class Stubborn:
    def __init__(self):
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def pid(self) -> int:
        return os.getpid()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--stubborn", action="store_true")
    p.add_argument("--hold")
    p.add_argument("--exit", type=int, default=0)
    args = p.parse_args()
    ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    report = {"address": os.environ["RAY_ADDRESS"], "auth": os.environ.get("RAY_AUTH_MODE"),
              "nodes": [{"host": n["NodeManagerHostname"], "resources": n["Resources"]} for n in nodes],
              "task": ray.get(where.remote())}
    if args.stubborn:
        actor = Stubborn.options(lifetime="detached", name="stubborn").remote()
        report["stubborn_pid"] = ray.get(actor.pid.remote())
        ray.get(orphan.remote())
    print("probe: " + json.dumps(report), flush=True)
    deadline = time.time() + 120
    while args.hold and not os.path.exists(args.hold) and time.time() < deadline:
        time.sleep(0.5)
    sys.exit(args.exit)
