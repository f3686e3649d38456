"""
Tests for qvd.config: layering, interpolation, validation and the generated
key reference docs/config.md.
"""

import os

from twisted.trial import unittest

from qvd.config import Config, ConfigError, load_defaults, parse_properties
from qvd.config import docs

DEFAULTS = """\
# A port.
# type: int
net.port = 8443

# Where things are.
path.root = /var/lib/x

# Below the root.
path.sub = ${path.root}/sub

# type: bool
feature.on = 0

a.loop = ${b.loop}

b.loop = ${a.loop}

a.self = ${a.self}

# Anything custom.
custom.* =
"""


class ConfigTestCase(unittest.TestCase):

    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, "test.conf"), "w") as f:
            f.write(DEFAULTS)
        self.keys = load_defaults(self.dir)

    def load(self, text="", overrides=None):
        path = os.path.join(self.dir, "node.conf")
        with open(path, "w") as f:
            f.write(text)
        return Config.load(path, overrides=overrides, keys=self.keys)


class LayeringTests(ConfigTestCase):

    def test_declarations(self):
        """
        Each key's type, default, doc and component come from its block.
        """
        key = self.keys["net.port"]
        self.assertEqual((key.type, key.default, key.doc, key.component),
                         ("int", "8443", "A port.", "test"))
        self.assertTrue(self.keys["custom.*"].is_family)

    def test_layers(self):
        """
        defaults < node file < database global < database tenant, each layer
        hiding the ones below only for the keys it sets.
        """
        config = self.load("net.port = 1\npath.root = /node\n")
        self.assertEqual(config.getint("net.port"), 1)
        config = config.with_database({"net.port": "2", "feature.on": "yes"},
                                      {5: {"net.port": "3"}})
        self.assertEqual(config.getint("net.port"), 2)
        self.assertEqual(config.getint("net.port", tenant=5), 3)
        self.assertEqual(config.getint("net.port", tenant=6), 2)
        self.assertEqual(config.get("path.root", tenant=5), "/node")
        self.assertTrue(config.getbool("feature.on"))
        self.assertEqual(self.load().getint("net.port"), 8443)

    def test_interpolation(self):
        """
        ${key} takes the value of the other key in the same tenant's view.
        """
        config = self.load("path.root = /srv\n").with_database({}, {2: {"path.root": "/t2"}})
        self.assertEqual(config.get("path.sub"), "/srv/sub")
        self.assertEqual(config.get("path.sub", tenant=2), "/t2/sub")

    def test_loops(self):
        """
        Keys that refer to each other, or a key to itself, raise a ConfigError
        showing the loop.
        """
        config = self.load()
        e = self.assertRaises(ConfigError, config.get, "a.loop")
        self.assertIn("a.loop -> b.loop -> a.loop", str(e))
        self.assertIn("a.self -> a.self", str(self.assertRaises(ConfigError, config.get, "a.self")))

    def test_unknown_keys(self):
        """
        An undeclared key is rejected in the node file and in the database,
        naming the key and where it came from; keys of a family are accepted.
        """
        e = self.assertRaises(ConfigError, self.load, "net.prot = 1\n")
        self.assertIn("'net.prot'", str(e))
        self.assertIn("node.conf", str(e))
        config = self.load("custom.anything.here = 1\n")
        self.assertEqual(config.get("custom.anything.here"), "1")
        e = self.assertRaises(ConfigError, config.with_database, {"nope": "1"})
        self.assertIn("'nope' in the database (global)", str(e))
        e = self.assertRaises(ConfigError, config.with_database, {}, {3: {"nope": "1"}})
        self.assertIn("tenant 3", str(e))
        self.assertRaises(ConfigError, config.get, "undeclared.key")

    def test_malformed_values(self):
        """
        A value of the wrong type is rejected naming the key, the type and the value.
        """
        e = self.assertRaises(ConfigError, self.load, "net.port = eighty\n")
        self.assertIn("'net.port'", str(e))
        self.assertIn("int", str(e))
        self.assertIn("'eighty'", str(e))
        e = self.assertRaises(ConfigError, self.load().with_database, {"feature.on": "maybe"})
        self.assertIn("'feature.on'", str(e))
        e = self.assertRaises(ConfigError, parse_properties, "good = 1\njust words\n", "f.conf")
        self.assertIn("f.conf, line 2", str(e))

    def test_builtin_defaults_validate(self):
        """
        Every built-in key's default has its declared type and interpolates.
        """
        config = Config(keys=load_defaults())
        for name, key in config.keys.items():
            if not key.is_family:
                config.typed(name)


class DocsTests(unittest.TestCase):

    def test_render_lists_every_key(self):
        """
        The reference lists each declared key with its type, default and meaning.
        """
        text = docs.render()
        for name, key in load_defaults().items():
            self.assertIn(f"| `{name}` | {key.type} |", text)
        self.assertIn("## core", text)

    def test_committed_docs_up_to_date(self):
        """
        docs/config.md is what the generator produces from the declared keys.
        """
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "docs", "config.md")
        with open(path, encoding="utf-8") as f:
            committed = f.read()
        if committed != docs.render():
            self.fail(f"docs/config.md is out of date with qvd/config/defaults/*.conf: "
                      f"regenerate it with `{docs.COMMAND}` and commit it")
