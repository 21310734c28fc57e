#!/usr/bin/env python3
"""Live upgrade figures: a server with many connections and held locks is upgraded while a
prober times every reply; prints the longest reply wait across the upgrade, the hand-over's
pause and total time (from the server's log), and resident memory before and after.

    python3 loadgen/upgrade-figures.py [--binary target/release/glockd] [--conns 10000]
                                       [--holders 100] [--locks-each 10000]
"""
import argparse, os, resource, shutil, socket, subprocess, sys, tempfile, threading, time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="target/release/glockd")
    ap.add_argument("--conns", type=int, default=10000)
    ap.add_argument("--holders", type=int, default=100)
    ap.add_argument("--locks-each", type=int, default=10000)
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, a.conns + 1000), hard))
    tmp = tempfile.mkdtemp(prefix="glockd-upgrade-figures-")
    exe = os.path.join(tmp, "glockd")
    shutil.copy(a.binary, exe)
    pidfile = os.path.join(tmp, "glockd.pid")
    log = open(os.path.join(tmp, "log.txt"), "w+")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([exe, "-bind", "127.0.0.1", "-port", str(port), "-ws", "0",
                               "-metrics", "off", "-pidfile", pidfile,
                               "-max-connections", str(a.conns + 100)],
                              stdout=subprocess.DEVNULL, stderr=log)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            break
        except OSError:
            time.sleep(0.05)
    conns = []
    for i in range(a.conns):
        conns.append(socket.create_connection(("127.0.0.1", port)))
    # The holders take their locks, pipelined.
    for h in range(a.holders):
        c = conns[h]
        c.sendall(b"".join(b"g l%d-%d\n" % (h, k) for k in range(a.locks_each)))
        want = len(b"1 Got Lock\n") * a.locks_each
        got = 0
        while got < want:
            got += len(c.recv(1 << 20))
    old_pid = server.pid
    old_rss = rss_kib(old_pid)
    # The prober: one command at a time, each reply timed.
    probe = socket.create_connection(("127.0.0.1", port))
    probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    worst = [0.0]
    stop = threading.Event()

    def prober():
        f = probe.makefile("rb")
        while not stop.is_set():
            t = time.perf_counter()
            probe.sendall(b"i l0-0\n")
            line = f.readline()
            assert line == b"1 Locked\n", line
            worst[0] = max(worst[0], time.perf_counter() - t)

    th = threading.Thread(target=prober)
    th.start()
    time.sleep(0.5)
    worst[0] = 0.0
    started = time.perf_counter()
    out = subprocess.run([exe, "upgrade", "-pidfile", pidfile], capture_output=True, text=True)
    took = time.perf_counter() - started
    time.sleep(0.5)
    stop.set()
    th.join()
    new_pid = int(open(pidfile).read().strip())
    new_rss = rss_kib(new_pid)
    # Every holder still holds its locks on the same connection.
    c = conns[a.holders - 1]
    c.sendall(b"r l%d-0\n" % (a.holders - 1))
    assert c.recv(100) == b"1 Released Lock\n"
    log.seek(0)
    done = [l for l in log if "event=upgrade_done" in l]
    print(out.stdout.strip() or out.stderr.strip())
    print(f"connections {a.conns + 1}, locks {a.holders * a.locks_each}")
    print(f"longest reply wait across the upgrade: {worst[0] * 1e3:.1f} ms")
    print(f"glockd upgrade command: {took * 1e3:.0f} ms")
    print(f"resident memory: old {old_rss / 1024:.0f} MiB, new {new_rss / 1024:.0f} MiB")
    if done:
        print(done[0].strip())
    os.kill(new_pid, 9)
    server.wait()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
