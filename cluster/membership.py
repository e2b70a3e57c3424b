"""Operator workflows over the admin channel: status, add, remove, drain, transfer.

These orchestrate the nodes' primitive admin commands the way an operator
would, one change at a time: ``remove`` of the leader first hands leadership
to a caught-up follower; ``remove`` drains the node (its clients resume
elsewhere) before the membership change and retires the process after it.
Every failure is an ``AdminCallError`` with a one-line reason.
"""

from __future__ import annotations

import time
from typing import Any

from node.auth import Keys

from .adminclient import AdminCallError, admin_call


class ClusterAdmin:
    def __init__(self, addrs: list[str], keys: Keys, timeout: float = 5.0):
        if not addrs:
            raise AdminCallError("bad-args", "no admin address given")
        self.addrs = list(addrs)
        self.keys = keys
        self.timeout = timeout

    def call(self, addr: str, cmd: str, args: dict[str, Any] | None = None,
             timeout: float | None = None) -> dict[str, Any]:
        return admin_call(addr, self.keys, cmd, args, timeout or self.timeout)

    def statuses(self) -> list[dict[str, Any]]:
        """One row per address; unreachable nodes get ``reachable: False``."""
        rows = []
        for a in self.addrs:
            try:
                st = self.call(a, "status")
                st["reachable"] = True
            except AdminCallError as e:
                if e.code == "auth-failed":
                    raise AdminCallError("auth-failed", f"{a}: wrong secret ({e.reason})") from None
                st = {"admin": a, "reachable": False, "error": e.reason, "role": "unreachable",
                      "id": "?"}
            rows.append(st)
        if not any(r["reachable"] for r in rows):
            raise AdminCallError("unreachable", "cluster unreachable: "
                                 + "; ".join(r["error"] for r in rows))
        return rows

    def leader(self, wait: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + wait
        while True:
            rows = [r for r in self.statuses() if r["reachable"]]
            leaders = [r for r in rows if r["role"] == "leader" and not r.get("fenced")]
            if len(leaders) == 1:
                return leaders[0]
            if time.monotonic() > deadline:
                raise AdminCallError("no-leader", "the cluster has no leader right now")
            time.sleep(0.1)

    def find(self, node: str) -> dict[str, Any]:
        """A member's status by id, admin, client or Raft address."""
        for r in self.statuses():
            if r["reachable"] and node in (r["id"], r.get("admin"), r.get("client"),
                                           r.get("raft")):
                return r
        raise AdminCallError("not-a-member",
                             f"{node} is not a reachable member (give a dead node's Raft "
                             "address to remove it)")

    def add(self, new_admin: str, wait: float = 120.0) -> dict[str, Any]:
        """Add the node whose admin address is ``new_admin`` (started with --join)
        and wait until it has caught up and serves clients."""
        try:
            new = self.call(new_admin, "status")
        except AdminCallError as e:
            raise AdminCallError(e.code, f"the new node is unreachable: {e.reason}") from None
        leader = self.leader()
        result = self.call(leader["admin"], "member-add",
                           {"raft": new["raft"], "id": new["id"]}, timeout=30)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            st = self.call(new_admin, "status")
            if st["ready"]:
                result["ready"] = True
                if new_admin not in self.addrs:
                    self.addrs.append(new_admin)
                return result
            time.sleep(0.2)
        raise AdminCallError("timeout", f"{new['id']} was added but did not catch up "
                             f"within {wait:g} s")

    def transfer(self, to: str | None = None) -> dict[str, Any]:
        leader = self.leader()
        args: dict[str, Any] = {}
        if to is not None:
            args["raft"] = self.find(to)["raft"]
        return self.call(leader["admin"], "transfer", args, timeout=30)

    def drain(self, node: str, timeout: float = 10.0) -> dict[str, Any]:
        target = self.find(node)
        return self.call(target["admin"], "drain", {"timeout": timeout}, timeout=timeout + 5)

    def undrain(self, node: str) -> dict[str, Any]:
        return self.call(self.find(node)["admin"], "undrain")

    def remove(self, node: str, retire: bool = True) -> dict[str, Any]:
        """Remove a member: transfer leadership away if needed, drain it, change the
        membership, then stop the removed node's process."""
        target: dict[str, Any] | None
        try:
            target = self.find(node)
        except AdminCallError:
            if ":" not in node:
                raise
            target = None  # a dead member, named by its Raft address
        raft = target["raft"] if target is not None else node
        node_id = target["id"] if target is not None else node
        leader = self.leader()
        if target is not None:
            self.call(target["admin"], "drain", {"timeout": 10}, timeout=15)
        if leader["raft"] == raft:
            try:
                self.call(leader["admin"], "transfer", {}, timeout=30)
            except AdminCallError:
                # pysyncobj's handover can fail under load: stop the old leader
                # instead (its clients were drained) and let the others elect.
                self.call(leader["admin"], "retire")
                retire = False
            leader = self.leader(wait=15)
            if leader["raft"] == raft:
                raise AdminCallError("is-leader", "leadership did not move; try again")
        try:
            result = self.call(leader["admin"], "member-remove",
                               {"raft": raft, "id": node_id}, timeout=30)
        except AdminCallError:
            if target is not None:  # refused: let the node serve again
                try:
                    self.call(target["admin"], "undrain")
                except AdminCallError:
                    pass
            raise
        if target is not None and retire:
            try:
                self.call(target["admin"], "retire")
                result["retired"] = True
            except AdminCallError:
                result["retired"] = False
        return result
