"""A three-stage pipeline: numbers -> squarer -> summer, each stage its own process, with asyncio."""

import asyncio

import deploy

COUNT = 1000


def squarer(parent: deploy.Pid, summer: deploy.Pid) -> None:
    async def run() -> None:
        with deploy.Receiver[int](parent) as numbers, deploy.Sender[int](summer) as squares:
            async for number in numbers:
                if number < 0:
                    await squares.asend(-1)
                    return
                await squares.asend(number * number)

    asyncio.run(run())


def summer(parent: deploy.Pid, _: None) -> None:
    async def run() -> None:
        squarer_pid = await deploy.Receiver[deploy.Pid](parent).arecv()
        total = 0
        async for square in deploy.Receiver[int](squarer_pid):
            if square < 0:
                break
            total += square
        await deploy.Sender[int](parent).asend(total)

    asyncio.run(run())


async def main() -> None:
    summer_pid = deploy.spawn(summer, None)
    squarer_pid = deploy.spawn(squarer, summer_pid)
    await deploy.Sender[deploy.Pid](summer_pid).asend(squarer_pid)
    with deploy.Sender[int](squarer_pid) as numbers:
        for number in range(COUNT):
            await numbers.asend(number)
        await numbers.asend(-1)
    total = await deploy.Receiver[int](summer_pid).arecv()
    print(
        f"sum of squares below {COUNT}: {total} ({'correct' if total == sum(n * n for n in range(COUNT)) else 'WRONG'})"
    )


if __name__ == "__main__":
    deploy.init()
    asyncio.run(main())
