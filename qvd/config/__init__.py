"""
Layered configuration, as in the original QVD (reference section 6).

    from qvd.config import Config
    cfg = Config.load("/etc/qvd/node.conf")          # defaults < node file
    cfg.getint("l7r.port")                            # 8443
    cfg = cfg.with_database(global_rows, tenant_rows) # < configs(tenant -1) < configs(tenant)
    cfg.get("l7r.auth.plugins", tenant=3)

Layers, lowest first: the built-in defaults (C{qvd/config/defaults/*.conf}), the
node file (Java-properties syntax, the original's key names), the database's
global rows (C{configs}, tenant -1) and the database's rows of one tenant.
Values may refer to other keys as C{${other.key}}. Every key must be declared
in the defaults, with a type; a value of another type or a key nobody declared
is rejected with a L{ConfigError} that names it. Keys ending in C{.*} in the
defaults declare a family (any key below that prefix is accepted).

L{qvd.config.live} keeps a L{Config} in step with the database.
"""

import glob
import os
import re

import attrs

DEFAULT_NODE_FILE = "/etc/qvd/node.conf"
GLOBAL_TENANT = -1
TYPES = ("str", "int", "float", "bool", "list")
SCOPES = ("live", "restart", "node")
#: The scope of a key whose declaration says none, by defaults file: keys of
#: the VMA and the client are never read from the database, the node's
#: drivers and paths are read when the HKD starts.
COMPONENT_SCOPES = {"vma": "node", "client": "node", "di": "node", "core": "restart",
                    "lxc": "restart", "kvm": "restart"}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_INTERPOLATION = re.compile(r"\$\{([^}]*)\}")


class ConfigError(ValueError):
    """
    A configuration key or value is wrong; the message names it and its source.
    """


@attrs.frozen
class Key:
    """
    A declared configuration key.

    @ivar name: the key, or a family C{prefix.*}.
    @ivar default: the default value, as text (before interpolation).
    @ivar type: one of L{TYPES}.
    @ivar doc: what the key means, for people.
    @ivar component: the defaults file that declares it (core, l7r, hkd, ...).
    @ivar scope: how a value set in the database takes effect: C{live} (the
        daemons apply it within a second), C{restart} (when they next start)
        or C{node} (never: only the node file, or the program that reads the
        key, such as the VMA in the image or the client, sets it).
    """
    name: str
    default: str
    type: str = "str"
    doc: str = ""
    component: str = ""
    scope: str = "live"

    @property
    def is_family(self):
        return self.name.endswith(".*")


def parse_properties(text, source="<string>"):
    """
    Parse Java-properties text into an ordered dict of key -> value.

    Lines are C{key = value} or C{key: value}; C{#} and C{!} start comments; a
    trailing backslash continues a line. Raises L{ConfigError} naming the line.
    """
    result = {}
    pending = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = pending + raw.strip() if pending else raw.strip()
        if line.endswith("\\") and not line.endswith("\\\\"):
            pending = line[:-1]
            continue
        pending = ""
        if not line or line[0] in "#!":
            continue
        match = re.match(r"([^=:\s]+)\s*[=:]\s*(.*)$", line)
        if match is None:
            raise ConfigError(
                f"{source}, line {number}: expected 'key = value', got {raw.strip()!r}")
        result[match.group(1)] = match.group(2).strip()
    return result


def _parse_defaults_file(path):
    component = os.path.splitext(os.path.basename(path))[0]
    default_scope = COMPONENT_SCOPES.get(component, "live")
    keys = []
    doc, typ, scope = [], "str", default_scope
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                doc, typ, scope = [], "str", default_scope
                continue
            if line.startswith("#"):
                text = line[1:].strip()
                if text.startswith("type:"):
                    typ = text[5:].strip()
                    if typ not in TYPES:
                        raise ConfigError(f"{path}, line {number}: unknown type {typ!r}")
                elif text.startswith("scope:"):
                    scope = text[6:].strip()
                    if scope not in SCOPES:
                        raise ConfigError(f"{path}, line {number}: unknown scope {scope!r} "
                                          f"(one of {', '.join(SCOPES)})")
                else:
                    doc.append(text)
                continue
            name, sep, value = line.partition("=")
            if not sep:
                raise ConfigError(f"{path}, line {number}: expected 'key = value'")
            keys.append(Key(name.strip(), value.strip(), typ, " ".join(doc), component, scope))
            doc, typ, scope = [], "str", default_scope
    return keys


def load_defaults(directory=None):
    """
    Read every declared key from the C{*.conf} files of C{directory}.

    @return: a dict of key name -> L{Key}.
    """
    directory = directory or os.path.join(os.path.dirname(__file__), "defaults")
    declared = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.conf"))):
        for key in _parse_defaults_file(path):
            if key.name in declared:
                raise ConfigError(
                    f"{path}: key {key.name!r} is declared twice "
                    f"(also in {declared[key.name].component}.conf)")
            declared[key.name] = key
    for key in declared.values():
        if not key.is_family and "${" not in key.default:
            convert(key.type, key.default, key.name, f"the defaults ({key.component}.conf)")
    return declared


def convert(typ, value, name="?", source="?"):
    """
    Convert C{value} (text) to C{typ}; raise L{ConfigError} naming the key.
    """
    try:
        if typ == "str":
            return value
        if typ == "int":
            return int(value)
        if typ == "float":
            return float(value)
        if typ == "bool":
            low = value.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(value)
        if typ == "list":
            return [item.strip() for item in value.split(",") if item.strip()]
    except ValueError:
        pass
    raise ConfigError(
        f"configuration key {name!r} from {source} must be of type {typ}, "
        f"got {value!r}")


_DECLARED = None


def declared_keys():
    """
    The keys declared by qvd's built-in defaults (read once).
    """
    global _DECLARED
    if _DECLARED is None:
        _DECLARED = load_defaults()
    return _DECLARED


@attrs.frozen
class Config:
    """
    An immutable view of the configuration layers.

    @ivar keys: the declared keys (name -> L{Key}).
    @ivar node: values from the node file (and command-line overrides).
    @ivar database: values of the global database layer (tenant -1).
    @ivar tenants: tenant id -> values of that tenant's database layer.
    """
    keys: dict
    node: dict = attrs.field(factory=dict)
    database: dict = attrs.field(factory=dict)
    tenants: dict = attrs.field(factory=dict)

    @classmethod
    def load(cls, path=None, overrides=None, keys=None):
        """
        Defaults < the node file C{path} (default: C{$QVD_CONFIG} when set,
        else L{DEFAULT_NODE_FILE} when it exists) < C{overrides}. A missing
        explicit C{path} is an error.
        """
        keys = declared_keys() if keys is None else keys
        node = {}
        if path is None:
            path = os.environ.get("QVD_CONFIG") or None
        if path is None and os.path.exists(DEFAULT_NODE_FILE):
            path = DEFAULT_NODE_FILE
        if path is not None:
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except OSError as e:
                raise ConfigError(f"cannot read the node configuration {path}: {e.strerror}")
            node = parse_properties(text, path)
        node.update(overrides or {})
        config = cls(keys=keys, node=node)
        config.validate(node, path or "the command line")
        return config

    def _declaration(self, name):
        key = self.keys.get(name)
        if key is not None:
            return key
        parts = name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            family = self.keys.get(".".join(parts[:i]) + ".*")
            if family is not None:
                return family
        return None

    def validate(self, values, source):
        """
        Reject unknown keys and values of the wrong type in C{values}.
        """
        for name, value in values.items():
            key = self._declaration(name)
            if key is None:
                raise ConfigError(
                    f"unknown configuration key {name!r} in {source} "
                    "(see docs/config.md for every key)")
            if "${" not in value:
                convert(key.type, value, name, source)

    def with_database(self, global_values, tenant_values=None):
        """
        A new L{Config} with the database layers replaced. Rows that do not
        validate are rejected with L{ConfigError}.

        @param global_values: key -> value of C{configs} with tenant -1.
        @param tenant_values: tenant id -> (key -> value).
        """
        self.validate(global_values, "the database (global)")
        tenants = {}
        for tenant, values in (tenant_values or {}).items():
            self.validate(values, f"the database (tenant {tenant})")
            tenants[tenant] = dict(values)
        return attrs.evolve(self, database=dict(global_values), tenants=tenants)

    def raw(self, name, tenant=None):
        """
        The uninterpolated text of C{name}, from the highest layer that has it.
        """
        if tenant is not None and name in self.tenants.get(tenant, {}):
            return self.tenants[tenant][name]
        if name in self.database:
            return self.database[name]
        if name in self.node:
            return self.node[name]
        key = self._declaration(name)
        if key is None:
            raise ConfigError(f"unknown configuration key {name!r}")
        if key.is_family:
            raise ConfigError(f"configuration key {name!r} is not set")
        return key.default

    def get(self, name, tenant=None, _seen=()):
        """
        The value of C{name} as text, with C{${key}} references interpolated.
        """
        if name in _seen:
            raise ConfigError(
                "configuration keys refer to each other in a loop: "
                + " -> ".join(_seen + (name,)))
        value = self.raw(name, tenant)

        def substitute(match):
            return self.get(match.group(1), tenant, _seen + (name,))
        return _INTERPOLATION.sub(substitute, value)

    def has(self, name, tenant=None):
        try:
            self.raw(name, tenant)
        except ConfigError:
            return False
        return True

    def typed(self, name, tenant=None):
        key = self._declaration(name)
        typ = key.type if key is not None else "str"
        return convert(typ, self.get(name, tenant), name, "the configuration")

    def getint(self, name, tenant=None):
        return convert("int", self.get(name, tenant), name, "the configuration")

    def getfloat(self, name, tenant=None):
        return convert("float", self.get(name, tenant), name, "the configuration")

    def getbool(self, name, tenant=None):
        return convert("bool", self.get(name, tenant), name, "the configuration")

    def getlist(self, name, tenant=None):
        return convert("list", self.get(name, tenant), name, "the configuration")

    def prefixed(self, prefix, tenant=None):
        """
        Every set key below C{prefix} (e.g. C{"vma.on_action."}) -> its text.
        """
        names = {n for n in self.keys if n.startswith(prefix) and not n.endswith(".*")}
        for layer in (self.node, self.database, self.tenants.get(tenant, {})):
            names.update(n for n in layer if n.startswith(prefix))
        return {n: self.get(n, tenant) for n in sorted(names)}
