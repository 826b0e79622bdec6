"""Resource exhaustion in local mode (issue 9): a process out of file descriptors (EMFILE on
accept, connect and pipe), the bridge and the zygote out of file descriptors, a process out
of memory. The runtime must neither crash nor spin, report the condition once, and serve
again once the resource is back."""

import json

import pytest
from conftest import run
from reliability import record

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(180)]

PROCESS_OUT_OF_FDS = """
import json, os, resource, sys, time, deploy
from deploy import DeployError

def exhaust():
    held = []
    while True:
        try:
            held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            return held

def victim(parent, _):
    control = deploy.Receiver[object](parent)
    report = deploy.Sender[object](parent)
    helper, target = control.recv()
    findings = {}
    report.send("ready")  # both channels to the parent are connected before the fds run out
    held = exhaust()
    findings["held"] = len(held)
    try:  # connect: the message is queued, and the connection attempted, while no fd is free
        with deploy.Sender[int](target) as tx:
            tx.send(1, timeout=5)
            time.sleep(1)  # the scenario: the endpoint tries to connect out of fds
        findings["connect"] = "sent"
    except Exception as error:
        findings["connect"] = f"{type(error).__name__}: {error}"
    try:  # pipe
        os.pipe()
        findings["pipe"] = "made"
    except OSError as error:
        findings["pipe"] = f"{type(error).__name__}: {error.strerror}"
    try:  # a spawn needs a control connection
        deploy.try_spawn(print, "spawned while out of fds")
        findings["spawn"] = "spawned"
    except Exception as error:
        findings["spawn"] = f"{type(error).__name__}: {error}"
        findings["spawn_is_deploy_error"] = isinstance(error, DeployError)
    # accept: the helper connects now, while no fd is free for its connection
    os.close(held.pop())  # room for the report's write, then take it back below
    report.send("exhausted")
    held.append(os.open("/dev/null", os.O_RDONLY))
    before = resource.getrusage(resource.RUSAGE_SELF)
    time.sleep(2)  # the scenario: two seconds out of fds (less than a sender's 3 s exit drain) while a peer knocks
    after = resource.getrusage(resource.RUSAGE_SELF)
    findings["cpu_s_while_exhausted"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 3)
    for fd in held:
        os.close(fd)
    with deploy.Receiver[int](helper) as rx:
        try:
            findings["accepted_after"] = [rx.recv(timeout=20) for _ in range(3)]
        except Exception as error:
            findings["accepted_after"] = f"{type(error).__name__}: {error}"
    try:
        with deploy.Sender[int](target) as tx:
            tx.send(2, timeout=10)
        findings["connect_after"] = "sent"
    except Exception as error:
        findings["connect_after"] = f"{type(error).__name__}: {error}"
    try:
        deploy.try_spawn(print, "spawned after")
        findings["spawn_after"] = "spawned"
    except Exception as error:
        findings["spawn_after"] = f"{type(error).__name__}: {error}"
    report.send(findings)

def helper(parent, victim_pid):
    assert deploy.Receiver[str](parent).recv() == "knock"
    with deploy.Sender[int](victim_pid) as tx:
        for n in range(3):
            tx.send(n)

def target(parent, victim_pid):
    assert deploy.Receiver[str](parent).recv() == "listen"  # not before: its Receiver would connect first
    with deploy.Receiver[int](victim_pid) as rx:
        got = []
        try:
            while True:
                got.append(rx.recv(timeout=60))
        except deploy.PeerExited:
            pass
    deploy.Sender[list](parent).send(got)

if __name__ == "__main__":
    deploy.init()
    victim_pid = deploy.spawn(victim, None)
    helper_pid = deploy.spawn(helper, victim_pid)
    target_pid = deploy.spawn(target, victim_pid)
    control, report = deploy.Sender[object](victim_pid), deploy.Receiver[object](victim_pid)
    control.send((helper_pid, target_pid))
    assert report.recv() == "ready"
    assert report.recv(timeout=60) == "exhausted"
    deploy.Sender[str](helper_pid).send("knock")
    findings = report.recv(timeout=90)
    deploy.Sender[str](target_pid).send("listen")
    findings["target_got"] = deploy.Receiver[list](target_pid).recv(timeout=60)
    print("findings", json.dumps(findings))
"""


def _findings(result) -> dict:
    lines = [line for line in result.all_output().splitlines() if line.startswith("findings ")]
    assert lines, f"the run printed no findings (exit {result.code}):\n{result.all_output(2)[-3000:]}"
    return json.loads(lines[0].split(" ", 1)[1])


@pytest.fixture(scope="module")
def out_of_fds(tmp_path_factory):
    path = tmp_path_factory.mktemp("fds") / "job.py"
    path.write_text(PROCESS_OUT_OF_FDS)
    result = run(path, timeout=150)
    result.check_tree()
    findings = _findings(result)
    victim = result.children(result.top)[0]
    findings["victim_stderr"] = result.output(victim, 2).decode(errors="replace")
    record("process out of fds", **{k: v for k, v in findings.items() if k != "victim_stderr"})
    return findings


def test_out_of_fds_a_process_neither_spins_nor_floods_its_log(out_of_fds):
    assert out_of_fds["held"] > 100  # the limit was reached for real
    assert out_of_fds["pipe"].startswith("OSError: Too many open files")
    assert out_of_fds["cpu_s_while_exhausted"] < 0.2, out_of_fds  # of 2 s; an idle loop uses ~0
    warnings = [line for line in out_of_fds["victim_stderr"].splitlines() if "Too many open files" in line]
    assert len(warnings) <= 3, warnings[:5] + [f"... {len(warnings)} lines"]


def test_out_of_fds_connections_waiting_to_be_accepted_are_served_after(out_of_fds):
    assert out_of_fds["accepted_after"] == [0, 1, 2], out_of_fds


def test_out_of_fds_a_spawn_fails_with_a_deploy_error_and_works_after(out_of_fds):
    assert out_of_fds["spawn_is_deploy_error"], out_of_fds["spawn"]
    assert out_of_fds["spawn_after"] == "spawned", out_of_fds


def test_out_of_fds_a_peer_is_reachable_again_once_fds_are_back(out_of_fds):
    assert out_of_fds["connect_after"] == "sent", out_of_fds
    assert out_of_fds["target_got"][-1:] == [2], out_of_fds


RUNTIME_OUT_OF_FDS = """
import json, os, sys, threading, time, psutil, deploy

def reply(parent, n):
    deploy.Sender[int](parent).send(n)
    try:  # stay alive, holding the fds a process costs the runtime, until the run ends
        deploy.Receiver[str](parent).recv()
    except deploy.PeerExited:
        pass

def spawn_in_thread(n, timeout):
    # A new thread opens a new control connection to the bridge, which must accept it.
    box = {}

    def attempt():
        try:
            pid = deploy.spawn(reply, n)
            with deploy.Receiver[int](pid) as rx:
                box["result"] = rx.recv(timeout=30)
        except Exception as error:
            kind = "DeployError" if isinstance(error, deploy.DeployError) else "not a DeployError"
            box["result"] = f"{kind} ({type(error).__name__}): {error}"

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout)
    return box.get("result", "still waiting")

def squeeze(process):
    soft, hard = process.rlimit(psutil.RLIMIT_NOFILE)
    # New fds take the lowest free number below the limit; open ones above it stay usable.
    # A limit of the number open leaves as many free numbers as fds are open above it (~1).
    process.rlimit(psutil.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{process.pid}/fd")), hard))
    return soft, hard

if __name__ == "__main__":
    which = sys.argv[1]
    deploy.init()
    zygote = psutil.Process(os.getppid())
    victim = zygote if which == "zygote" else psutil.Process(zygote.ppid())
    findings = {"before": spawn_in_thread(1, 30)}
    limits = squeeze(victim)
    cpu = victim.cpu_times()
    findings["while"] = [spawn_in_thread(n, 3) for n in range(10, 17)]  # more than the zygote keeps forked ahead
    after = victim.cpu_times()
    findings["cpu_s_while_exhausted"] = round(after.user + after.system - cpu.user - cpu.system, 3)
    victim.rlimit(psutil.RLIMIT_NOFILE, limits)
    findings["after"] = spawn_in_thread(3, 30)
    print("findings", json.dumps(findings), flush=True)
"""


@pytest.mark.parametrize("which", ["bridge", "zygote"])
def test_the_bridge_or_zygote_out_of_fds_recovers_without_spinning(tmp_path, which):
    path = tmp_path / "job.py"
    path.write_text(RUNTIME_OUT_OF_FDS)
    result = run(path, which, timeout=120)
    result.check_tree()
    findings = _findings(result)
    record(f"{which} out of fds", **findings)
    assert findings["before"] == 1
    assert findings["after"] == 3, findings
    for n, outcome in zip(range(10, 17), findings["while"], strict=True):
        assert outcome in (n, "still waiting") or outcome.startswith("DeployError ("), findings
    assert findings["while"][-1] != 16, "the fds never ran out"
    assert findings["cpu_s_while_exhausted"] < 0.5, findings
    assert len([line for line in result.stderr.splitlines() if "Too many open files" in line]) <= 3, result.stderr[
        -2000:
    ]


def test_out_of_memory_a_process_is_ended_or_recovers_and_the_run_serves_on(script):
    job = script(
        """
        import resource, psutil, deploy

        def hog(parent, _):
            chunks = []
            while True:
                chunks.append(bytearray(8 << 20))  # touched: bytearray zero-fills

        def bounded(parent, _):
            # Out of address space: allocation fails inside the process, which carries on.
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            size = psutil.Process().memory_info().vms
            resource.setrlimit(resource.RLIMIT_AS, (size + (256 << 20), hard))
            chunks = []
            try:
                while True:
                    chunks.append(bytearray(16 << 20))
            except MemoryError:
                got = len(chunks)
            del chunks
            with deploy.Sender[str](parent) as tx:
                tx.send(f"MemoryError after {got * 16} MiB, still talking")

        def after(parent, _):
            deploy.Sender[str](parent).send("served after")

        if __name__ == "__main__":
            deploy.init()
            pid = deploy.spawn(hog, None, resources=deploy.Resources(mem="64MiB"))
            with deploy.Receiver[str](pid) as rx:
                try:
                    rx.recv(timeout=60)
                except deploy.PeerLost as error:
                    print("hog lost:", error)
                except deploy.PeerExited as error:
                    print("hog exited:", error)
            with deploy.Receiver[str](deploy.spawn(bounded, None, resources=deploy.Resources(mem="1GiB"))) as rx:
                print(rx.recv(timeout=60))
            with deploy.Receiver[str](deploy.spawn(after, None)) as rx:
                print(rx.recv(timeout=30))
        """
    )
    result = run(job, timeout=120)
    result.check_tree()
    hog = result.children(result.top)[0]
    exit_event = result.exits()[hog]
    assert exit_event["signal"] == "SIGKILL" and "memory limit 64MiB exceeded" in (exit_event["reason"] or ""), (
        exit_event
    )
    out = result.output(result.top).decode()
    assert "hog lost:" in out or "hog exited:" in out, out
    assert "still talking" in out and "served after" in out, out
    assert result.code == 128 + 9
    record(
        "out of memory",
        hog=exit_event["reason"],
        bounded=next(line for line in out.splitlines() if "MemoryError" in line),
    )
