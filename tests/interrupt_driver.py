"""Run a command, send it SIGINT (what Ctrl+C sends) once a marker appears on its stderr,
and print its exit code and stderr as JSON. Used inside `unshare -n` by the tests."""

import json
import signal
import subprocess
import sys

marker, argv = sys.argv[1], sys.argv[2:]
child = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
assert child.stderr is not None
lines = []
for line in child.stderr:
    lines.append(line)
    if marker in line:
        child.send_signal(signal.SIGINT)
        break
lines += child.stderr.readlines()
print(json.dumps({"rc": child.wait(), "err": "".join(lines)}))
