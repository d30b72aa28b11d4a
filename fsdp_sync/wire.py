"""The control plane's wire format: versioned, schema-checked JSON, optionally signed. Never pickle.

Anyone who reaches the store can write any key, so a value read from it is data to
check, not code to run. A value on the wire is::

    b"FS1" b"u" <payload>                    unsigned (no secret configured)
    b"FS1" b"s" <32-byte HMAC-SHA256> <payload>   signed

The HMAC covers the header, the full store key (``fsdp_sync/<job>/<key>``) and the
payload, so a value copied from one key (or job) to another is refused like a forged
one. With a secret, unsigned values are refused; without one, signed values are too,
so a job that has the secret and one that has not fail with a clear error instead of
trusting each other by accident.

The payload is compact JSON. Self-describing values (what ``ControlPlane.set`` is
given) are: None, bool, int, float, str and lists as themselves; every other kind is
an object with exactly one tag: ``{"t": [...]}`` a tuple, ``{"d": {...}}`` a dict with
str keys, ``{"m": [[k, v], ...]}`` a dict with other keys, ``{"b": "<base64>"}``
bytes, ``{"dt": "bfloat16"}`` a torch dtype from ``DTYPES``, and ``{"@Name": [...]}``
a dataclass from ``CARRIED``. A dataclass is the list of its fields in declaration
order, each encoded by its annotation (a ``tuple[int, ...]`` field is a bare list,
a nested carried dataclass a bare list of its own fields, an ``Any`` field
self-describing), which keeps plans of big models small. Decoding checks every
field's type against the annotation, runs the dataclass's own ``__post_init__``
checks, and refuses unknown tags, unknown type names, wrong field counts and trailing
bytes; every refusal is a ``ControlPlaneError`` naming the key and the field.

Change ``MAGIC`` whenever a carried dataclass gains, loses or reorders a field: the
two jobs must then run the same fsdp_sync, and say so instead of misreading values.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import importlib
import json
import types
import typing
from typing import Any, Callable

import torch

from .errors import ControlPlaneError

MAGIC = b"FS1"
_UNSIGNED = MAGIC + b"u"
_SIGNED = MAGIC + b"s"
_MAC_BYTES = 32

# Every dataclass the control plane carries, by the name it travels under: nothing else
# decodes. Imported on first use (the RDMA and CUDA IPC ones need no device to import).
CARRIED: dict[str, str] = {
    "Box": "fsdp_sync.boxes",
    "Task": "fsdp_sync.plan",
    "Bucket": "fsdp_sync.plan",
    "SenderPlan": "fsdp_sync.plan",
    "ReceiverPlan": "fsdp_sync.plan",
    "DestTensor": "fsdp_sync.meta",
    "LayoutSpec": "fsdp_sync.meta",
    "ReceiverMeta": "fsdp_sync.meta",
    "IpcExport": "fsdp_sync.transport.cuda_ipc",
    "QpEndpoint": "fsdp_sync.transport.rdma_exchange",
    "Endpoint": "fsdp_sync.transport.rdma_exchange",
    "Region": "fsdp_sync.transport.rdma_wr",
    "RemoteTensor": "fsdp_sync.transport.rdma_wr",
}
_DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                "float8_e5m2fnuz", "float8_e8m0fnu", "int8", "uint8", "int16", "int32", "int64", "bool")
DTYPES: dict[str, torch.dtype] = {n: getattr(torch, n) for n in _DTYPE_NAMES if isinstance(getattr(torch, n, None), torch.dtype)}
_DTYPE_NAME = {d: n for n, d in DTYPES.items()}


class WireError(ValueError):
    """A value that cannot be carried or does not decode; ``ControlPlane`` adds the key."""


# -- signing --------------------------------------------------------------------------
class Signer:
    """Seals and opens values for one namespace, with an HMAC key or none."""

    def __init__(self, secret: str | None, namespace: str):
        self.signed = bool(secret)
        self._mac = hmac.new(secret.encode(), digestmod=hashlib.sha256) if secret else None
        self._namespace = namespace

    def _digest(self, key: str, payload: bytes) -> bytes:
        mac = self._mac.copy()
        mac.update(_SIGNED + (self._namespace + key).encode() + b"\0" + payload)
        return mac.digest()

    def seal(self, key: str, payload: bytes) -> bytes:
        if self._mac is None:
            return _UNSIGNED + payload
        return _SIGNED + self._digest(key, payload) + payload

    def open(self, key: str, raw: bytes) -> bytes:
        """The payload of ``raw``, once its header (and signature) checks out."""
        head = raw[:4]
        if head == _SIGNED:
            if self._mac is None:
                raise WireError("the value is signed, but this job has no secret: set the same secret on both jobs "
                                "(SyncConfig.secret or the FSDP_SYNC_SECRET environment variable)")
            mac, payload = raw[4:4 + _MAC_BYTES], raw[4 + _MAC_BYTES:]
            if len(mac) != _MAC_BYTES or not hmac.compare_digest(mac, self._digest(key, payload)):
                raise WireError("the signature does not match: written with another secret, forged, or copied "
                                "from another key")
            return payload
        if head == _UNSIGNED:
            if self._mac is not None:
                raise WireError("the value is unsigned, but this job has a secret: refused (is the same secret set "
                                "on the other job, as SyncConfig.secret or FSDP_SYNC_SECRET?)")
            return raw[4:]
        if raw[:1] == b"\x80":
            raise WireError("it holds a pickle, which fsdp_sync never loads (an older fsdp_sync, or a forgery); "
                            "refused")
        if raw[:2] == b"FS":
            raise WireError(f"it is in control format {raw[:4]!r}, not {MAGIC.decode()}: run the same fsdp_sync "
                            "version in both jobs")
        raise WireError(f"its {len(raw)} bytes are not an fsdp_sync control value (format {MAGIC.decode()}); "
                        f"they start {raw[:12]!r}")


# Built once: json.dumps/loads with non-default options build a new coder per call.
_to_json = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode
_from_json = json.JSONDecoder().decode


def dumps(value: Any, *, key: str, signer: Signer) -> bytes:
    return signer.seal(key, _to_json(encode(value)).encode())


def loads(raw: bytes, *, key: str, signer: Signer) -> Any:
    """The value under ``key``, or a WireError saying why it is refused. Runs no code of the writer's."""
    payload = signer.open(key, raw)
    try:
        obj = _from_json(payload.decode())  # trailing bytes after the value are an error here too
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise WireError(f"the payload is not valid JSON: {e}") from None
    try:
        return decode(obj, "value")
    except RecursionError:
        raise WireError("the value nests too deeply") from None


# -- self-describing values -------------------------------------------------------------
def encode(value: Any) -> Any:
    """``value`` as JSON-able data (see the module docstring); WireError for what cannot travel."""
    t = type(value)
    if t is str or t is int or t is bool or t is float or value is None:
        return value
    if t is tuple:
        return {"t": [encode(v) for v in value]}
    if t is list:
        return [encode(v) for v in value]
    if t is dict:
        if all(type(k) is str for k in value):
            return {"d": {k: encode(v) for k, v in value.items()}}
        return {"m": [[encode(k), encode(v)] for k, v in value.items()]}
    if t is bytes:
        return {"b": base64.b64encode(value).decode()}
    if t is torch.dtype:
        return {"dt": _dtype_name(value)}
    codec = _codec_of_class(t)
    if codec is not None:
        return {"@" + codec.name: codec.encode(value)}
    if isinstance(value, tuple) and not hasattr(value, "_fields"):  # torch.Size; not a namedtuple
        return {"t": [encode(v) for v in value]}
    raise WireError(f"a {t.__module__}.{t.__qualname__} cannot travel on the control plane")


def decode(obj: Any, path: str) -> Any:
    t = type(obj)
    if t is str or t is int or t is bool or t is float or obj is None:
        return obj
    if t is list:
        return [decode(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    if t is not dict or len(obj) != 1:
        raise WireError(f"{path}: an object must have exactly one type tag, got keys {sorted(obj)[:4]}")
    ((tag, body),) = obj.items()
    if tag == "t":
        return tuple(decode(v, f"{path}[{i}]") for i, v in enumerate(_need(body, list, path)))
    if tag == "d":
        return {k: decode(v, f"{path}[{k!r}]") for k, v in _need(body, dict, path).items()}
    if tag == "m":
        out = {}
        for i, pair in enumerate(_need(body, list, path)):
            if type(pair) is not list or len(pair) != 2:
                raise WireError(f"{path}: entry {i} of a mapping must be a [key, value] pair")
            k = decode(pair[0], f"{path}.key{i}")
            try:
                out[k] = decode(pair[1], f"{path}[{k!r}]")
            except TypeError:
                raise WireError(f"{path}: key {i} is a {type(k).__name__}, which cannot key a dict") from None
        return out
    if tag == "b":
        return _bytes(body, path)
    if tag == "dt":
        return _dtype(body, path)
    if tag[:1] == "@":
        codec = _codec_of_name(tag[1:])
        if codec is None:
            raise WireError(f"{path}: {tag[1:]!r} is not a type the control plane carries "
                            f"(known: {', '.join(sorted(CARRIED))})")
        return codec.decode(body, path)
    raise WireError(f"{path}: unknown type tag {tag!r}")


def _need(body: Any, kind: type, path: str) -> Any:
    if type(body) is not kind:
        raise WireError(f"{path}: expected a JSON {'array' if kind is list else 'object'}, got {type(body).__name__}")
    return body


def _bytes(body: Any, path: str) -> bytes:
    if type(body) is not str:
        raise WireError(f"{path}: bytes travel as base64 text, got {type(body).__name__}")
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise WireError(f"{path}: not valid base64") from None


def _dtype(body: Any, path: str) -> torch.dtype:
    if type(body) is not str or body not in DTYPES:
        raise WireError(f"{path}: {body!r} is not a dtype the control plane carries ({', '.join(DTYPES)})")
    return DTYPES[body]


def _dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAME[dtype]
    except KeyError:
        raise WireError(f"dtype {dtype} cannot travel on the control plane ({', '.join(DTYPES)})") from None


# -- values typed by an annotation -------------------------------------------------------
Encoder = Callable[[Any], Any]
Decoder = Callable[[Any, str], Any]


class _Dataclass:
    """One carried dataclass: a list of its fields, each coded by its annotation."""

    def __init__(self, cls: type, name: str):
        self.cls, self.name = cls, name
        self._fields: list[tuple[str, Encoder, Decoder]] | None = None
        self._keywords = False

    def fields(self) -> list[tuple[str, Encoder, Decoder]]:
        if self._fields is None:
            hints = typing.get_type_hints(self.cls)
            fields = dataclasses.fields(self.cls)
            for f in fields:
                if not f.init:
                    raise TypeError(f"{self.name}.{f.name} is init=False; a carried dataclass is built from its fields")
            self._keywords = any(f.kw_only for f in fields)
            self._fields = [(f.name, *_typed(hints[f.name], f"{self.name}.{f.name}")) for f in fields]
        return self._fields

    def encode(self, obj: Any) -> list:
        if type(obj) is not self.cls:
            raise WireError(f"expected a {self.name}, got a {type(obj).__name__}")
        return [enc(getattr(obj, name)) for name, enc, _ in self.fields()]

    def decode(self, body: Any, path: str) -> Any:
        fields = self.fields()
        if type(body) is not list or len(body) != len(fields):
            got = f"{len(body)} values" if type(body) is list else f"a {type(body).__name__}"
            raise WireError(f"{path}: a {self.name} is the list of its {len(fields)} fields "
                            f"({', '.join(n for n, _, _ in fields)}), got {got}")
        values = [dec(v, f"{path}.{name}") for (name, _, dec), v in zip(fields, body)]
        try:
            if self._keywords:
                return self.cls(**{name: v for (name, _, _), v in zip(fields, values)})
            return self.cls(*values)
        except (TypeError, ValueError) as e:  # the dataclass's own __post_init__ checks
            raise WireError(f"{path}: not a valid {self.name}: {e}") from None


_BY_NAME: dict[str, _Dataclass] = {}
_BY_CLASS: dict[type, _Dataclass] = {}


def _load_carried() -> None:
    if len(_BY_NAME) == len(CARRIED):
        return
    for name, module in CARRIED.items():
        if name not in _BY_NAME:
            cls = getattr(importlib.import_module(module), name)
            assert dataclasses.is_dataclass(cls), f"{module}.{name} is not a dataclass"
            _BY_NAME[name] = _BY_CLASS[cls] = _Dataclass(cls, name)


def _codec_of_name(name: str) -> _Dataclass | None:
    _load_carried()
    return _BY_NAME.get(name)


def _codec_of_class(cls: type) -> _Dataclass | None:
    codec = _BY_CLASS.get(cls)
    if codec is None and dataclasses.is_dataclass(cls):
        _load_carried()
        codec = _BY_CLASS.get(cls)
    return codec


def _scalar(kind: type) -> tuple[Encoder, Decoder]:
    def enc(v: Any) -> Any:
        if type(v) is not kind:
            raise WireError(f"expected {kind.__name__}, got {type(v).__name__}")
        return v

    def dec(x: Any, path: str) -> Any:
        if type(x) is not kind:
            raise WireError(f"{path}: expected {kind.__name__}, got {type(x).__name__}")
        return x

    return enc, dec


def _float() -> tuple[Encoder, Decoder]:
    def enc(v: Any) -> float:
        if type(v) is not float and type(v) is not int:
            raise WireError(f"expected float, got {type(v).__name__}")
        return float(v)

    def dec(x: Any, path: str) -> float:
        if type(x) is not float and type(x) is not int:
            raise WireError(f"{path}: expected float, got {type(x).__name__}")
        return float(x)

    return enc, dec


def _typed(tp: Any, where: str) -> tuple[Encoder, Decoder]:
    """(encode, decode) of values annotated ``tp``; a TypeError for annotations the wire cannot check."""
    if tp is Any:
        return encode, decode
    if tp in (int, str, bool):
        return _scalar(tp)
    if tp is float:
        return _float()
    if tp is bytes:
        return (lambda v: base64.b64encode(v).decode() if type(v) is bytes else _wrong("bytes", v)), _bytes
    if tp is torch.dtype:
        return (lambda v: _dtype_name(v) if type(v) is torch.dtype else _wrong("torch.dtype", v)), _dtype
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1 or len(args) != 2:
            raise TypeError(f"{where}: the wire carries X | None, not {tp}")
        inner_enc, inner_dec = _typed(rest[0], where)
        return (lambda v: None if v is None else inner_enc(v)), (lambda x, p: None if x is None else inner_dec(x, p))
    if origin is list or origin is tuple or origin is frozenset:
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return _fixed_tuple(args, where)
        item_enc, item_dec = _typed(args[0], where)
        build = {list: list, tuple: tuple, frozenset: frozenset}[origin]
        name = origin.__name__

        def enc_seq(v: Any) -> list:
            if type(v) is not origin and not (origin is tuple and isinstance(v, tuple)):
                _wrong(name, v)
            return [item_enc(x) for x in (sorted(v) if origin is frozenset else v)]

        def dec_seq(x: Any, path: str) -> Any:
            if type(x) is not list:
                raise WireError(f"{path}: expected a list ({name}), got {type(x).__name__}")
            return build(item_dec(e, f"{path}[{i}]") for i, e in enumerate(x))

        return enc_seq, dec_seq
    if origin is dict:
        key_type, value_type = args
        if key_type not in (str, int):
            raise TypeError(f"{where}: the wire carries dicts keyed by str or int, not {key_type}")
        value_enc, value_dec = _typed(value_type, where)
        if key_type is str:
            def enc_dict(v: Any) -> dict:
                if type(v) is not dict:
                    _wrong("dict", v)
                out = {}
                for k, x in v.items():
                    if type(k) is not str:
                        raise WireError(f"{where}: key {k!r} is not a str")
                    out[k] = value_enc(x)
                return out

            def dec_dict(x: Any, path: str) -> dict:
                return {k: value_dec(e, f"{path}[{k!r}]") for k, e in _need(x, dict, path).items()}
        else:
            def enc_dict(v: Any) -> dict:
                if type(v) is not dict:
                    _wrong("dict", v)
                out = {}
                for k, x in v.items():
                    if type(k) is not int:
                        raise WireError(f"{where}: key {k!r} is not an int")
                    out[str(k)] = value_enc(x)
                return out

            def dec_dict(x: Any, path: str) -> dict:
                out = {}
                for k, e in _need(x, dict, path).items():
                    number = k[1:] if k[:1] == "-" else k
                    if not (number.isascii() and number.isdigit()) or str(int(k)) != k:
                        raise WireError(f"{path}: key {k!r} is not an int")
                    out[int(k)] = value_dec(e, f"{path}[{k}]")
                return out
        return enc_dict, dec_dict
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        codec = _codec_of_class(tp)
        if codec is None:
            raise TypeError(f"{where}: {tp.__qualname__} is not in wire.CARRIED")
        return codec.encode, codec.decode
    raise TypeError(f"{where}: the wire cannot carry values annotated {tp}")


def _fixed_tuple(args: tuple, where: str) -> tuple[Encoder, Decoder]:
    codecs = [_typed(a, where) for a in args]

    def enc(v: Any) -> list:
        if not isinstance(v, tuple) or len(v) != len(codecs):
            raise WireError(f"{where}: expected a tuple of {len(codecs)}, got {v!r:.60}")
        return [e(x) for (e, _), x in zip(codecs, v)]

    def dec(x: Any, path: str) -> tuple:
        if type(x) is not list or len(x) != len(codecs):
            raise WireError(f"{path}: expected a list of {len(codecs)} values")
        return tuple(d(e, f"{path}[{i}]") for i, ((_, d), e) in enumerate(zip(codecs, x)))

    return enc, dec


def _wrong(expected: str, value: Any) -> Any:
    raise WireError(f"expected {expected}, got {type(value).__name__}")


def carried_types() -> dict[str, type]:
    """Every carried dataclass by wire name, its field codecs built (a check that each annotation is supported)."""
    _load_carried()
    for codec in _BY_NAME.values():
        codec.fields()
    return {name: codec.cls for name, codec in _BY_NAME.items()}


__all__ = ["CARRIED", "DTYPES", "MAGIC", "ControlPlaneError", "Signer", "WireError", "carried_types", "decode",
           "dumps", "encode", "loads"]
