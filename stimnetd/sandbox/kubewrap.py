"""PID 1 of a Kubernetes job pod (sent as ``python3 -I -B -c <this file>``; stdlib only).

A pod has no host directory the daemon can read, so what the script wrote to /out comes
back on the one channel the API offers, the container log: after the entrypoint exits 0,
one last line ``stimnet-out-v1 {"name": "<base64>", ...}`` holding the regular files
directly in /out. The daemon reads that line with a byte cap (``limitBytes``) and checks
it like a directory it does not trust (`stimnetd.sandbox.kubeout`): the script controls
/out anyway, so a script that forges or garbles the line gains nothing.

RLIMIT_FSIZE and RLIMIT_CORE are set here (Kubernetes has no ulimit setting); with all
capabilities dropped the script cannot raise them.
"""

import base64
import json
import os
import resource
import subprocess
import sys

FRAME = "stimnet-out-v1 "
OUT = os.environ.get("STIMNET_OUT", "/out")


def _limits() -> None:
    fsize = int(os.environ.get("STIMNET_FSIZE_BYTES", "0"))
    if fsize > 0:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _frame() -> str:
    files: dict[str, str | None] = {}
    for entry in os.scandir(OUT):
        if entry.is_file(follow_symlinks=False):
            with open(entry.path, "rb") as fh:
                files[entry.name] = base64.b64encode(fh.read()).decode("ascii")
        else:
            # Not a regular file: named so the daemon refuses the result, as it would a
            # directory or link in a Docker job's /out.
            files[entry.name] = None
    return FRAME + json.dumps(files, sort_keys=True)


def main() -> int:
    argv = os.environ["STIMNET_ENTRYPOINT"].split()
    status = subprocess.call(argv, preexec_fn=_limits)
    if status == 0:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout.write("\n" + _frame() + "\n")
        sys.stdout.flush()
    # A signal's death (negative) is reported the way a shell does.
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    os._exit(main())
