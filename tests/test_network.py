"""The suite runs with the network blocked (pytest-socket, --allow-hosts=127.0.0.1,::1 in pyproject.toml)."""

from __future__ import annotations

import socket

import pytest
import pytest_socket


@pytest.mark.filterwarnings("ignore:A test tried to use socket")
def test_a_connection_beyond_this_machine_is_refused():
    with pytest.raises(pytest_socket.SocketConnectBlockedError):
        socket.create_connection(("203.0.113.7", 443), timeout=1)  # an address nothing reaches anyway


def test_the_hubs_are_off():
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
