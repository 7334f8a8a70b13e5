#!/usr/bin/env python3
"""Instructions the daemon spent on its controller in a callgrind dump (argv[1]).

The controller's loop (a tick a second; the boot watchdog's scan of every booting node
every 15 s) and every SQL statement run meanwhile (the cached GET /ipxe/{uuid} path runs
none): the work scripts/callgrind-ipxe.sh prints apart from the request path. A
function's inclusive cost is the sum of the calls into it from outside it.
"""
import re
import sys

BACKGROUND = re.compile(
    r"^bearman::controller::Controller::run::"
    r"|^<sqlx_sqlite::connection::execute::ExecuteIter as "
)


def background_instructions(path):
    caller = callee = None
    in_call = False
    total = 0
    with open(path, errors="replace") as dump:
        for line in dump:
            if line.startswith("fn="):
                caller = line[3:].rstrip("\n")
            elif line.startswith("cfn="):
                callee = line[4:].rstrip("\n")
            elif line.startswith("calls="):
                in_call = True
            elif in_call and line[:1] and (line[0].isdigit() or line[0] in "+-*"):
                in_call = False
                if BACKGROUND.search(callee) and not BACKGROUND.search(caller):
                    total += int(line.split()[1])
    return total


if __name__ == "__main__":
    print(background_instructions(sys.argv[1]))
