"""The CLI as an operator runs it, through real subprocesses: logging,
metrics, TLS, DNS, seeds from the environment, exit codes by error family,
arguments from stdin, any result printed as valid JSON."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import trustme
from hypothesis import given, settings
from prometheus_client.parser import text_string_to_metric_families
from support import ROOT
from test_cli import ENV, free_port, malla
from test_dns import dns_server  # noqa: F401  (a fixture)

import malla as pkg
from malla.cli_output import EXIT_TABLE, dumps, exit_code
from malla.codec import packb, unpackb

from test_codec import values

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"

FAULTY = '''
import asyncio, os
import malla

class Faulty(malla.Service, global_=True):
    def fail(self, why):
        raise ValueError(why)

    async def slow(self, seconds):
        await asyncio.sleep(seconds)
        return seconds

    def die(self):
        os._exit(1)

    def odd(self):
        return {(1, 2): b"x", "set": {3, 1}, "nan": float("nan"), frozenset({1}): None}
'''


class Node:
    """`malla node` in a subprocess; its stderr read as it comes."""

    def __init__(self, name: str, *extra: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "malla", "node", name, "--port", str(self.port), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or ENV,
            cwd=ROOT)
        self.seed = f"127.0.0.1:{self.port}"
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        first = self.proc.stdout.readline()
        assert "listening on" in first, (first, self.proc.poll(), self.stderr())

    def _read(self) -> None:
        for line in self.proc.stderr:
            self._new.put(line)

    def stderr(self) -> str:
        while not self._new.empty():
            self.lines.append(self._new.get())
        return "".join(self.lines)

    def wait_for_log(self, pattern: str, timeout: float = 15.0) -> str:
        """The first stderr line matching `pattern`, waiting for it."""
        end = time.monotonic() + timeout
        while True:
            for line in self.stderr().splitlines():
                if re.search(pattern, line):
                    return line
            assert time.monotonic() < end, f"no line matches {pattern!r}:\n{self.stderr()}"
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=30)


@pytest.fixture
def nodes():
    made: list[Node] = []

    def start(*args: str, **kw) -> Node:
        made.append(Node(*args, **kw))
        return made[-1]

    yield start
    for node in made:
        node.stop()


# -- logging ---------------------------------------------------------------------

def test_node_logs_joins_leaves_and_draining_with_timestamps(nodes):
    # the flag wins over MALLA_LOG_LEVEL
    n1 = nodes("n1", "--service", "examples.calculator:Calculator", "--log-level", "info",
               env=dict(ENV, MALLA_LOG_LEVEL="error"))
    n1.wait_for_log(rf"^{STAMP} INFO malla\.node: .*n1 listening on 127\.0\.0\.1:{n1.port}")
    n1.wait_for_log(rf"^{STAMP} INFO malla\.hosting: .*n1 started service Calculator")
    n2 = nodes("n2", "--log-level", "debug",
               env=dict(ENV, MALLA_SEEDS=n1.seed))     # a node's seeds from the env
    n1.wait_for_log(rf"^{STAMP} INFO malla\.cluster: .*n1 connected to n2 at "
                    rf"127\.0\.0\.1:{n2.port}$")
    # a client names itself with --name: a hidden node, logged at DEBUG
    # only (probes come every few seconds); `services` joins through n1 and
    # dials n2 too, which logs at DEBUG
    out = malla("services", "--seed", n1.seed, "--name", "probe-client")
    assert out.returncode == 0, out.stderr
    n2.wait_for_log(rf"^{STAMP} DEBUG malla\.cluster: .*n2 connected to probe-client at "
                    r"127\.0\.0\.1:\d+ \(hidden\)$")
    n2.wait_for_log(rf"^{STAMP} DEBUG malla\.cluster: .*n2 lost its connection to probe-client$")
    n2.stop(signal.SIGKILL)
    n1.wait_for_log(rf"^{STAMP} INFO malla\.cluster: .*n1 lost its connection to n2$")
    assert "probe-client" not in n1.stderr()      # n1 logs at INFO: not there
    # a refusal: the wrong cookie
    out = malla("services", "--seed", n1.seed, env=dict(ENV, MALLA_COOKIE="x" * 32))
    assert out.returncode == 5
    n1.wait_for_log(rf"^{STAMP} WARNING malla\.handshakes: .*refused connection from "
                    r"127\.0\.0\.1")
    n1.stop(signal.SIGTERM)
    n1.wait_for_log(rf"^{STAMP} INFO malla\.node: .*n1 draining")
    n1.wait_for_log(rf"^{STAMP} INFO malla\.node: .*n1 stopped")


def test_log_level_from_the_environment(nodes):
    n1 = nodes("n1", env=dict(ENV, MALLA_LOG_LEVEL="warning"))
    n1.stop(signal.SIGTERM)
    assert n1.proc.returncode == 0
    assert " INFO " not in n1.stderr(), n1.stderr()
    bad = subprocess.run([sys.executable, "-m", "malla", "node", "n1", "--port", "0"],
                         capture_output=True, text=True, timeout=30, cwd=ROOT,
                         env=dict(ENV, MALLA_LOG_LEVEL="loud"))
    assert bad.returncode == 2 and "log level 'LOUD'" in bad.stderr


# -- metrics, seeds from the environment, DNS ---------------------------------------

def test_metrics_port_serves_prometheus(nodes):
    mport = free_port()
    n1 = nodes("n1", "--service", "examples.calculator:Calculator", "--metrics-port", str(mport))
    assert json.loads(malla("call", "Calculator.add", "1", "2", "--seed", n1.seed).stdout) == 3
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["malla_calls_in_total"] >= 1, text


def test_max_pending_handshakes_reaches_the_node(nodes):
    mport = free_port()
    n1 = nodes("n1", "--max-pending-handshakes", "2", "--metrics-port", str(mport))
    # three strangers that never say a word: two pending, the third closed unread
    idle = [socket.create_connection(("127.0.0.1", n1.port), timeout=5) for _ in range(3)]
    end = time.monotonic() + 15
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        samples = {s.name: s.value for f in text_string_to_metric_families(text)
                   for s in f.samples}
        if samples["malla_handshakes_refused_total"] >= 1 or time.monotonic() > end:
            break
        time.sleep(0.05)
    assert samples["malla_handshakes_pending"] == 2, text
    assert samples["malla_handshakes_refused_total"] == 1, text
    for s in idle:
        s.close()


@pytest.mark.parametrize("value", ["0", "-3", "1.5", "many"])
def test_max_pending_handshakes_must_be_a_positive_number(value):
    out = malla("node", "x", "--port", "0", "--max-pending-handshakes", value)
    assert out.returncode == 2, out
    assert "usage: malla node" in out.stderr and "Traceback" not in out.stderr
    assert f"--max-pending-handshakes: a number of connections above 0, not '{value}'" \
        in out.stderr


def test_seeds_from_the_environment_and_names_through_a_dns_server(nodes, dns_server):  # noqa: F811
    zone, server = dns_server
    n1 = nodes("n1", "--service", "examples.calculator:Calculator")
    # comma- or space-separated; an unreachable one is skipped
    env = dict(ENV, MALLA_SEEDS=f"127.0.0.1:1, {n1.seed}")
    out = malla("call", "Calculator.add", "2", "3", "--wait", "5", env=env)
    assert out.returncode == 0 and json.loads(out.stdout) == 5, out.stderr
    zone.set_a("cluster.test", ["127.0.0.1"])
    out = malla("call", "Calculator.add", "4", "5", "--seed", f"any@cluster.test:{n1.port}",
                "--dns-server", server)
    assert out.returncode == 0 and json.loads(out.stdout) == 9, out.stderr


# -- TLS -------------------------------------------------------------------------------

@pytest.fixture
def pki(tmp_path):
    """A CA, a certificate for the node and one for the CLI, and one from another CA."""
    def issue(ca: trustme.CA, name: str) -> list[str]:
        cert = ca.issue_cert(name, "127.0.0.1")
        paths = [str(tmp_path / f"{name}.pem"), str(tmp_path / f"{name}.key")]
        cert.cert_chain_pems[0].write_to_path(paths[0])
        cert.private_key_pem.write_to_path(paths[1])
        return paths

    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    other.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))

    def flags(name: str, ca_name: str = "ca") -> list[str]:
        cert, key = issue(ca if ca_name == "ca" else other, name)
        return ["--tls-cert", cert, "--tls-key", key, "--tls-ca", str(tmp_path / f"{ca_name}.pem")]

    return flags


def test_tls_flags_reach_a_tls_cluster(nodes, pki):
    n1 = nodes("n1", "--service", "examples.calculator:Calculator", *pki("n1"))
    n2 = nodes("n2", "--seed", n1.seed, *pki("n2"))
    client = pki("cli")
    out = malla("call", "Calculator.add", "1", "2", "--seed", n2.seed, "--name", "cli", *client)
    assert out.returncode == 0 and json.loads(out.stdout) == 3, out.stderr
    out = malla("services", "--seed", n1.seed, "--json", *client)
    assert out.returncode == 0 and json.loads(out.stdout)[0]["service"] == "Calculator"
    # without TLS the cluster cannot be reached
    out = malla("call", "Calculator.add", "1", "2", "--seed", n1.seed, "--wait", "1")
    assert out.returncode == 5 and "cannot join" in out.stderr, out.stderr
    # a certificate of another CA is refused by TLS
    out = malla("services", "--seed", n1.seed, *pki("intruder", "other-ca"))
    assert out.returncode == 5 and "TLS handshake" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    # ... and a node of another CA logs why it cannot join
    n3 = nodes("n3", "--seed", n1.seed, *pki("n3", "other-ca"))
    n3.wait_for_log(rf"^{STAMP} WARNING malla\.cluster: .*n3 could not join {n1.seed}: "
                    "TLS handshake failed")
    # the three flags go together
    out = malla("services", "--seed", n1.seed, *client[:4])
    assert out.returncode == 2 and "go together" in out.stderr


def test_the_cli_reaches_a_cluster_with_certificate_identity(nodes, pki):
    # each node's certificate names it (trustme: DNS:<name>); --identity tls
    # binds every name to its certificate
    n1 = nodes("n1", "--service", "examples.calculator:Calculator", "--identity", "tls",
               *pki("n1"))
    n2 = nodes("n2", "--seed", n1.seed, "--identity", "tls", *pki("n2"))
    client = pki("cli")
    out = malla("call", "Calculator.add", "1", "2", "--seed", n2.seed, "--name", "cli",
                "--identity", "tls", *client)
    assert out.returncode == 0 and json.loads(out.stdout) == 3, out.stderr
    # the same client under another name: its certificate does not name it
    out = malla("call", "Calculator.add", "1", "2", "--seed", n1.seed, "--name", "root",
                "--identity", "tls", "--wait", "2", *client)
    assert out.returncode == 5 and "does not name node 'root'" in out.stderr, out.stderr
    n1.wait_for_log(r"WARNING malla\.handshakes: .*claims to be node 'root', but its "
                    r"certificate names cli")
    # --identity tls needs the certificate files, and a client needs its name
    out = malla("call", "Calculator.add", "1", "2", "--seed", n1.seed, "--identity", "tls")
    assert out.returncode == 2 and "needs --tls-cert" in out.stderr, out.stderr
    out = malla("call", "Calculator.add", "1", "2", "--seed", n1.seed, "--identity", "tls",
                *client)
    assert out.returncode == 2 and "needs --name" in out.stderr, out.stderr
    # MALLA_IDENTITY sets it too, and is checked as the flag is
    out = malla("call", "Calculator.add", "1", "2", "--seed", n2.seed, "--name", "cli",
                *client, env=dict(ENV, MALLA_IDENTITY="tls"))
    assert out.returncode == 0 and json.loads(out.stdout) == 3, out.stderr
    out = malla("call", "Calculator.add", "1", "2", "--seed", n2.seed, "--name", "cli",
                *client, env=dict(ENV, MALLA_IDENTITY="TLS"))
    assert out.returncode == 2 and "MALLA_IDENTITY is cookie or tls" in out.stderr, out.stderr


# -- exit codes by family ------------------------------------------------------------

@pytest.fixture
def faulty(tmp_path, nodes):
    (tmp_path / "faulty.py").write_text(FAULTY)
    env = dict(ENV, PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")
    return nodes("f1", "--service", "faulty:Faulty", env=env), env


def test_exit_codes_by_family(faulty):
    node, env = faulty
    seed = ["--seed", node.seed]

    def call(*args: str) -> subprocess.CompletedProcess[str]:
        return malla("call", *args, *seed, env=env)

    out = call("Faulty.fail", "boom")                          # 1 the function raised
    assert (out.returncode, out.stderr) == (
        1, "malla call: RemoteError: builtins.ValueError: boom\n")
    out = call("Faulty.fail", "boom", "--traceback")           # where, on the remote side
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "raise ValueError(why)" in out.stderr
    assert out.stderr.splitlines()[-1] == "malla call: RemoteError: builtins.ValueError: boom"
    out = call("Faulty", "x")                                  # 2 usage
    assert out.returncode == 2 and out.stderr.startswith("malla call: expected Service.fun")
    out = call("Missing.f", "--wait", "0")                     # 3 did not run
    assert out.returncode == 3 and out.stderr.startswith("malla call: ServiceNotAvailable:")
    out = call("Faulty.nope")
    assert out.returncode == 3 and out.stderr.startswith("malla call: UnknownFunction:")
    out = call("Faulty.slow", "5", "--timeout", "200")         # 4 may have run
    assert out.returncode == 4 and out.stderr.startswith("malla call: CallTimeout:")
    out = call("Faulty.odd")                                   # 0, any result as JSON
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"[1, 2]": {"$bytes": "eA=="}, "set": [1, 3],
                                      "nan": "NaN", "[1]": None}
    out = malla("call", "Faulty.odd", "--seed", node.seed, env=dict(env, MALLA_COOKIE="y" * 32))
    assert out.returncode == 5                                 # 5 cluster unreachable
    assert out.stderr.startswith("malla call: AuthenticationError: cannot join"), out.stderr
    out = call("Faulty.die")                                   # 4: the node died mid-call
    assert out.returncode == 4 and out.stderr.startswith("malla call: ConnectionLost:")
    out = call("Faulty.odd", "--wait", "0.5")                  # 5: nobody left to join
    assert out.returncode == 5 and out.stderr.startswith("malla call: Unreachable: cannot join")
    assert "Traceback" not in out.stderr


# DESIGN.md "Calls": the table, class by class
@pytest.mark.parametrize("error, code", [
    (pkg.RemoteError("builtins.ValueError", "x"), 1),
    *[(cls("x"), 3) for cls in (pkg.ServiceNotAvailable, pkg.Overloaded, pkg.UnknownFunction,
                                pkg.BadArguments, pkg.InvalidOption, pkg.EncodeError,
                                pkg.MessageTooLarge, pkg.Forbidden, pkg.NodeStopped,
                                pkg.NameInUse)],
    (pkg.CallTimeout("x", sent=False), 3),
    (pkg.CallTimeout("x", sent=True), 4),
    (pkg.ConnectionLost("x"), 4),
    *[(cls("x"), 5) for cls in (pkg.Unreachable, pkg.AuthenticationError, pkg.ProtocolError)],
])
def test_exit_code_of_each_class(error, code):
    assert exit_code(error) == code
    rows = dict(re.findall(r"^  (\d)  (.*?)(?=^  \d  |\Z)", EXIT_TABLE, re.M | re.S))
    name = "RemoteError" if code == 1 else type(error).__name__
    assert re.search(rf"\b{name}\b", rows[str(code)]), (name, rows)


def test_call_help_prints_the_exit_table():
    out = malla("call", "--help")
    assert out.returncode == 0
    assert EXIT_TABLE in out.stdout          # as written: the formatter keeps its lines


# -- arguments from stdin --------------------------------------------------------------

def test_arguments_from_stdin(nodes):
    n1 = nodes("n1", "--service", "examples.calculator:Calculator")

    def call(stdin: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "malla", "call", *args, "--seed", n1.seed],
                              input=stdin, capture_output=True, text=True, timeout=60,
                              env=ENV, cwd=ROOT)

    assert json.loads(call('[1, 2]', "Calculator.add", "-").stdout) == 3
    assert json.loads(call('{"x": 7}', "Calculator.slow_square", "--kwargs", "-").stdout) == 49
    both = call('["a"]\n{"b": "c"}', "Calculator.add", "-", "--kwargs", "-")
    assert json.loads(both.stdout) == "ac", both.stderr
    for stdin, args in [('{"a": 1}', ["-"]), ("[1, 2", ["-"]), ("[1] [2]", ["-"]),
                        ("[1]", ["-", "--kwargs", "-"])]:
        out = call(stdin, "Calculator.add", *args)
        assert out.returncode == 2 and "stdin" in out.stderr, (stdin, out.stderr)


# -- results as JSON --------------------------------------------------------------------

def _strict(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


@settings(max_examples=300, deadline=None)
@given(values)
def test_any_value_malla_carries_prints_as_valid_json(value):
    received = unpackb(packb(value))          # what `malla call` gets back
    text = dumps(received)
    assert "\n" not in text
    json.loads(text, parse_constant=_strict)
