"""Registering once, staying registered, and heartbeating.

The device id and token are saved in the state directory the moment the registry hands them out. A restarted agent
re-registers *with its token* (same device id, profile updated) or, without an enrollment key, just updates its
profile; it never creates a second device. A first registration proposes a random token, saved before the request,
so a retry after a lost reply (or after a crash) gets the device that request created instead of ALREADY_EXISTS.
Only when the registry no longer knows the token (the device was deregistered, or the registry's database was reset)
does it register afresh, and it says so.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import replace

import grpc

from edge_agent.client import ServiceClient, ServiceError, Stopped
from edge_agent.state import AgentState, save_state
from raffm.profile import DeviceProfile, profile_to_proto
from raffm.v1 import registry_pb2

log = logging.getLogger("edge_agent.identity")

DEFAULT_HEARTBEAT_S = 30.0
# Codes that mean "this token/device is not (or no longer) valid here".
IDENTITY_LOST = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND)


class Identity:
    """The device's registration, kept in the state file; thread-safe reads for the heartbeat thread."""

    def __init__(self, client: ServiceClient, state: AgentState) -> None:
        self.client = client
        self.state = state
        self.heartbeat_interval_s = DEFAULT_HEARTBEAT_S
        self.lost = threading.Event()  # set when the registry rejects our token
        self._lock = threading.Lock()

    @property
    def device_id(self) -> str:
        return self.state.device_id

    def save(self, state: AgentState) -> None:
        with self._lock:
            save_state(self.client.config.state_path, state)
            self.state = state

    def ensure_registered(self, profile: DeviceProfile) -> AgentState:
        """Register or re-register (retrying while the registry is unreachable); returns the saved state."""
        config = self.client.config
        state = self.state
        name = state.name or config.name
        if state.registered and state.name and state.name != config.name:
            log.warning("this state directory belongs to device %r; keeping that identity (not %r). Use another "
                        "--state-dir to run a different device.", state.name, config.name)
        if state.registered:
            self.client.token = state.token
            if not config.enroll_key:
                try:
                    reply = self.client.call(
                        "registry.UpdateProfile", self.client.registry.UpdateProfile,
                        registry_pb2.UpdateProfileRequest(device_id=state.device_id,
                                                          profile=profile_to_proto(profile)),
                        target=config.registry,
                    )
                    log.info("resumed as device %s (%s); profile version %d", state.device_id, name,
                             reply.profile_version, extra={"event": "resumed", "device_id": state.device_id})
                    self.lost.clear()
                    return state
                except ServiceError as exc:
                    if exc.code not in IDENTITY_LOST:
                        raise
                    raise ValueError(
                        f"the registry no longer accepts this device's token ({exc.details}); pass --enroll-key to "
                        "register it again"
                    ) from None
        if not config.enroll_key:
            raise ValueError("first registration needs the fleet's enrollment key: pass --enroll-key "
                             "(or RAFFM_AGENT_ENROLL_KEY)")
        if not state.token:
            # Propose our own token, saved before the first request: a retry (or a restart) after a lost reply then
            # proves it is the same registration, and the registry returns the device it created.
            state = replace(state, token=secrets.token_urlsafe(32), name=name)
            self.save(state)
        request = registry_pb2.RegisterRequest(enroll_key=config.enroll_key, name=name,
                                               profile=profile_to_proto(profile), device_token=state.token)
        reply = self.client.call("registry.Register", self.client.registry.Register, request,
                                 target=config.registry, authenticated=False)
        if reply.heartbeat_interval_s > 0:
            self.heartbeat_interval_s = float(reply.heartbeat_interval_s)
        if state.registered and reply.device_id == state.device_id:
            log.info("resumed as device %s (%s); profile version %d", reply.device_id, name, reply.profile_version,
                     extra={"event": "resumed", "device_id": reply.device_id})
        elif state.registered:
            log.warning("the registry did not know device %s any more; registered again as %s", state.device_id,
                        reply.device_id, extra={"event": "re_registered", "device_id": reply.device_id})
        else:
            log.info("registered as device %s (%s)", reply.device_id, name,
                     extra={"event": "registered", "device_id": reply.device_id})
        new_state = replace(
            state, device_id=reply.device_id, token=reply.token or state.token, name=name, registry=config.registry,
            registered_at=state.registered_at if reply.device_id == state.device_id
            else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        self.save(new_state)
        self.client.token = new_state.token
        self.lost.clear()
        return new_state


class Heartbeat:
    """A daemon thread that heartbeats on the registry's schedule; failures are logged, never fatal."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0
        self._failing = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="agent-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        client = self.identity.client
        interval = self.identity.heartbeat_interval_s
        while not self._stop.wait(interval if not self._failing else min(interval, 5.0)):
            if client.stopper.stopped:
                return
            try:
                reply = client.call(
                    "registry.Heartbeat", client.registry.Heartbeat,
                    registry_pb2.HeartbeatRequest(device_id=self.identity.device_id),
                    target=client.config.registry, retry=False,
                )
            except Stopped:
                return
            except ServiceError as exc:
                if exc.code in IDENTITY_LOST:
                    self.identity.lost.set()
                if not self._failing:
                    log.warning("heartbeat failed: %s", exc, extra={"event": "heartbeat_failed",
                                                                    "code": exc.code.name})
                self._failing = True
                continue
            except Exception:  # noqa: BLE001 - the heartbeat thread must never die
                log.exception("heartbeat failed unexpectedly")
                self._failing = True
                continue
            if self._failing:
                log.info("heartbeat restored", extra={"event": "heartbeat_restored"})
            self._failing = False
            self.sent += 1
            if reply.next_heartbeat_s > 0:
                interval = float(reply.next_heartbeat_s)
