"""Ten workers each print a greeting and send a number back to their parent."""

from dataclasses import dataclass

import deploy


@dataclass
class WorkerArg:
    index: int
    greeting: str


def worker(parent: deploy.Pid, arg: WorkerArg) -> None:
    print(arg.greeting)
    deploy.Sender[int](parent).send(arg.index * 100)


def main() -> None:
    deploy.init(deploy.Resources.default())
    total = 0
    for index in range(10):
        pid = deploy.spawn(worker, WorkerArg(index, f"hello worker {index}!"))
        total += deploy.Receiver[int](pid).recv()
    print(f"total {total}!")


if __name__ == "__main__":
    main()
