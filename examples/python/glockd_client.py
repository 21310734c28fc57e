"""A complete glockd client in the Python standard library (see "Writing a client")."""
import socket


class Glockd:
    def __init__(self, host="127.0.0.1", port=9999, timeout=10.0, user=None, token=None):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")
        if user and self.ask("auth %s %s" % (user, token))[0] != 1:  # a server with -users
            raise PermissionError("auth refused for user " + user)
        self.ask("framed")  # count the lines of every listing from now on

    def close(self):  # releases every lock this connection holds
        self.file.close()
        self.sock.close()

    def _line(self):
        line = self.file.readline()
        if not line.endswith(b"\n"):
            raise ConnectionError("the server closed the connection")
        return line[:-1].decode("utf-8", "replace")

    def ask(self, command):
        """Sends one command; returns its reply's integer and text."""
        if "\n" in command:
            raise ValueError("a command is one line")
        self.sock.sendall(command.encode() + b"\n")
        number, _, text = self._line().partition(" ")
        return int(number), text

    def listing(self, command):
        """d, sd, h, who, q: the lines of the reply (framed: a count line first)."""
        count, text = self.ask(command)
        return [self._line() for _ in range(count)]

    def get(self, name):
        return self.ask("g " + name)[0] == 1

    def release(self, name):
        return self.ask("r " + name)[0] == 1

    def get_wait(self, name, ms):
        return self.ask("gw %d %s" % (ms, name))[0] == 1

    def shared_get(self, name):
        return self.ask("sg " + name)[0]

    def stats(self):
        return dict(line.split(": ", 1) for line in self.listing("q"))


if __name__ == "__main__":
    import sys
    lock = Glockd(port=int(sys.argv[1]) if len(sys.argv) > 1 else 9999)
    print("got", lock.get("report-42"), "again", lock.get("report-42"))
    print("holders", lock.listing("d report-42"))
    print("locks", lock.stats()["locks"], "released", lock.release("report-42"))
    lock.close()
