"""The control plane's wire format on a real TCPStore: every carried type round-trips, and
anything else under a job's keys (garbage, a pickle, a value copied between keys, one
signed with another secret or not at all) is refused with a ControlPlaneError naming
the key, runs no code, and commits nothing."""

from __future__ import annotations

import json
import pickle
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import Replicate, Shard

from fsdp_sync import SyncConfig, WeightReceiver
from fsdp_sync.boxes import Box
from fsdp_sync.config import SECRET_ENV
from fsdp_sync.control import (PUSH_FAILURES, ControlPlane, ack_key, done_key, plan_receiver_key, push_key,
                               recv_meta_key)
from fsdp_sync.errors import ControlPlaneError, SyncError, SyncTimeout
from fsdp_sync.meta import DestTensor, LayoutSpec, ReceiverMeta
from fsdp_sync.plan import ReceiverPlan, Task
from fsdp_sync.transport.cuda_ipc import IpcExport
from fsdp_sync.transport.rdma_exchange import Endpoint, QpEndpoint
from fsdp_sync.transport.rdma_wr import Region, RemoteTensor
from fsdp_sync.transport.shm import ShmRecv, remove_files
from fsdp_sync.wire import CARRIED, MAGIC, Signer, carried_types, dumps, loads
from recipes.jobs import free_port
from tests.planner_fixtures import llama_like_shapes, plan, receivers_for, sources_on

SECRET = "correct horse battery staple"


@pytest.fixture
def store() -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", free_port(), is_master=True, timeout=timedelta(seconds=10),
                         wait_for_workers=False)


def _control(store, secret=None, job="wire-test", timeout_s=5.0) -> ControlPlane:
    return ControlPlane(store, job, timeout_s=timeout_s, secret=secret)


def _raw(store, job="wire-test") -> dist.PrefixStore:
    """The job's keys as the store holds them: raw bytes, as a forger writes them."""
    return dist.PrefixStore(f"fsdp_sync/{job}/", store)


def _samples() -> dict[str, object]:
    """One value of every carried dataclass, built the way the library builds them."""
    shapes = llama_like_shapes(2, 256, 512, 128, 1000)
    sources = sources_on(shapes, [[0, 1], [2, 3]], [Replicate(), Shard(0)])  # HSDP 2x2
    receivers = receivers_for(sources, num_replicas=1, tp=2, quant="fp8_block")
    p = plan(sources, receivers)
    sender, receiver = p.for_sender(1), p.for_receiver(1)
    assert sender.tasks and sender.buckets and receiver.arrivals
    staged, info = ShmRecv.prepare({"w": torch.zeros(4, 8, dtype=torch.bfloat16), "s": torch.ones(1)}, job="wire",
                                   rank=0)
    remove_files(info)
    meta = ReceiverMeta(0, "infer0", {"w": DestTensor("w", (4, 8), torch.bfloat16)},
                        LayoutSpec("vllm", {"tp_rank": 1, "tp_size": 2, "names": ["a", "b"], "pad": None}),
                        "fp8_block", info, gated=True, device="GPU-1234")
    fake_cuda_args = (torch.Tensor, torch.Size([4, 8]), (8, 1), 0, torch.storage.TypedStorage, torch.float8_e4m3fn, 1,
                      b"\x00\xffipc-handle", 4096, 512, False, b"ref\x00counter", 16, b"\x01event", True)
    endpoint = Endpoint(0, "mlx5_1:1@infer0", "InfiniBand", {0: QpEndpoint(11, 1, 5, "fe80::1", 5)},
                        (Region(0x7000, 4096, 99, 0),), {"w": RemoteTensor(0x7100, (4, 8), 2)})
    return {"Box": sender.tasks[0].src_box, "Task": sender.tasks[0], "Bucket": sender.buckets[0],
            "SenderPlan": sender, "ReceiverPlan": receiver, "DestTensor": receivers[1].tensors[sources[0].name],
            "LayoutSpec": receivers[1].layout, "ReceiverMeta": meta, "IpcExport": IpcExport.from_args("GPU-1", fake_cuda_args),
            "QpEndpoint": endpoint.qps[0], "Endpoint": endpoint, "Region": endpoint.regions[0],
            "RemoteTensor": endpoint.tensors["w"]}


@pytest.mark.parametrize("secret", [None, SECRET])
def test_every_carried_type_round_trips_through_the_store(store, secret):
    samples = _samples()
    assert set(samples) == set(CARRIED) == set(carried_types())  # every annotation is one the wire checks
    control = _control(store, secret)
    for name, value in samples.items():
        assert type(value) is carried_types()[name]
        control.set(f"sample/{name}", value)
        assert control.get(f"sample/{name}") == value, name
    # Reconstruct mode's bucket sizes are whole bytes too (they were floats, which the wire refuses).
    sources = sources_on(llama_like_shapes(1, 256, 512, 128, 1000), [0, 1], [Shard(0)])
    rebuilt = plan(sources, receivers_for(sources, num_replicas=1, tp=1, quant="none"), mode="reconstruct")
    control.set("sample/reconstruct", rebuilt.for_sender(0))
    assert control.get("sample/reconstruct") == rebuilt.for_sender(0)
    plain = [("go", 3, "f00d", 2, None, False), "ok", True, None, 7, 2.5, [1, (2, 3)], {"files": {"w": ("/p", torch.bfloat16, (4,))}},
             {0: "a", 5: (1,)}, b"\x00\x01", torch.float8_e4m3fn, ("error", "PlanError: 'x' is missing")]
    control.set_many({f"plain/{i}": v for i, v in enumerate(plain)})
    got = control.get_many([f"plain/{i}" for i in range(len(plain))])
    assert got == plain and [type(g) for g in got] == [type(v) for v in plain]
    # Fields keep their exact types: tuples stay tuples, dict keys stay ints.
    meta = control.get("sample/ReceiverMeta")
    assert type(meta.transport_info["files"]["w"][2]) is tuple
    assert list(control.get("sample/SenderPlan").tasks[0].src_box.sizes) == list(samples["Box"].sizes)
    ipc = control.get("sample/IpcExport").rebuild_args(3)
    assert ipc[1] == torch.Size([4, 8]) and ipc[6] == 3 and ipc[7] == b"\x00\xffipc-handle" and ipc[14] is True


def test_plans_are_compact_and_code_fast():
    sender = _samples()["SenderPlan"]
    signer = Signer(SECRET, "fsdp_sync/j/")
    raw = dumps(sender, key="plan/x/send/1", signer=signer)
    assert len(raw) < 1.6 * len(pickle.dumps(sender, protocol=4))
    go = ("go", 12345, "0123456789abcdef01234567", 3, None, False)
    started = time.perf_counter()
    for _ in range(2000):
        assert loads(dumps(go, key="push/7", signer=signer), key="push/7", signer=signer) == go
    per_value_s = (time.perf_counter() - started) / 2000
    assert per_value_s < 200e-6, f"{per_value_s * 1e6:.1f} us to sign, encode, verify and decode a go"


class _Boom:
    """Unpickling this creates a file: what a forged pickle could do to every reader."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _refusal(store, raw: bytes, *, secret=None) -> str:
    _raw(store).set("push/4", raw)
    with pytest.raises(ControlPlaneError) as caught:
        _control(store, secret).get(push_key(4))
    assert caught.value.key == "push/4"
    assert "fsdp_sync/wire-test/push/4" in str(caught.value)
    return str(caught.value)


def _payload(obj) -> bytes:
    return MAGIC + b"u" + json.dumps(obj).encode()


def test_garbage_is_refused_naming_the_key(store, tmp_path):
    marker = tmp_path / "pwned"
    assert "pickle" in _refusal(store, pickle.dumps(("go", 1, _Boom(str(marker)), 0)))
    assert not marker.exists()
    assert "not an fsdp_sync control value" in _refusal(store, b"\x00\x01garbage")
    assert "not an fsdp_sync control value" in _refusal(store, b"")
    assert "FS9" in _refusal(store, b"FS9u[]")
    assert "not valid JSON" in _refusal(store, MAGIC + b"u" + b'{"t": [1, 2')
    assert "not valid JSON" in _refusal(store, MAGIC + b"u" + b'{"t": [1]} trailing')
    assert "not valid JSON" in _refusal(store, MAGIC + b"u" + b"\xff\xfe")
    assert "unknown type tag 'x'" in _refusal(store, _payload({"x": 1}))
    assert "exactly one type tag" in _refusal(store, _payload({"t": [], "d": {}}))
    assert "'Popen' is not a type" in _refusal(store, _payload({"@Popen": ["rm -rf /"]}))
    assert "list of its 2 fields" in _refusal(store, _payload({"@Box": [[0], [1], [2]]}))
    assert "value.offsets[0]: expected int, got str" in _refusal(store, _payload({"@Box": [["0"], [1]]}))
    assert "expected int, got bool" in _refusal(store, _payload({"@Box": [[True], [1]]}))
    assert "not a valid Box" in _refusal(store, _payload({"@Box": [[0], [-1]]}))  # Box.__post_init__
    assert "'complex64' is not a dtype" in _refusal(store, _payload({"dt": "complex64"}))
    assert "not valid base64" in _refusal(store, _payload({"b": "!!"}))
    assert "key '01' is not an int" in _refusal(store, _payload(
        {"@Endpoint": [0, "n", "IB", {"01": [1, 2, 3, "g", 4]}, [], {}]}))
    _refusal(store, MAGIC + b"u" + b"[" * 100_000 + b"]" * 100_000)  # too deep: refused, not a crash


def test_signatures_bind_the_value_to_its_key_job_and_secret(store):
    signed, other_job = _control(store, SECRET), _control(store, SECRET, job="another-job")
    signed.set(done_key(1, 0), True)
    raw = _raw(store).get(done_key(1, 0))
    assert signed.get(done_key(1, 0)) is True
    _raw(store).set(done_key(2, 0), raw)  # replayed under the next push's key
    with pytest.raises(ControlPlaneError, match="signature does not match"):
        signed.get(done_key(2, 0))
    _raw(store, "another-job").set(done_key(1, 0), raw)  # and under another job's
    with pytest.raises(ControlPlaneError, match="signature does not match"):
        other_job.get(done_key(1, 0))
    _control(store, "wrong secret").set(done_key(3, 0), True)
    with pytest.raises(ControlPlaneError, match="signature does not match"):
        signed.get(done_key(3, 0))
    tampered = bytearray(raw)
    tampered[-1] ^= 1  # the payload after the MAC
    _raw(store).set(done_key(1, 0), bytes(tampered))
    with pytest.raises(ControlPlaneError):
        signed.get(done_key(1, 0))
    _control(store).set(done_key(4, 0), True)
    with pytest.raises(ControlPlaneError, match="unsigned, but this job has a secret"):
        signed.get(done_key(4, 0))
    signed.set(done_key(5, 0), True)
    with pytest.raises(ControlPlaneError, match="signed, but this job has no secret"):
        _control(store).get(done_key(5, 0))


def test_waits_that_gate_a_commit_never_take_a_refused_value(store):
    """A forged done key counts as not written: the genuine one, written later, is what ends the wait."""
    signed = _control(store, SECRET)
    _control(store).set(done_key(1, 0), True)  # forged: unsigned
    _control(store, SECRET).set(done_key(1, 1), "True")  # signed, but not the value a done key holds
    with pytest.raises(ControlPlaneError, match=r"senders \[0, 1\] to finish push 1.*unsigned.*not True"):
        signed.wait_done(1, [0, 1], timeout_s=0.2)
    import threading
    threading.Timer(0.1, lambda: signed.set_many({done_key(1, 0): True, done_key(1, 1): True})).start()
    signed.wait_done(1, [0, 1], timeout_s=5)
    with pytest.raises(SyncTimeout, match=r"senders \[2\] to finish push 1"):
        signed.wait_done(1, [2], timeout_s=0.1)


def test_counters_stay_plain_integers_and_garbage_in_one_is_an_error(store):
    control = _control(store, SECRET)
    control.add(PUSH_FAILURES, 2)
    assert control.counters([PUSH_FAILURES]) == [2]
    _raw(store).set(PUSH_FAILURES, b"\x80\x04pickle")
    with pytest.raises(ControlPlaneError, match="push/failures refused: a counter holds"):
        control.counters([PUSH_FAILURES])


def test_a_refused_error_value_is_reported_as_the_reason():
    control = ControlPlane(dist.HashStore(), "job", timeout_s=1.0, secret=SECRET)
    control.store.set(ack_key(1, 0), b"junk")
    assert "ack/0 refused" in control.first_error([ack_key(1, 0)])


def test_secret_setting_and_environment(monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    assert SyncConfig().resolved_secret() is None
    monkeypatch.setenv(SECRET_ENV, "from-env")
    assert SyncConfig().resolved_secret() == "from-env"
    assert SyncConfig(secret="field").resolved_secret() == "field"
    assert "field" not in repr(SyncConfig(secret="field"))
    with pytest.raises(ValueError, match="SyncConfig.secret"):
        SyncConfig(secret="")


# -- a running receiver (in this process) against forged keys ----------------------------------
def _receiver(port: int, job: str, secret: str | None) -> WeightReceiver:
    cfg = SyncConfig(control=f"127.0.0.1:{port}", job=job, transport="shm", host_control=False, timeout_s=3.0,
                     secret=secret)
    return WeightReceiver({"w": torch.zeros(4, 8, dtype=torch.bfloat16)}, config=cfg, rank=0, world_size=1)


def _fake_plan(fp: str) -> ReceiverPlan:
    box = Box.full((4, 8))
    return ReceiverPlan(fp, 0, 1, 1, [Task(0, 0, "w", box, "w", box, "data", "none", 64, 0, 0)], [0], "shm")


def test_a_pickle_under_the_go_key_of_a_running_receiver_runs_nothing(store, tmp_path):
    port = store.port
    marker = tmp_path / "pwned"
    recv = _receiver(port, "pickled", None)
    try:
        _raw(store, "pickled").set(push_key(1), pickle.dumps(("go", 1, _Boom(str(marker)), 0)))
        with pytest.raises(SyncError, match=r"fsdp_sync/pickled/push/1 refused: it holds a pickle"):
            recv.wait_for(timeout=5)
        assert not marker.exists()
        assert recv.version is None and recv._thread.is_alive()
        # Still following the job: garbage that replaces it is reported in turn.
        _raw(store, "pickled").set(push_key(1), b"\x00garbage")
        with pytest.raises(ControlPlaneError, match="push/1 refused: its 8 bytes are not"):
            recv.wait_for(timeout=5)
        # Without a secret, a well-formed go is read, but one naming no published plan fails at once.
        _control(store, job="pickled").set(push_key(1), ("go", 999, "no-such-plan", 0, None, False))
        with pytest.raises(ControlPlaneError, match="names plan no-such-plan, which is not on the control plane"):
            recv.wait_for(timeout=2)
        assert recv.version is None
    finally:
        recv.close()


def test_with_a_secret_forged_go_plan_and_done_keys_commit_nothing(store):
    job = "forged"
    recv = _receiver(store.port, job, SECRET)
    genuine = _control(store, SECRET, job=job)
    try:
        assert genuine.get(recv_meta_key(0), expect=ReceiverMeta).rank == 0  # registered, signed
        with pytest.raises(ControlPlaneError, match="signed, but this job has no secret"):
            _control(store, job=job).get(recv_meta_key(0))  # and a reader without the secret refuses it
        for forger, why in ((_control(store, job=job), "unsigned"),
                            (_control(store, "guess", job=job), "signature does not match")):
            forger.set(plan_receiver_key("evil", 0), _fake_plan("evil"))
            forger.set_many({push_key(1): ("go", 999, "evil", 0, None, False), done_key(1, 0): True})
            with pytest.raises(ControlPlaneError, match=f"push/1 refused: .*{why}"):
                recv.wait_for(timeout=5)
            assert recv.version is None and recv.landed_version is None
        # A signed go (as if copied from a genuine push) naming a plan the forger wrote: refused too.
        genuine.set(push_key(1), ("go", 999, "evil", 0, None, False))
        with pytest.raises(ControlPlaneError, match=r"plan/evil/recv/0 refused: .*signature does not match"):
            recv.wait_for(timeout=5)
        assert recv.version is None and recv.landed_version is None
        assert "plan/evil/recv/0 refused" in genuine.get(ack_key(1, 0))  # the push failed, visibly
        assert bool((recv.tensors["w"] == 0).all())
    finally:
        recv.close()


def test_rdma_wire_rejects_a_tampered_endpoint(store):
    """Schema checks reach nested fields: an Endpoint whose QP number is a string is refused."""
    control = _control(store)
    good = _samples()["Endpoint"]
    control.set("rdma/fp/recv/0", good)
    raw = _raw(store).get("rdma/fp/recv/0")
    bad = raw.replace(b'"0":[11,', b'"0":["11",')
    assert bad != raw
    _raw(store).set("rdma/fp/recv/0", bad)
    with pytest.raises(ControlPlaneError, match=r"value.qps\[0\]"):
        control.get("rdma/fp/recv/0")


def test_plain_values_of_unknown_classes_cannot_be_written(store):
    with pytest.raises(TypeError, match="cannot travel"):
        _control(store).set("x", Path("/tmp"))
    with pytest.raises(TypeError, match="cannot travel"):
        _control(store).set("x", {"f": lambda: 0})
