"""Every worker sends its index to every other worker and sums what it gets."""

import deploy

N = 6


def worker(parent: deploy.Pid, index: int) -> None:
    peers = deploy.Receiver[list[deploy.Pid]](parent).recv()
    others = [pid for pid in peers if pid != deploy.pid()]
    for pid in others:
        deploy.Sender[int](pid).send(index)
    total = sum(deploy.Receiver[int](pid).recv() for pid in others)
    deploy.Sender[int](parent).send(total)


def main() -> None:
    deploy.init()
    pids = [deploy.spawn(worker, index) for index in range(N)]
    for pid in pids:
        deploy.Sender[list[deploy.Pid]](pid).send(pids)
    totals = [deploy.Receiver[int](pid).recv() for pid in pids]
    expected = [sum(range(N)) - index for index in range(N)]
    print(f"totals {totals}, {'correct' if totals == expected else 'WRONG'}")


if __name__ == "__main__":
    main()
