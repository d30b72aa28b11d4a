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
import operator
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
        return decode(obj)
    except RecursionError:
        raise WireError("the value nests too deeply") from None
    except _Refused as e:
        raise WireError(e.message()) from None


class _Refused(Exception):
    """A decoding failure on its way up: each container adds its part of the path, so the
    success path never formats one."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what, self.path = what, []

    def at(self, part: str) -> "_Refused":
        self.path.append(part)
        return self

    def message(self) -> str:
        return f"value{''.join(reversed(self.path))}: {self.what}"


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


def decode(obj: Any) -> Any:
    t = type(obj)
    if t is str or t is int or t is bool or t is float or obj is None:
        return obj
    if t is list:
        return _each(decode, obj, list)
    if t is not dict or len(obj) != 1:
        raise _Refused(f"an object must have exactly one type tag, got keys {sorted(obj)[:4]}")
    ((tag, body),) = obj.items()
    if tag == "t":
        return _each(decode, _need(body, list), tuple)
    if tag == "d":
        return _values(decode, _need(body, dict))
    if tag == "m":
        out = {}
        for i, pair in enumerate(_need(body, list)):
            if type(pair) is not list or len(pair) != 2:
                raise _Refused(f"entry {i} of a mapping must be a [key, value] pair")
            try:
                k = decode(pair[0])
                out[k] = decode(pair[1])
            except _Refused as e:
                raise e.at(f"[entry {i}]") from None
            except TypeError:
                raise _Refused(f"key {i} is a {type(k).__name__}, which cannot key a dict") from None
        return out
    if tag == "b":
        return _bytes(body)
    if tag == "dt":
        return _dtype(body)
    if tag[:1] == "@":
        codec = _codec_of_name(tag[1:])
        if codec is None:
            raise _Refused(f"{tag[1:]!r} is not a type the control plane carries (known: {', '.join(sorted(CARRIED))})")
        return codec.decode(body)
    raise _Refused(f"unknown type tag {tag!r}")


def _each(dec: Callable[[Any], Any], items: list, build: type) -> Any:
    try:
        return build([dec(v) for v in items])
    except _Refused as e:
        for i, v in enumerate(items):  # only on the error path: which item
            try:
                dec(v)
            except _Refused:
                raise e.at(f"[{i}]") from None
        raise


def _values(dec: Callable[[Any], Any], items: dict, key: Callable[[str], Any] | None = None) -> dict:
    out = {}
    for k, v in items.items():
        try:
            out[k if key is None else key(k)] = dec(v)
        except _Refused as e:
            raise e.at(f"[{k!r}]" if key is None else f"[{k}]") from None
    return out


def _need(body: Any, kind: type) -> Any:
    if type(body) is not kind:
        raise _Refused(f"expected a JSON {'array' if kind is list else 'object'}, got {type(body).__name__}")
    return body


def _bytes(body: Any) -> bytes:
    if type(body) is not str:
        raise _Refused(f"bytes travel as base64 text, got {type(body).__name__}")
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise _Refused("not valid base64") from None


def _dtype(body: Any) -> torch.dtype:
    if type(body) is not str or body not in DTYPES:
        raise _Refused(f"{body!r:.40} is not a dtype the control plane carries ({', '.join(DTYPES)})")
    return DTYPES[body]


def _dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAME[dtype]
    except KeyError:
        raise WireError(f"dtype {dtype} cannot travel on the control plane ({', '.join(DTYPES)})") from None


# -- values typed by an annotation -------------------------------------------------------
# Encoders trust scalars (json refuses what it cannot write; a float in an int field is the
# reader's error to report), check containers and dataclasses. Decoders check everything.
Encoder = Callable[[Any], Any]
Decoder = Callable[[Any], Any]


def _same(v: Any) -> Any:
    return v


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
            self._names = [f.name for f in fields]
            coded = [(f.name, *_typed(hints[f.name], f"{self.name}.{f.name}")) for f in fields]
            # Fast paths: every field read in one C call; only fields that need it are encoded.
            self._get = operator.attrgetter(*self._names) if len(fields) > 1 else (
                lambda obj, name=self._names[0]: (getattr(obj, name),))
            self._encoded = [(i, enc) for i, (_, enc, _) in enumerate(coded) if enc is not _same]
            self._decoders = [dec for _, _, dec in coded]
            self._fields = coded
        return self._fields

    def encode(self, obj: Any) -> list:
        if type(obj) is not self.cls:
            raise WireError(f"expected a {self.name}, got a {type(obj).__name__}")
        self.fields()
        values = list(self._get(obj))
        try:
            for i, enc in self._encoded:
                values[i] = enc(values[i])
            return values
        except WireError as e:
            for name, enc, _ in self.fields():  # say which field (only on this error path)
                try:
                    enc(getattr(obj, name))
                except WireError:
                    raise WireError(f"{self.name}.{name}: {e}") from None
            raise

    def decode(self, body: Any) -> Any:
        fields = self.fields()
        if type(body) is not list or len(body) != len(fields):
            got = f"{len(body)} values" if type(body) is list else f"a {type(body).__name__}"
            raise _Refused(f"a {self.name} is the list of its {len(fields)} fields ({', '.join(self._names)}), got {got}")
        try:
            values = [dec(v) for dec, v in zip(self._decoders, body)]
        except _Refused as e:
            for (name, _, dec), v in zip(fields, body):  # only on the error path: which field
                try:
                    dec(v)
                except _Refused:
                    raise e.at(f".{name}") from None
            raise
        try:
            if self._keywords:
                return self.cls(**dict(zip(self._names, values)))
            return self.cls(*values)
        except (TypeError, ValueError) as e:  # the dataclass's own __post_init__ checks
            raise _Refused(f"not a valid {self.name}: {e}") from None


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
    def dec(x: Any) -> Any:
        if type(x) is not kind:
            raise _Refused(f"expected {kind.__name__}, got {type(x).__name__}")
        return x

    return _same, dec


def _float() -> tuple[Encoder, Decoder]:
    def dec(x: Any) -> float:
        if type(x) is not float and type(x) is not int:
            raise _Refused(f"expected float, got {type(x).__name__}")
        return float(x)

    return _same, dec


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
        return (lambda v: None if v is None else inner_enc(v)), (lambda x: None if x is None else inner_dec(x))
    if origin is list or origin is tuple or origin is frozenset:
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return _fixed_tuple(args, where)
        return _sequence(origin, *_typed(args[0], where), scalar=args[0] if args[0] in (int, str, bool) else None)
    if origin is dict:
        key_type, value_type = args
        if key_type not in (str, int):
            raise TypeError(f"{where}: the wire carries dicts keyed by str or int, not {key_type}")
        return _mapping(key_type, *_typed(value_type, where))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        codec = _codec_of_class(tp)
        if codec is None:
            raise TypeError(f"{where}: {tp.__qualname__} is not in wire.CARRIED")
        return codec.encode, codec.decode
    raise TypeError(f"{where}: the wire cannot carry values annotated {tp}")


def _sequence(origin: type, item_enc: Encoder, item_dec: Decoder, *, scalar: type | None) -> tuple[Encoder, Decoder]:
    name = origin.__name__

    def enc(v: Any) -> list:
        if not isinstance(v, origin):
            _wrong(name, v)
        if origin is frozenset:
            v = sorted(v)
        return list(v) if item_enc is _same else [item_enc(x) for x in v]

    def dec(x: Any) -> Any:
        if type(x) is not list:
            raise _Refused(f"expected a list ({name}), got {type(x).__name__}")
        if scalar is not None and set(map(type, x)) <= {scalar}:  # the common case, in C
            return x if origin is list else origin(x)
        return _each(item_dec, x, origin)

    return enc, dec


def _mapping(key_type: type, value_enc: Encoder, value_dec: Decoder) -> tuple[Encoder, Decoder]:
    def enc(v: Any) -> dict:
        if type(v) is not dict:
            _wrong("dict", v)
        if not all(type(k) is key_type for k in v):
            raise WireError(f"a dict keyed by {key_type.__name__} has keys {[k for k in v][:4]}")
        if key_type is str:
            return v if value_enc is _same else {k: value_enc(x) for k, x in v.items()}
        return {str(k): value_enc(x) for k, x in v.items()}

    if key_type is str:
        return enc, lambda x: _values(value_dec, _need(x, dict))
    return enc, lambda x: _values(value_dec, _need(x, dict), key=_int_key)


def _int_key(k: str) -> int:
    number = k[1:] if k[:1] == "-" else k
    if not (number.isascii() and number.isdigit()) or str(int(k)) != k:
        raise _Refused(f"key {k!r} is not an int")
    return int(k)


def _fixed_tuple(args: tuple, where: str) -> tuple[Encoder, Decoder]:
    codecs = [_typed(a, where) for a in args]

    def enc(v: Any) -> list:
        if not isinstance(v, tuple) or len(v) != len(codecs):
            raise WireError(f"{where}: expected a tuple of {len(codecs)}, got {v!r:.60}")
        return [e(x) for (e, _), x in zip(codecs, v)]

    def dec(x: Any) -> tuple:
        if type(x) is not list or len(x) != len(codecs):
            raise _Refused(f"expected a list of {len(codecs)} values")
        return _each(lambda pair: pair[0](pair[1]), [(d, e) for (_, d), e in zip(codecs, x)], tuple)

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
