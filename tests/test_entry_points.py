"""
The programs setup.py installs: every console script resolves to a function,
and each one's bad arguments end in one line and a non-zero exit.
"""

import ast
import importlib
import os
import subprocess
import sys

from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def console_scripts():
    """(name, module, function) of each console_scripts entry of setup.py."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "console_scripts":
                    for item in ast.literal_eval(value):
                        name, _, target = (part.strip() for part in item.partition("="))
                        module, _, function = target.partition(":")
                        yield name, module, function


class ConsoleScriptTests(unittest.TestCase):

    def test_every_script_resolves(self):
        """Each console script of setup.py names a module and function that exist."""
        scripts = list(console_scripts())
        self.assertTrue(scripts)
        for name, module, function in scripts:
            target = getattr(importlib.import_module(module), function, None)
            self.assertTrue(callable(target), f"{name}: {module}:{function} is not callable")

    def test_no_qvd_up(self):
        """qvd-up is not installed and no message sends users to it (deploy/up.sh is)."""
        self.assertNotIn("qvd-up", [name for name, _, _ in console_scripts()])
        for top, _, files in os.walk(os.path.join(ROOT, "qvd")):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(top, name)) as f:
                        self.assertNotIn("qvd-up", f.read(), os.path.join(top, name))
