"""A pool of workers fed with tasks; the parent waits on all of them with select()."""

import deploy

TASKS = list(range(40))
WORKERS = 4


def worker(parent: deploy.Pid, _: None) -> None:
    with deploy.Receiver[int](parent) as tasks, deploy.Sender[tuple[int, int]](parent) as results:
        while True:
            task = tasks.recv()
            if task < 0:
                return
            results.send((task, task * task))


def main() -> None:
    deploy.init()
    pids = [deploy.spawn(worker, None) for _ in range(WORKERS)]
    senders = {pid: deploy.Sender[int](pid) for pid in pids}
    receivers = {deploy.Receiver[tuple[int, int]](pid): pid for pid in pids}
    queue = list(TASKS)
    for sender in senders.values():  # one task in flight per worker
        sender.send(queue.pop())
    squares: dict[int, int] = {}
    busy = dict(receivers)
    while busy:
        ready = deploy.select(*busy)
        task, square = ready.recv()
        squares[task] = square
        sender = senders[busy[ready]]
        if queue:
            sender.send(queue.pop())
        else:
            sender.send(-1)  # no more work: the worker returns, and we stop listening to it
            del busy[ready]
    print(f"sum of squares of 0..{len(TASKS) - 1}: {sum(squares.values())}")


if __name__ == "__main__":
    main()
