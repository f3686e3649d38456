"""
Tests for qvd.client.cli: how the command line, configuration files and
environment become Settings, and the VM table.
"""

import os
import shutil
import tempfile

from twisted.trial import unittest

from qvd.client import cli, errors
from qvd.client.errors import ClientError
from qvd.client.protocol import VM, BasicAuth, BearerAuth


class ParseTests(unittest.TestCase):

    def setUp(self):
        self.home = tempfile.mkdtemp(prefix="qvdt-client-")
        self.addCleanup(shutil.rmtree, self.home, True)
        os.mkdir(os.path.join(self.home, ".qvd"))
        self.warnings = []
        self.patch(cli, "SYSTEM_CONFIG", os.path.join(self.home, "no-system.conf"))

    def write_config(self, text):
        with open(os.path.join(self.home, ".qvd", "client.conf"), "w") as f:
            f.write(text)

    def parse(self, argv, env=None, tty=False, prompt=None):
        environ = {"HOME": self.home}
        environ.update(env or {})
        return cli.parse(argv, environ=environ, stdin_isatty=tty,
                         prompt=prompt or (lambda text: self.fail("prompted")),
                         warn=self.warnings.append)

    def test_config_file_then_command_line(self):
        """
        ~/.qvd/client.conf gives host, port, user, link, geometry, keyboard;
        the command line overrides them; unknown keys of the original client
        are ignored with a warning.
        """
        self.write_config("client.host.name = qvd.example.com\nclient.host.port = 443\n"
                          "client.user.name = bob@acme\nclient.link = wan\n"
                          "client.geometry = 800x600\nclient.keyboard = pc105/es\n"
                          "client.usb.enable = 1\n")
        s = self.parse(["connect", "--geometry", "1280x1024"],
                       env={"QVD_PASSWORD": "pw", "DISPLAY": ":0"})
        self.assertEqual((s.host, s.port, s.auth), ("qvd.example.com", 443, BasicAuth("bob@acme", "pw")))
        self.assertEqual((s.parameters.link, s.parameters.geometry, s.parameters.keyboard),
                         ("wan", "1280x1024", "pc105/es"))
        self.assertEqual(s.display, ":0")
        self.assertEqual(len(self.warnings), 1)
        self.assertIn("client.usb.enable", self.warnings[0])
        s = self.parse(["--host", "other", "--port", "8443", "list"], env={"QVD_PASSWORD": "pw"})
        self.assertEqual((s.host, s.port), ("other", 8443))

    def test_options_after_command(self):
        """
        Common options may also follow the command.
        """
        s = self.parse(["list", "--host", "h", "--user", "u", "--password", "p"])
        self.assertEqual((s.host, s.auth), ("h", BasicAuth("u", "p")))

    def test_password_sources(self):
        """
        The password comes from --password, else QVD_PASSWORD, else a prompt
        when stdin is a terminal; otherwise the error says how to give one.
        """
        base = ["--host", "h", "--user", "u"]
        self.assertEqual(self.parse(base + ["--password", "a", "list"],
                                    env={"QVD_PASSWORD": "b"}).auth.password, "a")
        self.assertEqual(self.parse(base + ["list"], env={"QVD_PASSWORD": "b"}).auth.password, "b")
        self.assertEqual(self.parse(base + ["list"], tty=True, prompt=lambda t: "c").auth.password, "c")
        e = self.assertRaises(ClientError, self.parse, base + ["list"])
        self.assertEqual(e.exit_code, errors.EXIT_USAGE)
        self.assertIn("QVD_PASSWORD", e.message)

    def test_token(self):
        """
        --token uses Bearer authentication and needs no user or password.
        """
        s = self.parse(["--host", "h", "--token", "dG9r", "list"])
        self.assertEqual(s.auth, BearerAuth("dG9r"))

    def test_missing_host(self):
        """
        Without a host the error says where to set one.
        """
        e = self.assertRaises(ClientError, self.parse, ["--user", "u", "--password", "p", "list"])
        self.assertIn("--host", e.message)

    def test_no_display(self):
        """
        connect without DISPLAY or --display fails before connecting, saying
        how to choose a display; --headless needs no display but a screenshot file.
        """
        base = ["--host", "h", "--user", "u", "--password", "p", "connect"]
        e = self.assertRaises(ClientError, self.parse, base)
        self.assertEqual(e.exit_code, errors.EXIT_LOCAL)
        self.assertIn("--display", e.message)
        self.assertEqual(self.parse(base + ["--display", ":5"]).display, ":5")
        e = self.assertRaises(ClientError, self.parse, base + ["--headless"])
        self.assertIn("--screenshot", e.message)
        s = self.parse(base + ["--headless", "--screenshot", "x.png", "--wait", "5"])
        self.assertEqual((s.headless, s.screenshot, s.wait, s.display), (True, "x.png", 5.0, None))

    def test_screenshot_path_checked_first(self):
        """
        A --screenshot file that cannot be created (missing or read-only
        directory, a directory) is a usage error before anything connects.
        """
        base = ["--host", "h", "--user", "u", "--password", "p", "connect", "--headless"]
        e = self.assertRaises(ClientError, self.parse, base + ["--screenshot", "/missing/x.png"])
        self.assertEqual(e.exit_code, errors.EXIT_USAGE)
        self.assertEqual(e.message, "--screenshot /missing/x.png: directory /missing does "
                                    "not exist")
        e = self.assertRaises(ClientError, self.parse, base + ["--screenshot", self.home])
        self.assertIn("is a directory", e.message)
        if os.geteuid() != 0:
            locked = os.path.join(self.home, "ro")
            os.mkdir(locked, 0o500)
            e = self.assertRaises(ClientError, self.parse,
                                  base + ["--screenshot", os.path.join(locked, "x.png")])
            self.assertIn("is not writable", e.message)

    def test_headless_fills_its_screen(self):
        """
        A headless client asks for a full-screen desktop of the geometry of
        its own Xvfb, so the desktop covers the whole screenshot.
        """
        base = ["--host", "h", "--user", "u", "--password", "p", "connect",
                "--headless", "--screenshot", "x.png"]
        s = self.parse(base + ["--geometry", "800x600"])
        self.assertEqual((s.parameters.geometry, s.parameters.fullscreen), ("800x600", True))
        query = dict(s.parameters.query(1))
        self.assertEqual((query["qvd.client.geometry"], query["qvd.client.fullscreen"]),
                         ("800x600", "1"))
        s = self.parse(["--host", "h", "--user", "u", "--password", "p", "connect",
                        "--display", ":3"])
        self.assertFalse(s.parameters.fullscreen)

    def test_bad_values(self):
        """
        A bad link or geometry (from a file or the command line) is a usage
        error naming the value.
        """
        self.write_config("client.link = warp\n")
        base = ["--host", "h", "--user", "u", "--password", "p", "connect", "--display", ":0"]
        e = self.assertRaises(ClientError, self.parse, base)
        self.assertIn("'warp'", e.message)
        self.write_config("client.host.port = many\n")
        e = self.assertRaises(ClientError, self.parse, base)
        self.assertIn("client.host.port", e.message)

    def test_bad_value_names_its_file(self):
        """
        A bad value in ~/.qvd/client.conf, /etc/qvd/client.conf or --config
        FILE is reported with that file's path (never /dev/null); one given
        on the command line with its option.
        """
        user_file = os.path.join(self.home, ".qvd", "client.conf")
        base = ["--host", "h", "--user", "u", "--password", "p", "connect", "--display", ":0"]
        self.write_config("client.host.port = many\n")
        e = self.assertRaises(ClientError, self.parse, base)
        self.assertIn(f"'client.host.port' from {user_file} must be of type int", e.message)
        self.assertNotIn(os.devnull, e.message)
        self.write_config("client.geometry = big\n")
        e = self.assertRaises(ClientError, self.parse, base)
        self.assertIn(f"geometry 'big' must be WIDTHxHEIGHT", e.message)
        self.assertIn(f"(client.geometry in {user_file})", e.message)
        e = self.assertRaises(ClientError, self.parse, base + ["--geometry", "huge"])
        self.assertIn("'huge'", e.message)
        self.assertIn("(--geometry)", e.message)
        other = os.path.join(self.home, "other.conf")
        with open(other, "w") as f:
            f.write("client.timeout.connect = soon\n")
        e = self.assertRaises(ClientError, self.parse, ["--config", other] + base)
        self.assertIn(f"from {other} must be of type float", e.message)
        system = os.path.join(self.home, "system.conf")
        self.patch(cli, "SYSTEM_CONFIG", system)
        with open(system, "w") as f:
            f.write("client.use_ssl = maybe\n")
        e = self.assertRaises(ClientError, self.parse, base)
        self.assertIn(system, e.message)

    def test_tls_options(self):
        """
        Verification is on by default; --insecure or client.ssl.verify=0 turn
        it off; --ca must name an existing file.
        """
        base = ["--host", "h", "--user", "u", "--password", "p"]
        self.assertFalse(self.parse(base + ["list"]).insecure)
        self.assertTrue(self.parse(base + ["--insecure", "list"]).insecure)
        e = self.assertRaises(ClientError, self.parse, base + ["--ca", "/nonexistent.pem", "list"])
        self.assertIn("/nonexistent.pem", e.message)
        self.write_config("client.ssl.verify = 0\n")
        self.assertTrue(self.parse(base + ["list"]).insecure)

    def test_nxproxy_options(self):
        """
        nxproxy path and extra arguments come from the configuration or the
        command line; printing adds cups=631.
        """
        self.write_config("command.nxproxy = /opt/nx/nxproxy\nclient.nxproxy.extra_args = -d 2\n"
                          "client.printing.enable = 1\n")
        s = self.parse(["--host", "h", "--user", "u", "--password", "p", "connect",
                        "--display", ":0"])
        self.assertEqual((s.nxproxy, s.nxproxy_args), ("/opt/nx/nxproxy", ("-d", "2")))
        self.assertIn(("cups", "631"), s.nxproxy_options)
        self.assertTrue(s.parameters.printing)


class RunErrorTests(unittest.TestCase):

    def test_unexpected_error_is_one_line(self):
        """
        An error qvd-client did not foresee is still one line, naming the
        exception, with exit code 1; QVD_DEBUG=1 adds the traceback.
        """
        import io

        from twisted.internet.task import Clock

        async def broken(reactor, settings, output):
            raise RuntimeError("something\nbroke")
        self.patch(cli, "_connect", broken)
        settings = cli.Settings(command="list", host="h", port=1, auth=BasicAuth("u", "p"),
                                user_dir=self.mktemp())
        for environ, lines in (({}, 1), ({"QVD_DEBUG": "1"}, None)):
            output = cli.Output(io.StringIO(), io.StringIO())
            code = self.successResultOf(cli.run(Clock(), settings, output, environ=environ))
            self.assertEqual(code, errors.EXIT_ERROR)
            err = output.err.getvalue()
            if lines:
                self.assertEqual(err, "qvd-client: unexpected error: RuntimeError: something "
                                      "broke (set QVD_DEBUG=1 for the traceback)\n")
            else:
                self.assertIn("Traceback", err)


class TableTests(unittest.TestCase):

    def test_table(self):
        """
        The VM list prints as aligned columns id, name, state, blocked.
        """
        text = cli.format_vm_table([VM(1, "desk1", "running", False),
                                    VM(12, "lab", "stopped", True)])
        self.assertEqual(text.splitlines(), [
            "ID  NAME   STATE    BLOCKED",
            "1   desk1  running  no",
            "12  lab    stopped  yes",
        ])
