"""Runs inside `unshare -n`: brings loopback up, runs each command, prints results as JSON."""

import json
import subprocess
import sys
import time

subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
results = []
for argv in json.loads(sys.argv[1]):
    began = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    results.append({"rc": done.returncode, "out": done.stdout, "err": done.stderr,
                    "seconds": time.monotonic() - began})
print(json.dumps(results))
