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


def test_processes_spread_over_the_nodes_of_a_cluster_and_never_overfill_one():
    nodes = [
        Node("master", Resources("1GiB", 2)),
        Node("w1", Resources("1536MiB", 2)),
        Node("w2", Resources("2GiB", 2)),
    ]
    scheduler = Scheduler(nodes)
    placed = [scheduler.place(Resources("400MiB", 0.1)) for _ in range(10)]  # 2 + 3 + 5 slots
    assert None not in placed and {node.name for node in placed} == {"master", "w1", "w2"}
    assert scheduler.place(Resources("400MiB", 0.1)) is None
    for node in nodes:
        assert node.used.fits_in(node.capacity)


def test_a_node_that_fits_on_cpu_only_is_chosen_over_one_with_more_memory():
    roomy, busy = Node("roomy", Resources("8GiB", 1)), Node("busy", Resources("2GiB", 4))
    scheduler = Scheduler([roomy, busy])
    assert scheduler.place(Resources("1GiB", 1)) is roomy
    assert scheduler.place(Resources("1GiB", 1)) is busy  # roomy has memory left but no core


def test_a_lost_node_leaves_the_scheduler_and_a_returning_one_is_used_again():
    master, worker = Node("master", Resources("1GiB", 1)), Node("worker", Resources("4GiB", 4))
    scheduler = Scheduler([master, worker])
    scheduler.nodes.remove(worker)  # what the master daemon does with a lost node
    assert scheduler.place(Resources("2GiB", 0.1)) is None
    assert "master" in (scheduler.impossible(Resources("2GiB", 0.1)) or "")
    back = Node("worker", Resources("4GiB", 4))
    scheduler.nodes.append(back)
    assert scheduler.impossible(Resources("2GiB", 0.1)) is None
    assert scheduler.place(Resources("2GiB", 0.1)) is back


def test_a_request_only_an_absent_listed_node_could_hold_waits_for_it():
    master = Node("master", Resources("1GiB", 2))
    listed = Node("worker", Resources("2GiB", 2))
    scheduler = Scheduler([master], absent=[listed])
    request = Resources("1200MiB", 0.1)
    assert scheduler.impossible(request) is None  # not NoCapacity: it waits
    assert scheduler.place(request) is None  # nothing goes to a node that is not up
    assert "worker" in (scheduler.impossible(Resources("3GiB", 0.1)) or "")
    scheduler.absent.remove(listed)
    scheduler.nodes.append(listed)
    assert scheduler.place(request) is listed
