"""Bytes from anyone who reaches a port of the cluster cannot take a process
down (issue 13): every TCP port that any process of a running cluster
listens on — the router's and the store's handshake listeners, UCX's own
transport ports of every process, the HTTP and gRPC ports — gets 17 zero
bytes, 4 KiB of 0xff and then random payloads of random lengths (fixed
seed). Every process must stay up, answer its health check, and the
cluster must give the same answer as before. Loopback only; the ports are
read from `ss`, limited to the cluster's own processes."""

import random
import re
import socket
import struct
import subprocess
import time


from cluster import Cluster, http_get, sanitized

N_RANDOM = 2000 if sanitized() else 10000
QUESTION = "What is the capital of France?"


def listening_ports(pids):
    """{pid: [port, ...]} of the TCP ports each of pids listens on, and the
    set of local addresses they are bound to."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, timeout=30, check=True)
    ports = {pid: [] for pid in pids}
    addrs = set()
    for line in out.stdout.decode().splitlines():
        cols = line.split()
        if len(cols) < 6:
            continue
        local = cols[3]
        host, port = local.rsplit(":", 1)
        host = host.strip("[]").removeprefix("::ffff:")  # v4-mapped (gRPC binds so)
        for m in re.finditer(r"pid=(\d+)", line):
            pid = int(m.group(1))
            if pid in ports and int(port) not in ports[pid]:
                ports[pid].append(int(port))
                addrs.add(host)
    return ports, addrs


def send_bytes(port, payload, rst):
    """One connection that sends payload and goes away (with a reset when rst)."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=2)
    except OSError:
        return False
    try:
        if rst:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if payload:
            s.sendall(payload)
    except OSError:
        pass
    finally:
        s.close()
    return True


def test_garbage_to_every_port():
    with Cluster(prefill=1, decode=1, stores=1) as c:
        before, _ = c.chat(QUESTION, max_tokens=16)
        pids = {p.p.pid: f"{p.role}-{p.index}" for p in c.procs}
        ports, addrs = listening_ports(pids)
        # a cluster on 127.0.0.1 listens on loopback only, UCX's ports too
        assert addrs == {"127.0.0.1"}, addrs
        targets = [(pids[pid], port) for pid, pl in ports.items() for port in pl]
        # tandem's own listeners and at least one UCX transport port each
        assert c.listen_port in ports[c.get("router").p.pid], ports
        store_port = int(c.store_addrs[0].rsplit(":", 1)[1])
        assert store_port in ports[c.get("kvstore").p.pid], ports
        for pid, name in pids.items():
            assert len(ports[pid]) >= 2, f"{name} listens on {ports[pid]} only"
        print(f"\n{len(targets)} ports: " + ", ".join(f"{n}:{p}" for n, p in targets))

        rng = random.Random(13)
        t0 = time.monotonic()
        reached = 0
        for name, port in targets:
            reached += send_bytes(port, bytes(17), rst=False)
            reached += send_bytes(port, b"\xff" * 4096, rst=False)
        for i in range(N_RANDOM):
            name, port = targets[i % len(targets)]
            n = rng.choice((rng.randrange(0, 64), rng.randrange(0, 4096)))
            reached += send_bytes(port, rng.randbytes(n), rst=rng.random() < 0.5)
            if i % 2500 == 2499:  # the cluster keeps serving meanwhile
                for p in c.procs:
                    assert p.alive(), f"{p.role}-{p.index} died:\n{p.log_tail()}"
        took = time.monotonic() - t0
        print(f"{reached} connections with bad bytes in {took:.1f} s")
        assert reached >= N_RANDOM, "most connections were not even accepted"

        time.sleep(0.5)
        for p in c.procs:
            assert p.alive(), f"{p.role}-{p.index} died:\n{p.log_tail()}"
            st, _ = http_get(p.health_port, "/health", timeout=5)
            assert st == 200, f"{p.role}-{p.index} /health {st}"
        after, _ = c.chat(QUESTION, max_tokens=16)
        assert after == before
        with open(c.get("router").log_path, "rb") as f:
            assert b"refused a connection" in f.read()

        # Connections that say nothing hold no door shut: with 300 of them
        # open on the router's and the store's listeners, a new node still
        # connects to both and serves.
        idle = []
        try:
            for port in (c.listen_port, store_port):
                for _ in range(150):
                    idle.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            t1 = time.monotonic()
            c.add_node("decode")  # waits until /ready
            print(f"a new decode node joined in {time.monotonic() - t1:.1f} s "
                  f"past {len(idle)} idle connections")
            c.kill("decode", 0)
            again, _ = c.chat(QUESTION, max_tokens=16)
            assert again == before
        finally:
            for s in idle:
                s.close()
