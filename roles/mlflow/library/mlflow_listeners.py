#!/usr/bin/python
# -*- coding: utf-8 -*-
"""Which processes listen on a TCP port of this host, and the systemd unit of each."""

from __future__ import annotations

import os
import re
import socket
import struct

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: mlflow_listeners
short_description: List the processes that listen on a TCP port, with their systemd units
description:
  - Reads /proc/net/tcp and /proc/net/tcp6 for sockets in the LISTEN state on I(port), then finds the
    processes that hold each socket and the systemd unit (cgroup) of each process. Changes nothing.
  - Needs root to see the sockets of every process.
options:
  port:
    description: The TCP port.
    type: int
    required: true
author: mlflow-ansible
"""

RETURN = r"""
listeners:
  description: One entry per process and listening socket.
  returned: always
  type: list
  elements: dict
  sample: [{"address": "0.0.0.0", "pid": 812, "command": "python3", "unit": "demo.service"}]
"""

LISTEN = "0A"


def _address(hex_address, family):
    raw = bytes.fromhex(hex_address)
    if family == socket.AF_INET:
        return socket.inet_ntop(family, struct.pack("<I", struct.unpack(">I", raw)[0]))
    # /proc/net/tcp6 writes the address as four host-order 32-bit words.
    return socket.inet_ntop(family, b"".join(struct.pack("<I", struct.unpack(">I", raw[i:i + 4])[0])
                                             for i in range(0, 16, 4)))


def listening_inodes(port):
    inodes = {}
    for path, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            with open(path) as table:
                next(table)
                for line in table:
                    fields = line.split()
                    local, state, inode = fields[1], fields[3], fields[9]
                    address, hex_port = local.split(":")
                    if state == LISTEN and int(hex_port, 16) == port:
                        inodes[inode] = _address(address, family)
        except FileNotFoundError:
            continue
    return inodes


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def unit_of(pid):
    lines = [line.split(":", 2) for line in _read(f"/proc/{pid}/cgroup").splitlines() if line.count(":") >= 2]
    # systemd's own hierarchy: cgroup v2's single line, or v1's name=systemd (other v1 controllers
    # may show only a container's or a slice's path).
    systemd = [fields for fields in lines if fields[1] in ("", "name=systemd")] or lines
    for fields in systemd:
        for part in reversed(fields[2].split("/")):
            if re.search(r"\.(service|scope)$", part):
                return part
    return ""


def listeners(port):
    inodes = listening_inodes(port)
    found = []
    if not inodes:
        return found
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            match = re.fullmatch(r"socket:\[(\d+)\]", target)
            if match and match.group(1) in inodes:
                # The process name only: another program's command line may hold its secrets.
                found.append({"address": inodes[match.group(1)], "pid": int(pid),
                              "command": _read(f"/proc/{pid}/comm").strip(),
                              "unit": unit_of(pid)})
    return found


def main():
    module = AnsibleModule(argument_spec={"port": {"type": "int", "required": True}}, supports_check_mode=True)
    module.exit_json(changed=False, listeners=listeners(module.params["port"]))


if __name__ == "__main__":
    main()
