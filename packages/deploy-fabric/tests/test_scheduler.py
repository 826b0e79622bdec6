import pytest
from deploy_core import Resources
from deploy_fabric import Node, Scheduler


def test_places_on_the_node_with_most_free_memory_and_releases():
    small, big = Node("small", Resources("1GiB", 1)), Node("big", Resources("4GiB", 1))
    scheduler = Scheduler([small, big])
    request = Resources("1GiB", 0.5)
    assert scheduler.place(request) is big
    assert big.free == Resources("3GiB", 0.5)
    scheduler.release(big, request)
    assert big.free == big.capacity


def test_no_room_now_is_not_impossible():
    node = Node("local", Resources("1GiB", 1))
    scheduler = Scheduler([node])
    assert scheduler.place(Resources("1GiB", 0.5)) is node
    assert scheduler.place(Resources("1MiB", 0.1)) is None
    assert scheduler.impossible(Resources("1MiB", 0.1)) is None


def test_impossible_requests_name_the_numbers():
    scheduler = Scheduler([Node("local", Resources("1GiB", 2))])
    problem = scheduler.impossible(Resources("64GiB", 0.05))
    assert problem is not None and "64GiB" in problem and "1GiB" in problem
    assert scheduler.impossible(Resources("1MiB", 3)) is not None


def test_cpu_shares_add_up_exactly():
    node = Node("local", Resources("100GiB", 1))
    scheduler = Scheduler([node])
    for _ in range(20):
        assert scheduler.place(Resources("1MiB", 0.05)) is node
    assert scheduler.place(Resources("1MiB", 0.05)) is None


def test_a_scheduler_needs_a_node():
    with pytest.raises(ValueError):
        Scheduler([])
