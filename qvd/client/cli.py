"""
qvd-client: list your virtual desktops and connect to one.

    qvd-client --host qvd.example.com --user alice@acme list
    qvd-client --host qvd.example.com --user alice@acme connect [--vm 3]
    qvd-client --host H --user U connect --headless --screenshot desk.png --wait 60

Options come from /etc/qvd/client.conf, then ~/.qvd/client.conf (or
--config FILE), then the command line (see qvd/config/defaults/client.conf).
The password comes from --password, $QVD_PASSWORD, or a prompt; --token uses
Bearer authentication instead. The exit codes are in L{qvd.client.errors};
every error is one line on stderr (C{QVD_DEBUG=1} adds the traceback
of an unexpected one).

L{run} is the whole program as a function of a reactor and L{Settings}
(tests call it in-process); L{parse} turns argv + files + environment into
L{Settings}; L{main} joins them.
"""

import argparse
import getpass
import os
import shlex
import sys

import attrs
from twisted.internet import defer, error as net_error, threads
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS

from qvd._cli import ArgumentParser, unexpected
from qvd.config import Config, ConfigError, declared_keys, parse_properties
from qvd.client import errors
from qvd.client.errors import ClientError
from qvd.client.protocol import (
    LINKS, BasicAuth, BearerAuth, ConnectParameters, ParameterError, ProtocolError,
    Upgraded, connect_to_vm_request, list_of_vm_request, parse_vm_list)
from qvd.client.session import ConnectionClosed, L7RProtocol, ResponseTimeout

SYSTEM_CONFIG = "/etc/qvd/client.conf"


@attrs.frozen
class Settings:
    """
    Everything one run of qvd-client needs, already validated.
    """
    command: str
    host: str
    port: int
    auth: object
    user_dir: str
    use_ssl: bool = True
    insecure: bool = False
    ca_file: str = None
    cert_file: str = None
    key_file: str = None
    connect_timeout: float = 15.0
    response_timeout: float = 120.0
    vm_id: int = None
    parameters: ConnectParameters = ConnectParameters()
    display: str = None
    nxproxy: str = "/usr/bin/nxproxy"
    nxproxy_args: tuple = ()
    nxproxy_options: tuple = ()
    slave: bool = False
    accept_timeout: float = 10.0
    headless: bool = False
    screenshot: str = None
    wait: float = 60.0
    interactive: bool = False


def _user_dir(environ):
    home = environ.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".qvd")


def load_config(paths, warn):
    """
    Defaults < each existing file of C{paths}; unknown keys are ignored with
    a warning (the original client's files have many more keys), a bad value
    is a L{ClientError} naming its file.

    @return: (the L{Config}, key -> the file its value came from)
    """
    keys = declared_keys()
    values = {}
    origins = {}
    probe = Config(keys=keys)
    for path in paths:
        if path is None or not os.path.exists(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ClientError(f"cannot read {path}: {e.strerror}", errors.EXIT_USAGE)
        try:
            found = parse_properties(text, path)
        except ConfigError as e:
            raise ClientError(str(e), errors.EXIT_USAGE)
        for name, value in found.items():
            key = probe._declaration(name)
            if key is None or key.component != "client":
                warn(f"warning: ignoring unknown key {name!r} in {path}")
                continue
            try:
                probe.validate({name: value}, path)
            except ConfigError as e:
                raise ClientError(str(e), errors.EXIT_USAGE)
            values[name] = value
            origins[name] = path
    return Config(keys=keys, node=values), origins


def _common_options(parser, suppress):
    default = argparse.SUPPRESS if suppress else None
    add = parser.add_argument
    add("--config", metavar="FILE", default=default,
        help="client configuration file (default ~/.qvd/client.conf)")
    add("--host", "-H", default=default, help="L7R host name or address (client.host.name)")
    add("--port", "-p", type=int, default=default, help="L7R port (client.host.port, 8443)")
    add("--user", "-u", default=default, help="login, user@tenant (client.user.name)")
    add("--password", default=default, help="password (else $QVD_PASSWORD, else a prompt)")
    add("--token", default=default, help="authenticate with this token (Bearer) instead")
    add("--ca", metavar="FILE", default=default,
        help="PEM CA file to verify the server with (default: the system CAs)")
    add("--insecure", action="store_true", default=default,
        help="do not verify the server's certificate (unsafe)")
    add("--timeout", type=float, default=default,
        help="seconds to wait for the server to answer (client.timeout.response)")


def build_parser():
    codes = "\n".join(f"  {code}  {text}" for code, text in sorted(errors.EXIT_CODES.items()))
    parser = ArgumentParser(
        prog="qvd-client", description="Connect to your QVD virtual desktop.",
        epilog="exit codes:\n" + codes, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    listing = sub.add_parser("list", help="list your virtual machines")
    _common_options(listing, suppress=True)
    connect = sub.add_parser("connect", help="connect to a virtual machine")
    _common_options(connect, suppress=True)
    add = connect.add_argument
    add("--vm", type=int, help="id of the VM (default: your only VM, or ask)")
    add("--keyboard", help="keyboard MODEL/LAYOUT (client.keyboard, pc105/us)")
    add("--link", choices=LINKS, help="link speed (client.link)")
    add("--geometry", help="desktop size WIDTHxHEIGHT (client.geometry)")
    add("--fullscreen", action="store_true", default=None, help="full-screen desktop")
    add("--display", help="X display nxproxy draws into (default $DISPLAY)")
    add("--nxproxy", metavar="PATH", help="nxproxy to run (command.nxproxy)")
    add("--nxproxy-args", metavar="ARGS", help="extra nxproxy arguments (client.nxproxy.extra_args)")
    add("--headless", action="store_true",
        help="draw into a private Xvfb, take a screenshot, disconnect")
    add("--screenshot", metavar="FILE", help="with --headless: PNG file to write")
    add("--wait", type=float, default=60.0, metavar="SECONDS",
        help="with --headless: longest wait for the desktop to show (default 60)")
    return parser


def parse(argv, environ=None, stdin_isatty=None, prompt=getpass.getpass, warn=None):
    """
    Turn the command line, the configuration files and the environment into
    L{Settings}; raise L{ClientError} (exit code 2) for anything wrong.
    """
    environ = os.environ if environ is None else environ
    warn = warn or (lambda text: print(text, file=sys.stderr))
    if stdin_isatty is None:
        stdin_isatty = sys.stdin.isatty()
    args = build_parser().parse_args(argv)
    user_dir = _user_dir(environ)
    if args.config is not None and not os.path.exists(args.config):
        raise ClientError(f"configuration file {args.config} does not exist", errors.EXIT_USAGE)
    config, origins = load_config(
        [SYSTEM_CONFIG, args.config or os.path.join(user_dir, "client.conf")], warn)

    def pick(value, key, convert=None):
        if value is not None:
            return value
        try:
            return config.typed(key) if convert is None else convert(config.get(key))
        except (ConfigError, ValueError) as e:   # ${...} that expands to a bad value
            raise ClientError(f"{key} in {origins.get(key, 'the defaults')}: {e}",
                              errors.EXIT_USAGE)

    def origin(key, option, given):
        return option if given is not None else f"{key} in {origins.get(key, 'the defaults')}"

    host = pick(args.host, "client.host.name")
    if not host:
        raise ClientError("no server: pass --host or set client.host.name in "
                          "~/.qvd/client.conf", errors.EXIT_USAGE)
    port = pick(args.port, "client.host.port")
    if not 0 < port < 65536:
        raise ClientError(f"port {port} is not a TCP port (1-65535)", errors.EXIT_USAGE)

    if args.token is not None:
        auth = BearerAuth(args.token)
    else:
        login = pick(args.user, "client.user.name")
        if not login:
            raise ClientError("no user: pass --user user@tenant or set client.user.name",
                              errors.EXIT_USAGE)
        password = args.password
        if password is None:
            password = environ.get("QVD_PASSWORD")
        if password is None:
            if not stdin_isatty:
                raise ClientError("no password: pass --password, set QVD_PASSWORD "
                                  "or run in a terminal to be asked", errors.EXIT_USAGE)
            password = prompt(f"Password for {login} at {host}: ")
        auth = BasicAuth(login, password)

    insecure = bool(args.insecure) or not config.getbool("client.ssl.verify")
    ca_file = args.ca or config.get("client.ssl.ca_file") or None
    if ca_file and not os.path.isfile(ca_file):
        raise ClientError(f"CA file {ca_file} does not exist", errors.EXIT_USAGE)
    cert_file = key_file = None
    if config.getbool("client.ssl.use_cert"):
        cert_file = config.get("client.ssl.cert_file") or None
        key_file = config.get("client.ssl.key_file") or None
        if not cert_file or not os.path.isfile(cert_file):
            raise ClientError(f"client.ssl.use_cert is on but client.ssl.cert_file "
                              f"{cert_file!r} is not a file", errors.EXIT_USAGE)

    settings = dict(
        command=args.command, host=host, port=port, auth=auth, user_dir=user_dir,
        use_ssl=config.getbool("client.use_ssl"), insecure=insecure, ca_file=ca_file,
        cert_file=cert_file, key_file=key_file,
        connect_timeout=config.getfloat("client.timeout.connect"),
        response_timeout=(args.timeout if args.timeout is not None
                          else config.getfloat("client.timeout.response")),
        interactive=stdin_isatty,
    )
    if args.command == "connect":
        chosen = {}
        for field, given, key, option in (
                ("keyboard", args.keyboard, "client.keyboard", "--keyboard"),
                ("link", args.link, "client.link", "--link"),
                ("geometry", args.geometry, "client.geometry", "--geometry")):
            chosen[field] = pick(given, key)
            try:
                ConnectParameters(**{field: chosen[field]})
            except ParameterError as e:
                raise ClientError(f"{e} ({origin(key, option, given)})", errors.EXIT_USAGE)
        parameters = ConnectParameters(
            fullscreen=pick(args.fullscreen, "client.fullscreen"),
            printing=config.getbool("client.printing.enable"),
            audio_redirect=config.getbool("client.audio.enable"), **chosen)
        extra = args.nxproxy_args if args.nxproxy_args is not None else config.get(
            "client.nxproxy.extra_args")
        options = []
        for item in config.getlist("client.nxproxy.options"):
            name, sep, value = item.partition("=")
            if not sep:
                raise ClientError(f"client.nxproxy.options item {item!r} is not name=value",
                                  errors.EXIT_USAGE)
            options.append((name.strip(), value.strip()))
        if parameters.printing:
            options.append(("cups", "631"))
        display = args.display or environ.get("DISPLAY")
        if args.headless:
            display = None
            if not args.screenshot:
                raise ClientError("--headless needs --screenshot FILE", errors.EXIT_USAGE)
            # The private Xvfb is exactly the geometry asked for; nxagent
            # fills it only in full-screen mode (in window mode it ignores
            # the geometry and opens a window of 3/4 of the screen).
            parameters = attrs.evolve(parameters, fullscreen=True)
        elif not display:
            raise ClientError("no X display to draw the desktop into: set DISPLAY, "
                              "pass --display :N, or use --headless", errors.EXIT_LOCAL)
        if args.screenshot and not args.headless:
            raise ClientError("--screenshot only works with --headless", errors.EXIT_USAGE)
        if args.screenshot:
            _check_writable(args.screenshot)
        settings.update(
            vm_id=args.vm, parameters=parameters, display=display,
            nxproxy=args.nxproxy or config.get("command.nxproxy"),
            nxproxy_args=tuple(shlex.split(extra)), nxproxy_options=tuple(options),
            slave=config.getbool("client.slave.enable"),
            accept_timeout=config.getfloat("client.nxproxy.timeout.accept"),
            headless=args.headless, screenshot=args.screenshot, wait=args.wait)
    return Settings(**settings)


def _check_writable(path):
    """A L{ClientError} unless a file C{path} can be created (checked before connecting)."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ClientError(f"--screenshot {path} is a directory; name a .png file",
                          errors.EXIT_USAGE)
    if not os.path.isdir(directory):
        raise ClientError(f"--screenshot {path}: directory {directory} does not exist",
                          errors.EXIT_USAGE)
    if not os.access(directory, os.W_OK):
        raise ClientError(f"--screenshot {path}: directory {directory} is not writable",
                          errors.EXIT_USAGE)


# --- running ------------------------------------------------------------------

class Output:
    """
    Where results (stdout) and progress/errors (stderr) go.
    """

    def __init__(self, out=None, err=None):
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def result(self, text):
        print(text, file=self.out, flush=True)

    def info(self, text):
        print(text, file=self.err, flush=True)


def format_vm_table(vms):
    rows = [("ID", "NAME", "STATE", "BLOCKED")]
    rows += [(str(vm.id), vm.name, vm.state, "yes" if vm.blocked else "no") for vm in vms]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in rows)


def run(reactor, settings, output=None, environ=None, ask=None):
    """
    Run one qvd-client command; fires with the exit code. Errors are
    printed on C{output.err}, never raised.
    """
    output = output or Output()
    d = defer.ensureDeferred(_run(reactor, settings, output, environ, ask))

    def failed(failure):
        if failure.check(ClientError):
            output.info(f"qvd-client: {failure.value.message}")
            return failure.value.exit_code
        output.info(unexpected("qvd-client", failure, environ))
        return errors.EXIT_ERROR
    return d.addErrback(failed)


async def _run(reactor, settings, output, environ, ask):
    xvfb = None
    protocol = None
    creator = None
    try:
        if settings.command == "connect":
            _check_nxproxy(settings.nxproxy)
            if settings.headless:
                from qvd.client.headless import Xvfb
                xvfb = Xvfb(reactor, geometry=settings.parameters.geometry)
                xvfb_trigger = reactor.addSystemEventTrigger("before", "shutdown", xvfb.stop)
                display = await xvfb.start()
                settings = attrs.evolve(settings, display=display)
                output.info(f"headless: Xvfb on display {display}")
        protocol, creator = await _connect(reactor, settings, output)
        response = await _request(protocol, list_of_vm_request(settings.auth), settings,
                                  creator)
        if response.code != 200:
            raise errors.error_for_response("list", response, settings.host,
                                            token=isinstance(settings.auth, BearerAuth))
        try:
            vms = parse_vm_list(response.body)
        except ProtocolError as e:
            raise ClientError(f"{settings.host} sent a bad VM list: {e}", errors.EXIT_NETWORK)
        if settings.command == "list":
            output.result(format_vm_table(vms))
            return errors.EXIT_OK
        vm_id = await _choose_vm(vms, settings, output, ask)
        if protocol.state != "idle" or (response.headers.get("Connection") or "").lower() == "close":
            # The server did not keep the connection open: use a new one.
            protocol.close()
            protocol, creator = await _connect(reactor, settings, output)
        output.info(f"connecting to VM {vm_id} at {settings.host}:{settings.port}")
        request = connect_to_vm_request(settings.auth, vm_id, settings.parameters)
        progress = _Progress(output)
        try:
            outcome = await protocol.request(request, progress)
        except ConnectionClosed as e:
            if progress.seen:
                raise _request_error(e, settings, creator) from None
            # Closed before answering anything (an idle connection the server
            # dropped): the request was not processed; try once more.
            protocol.close()
            protocol, creator = await _connect(reactor, settings, output)
            outcome = await _request(protocol, request, settings, creator, progress)
        except (ResponseTimeout, ProtocolError) as e:
            raise _request_error(e, settings, creator) from None
        if not isinstance(outcome, Upgraded):
            raise errors.error_for_response("connect", outcome, settings.host,
                                            token=isinstance(settings.auth, BearerAuth))
        return await _run_session(reactor, protocol, outcome, settings, output, environ)
    finally:
        if protocol is not None:
            protocol.close()
        if xvfb is not None:
            reactor.removeSystemEventTrigger(xvfb_trigger)
            await xvfb.stop()


def _check_nxproxy(path):
    import shutil
    if shutil.which(path) is None:
        raise ClientError(f"nxproxy not found at {path!r}: install nxproxy or pass "
                          "--nxproxy PATH (command.nxproxy)", errors.EXIT_LOCAL)


async def _connect(reactor, settings, output):
    endpoint = HostnameEndpoint(reactor, settings.host, settings.port,
                                timeout=settings.connect_timeout)
    creator = None
    if settings.use_ssl:
        from qvd.client.tls import ClientTLS
        if settings.insecure:
            output.info(f"warning: not verifying the certificate of {settings.host} "
                        "(--insecure); anyone on the path can read your session")
        try:
            creator = ClientTLS(settings.host, ca_file=settings.ca_file,
                                insecure=settings.insecure, cert_file=settings.cert_file,
                                key_file=settings.key_file)
        except Exception as e:
            raise ClientError(f"cannot set up TLS: {e}", errors.EXIT_USAGE)
        endpoint = wrapClientTLS(creator, endpoint)
    protocol = L7RProtocol(reactor, response_timeout=settings.response_timeout)
    where = f"{settings.host}:{settings.port}"
    try:
        await connectProtocol(endpoint, protocol)
    except (net_error.ConnectError, net_error.DNSLookupError) as e:
        raise ClientError(f"cannot connect to {where}: {_reason(e)}", errors.EXIT_NETWORK)
    timer = reactor.callLater(settings.connect_timeout, protocol.transport.abortConnection)
    try:
        await protocol.ready
    except Exception as e:
        explained = creator.explain(settings.port) if creator is not None else None
        if explained:
            raise ClientError(explained, errors.EXIT_NETWORK)
        if not timer.active():
            raise ClientError(f"TLS handshake with {where} timed out after "
                              f"{settings.connect_timeout:g} s", errors.EXIT_NETWORK)
        raise ClientError(f"TLS handshake with {where} failed: {_reason(e)} "
                          f"(is {where} the L7R's TLS port?)", errors.EXIT_NETWORK)
    finally:
        if timer.active():
            timer.cancel()
    return protocol, creator


def _reason(e):
    """
    A short human text for a connection failure.
    """
    from twisted.python.failure import Failure
    if isinstance(e, Failure):
        e = e.value
    if isinstance(e, ConnectionClosed):
        e = e.reason.value
    text = str(e).strip()
    if type(e).__module__.startswith("OpenSSL"):
        text = "; ".join(item[-1] for item in e.args[0] if item) if e.args and isinstance(
            e.args[0], list) else text
    return text or type(e).__name__


async def _request(protocol, data, settings, creator, on_interim=None):
    try:
        return await protocol.request(data, on_interim)
    except (ConnectionClosed, ResponseTimeout, ProtocolError) as e:
        raise _request_error(e, settings, creator) from None


def _request_error(e, settings, creator):
    """
    The ClientError for a request that failed with C{e}.
    """
    where = f"{settings.host}:{settings.port}"
    if isinstance(e, ConnectionClosed):
        explained = creator.explain(settings.port) if creator is not None else None
        if explained:
            return ClientError(explained, errors.EXIT_NETWORK)
        return ClientError(f"{where} closed the connection: {_reason(e.reason.value)}",
                           errors.EXIT_NETWORK)
    if isinstance(e, ResponseTimeout):
        return ClientError(f"{where} stopped answering: {e}", errors.EXIT_NETWORK)
    return ClientError(f"{where} does not speak the QVD protocol: {e}", errors.EXIT_NETWORK)


async def _choose_vm(vms, settings, output, ask):
    if settings.vm_id is not None:
        return settings.vm_id
    if not vms:
        raise ClientError("you have no virtual machines; ask your administrator",
                          errors.EXIT_VM_GONE)
    if len(vms) == 1:
        return vms[0].id
    listing = format_vm_table(vms)
    if not settings.interactive:
        raise ClientError("you have several virtual machines; choose one with --vm ID:\n"
                          + listing, errors.EXIT_USAGE)
    output.info(listing)
    ids = {vm.id for vm in vms}
    ask = ask or (lambda: threads.deferToThread(input, "VM id to connect to: "))
    while True:
        answer = (await ask()).strip()
        if answer.isdigit() and int(answer) in ids:
            return int(answer)
        output.info(f"{answer!r} is not one of: {', '.join(str(i) for i in sorted(ids))}")


class _Progress:
    """
    Shows the X-QVD-VM-Info of each 102 line; remembers whether any came.
    """

    def __init__(self, output):
        self.output = output
        self.seen = False

    def __call__(self, interim):
        self.seen = True
        if interim.info:
            self.output.info(interim.info)


async def _run_session(reactor, protocol, outcome, settings, output, environ):
    from qvd.client.nx import NxproxySettings, NxSession
    output.info("connected; starting nxproxy")
    nx = NxproxySettings(
        display=settings.display, command=settings.nxproxy,
        extra_args=settings.nxproxy_args, options=settings.nxproxy_options,
        slave=settings.slave, accept_timeout=settings.accept_timeout)
    session = NxSession(reactor, protocol, nx, settings.user_dir,
                        slave_key=outcome.slave_key, environ=environ,
                        on_status=output.info)
    ended = session.run()

    def on_shutdown():
        # Ctrl-C / SIGTERM: suspend the session and wait for nxproxy to go.
        session.disconnect()
        waiting = defer.Deferred()
        ended.addBoth(lambda result: (waiting.callback(None), result)[1])
        return waiting
    trigger = reactor.addSystemEventTrigger("before", "shutdown", on_shutdown)
    try:
        if settings.headless:
            return await _headless(reactor, session, ended, settings, output)
        result = await ended
    finally:
        reactor.removeSystemEventTrigger(trigger)
    said = " | ".join(result.nxproxy_said)
    if result.failed:
        status = ("was killed by a signal" if result.nxproxy_status is None
                  else f"exited with status {result.nxproxy_status}")
        raise ClientError(f"nxproxy {status}; the session is suspended"
                          + (f"; nxproxy said: {said}" if said else ""), result.exit_code)
    output.info(f"session ended (closed by {result.closed_by})")
    if result.closed_by == "nxproxy" and said:
        output.info("nxproxy said: " + said)
    return result.exit_code


async def _headless(reactor, session, ended, settings, output):
    from qvd.client._x11 import write_png
    from qvd.client.headless import threaded_grab, wait_for_picture
    waiter = defer.Deferred()

    def wake(value, what):
        if not waiter.called:
            waiter.callback(what)
        return value
    session.started.addCallback(wake, "started")
    ended.addBoth(wake, "ended")
    if await waiter == "ended":
        result = await ended  # raises the session's ClientError, if any
        raise ClientError(f"the session ended (closed by {result.closed_by}) "
                          "before the desktop showed", errors.EXIT_ERROR)
    image = await wait_for_picture(reactor, threaded_grab(reactor), settings.display,
                                   settings.wait, stop=lambda: ended.called)
    path = os.path.abspath(settings.screenshot)
    try:
        write_png(path, image)
    except OSError as e:
        session.disconnect()
        await ended
        raise ClientError(f"cannot write the screenshot {path}: {e.strerror}", errors.EXIT_LOCAL)
    if image.is_black():
        output.info(f"warning: the screen was still black after {settings.wait:g} s")
    output.result(path)
    session.disconnect()
    result = await ended
    output.info(f"disconnected (session suspended; closed by {result.closed_by})")
    return errors.EXIT_OK


def main(argv=None):
    """
    The qvd-client console script.
    """
    from twisted.internet.task import react
    try:
        settings = parse(sys.argv[1:] if argv is None else argv)
    except ClientError as e:
        print(f"qvd-client: {e.message}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:
        print(unexpected("qvd-client", e), file=sys.stderr)
        sys.exit(errors.EXIT_ERROR)

    async def _main(reactor):
        code = await run(reactor, settings)
        if code:
            raise SystemExit(code)
    react(lambda reactor: defer.ensureDeferred(_main(reactor)))
