"""What a release asks of the host beyond a confined service (docs/host-policy.md).

Finds every request (privileged, host mounts, capabilities, host namespaces, devices,
security_opt, other containers, root) for both sides: the build side records an `excerpt` of
the compose files in the signed manifest; `bundle verify` and the installer `analyse` the
files themselves. What cannot be evaluated exactly as compose will is refused (`Unevaluable`).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from bundler.bundle.models import Runtime
from bundler.errors import HostPolicyError

EXCERPT_VERSION = 1
# The service keys the excerpt keeps (version 1). List-valued keys are unioned across files,
# the others overridden by the later file, as compose merges `-f a -f b`.
_LIST_KEYS = ("cap_add", "volumes", "devices", "device_cgroup_rules", "security_opt",
              "volumes_from", "env_file", "secrets", "configs", "networks", "sysctls")
_SCALAR_KEYS = ("privileged", "network_mode", "pid", "ipc", "userns_mode", "uts", "cgroup",
                "user")
_TOP_KEYS = {"volumes": ("driver", "driver_opts", "external", "name"),
             "networks": ("driver", "external", "name"),
             "secrets": ("file",), "configs": ("file",)}

# Docker's default capability set: adding one of these changes nothing (listed, not refused).
DEFAULT_CAPS = frozenset({"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL",
                          "MKNOD", "NET_BIND_SERVICE", "NET_RAW", "SETFCAP", "SETGID",
                          "SETPCAP", "SETUID", "SYS_CHROOT"})
# Hardening options: not requests.
_HARDENING = frozenset({"no-new-privileges", "no-new-privileges=true"})

# Grant kinds an operator can allow (`--allow KIND[=VALUE]`, `allow:` in policy.yaml).
FLAG_KINDS = ("privileged", "host-network", "host-pid", "host-ipc", "host-userns", "host-uts",
              "host-cgroup")
VALUE_KINDS = ("cap", "host-mount", "device", "security-opt", "join-container",
               "volume-driver", "user")
KINDS = FLAG_KINDS + VALUE_KINDS

_WHAT = {
    "privileged": "a privileged container (every capability and device, no confinement)",
    "host-network": "the host's network stack", "host-pid": "the host's PID namespace",
    "host-ipc": "the host's IPC namespace", "host-userns": "the host's user namespace",
    "host-uts": "the host's UTS namespace", "host-cgroup": "the host's cgroup namespace",
    "cap": "the capability {}", "host-mount": "the host path {} mounted",
    "device": "the host device {}", "security-opt": "the security option {}",
    "join-container": "joining container {}, which is not part of this project",
    "volume-driver": "a volume through driver/options {}",
    "user": "running as {} on the host",
    "container-root": "running as root inside its container",
    "sysctl": "setting the namespaced sysctl {}",
    "release-mount": "its own release file {} mounted",
}


class Unevaluable(ValueError):
    """The compose files cannot be checked exactly as compose will read them."""


@dataclass(frozen=True)
class Request:
    """One thing a service asks of the host."""

    service: str  # compose or process service; "" for the release as a whole
    kind: str
    value: str = ""
    source: str = ""  # where it comes from, as the file says it ("volumes: /:/host")
    refused_by_default: bool = True  # False: listed for the operator, never refused
    pending: bool = False  # depends on ${VARIABLES} that only the target knows

    @property
    def grant(self) -> str:
        """The `--allow` value (and policy line) that allows it."""
        return f"{self.kind}={self.value}" if self.value else self.kind

    def describe(self) -> str:
        text = _WHAT.get(self.kind, self.kind).format(self.value)
        return f"{text} ({self.source})" if self.source else text

    def to_json(self) -> dict[str, Any]:
        return {"service": self.service, "kind": self.kind, "value": self.value,
                "source": self.source, "refused_by_default": self.refused_by_default,
                "pending": self.pending,
                "allow": self.grant if self.refused_by_default and not self.pending else None}


# --- the excerpt: merged compose files, restricted to what matters here ----------------------

def load(text: str | bytes, name: str) -> dict[str, Any]:
    """One compose file, parsed as compose would (YAML 1.1 with merge keys). Unevaluable if
    it is not a mapping, or uses YAML tags compose gives a meaning (`!reset`, `!override`)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise Unevaluable(f"compose file {name} cannot be read: {first}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise Unevaluable(f"compose file {name} is not a mapping")
    return doc


MAX_NODES = 100_000  # YAML aliases can make a small file a huge tree: refused, not walked


def _norm(value: Any, budget: list[int] | None = None) -> Any:
    """Plain JSON without floats, deterministic: every scalar but a bool or null as text."""
    budget = budget if budget is not None else [MAX_NODES]
    budget[0] -= 1
    if budget[0] < 0:
        raise Unevaluable(f"the compose files expand to more than {MAX_NODES} values "
                          "(YAML aliases?)")
    if isinstance(value, dict):
        return {str(k): _norm(v, budget) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_norm(v, budget) for v in value]
    if value is None or isinstance(value, bool | str):
        return value
    return str(value)


def _listed(value: Any, key: str, service: str) -> list[Any]:
    """A list-valued key as a list; a mapping (networks, sysctls) as its entries."""
    if value is None:
        return []
    if key == "networks" and isinstance(value, dict):
        return [str(k) for k in value]
    if key == "sysctls" and isinstance(value, dict):
        return [f"{k}={'' if v is None else _norm(v)}" for k, v in value.items()]
    if key == "env_file" and isinstance(value, str | dict):
        value = [value]
    if not isinstance(value, list):
        raise Unevaluable(f"service {service}: `{key}` is not a list")
    return [_norm(v) for v in value]


def _union(old: list[Any], new: list[Any]) -> list[Any]:
    return old + [v for v in new if v not in old]


def _service_excerpt(name: str, spec: Any, into: dict[str, Any]) -> None:
    if spec is None:
        return
    if not isinstance(spec, dict):
        raise Unevaluable(f"service {name} is not a mapping")
    if "extends" in spec:
        raise Unevaluable(f"service {name} uses `extends`: bundler checks what a service asks "
                          "of the host only in the files themselves; write its keys out")
    for key in _LIST_KEYS:
        if key in spec:
            into[key] = _union(into.get(key, []), _listed(spec[key], key, name))
    for key in _SCALAR_KEYS:
        if key in spec:
            into[key] = _norm(spec[key])
    reserved = (((spec.get("deploy") or {}).get("resources") or {}).get("reservations") or {}) \
        if isinstance(spec.get("deploy"), dict) else {}
    if isinstance(reserved, dict) and reserved.get("devices"):
        into["reserved_devices"] = _union(into.get("reserved_devices", []),
                                          _listed(reserved["devices"], "devices", name))


def excerpt(docs: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """The compose files (name, parsed document), merged as `-f a -f b` merges them and
    restricted to what a host policy checks. Deterministic plain JSON (the manifest signs it)."""
    services: dict[str, dict[str, Any]] = {}
    top: dict[str, dict[str, dict[str, Any]]] = {k: {} for k in _TOP_KEYS}
    for name, doc in docs:
        if "include" in doc:
            raise Unevaluable(f"compose file {name} uses `include`: bundler checks only the "
                              "compose files the profile names; list them in compose.files")
        found = doc.get("services") or {}
        if not isinstance(found, dict):
            raise Unevaluable(f"compose file {name}: `services` is not a mapping")
        for svc, spec in found.items():
            _service_excerpt(str(svc), spec, services.setdefault(str(svc), {}))
        for key, kept in _TOP_KEYS.items():
            section = doc.get(key) or {}
            if not isinstance(section, dict):
                raise Unevaluable(f"compose file {name}: `{key}` is not a mapping")
            for item, spec in section.items():
                merged = top[key].setdefault(str(item), {})
                if isinstance(spec, dict):
                    merged.update({k: _norm(spec[k]) for k in kept if k in spec})
    return {"version": EXCERPT_VERSION, "services": services,
            **{k: v for k, v in top.items() if v}}


def excerpt_of_files(files: Iterable[tuple[str, str | bytes]]) -> dict[str, Any]:
    return excerpt([(name, load(text, name)) for name, text in files])


def checked_excerpt(files: Iterable[tuple[str, str | bytes]], recorded: Mapping[str, Any] | None,
                    release: str) -> dict[str, Any]:
    """The excerpt of the verified compose `files` of `release` ("name version"):
    HostPolicyError if they cannot be evaluated, or if the signed manifest's record of them
    (`recorded`, same excerpt version) says something else: a record the signer wrote by hand
    to show less than the files ask."""
    try:
        ex = excerpt_of_files(files)
    except Unevaluable as exc:
        raise HostPolicyError(f"what the compose files of {release} ask of the host cannot "
                              f"be checked: {exc}") from None
    if recorded is not None and recorded.get("version") == ex["version"] and recorded != ex:
        raise HostPolicyError(
            f"the signed manifest of {release} records other requests than its compose files "
            "make of the host: that record was not made from these files",
            hint="do not install it; ask its publisher to rebuild it with `bundle build`")
    return ex


# --- interpolation, as compose does it -------------------------------------------------------

_REF = re.compile(r"\$(?:(\$)|([A-Za-z_][A-Za-z0-9_]*)|\{([^}]*)\}|(.?))")
_BRACED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?$", re.S)

Env = Mapping[str, "str | None"]  # None: a variable whose value cannot be known exactly


def interpolate(text: str, env: Env | None, where: str) -> str | None:
    """`text` with `$VAR`, `${VAR}`, `${VAR:-x}`, `${VAR-x}`, `${VAR:?e}`, `${VAR?e}`,
    `${VAR:+x}`, `${VAR+x}` and `$$` replaced as compose replaces them. `env` None: the
    environment is not known here; returns None if the text depends on it."""
    if "$" not in text:
        return text
    out: list[str] = []
    pos = 0
    for m in _REF.finditer(text):
        out.append(text[pos:m.start()])
        pos = m.end()
        escaped, bare, braced, other = m.groups()
        if escaped:
            out.append("$")
            continue
        if other is not None:
            raise Unevaluable(f"{where}: `{text}` is not valid compose interpolation")
        if env is None:
            return None
        if bare is not None:
            out.append(_lookup(env, bare, where) or "")
            continue
        out.append(_braced(braced, env, where, text))
    out.append(text[pos:])
    return "".join(out)


def _lookup(env: Env, name: str, where: str) -> str | None:
    if name in env and env[name] is None:
        raise Unevaluable(f"{where}: ${{{name}}} may come from the bundle's own .env file, "
                          "which compose may or may not read here")
    return env.get(name)


def _braced(inner: str, env: Env, where: str, text: str) -> str:
    m = _BRACED.match(inner)
    if m is None or "$" in (m.group(3) or ""):
        raise Unevaluable(f"{where}: `{text}` is interpolation bundler does not evaluate "
                          "(nested, or not a variable name)")
    name, op, word = m.group(1), m.group(2), m.group(3) or ""
    value = _lookup(env, name, where)
    unset, empty = value is None, not value
    if op is None:
        return value or ""
    if op in (":-", "-"):
        return word if (empty if op == ":-" else unset) else (value or "")
    if op in (":?", "?"):
        if empty if op == ":?" else unset:
            raise Unevaluable(f"{where}: ${{{name}}} is required and not set "
                              f"({word or 'no message'})")
        return value or ""
    return "" if (empty if op == ":+" else unset) else word  # :+ / +


def _shown(value: Any) -> str:
    """A scalar as the compose file would show it."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _split_short(text: str) -> list[str]:
    """`SOURCE:TARGET[:MODE]` split on the colons outside `${...}`."""
    parts, depth, cur = [], 0, []
    i = 0
    while i < len(text):
        ch = text[i]
        if text.startswith("${", i):
            depth += 1
            cur.append("${")
            i += 2
            continue
        if ch == "}" and depth:
            depth -= 1
        if ch == ":" and not depth:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


# --- analysis --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Place:
    """Where the compose files run: `workdir` is the project directory relative to the
    release's files directory ("stack"); `files` is that directory's absolute path on the
    target (None when not known: a relative path leaving it is then shown as written)."""

    workdir: str
    files: str | None = None
    home: str | None = None  # what `~` means for compose here


class _Analysis:
    def __init__(self, ex: Mapping[str, Any], env: Env | None, place: Place) -> None:
        self.ex, self.env, self.place = ex, env, place
        self.out: list[Request] = []

    def add(self, service: str, kind: str, value: str, source: str, *,
            refused: bool = True, pending: bool = False) -> None:
        req = Request(service, kind, value, source, refused, pending)
        if req not in self.out:
            self.out.append(req)

    def text(self, value: Any, where: str) -> str | None:
        """A scalar, interpolated; None: it depends on the environment (inspect)."""
        if isinstance(value, bool) or value is None:
            return "" if value is None else str(value).lower()
        if not isinstance(value, str):
            raise Unevaluable(f"{where}: {value!r} is not a value bundler can check")
        return interpolate(value, self.env, where)

    def path(self, service: str, raw: str, source: str) -> None:
        """A host path a container gets (bind source, env_file, secret or config file, a
        volume's bind device), as written: interpolated here."""
        value = self.text(raw, f"service {service}: {source}")
        if value is None:
            self.add(service, "host-mount", raw, source, pending=True)
        else:
            self.host_path(service, value, source)

    def host_path(self, service: str, value: str, source: str) -> None:
        """An interpolated host path: inside the release's files (listed only), or a host
        mount (absolute, from `~`, or relative and leaving the files directory)."""
        if not value:
            raise Unevaluable(f"service {service}: {source}: the host path is empty")
        home = self.place.home
        if home and (value == "~" or value.startswith("~/")):
            value = home + value[1:]
        if value.startswith("/"):
            self.add(service, "host-mount", posixpath.normpath(value) if value != "/" else "/",
                     source)
            return
        if value.startswith("~"):
            self.add(service, "host-mount", value, source)
            return
        inside = posixpath.normpath(posixpath.join(self.place.workdir, value))
        if inside == ".." or inside.startswith("../"):
            where = (posixpath.normpath(posixpath.join(self.place.files, inside))
                     if self.place.files else value)
            self.add(service, "host-mount", where, source)
        else:
            self.add(service, "release-mount", inside, source, refused=False)

    def run(self) -> list[Request]:
        services = self.ex.get("services") or {}
        for name in sorted(services):
            self.service(name, services[name])
        return self.out

    def service(self, name: str, spec: Mapping[str, Any]) -> None:
        self.flags(name, spec)
        for cap in spec.get("cap_add", []):
            self.cap(name, cap)
        for vol in spec.get("volumes", []):
            self.volume(name, vol)
        for dev in spec.get("devices", []) + spec.get("reserved_devices", []):
            self.device(name, dev)
        for rule in spec.get("device_cgroup_rules", []):
            value = self.text(rule, f"service {name}: device_cgroup_rules")
            self.add(name, "device", rule if value is None else value,
                     f"device_cgroup_rules: {rule}", pending=value is None)
        for opt in spec.get("security_opt", []):
            self.security(name, opt)
        for item in spec.get("volumes_from", []):
            value = self.text(item, f"service {name}: volumes_from")
            if value is None or value.startswith("container:"):
                target = item if value is None else value.split(":")[1]
                self.add(name, "join-container", target, f"volumes_from: {item}",
                         pending=value is None)
        for item in spec.get("env_file", []):
            path = item.get("path") if isinstance(item, dict) else item
            self.path(name, str(path), f"env_file: {path}")
        for key in ("secrets", "configs"):
            for ref in spec.get(key, []):
                ref_name = ref.get("source") if isinstance(ref, dict) else ref
                top = (self.ex.get(key) or {}).get(str(ref_name)) or {}
                if top.get("file"):
                    self.path(name, str(top["file"]), f"{key}: {ref_name} (file: {top['file']})")
        for net in spec.get("networks", []):
            top = (self.ex.get("networks") or {}).get(str(net)) or {}
            host = top.get("driver") == "host" or (
                top.get("external") is True and (top.get("name") or net) == "host")
            if host:
                self.add(name, "host-network", "", f"networks: {net} (the host network)")
        for item in spec.get("sysctls", []):
            value = self.text(item, f"service {name}: sysctls")
            key = (item if value is None else value).split("=", 1)[0]
            self.add(name, "sysctl", key, f"sysctls: {item}", refused=False,
                     pending=value is None)

    def flags(self, name: str, spec: Mapping[str, Any]) -> None:
        if "privileged" in spec:
            value = self.text(spec["privileged"], f"service {name}: privileged")
            if value is None or value not in ("false", "no", "0", "off", ""):
                self.add(name, "privileged", "", f"privileged: {_shown(spec['privileged'])}",
                         pending=value is None)
        for key, kind in (("network_mode", "host-network"), ("pid", "host-pid"),
                          ("ipc", "host-ipc"), ("userns_mode", "host-userns"),
                          ("uts", "host-uts"), ("cgroup", "host-cgroup")):
            if key not in spec:
                continue
            raw = spec[key]
            value = self.text(raw, f"service {name}: {key}")
            source = f"{key}: {_shown(raw)}"
            if value is None:
                self.add(name, kind, "", source, pending=True)
            elif value == "host":
                self.add(name, kind, "", source)
            elif value.startswith("container:") and key in ("network_mode", "pid", "ipc"):
                self.add(name, "join-container", value.split(":", 1)[1], source)
        if "user" in spec:
            value = self.text(spec["user"], f"service {name}: user")
            if value is None or value.split(":", 1)[0] in ("root", "0"):
                self.add(name, "container-root", "", f"user: {spec['user']}", refused=False,
                         pending=value is None)

    def cap(self, name: str, raw: Any) -> None:
        value = self.text(raw, f"service {name}: cap_add")
        if value is None:
            self.add(name, "cap", str(raw), f"cap_add: {raw}", pending=True)
            return
        cap = value.upper().removeprefix("CAP_")
        self.add(name, "cap", cap, f"cap_add: {raw}", refused=cap not in DEFAULT_CAPS)

    def volume(self, name: str, vol: Any) -> None:
        if isinstance(vol, dict):
            self.long_volume(name, vol)
            return
        if not isinstance(vol, str):
            raise Unevaluable(f"service {name}: volume {vol!r} is not in a form compose reads")
        source = f"volumes: {vol}"
        # compose interpolates the whole string, then splits it: `${X}` alone may be `/:/host`
        value = self.text(vol, f"service {name}: {source}")
        if value is None:
            parts = _split_short(vol)
            if len(parts) < 2 or "$" in parts[0]:
                self.add(name, "host-mount", parts[0], source, pending=True)
                return
            value = vol  # only the target or mode depends on the environment
        parts = value.split(":")
        if len(parts) < 2:
            return  # an anonymous volume
        self.volume_source(name, parts[0], source, bind=None)

    def long_volume(self, name: str, vol: Mapping[str, Any]) -> None:
        raw_type, src = vol.get("type"), vol.get("source")
        source = f"volumes: {{type: {raw_type}, source: {src}, target: {vol.get('target')}}}"
        kind = None if raw_type is None else self.text(raw_type, f"service {name}: {source}")
        value = None if src is None else self.text(src, f"service {name}: {source}")
        if (raw_type is not None and kind is None) or (src is not None and value is None):
            self.add(name, "host-mount", str(src), source, pending=True)
        elif kind in ("tmpfs", "npipe", "image", "cluster"):
            return
        elif kind not in (None, "bind", "volume"):
            raise Unevaluable(f"service {name}: volume type {kind!r} is not one bundler knows")
        elif value is None or value == "":
            if kind == "bind":
                raise Unevaluable(f"service {name}: a bind mount without a source")
        else:
            self.volume_source(name, value, source, bind=kind == "bind" or None)

    def volume_source(self, name: str, value: str, source: str, bind: bool | None) -> None:
        """An interpolated volume source: a host path (as compose tells them apart: it starts
        with `/`, `.` or `~`), else a named volume."""
        if bind or value[:1] in ("/", ".", "~"):
            self.host_path(name, value, source)
        elif value:
            self.named(name, value, source)
        else:
            raise Unevaluable(f"service {name}: {source}: the volume source is empty")

    def named(self, service: str, volume: str, source: str) -> None:
        """A named volume: harmless, unless its top-level definition binds a host path or
        uses another driver."""
        top = (self.ex.get("volumes") or {}).get(volume)
        if not top:
            return
        opts = top.get("driver_opts") or {}
        driver = top.get("driver")
        if isinstance(opts, dict) and opts:
            o = str(opts.get("o", ""))
            kind = str(opts.get("type", ""))
            if "bind" in o.split(",") or kind == "none":
                self.path(service, str(opts.get("device", "")),
                          f"{source} (volume {volume} binds {opts.get('device')})")
            elif kind != "tmpfs":
                self.add(service, "volume-driver", f"{driver or 'local'}:{kind or '?'}",
                         f"{source} (volume {volume}: driver_opts {opts})")
        if driver not in (None, "local"):
            self.add(service, "volume-driver", str(driver), f"{source} (volume {volume}: "
                                                            f"driver {driver})")

    def device(self, name: str, dev: Any) -> None:
        if isinstance(dev, dict):
            if "source" in dev:
                raw = str(dev["source"])
            else:  # deploy.resources.reservations.devices: a GPU or other generic resource
                caps = dev.get("capabilities") or []
                raw = str(dev.get("driver") or ",".join(str(c) for c in caps) or "device")
        else:
            raw = str(dev)
        value = self.text(raw, f"service {name}: devices")
        host = raw if value is None else value.split(":", 1)[0]
        self.add(name, "device", host, f"devices: {dev}", pending=value is None)

    def security(self, name: str, raw: Any) -> None:
        value = self.text(raw, f"service {name}: security_opt")
        if value is None:
            self.add(name, "security-opt", str(raw), f"security_opt: {raw}", pending=True)
            return
        opt = value.replace(":", "=", 1) if "=" not in value else value
        if opt not in _HARDENING:
            self.add(name, "security-opt", opt, f"security_opt: {raw}")


def analyse(ex: Mapping[str, Any], env: Env | None, place: Place) -> list[Request]:
    """Every request the compose excerpt `ex` makes. `env`: the values compose interpolates
    with (None: unknown, as in `bundle inspect`: what depends on them is `pending`).
    Unevaluable if `ex` is not in the shape `excerpt` makes (a record written by hand)."""
    _check_shape(ex)
    try:
        return _Analysis(ex, env, place).run()
    except (AttributeError, TypeError, KeyError) as exc:
        raise Unevaluable(f"the excerpt of the compose files is malformed ({exc})") from None


def _check_shape(ex: Mapping[str, Any]) -> None:
    if ex.get("version") != EXCERPT_VERSION:
        raise Unevaluable(f"host-request excerpt version {ex.get('version')!r} is not one "
                          "this bundler reads")
    services = ex.get("services")
    if not isinstance(services, dict) or not all(isinstance(v, dict)
                                                 for v in services.values()):
        raise Unevaluable("the excerpt's `services` is not a mapping of mappings")
    for name, spec in services.items():
        for key in (*_LIST_KEYS, "reserved_devices"):
            if not isinstance(spec.get(key, []), list):
                raise Unevaluable(f"the excerpt's service {name}: `{key}` is not a list")
    for key in _TOP_KEYS:
        section = ex.get(key, {})
        if not isinstance(section, dict) or not all(isinstance(v, dict)
                                                    for v in section.values()):
            raise Unevaluable(f"the excerpt's `{key}` is not a mapping of mappings")


def process_requests(runtime: Runtime) -> list[Request]:
    """The accounts the release runs its own code as on the host: its `user` (root when the
    profile names none) for its processes, host-run migrations and command checks, and each
    service's own `user`. None when nothing of the release runs on the host (a compose
    release whose migrations run in its services)."""
    out: list[Request] = []
    host_run = (any(not s.user for s in runtime.services)
                or any(x.kind == "alembic" or (x.kind == "command" and not x.service)
                       for x in runtime.migrations)
                or any(h.kind == "command" for h in runtime.health))
    if host_run:
        user = runtime.user or "root"
        source = f"user: {runtime.user}" if runtime.user else "the profile names no `user`"
        out.append(Request("", "user", user, source, user == "root"))
    for s in runtime.services:
        if s.user:
            out.append(Request(s.name, "user", s.user, f"services.{s.name}.user",
                               s.user == "root"))
    return out


def grant_parse(text: str, error: Callable[[str], Exception]) -> tuple[str, str]:
    """`KIND[=VALUE]` as (kind, value), checked; `error(message)` is raised otherwise."""
    kind, _, value = text.strip().partition("=")
    if kind not in KINDS:
        raise error(f"{text!r}: unknown kind {kind!r} (one of {', '.join(KINDS)})")
    if kind in FLAG_KINDS and value:
        raise error(f"{text!r}: {kind} takes no value")
    if kind in VALUE_KINDS and not value:
        example = "/srv/data" if kind == "host-mount" else "NET_ADMIN" if kind == "cap" else "X"
        raise error(f"{text!r}: {kind} needs a value, e.g. {kind}={example}")
    if kind == "host-mount":
        if not value.startswith("/"):
            raise error(f"{text!r}: host-mount needs an absolute path")
        value = posixpath.normpath(value) if value != "/" else "/"
    if kind == "cap":
        value = value.upper().removeprefix("CAP_")
    if kind == "security-opt" and "=" not in value:
        value = value.replace(":", "=", 1)
    return kind, value


def covers(kind: str, value: str, request: Request) -> bool:
    """Does the grant (kind, value) allow `request`? A host-mount grant covers its path and
    everything below it; every other grant is exact."""
    if kind != request.kind:
        return False
    if kind == "host-mount":
        return value == "/" or request.value == value or request.value.startswith(value + "/")
    return value == request.value
