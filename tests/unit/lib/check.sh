# Shared by the shell tests of tests/unit (sourced, not a test itself):
# counted checks, process liveness and a block of free ports.

pass=0 fail=0
check() { # check NAME COMMAND...: ok/FAIL line, counted in pass / fail
    local name=$1
    shift
    if "$@"; then
        echo "ok   $name"
        pass=$((pass + 1))
    else
        echo "FAIL $name"
        fail=$((fail + 1))
    fi
}

alive() { # alive PID: running (a zombie does not count)
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    s=${s##*) }
    [ "${s:0:1}" != Z ] && [ "${s:0:1}" != X ]
}

free_port_block() { # free_port_block PYTHON: the first of 16 ports free now, below
    # the ephemeral range (32768 up) where other tests' client connections land
    "$1" -c '
import random, socket, sys
for _ in range(50):
    b = 20000 + random.randrange(750) * 16
    try:
        for p in range(b, b + 16):
            s = socket.socket(); s.bind(("127.0.0.1", p)); s.close()
        print(b); sys.exit(0)
    except OSError:
        s.close()
sys.exit(1)'
}
