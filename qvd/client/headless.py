"""
Headless sessions: a private Xvfb for nxproxy to draw into, and a screenshot.

    xvfb = Xvfb(reactor)
    display = await xvfb.start()                     # ":7", a free display
    image = await wait_for_picture(reactor, threaded_grab(reactor), display, wait=60)
    write_png("desktop.png", image)
    await xvfb.stop()

Xvfb picks its own free display (C{-displayfd}), runs with a black root
(C{-br}) so "something other than black" means the remote desktop arrived;
then we wait for the screen to stop changing before the screenshot.
The X11 calls run in threads (L{qvd.client._x11} is blocking).
"""

import shutil

from twisted.internet import defer, threads
from twisted.internet.protocol import ProcessProtocol

from qvd.client._x11 import X11Connection, X11Error
from qvd.client.errors import EXIT_LOCAL, ClientError


class _XvfbProcess(ProcessProtocol):
    def __init__(self):
        self.display = defer.Deferred()
        self.ended = defer.Deferred()
        self._fd3 = b""
        self.tail = []

    def childDataReceived(self, fd, data):
        if fd == 3:
            self._fd3 += data
            if b"\n" in self._fd3 and not self.display.called:
                self.display.callback(":" + self._fd3.split(b"\n")[0].decode().strip())
        else:
            self.tail.extend(data.decode("utf-8", "replace").splitlines())
            del self.tail[:-10]

    def processEnded(self, reason):
        if not self.display.called:
            self.display.errback(ClientError(
                "Xvfb exited before it was ready: " + " | ".join(self.tail[-3:]), EXIT_LOCAL))
        self.ended.callback(None)


class Xvfb:
    """
    A private Xvfb on a free display.
    """

    def __init__(self, reactor, geometry="1024x768", command="Xvfb", start_timeout=10.0):
        self.reactor = reactor
        self.geometry = geometry
        self.command = command
        self.start_timeout = start_timeout
        self._process = None
        self._transport = None

    @defer.inlineCallbacks
    def start(self):
        """
        Start Xvfb; fires with its display name (C{":N"}).
        """
        path = shutil.which(self.command)
        if path is None:
            raise ClientError(
                f"{self.command} not found; install the xvfb package for --headless", EXIT_LOCAL)
        self._process = _XvfbProcess()
        argv = [path, "-displayfd", "3", "-screen", "0", f"{self.geometry}x24",
                "-nolisten", "tcp", "-br", "-noreset"]
        self._transport = self.reactor.spawnProcess(
            self._process, path, argv, env=None,
            childFDs={0: "w", 1: "r", 2: "r", 3: "r"})
        timer = self.reactor.callLater(self.start_timeout, self._process.display.cancel)
        try:
            display = yield self._process.display
        except defer.CancelledError:
            yield self.stop()
            raise ClientError(f"Xvfb did not start within {self.start_timeout:g} s", EXIT_LOCAL)
        finally:
            if timer.active():
                timer.cancel()
        return display

    def stop(self):
        """
        Stop Xvfb; fires when it has exited.
        """
        if self._process is None or self._process.ended.called:
            return defer.succeed(None)
        try:
            self._transport.signalProcess("TERM")
        except Exception:
            pass
        return self._process.ended


def grab(display):
    """
    The root window of C{display} as an L{RGBImage} (blocking).
    """
    with X11Connection.open(display) as x:
        return x.root_image()


def threaded_grab(reactor):
    """
    A function display -> Deferred(RGBImage) that grabs in the reactor's threads.
    """
    def grab_async(display):
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), grab, display)
    return grab_async


@defer.inlineCallbacks
def wait_for_picture(clock, grab_async, display, wait, poll=0.5, settle=1.0,
                     max_settle=10.0, stop=lambda: False):
    """
    Poll C{display} until it shows something other than black, then until
    it stops changing (two grabs C{settle} seconds apart are equal, for at
    most C{max_settle} seconds), so that the desktop has finished drawing.
    Gives up after C{wait} seconds in all or when C{stop()} is true; fires
    with the last L{RGBImage}, or fails with L{ClientError} if the display
    could never be read.
    """
    deadline = clock.seconds() + wait
    image = None
    while True:
        try:
            image = yield grab_async(display)
        except X11Error:
            pass
        if image is not None and not image.is_black():
            break
        if clock.seconds() >= deadline or stop():
            if image is None:
                raise ClientError(f"cannot read the screen of {display}", EXIT_LOCAL)
            return image
        yield _sleep(clock, poll)
    settle_deadline = min(deadline, clock.seconds() + max_settle)
    while clock.seconds() < settle_deadline and not stop():
        yield _sleep(clock, settle)
        try:
            newer = yield grab_async(display)
        except X11Error:
            break
        if newer.rgb == image.rgb:
            return newer
        image = newer
    return image


def _sleep(clock, seconds):
    d = defer.Deferred()
    clock.callLater(seconds, d.callback, None)
    return d
