"""Upload schemes, device side: how an update travels to the server (the mirror of the
server's ``sync_server.upload_schemes``). A round task names its scheme; ``scheme_for``
picks the registered one.

- ``SealedUpload`` (``sealed-x25519-v1``): one POST of the update sealed to the server's
  transport key; queued in the client's outbox while the server is unreachable.
- ``SecAggUpload`` (``secagg+-v1``, the default): a ``SecAggSession`` runs the device's side
  of secure aggregation, one stage at a time (``device_sdk.secagg.STAGES``): the server only
  ever sees the update masked.

A scheme makes its requests through the client it is given (``SyncTransport``: signed,
retried requests and the outbox, which ``device_sdk.sync_client.SyncClient`` provides), so
multi-request schemes such as SecAgg+ fit. This module does not import the client: the
client imports it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from device_sdk import secagg
from device_sdk.device_identity import DeviceIdentity
from device_sdk.model_update import ModelUpdate
from device_sdk.protocol import (
    CLIP_SLACK,
    SEALED_SCHEME,
    ProtocolError,
    RoundTask,
    SyncError,
    encode_tensors,
    seal_update,
)

# The longest wait between two polls a server can ask for (seconds).
MAX_POLL_S = 30.0


class SyncTransport(Protocol):
    """What a scheme needs of the client: ``device_sdk.sync_client.SyncClient``."""

    identity: DeviceIdentity

    def request(self, method: str, path: str, **kwargs: Any) -> Any: ...

    def error_from(self, response: Any) -> SyncError: ...

    def json_of(self, response: Any, expected: tuple[int, ...]) -> dict: ...

    def server_keys(self) -> Any: ...

    @property
    def known_server_keys(self) -> Any: ...

    def send_or_queue(self, task: RoundTask, path: str, body: bytes) -> dict[str, Any]: ...


class UploadScheme(Protocol):
    """How an update travels to the server."""

    name: str

    def submit(self, client: SyncTransport, task: RoundTask, update: ModelUpdate
               ) -> dict[str, Any]:
        """Deliver ``update`` for ``task``; return the server's acceptance JSON."""
        ...


_SCHEMES: dict[str, UploadScheme] = {}


def register_upload_scheme(scheme: UploadScheme) -> None:
    """Make ``scheme`` available to tasks whose ``upload_scheme`` is ``scheme.name``."""
    _SCHEMES[scheme.name] = scheme


def scheme_for(task: RoundTask, update: ModelUpdate) -> UploadScheme:
    """The registered scheme of ``task``; ValueError when ``update`` does not fit the task
    (another base version, a looser clip), SyncError("unsupported_scheme") when no scheme
    of that name is registered."""
    if update.base_version != task.model_version or (
        update.clip_norm > task.clip_norm * (1 + CLIP_SLACK)
    ):
        raise ValueError(
            f"update (base {update.base_version}, clip {update.clip_norm}) does not fit "
            f"task {task.round_id} (model {task.model_version}, clip {task.clip_norm})"
        )
    scheme = _SCHEMES.get(task.upload_scheme)
    if scheme is None:
        raise SyncError("unsupported_scheme",
                        f"this device cannot upload with {task.upload_scheme!r}")
    return scheme


class SealedUpload:
    """``sealed-x25519-v1``: one POST of the update sealed to the server's transport key."""

    name = SEALED_SCHEME

    def submit(self, client: SyncTransport, task: RoundTask, update: ModelUpdate) -> dict[str, Any]:
        try:
            keys = client.server_keys()
        except SyncError as exc:
            # Unreachable now: seal to the last verified transport key and queue the result.
            if not exc.retryable or client.known_server_keys is None:
                raise
            keys = client.known_server_keys
        sealed = seal_update(
            update,
            round_id=task.round_id,
            device_id=client.identity.device_id,
            transport_public_key=keys.transport_key,
        )
        return client.send_or_queue(task, f"/v1/rounds/{task.round_id}/update", sealed)


register_upload_scheme(SealedUpload())


class SecAggSession:
    """The device's side of one SecAgg+ round (device_sdk.secagg), one stage at a time.

    ``start()`` advertises; each ``step()`` polls ``GET /v1/rounds/<id>/secagg`` once and,
    when the server asks for the next stage, answers it. ``SecAggUpload`` (what ``sync()``
    uses) loops over ``step()``; an app that schedules its own background work, or a
    simulator driving thousands of devices, calls it whenever it likes. The round's secrets
    live in this object only: a device that drops it (crash, timeout) is a dropout, which the
    round survives; nothing is queued, a masked input is useless after its round.

    ``spill(path)`` moves the update vector out of memory into ``path`` (.npy, no pickle)
    until the masked-input stage reads it back and deletes it."""

    def __init__(self, client: SyncTransport, task: RoundTask, vector: np.ndarray) -> None:
        if task.secagg is None:
            raise SyncError("bad_task", f"round {task.round_id} names {secagg.SCHEME} "
                            "without its parameters")
        try:
            self.params = secagg.TaskParams.from_json(task.secagg)
        except ProtocolError as exc:
            raise SyncError("bad_task", f"SecAgg+ parameters: {exc}") from None
        timeout = task.secagg.get("stage_timeout_s", 60.0)
        if type(timeout) not in (int, float) or not 0 < timeout < 2**31:  # NaN fails too
            raise SyncError("bad_task", f"SecAgg+ stage_timeout_s {timeout!r} is not a "
                            "positive number of seconds")
        self.stage_timeout = float(timeout)
        self.client, self.task = client, task
        self.round_id = task.round_id
        self._base = f"/v1/rounds/{task.round_id}/secagg"
        self._device = secagg.SecAggDevice(task.round_id, client.identity.device_id,
                                           client.identity, self.params)
        self._vector: np.ndarray | None = np.asarray(vector, dtype=np.float64).ravel()
        self._spilled: Path | None = None
        self._answered: secagg.Stage | None = None  # the last stage this device answered
        self.done = False
        # Seconds the server suggested before the next poll.
        self.retry_after = 1.0
        # Collecting lasts until the round's deadline; each later stage one stage timeout.
        self.give_up_at = max(task.deadline, time.time()) + self.stage_timeout + 5.0

    @property
    def answered(self) -> str | None:
        """The last stage this device answered, by its answer's name (``Stage.answer``)."""
        return None if self._answered is None else self._answered.answer

    @property
    def waiting_for(self) -> str | None:
        """The action the device waits for the server to ask (None before start or when
        done)."""
        if self.done or self._answered is None:
            return None
        return secagg.next_stage(self._answered).action

    def spill(self, path: str | Path) -> None:
        if self._vector is None:
            return
        path = Path(path)
        with open(path, "wb") as f:
            np.save(f, self._vector, allow_pickle=False)
        self._spilled, self._vector = path, None

    def _load_vector(self) -> np.ndarray:
        if self._vector is not None:
            return self._vector
        assert self._spilled is not None
        try:
            vector = np.load(self._spilled, allow_pickle=False)
        finally:
            self._spilled.unlink(missing_ok=True)
        self._spilled = None
        return vector

    def discard(self) -> None:
        """Forget the round (and delete a spilled vector): the device drops out."""
        if self._spilled is not None:
            self._spilled.unlink(missing_ok=True)
        self._vector, self._spilled, self.done = None, None, True

    def start(self) -> None:
        first = secagg.STAGES[0]
        self._post(f"/{first.path}", json=self._device.advertise())
        self._answered = first

    def step(self) -> bool:
        """Poll once; answer the stage if the server asks for it. Returns True once the last
        stage is answered. Raises SyncError("secagg_dropped") when the round went on without
        this device, or when it waited past the stage's time; other SyncErrors as sent."""
        if self.done:
            return True
        action = self.waiting_for
        if action is None:
            raise RuntimeError("start() the session first")
        response = self.client.request("GET", self._base)
        view = self.client.json_of(response, (200,))
        if view.get("action") != action:
            if view.get("dropped") or view.get("stage") in ("aggregating", "published"):
                self.discard()
                raise SyncError("secagg_dropped", f"round {view.get('round_id')} went on "
                                f"without this device (at {view.get('stage')})")
            retry_after = view.get("retry_after")
            valid = type(retry_after) in (int, float) and 0 <= retry_after < 2**31
            self.retry_after = min(float(retry_after) if valid else 1.0, MAX_POLL_S)
            if time.time() + self.retry_after > self.give_up_at:
                self.discard()
                raise SyncError("secagg_dropped", f"gave up waiting for {action}: the round "
                                "did not reach it in time", retryable=False)
            return False
        payload = view.get("payload")
        stage = secagg.STAGE_BY_ACTION[action]
        path = f"/{stage.path}"
        try:
            if stage.state == "share_keys":
                self._post(path, json=self._device.share_keys(payload))
            elif stage.state == "masked_input":
                masked = self._device.masked_input(payload, self._load_vector())
                self._post(path, body=encode_tensors({"masked": masked},
                                                      {"round_id": self.round_id}))
            else:
                self._post(path, json=self._device.unmask(payload))
                self.done = secagg.next_stage(stage) is None
        except secagg.SecAggError as exc:  # the device refused what the server sent
            self.discard()
            raise SyncError(exc.code, exc.message) from None
        self._answered = stage
        self.give_up_at = time.time() + 2 * self.stage_timeout + 5.0
        return self.done

    def _post(self, path: str, **kwargs: Any) -> None:
        response = self.client.request("POST", self._base + path, **kwargs)
        if response.status != 202:
            raise self.client.error_from(response)


class SecAggUpload:
    """``secagg+-v1``: a ``SecAggSession`` run to its end, sleeping between polls."""

    name = secagg.SCHEME

    def session(self, client: SyncTransport, task: RoundTask, vector: np.ndarray) -> SecAggSession:
        return SecAggSession(client, task, vector)

    def begin(self, client: SyncTransport, task: RoundTask, update: ModelUpdate
              ) -> SecAggSession:
        """Advertise and return the session, for the caller to ``step()`` through."""
        clip_bit = isinstance(task.secagg, dict) and task.secagg.get("clip_bit") is True
        session = self.session(client, task, secagg_vector(update, clip_bit=clip_bit))
        session.start()
        return session

    def submit(self, client: SyncTransport, task: RoundTask, update: ModelUpdate) -> dict[str, Any]:
        session = self.begin(client, task, update)
        while not session.step():
            time.sleep(session.retry_after)
        return {"accepted": True, "round_id": task.round_id, "scheme": self.name}


def flatten_update(update: ModelUpdate) -> np.ndarray:
    """The update as one float vector, tensors in sorted name order (the order the server
    splits the unmasked sum back into tensors)."""
    return np.concatenate([np.asarray(update.delta[name], dtype=np.float64).ravel()
                           for name in sorted(update.delta)])


register_upload_scheme(SecAggUpload())


def secagg_vector(update: ModelUpdate, *, clip_bit: bool) -> np.ndarray:
    """A device's SecAgg+ input: ``flatten_update``, and with ``clip_bit`` (adaptive
    clipping) one more value, C (b - 1/2) with b = 1 when the update's norm before
    clipping was within the clip C. Centred and scaled by C, it stays within the ring's
    per-value range and one device moves the count by 1/2 either way; the server sees only
    the sum (``sync_server.secure_aggregation.aggregate_ring_sum``)."""
    vector = flatten_update(update)
    if not clip_bit:
        return vector
    below = update.norm_before_clip <= update.clip_norm
    return np.append(vector, update.clip_norm * (0.5 if below else -0.5))
